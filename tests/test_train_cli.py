"""train.py end to end, in subprocesses: exact resume, errors, the workdir's contents."""

import json
import os

import numpy as np
import pytest
from conftest import ROOT, device_env, read_metrics, run_python, train


def losses(workdir):
    return [(m["step"], m["train_loss"], m.get("val_loss")) for m in read_metrics(workdir)]


def final_params(workdir):
    import jax

    from transformer.store.rundir import load_params

    return jax.tree.leaves(load_params(workdir)[1])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    proc = train(workdir)
    return workdir, proc


def test_workdir_holds_config_tokenizer_checkpoints_and_metrics(straight_run):
    workdir, proc = straight_run
    assert {"config.json", "tokenizer.json", "checkpoints", "metrics.jsonl"} <= set(
        os.listdir(workdir)
    )
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for key in ("train_loss", "learning_rate", "tokens_per_sec", "mfu"):
        assert all(isinstance(r[key], float) for r in records)
    assert "val_loss" in records[1] and "val_loss" in records[3]
    assert records[-1]["val_loss"] < records[1]["val_loss"] < np.log(64)
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["model"]["vocab_size"] % 64 == 0 and config["train"]["num_steps"] == 20
    assert "sample" in proc.stdout  # a generated sample is printed at the end


def test_resume_in_a_new_process_is_exact(straight_run, tmp_path):
    workdir, _ = straight_run
    split = str(tmp_path / "split")
    first = train(split, "--config.train.stop_at_step=10")
    assert "stopped at train.stop_at_step=10" in first.stdout
    assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == ["10"]
    train(split)  # the same command again resumes from step 10
    assert losses(split) == losses(workdir)  # bit for bit, validation included
    for a, b in zip(final_params(split), final_params(workdir), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", ["rbg", pytest.param("unsafe_rbg", marks=pytest.mark.slow)])
def test_each_prng_impl_trains_and_resumes_exactly(straight_run, tmp_path, impl):
    """train.prng_impl makes the keys of initialisation and dropout; JAX's default generator
    (JAX_DEFAULT_PRNG_IMPL) has no say. A run resumed under another generator is refused."""
    flags = (f"--config.train.prng_impl={impl}", "--config.model.dropout_rate=0.1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, *flags)
    train(split, *flags, "--config.train.stop_at_step=10")
    other_default = device_env(1, JAX_DEFAULT_PRNG_IMPL="unsafe_rbg" if impl == "rbg" else "rbg")
    train(split, *flags, env=other_default)
    assert losses(split) == losses(straight)  # bit for bit
    for a, b in zip(final_params(split), final_params(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    assert json.loads((split / "config.json").read_text())["train"]["prng_impl"] == impl
    # Another generator draws other parameters and dropout masks.
    threefry = tmp_path / "threefry"
    train(threefry, "--config.model.dropout_rate=0.1")
    assert losses(threefry)[0] != losses(straight)[0]

    proc = train(split, "--config.train.num_steps=30", check=False)  # threefry, the default
    assert proc.returncode == 2
    assert f"was trained with train.prng_impl='{impl}', not 'threefry'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_data_parallel_run_matches_single_device(straight_run, tmp_path):
    workdir, _ = straight_run
    dp = str(tmp_path / "dp")
    train(dp, devices=8)
    for (s1, l1, v1), (s8, l8, v8) in zip(losses(workdir), losses(dp), strict=True):
        assert s1 == s8
        np.testing.assert_allclose(l8, l1, atol=1e-5)
        if v1 is not None:
            np.testing.assert_allclose(v8, v1, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.train.bogus=1"], "unknown config field `train.bogus`"),
        (["--config.train.num_steps=ten"], "num_steps"),
        (["--config.model.num_heads=5"], "model.d_model=32: must be divisible by model.num_heads"),
        (["--config.mesh.data=3"], "mesh data=3"),
        (["--config.data.corpus=text:/nonexistent/*.txt"], "/nonexistent"),
        (["--config.train.schedule=linear"], "train.schedule"),
        (["--config.train.prng_impl=mt19937"], "train.prng_impl='mt19937': must be one of"),
        (["--config.data.corpus=bible_en_de"], "is a translation corpus but the model is a 2-"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, overrides, message):
    proc = train(str(tmp_path / "bad"), *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr


def test_resuming_with_another_model_is_refused(straight_run, tmp_path):
    workdir, _ = straight_run
    proc = train(workdir, "--config.model.d_model=64", check=False)
    assert proc.returncode == 2
    assert "holds a run of a different model (model.d_model: 32 -> 64)" in proc.stderr


def test_a_finished_run_says_so_and_changes_nothing(straight_run):
    workdir, _ = straight_run
    before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
    proc = train(workdir)
    assert proc.returncode == 0
    assert (
        f"the run in {workdir} already finished at step 20 (train.num_steps=20); raise "
        "--config.train.num_steps to continue training it"
    ) in proc.stdout
    assert "sample" not in proc.stdout  # no second sample, no new event file, nothing rewritten
    after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
    assert after == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.data.corpus=text:/nonexistent/*.txt"], "/nonexistent"),
        (["--config.mesh.tensor=3"], "does not divide the 1 devices"),  # after the tokenizer
    ],
)
def test_a_failed_start_leaves_the_workdir_as_it_found_it(tmp_path, overrides, message):
    fresh = tmp_path / "fresh"
    proc = train(str(fresh), *overrides, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not fresh.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    proc = train(str(existing), *overrides, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert os.listdir(existing) == ["notes.txt"]


def test_loading_a_run_from_python_prints_no_library_warnings(straight_run):
    from transformer import load_run
    from transformer.inference import generate

    workdir, _ = straight_run
    code = (
        "from transformer import load_run\n"
        "from transformer.inference import generate\n"
        f"cfg, params, tokenizer = load_run({workdir!r})\n"
        "print(repr(generate(cfg, params, tokenizer, ['RO'], max_new_tokens=5, temperature=0)[0]))"
    )
    proc = run_python("-c", code, check=True)
    assert "WARNING" not in proc.stderr, proc.stderr
    # A fresh process gives the greedy text this one does.
    cfg, params, tokenizer = load_run(workdir)
    expected = generate(cfg, params, tokenizer, ["RO"], max_new_tokens=5, temperature=0)[0]
    assert proc.stdout.strip() == repr(expected)


def test_sample_command_continues_a_prompt(straight_run):
    workdir, _ = straight_run
    cmd = ["-m", "transformer.sample", f"--workdir={workdir}", "--prompt=ROMEO:"]
    cmd += ["--max_new_tokens=8", "--temperature=0", "--num_samples=2"]
    proc = run_python(*cmd, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0::2] == ["--- sample 1 ---", "--- sample 2 ---"]
    greedy = lines[1::2]  # temperature 0: the same continuation twice, 8 tokens after the prompt
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO:") and len(greedy[0]) == 14


# Configs that need a path of the user's (the message names the field to set).
NEEDS_A_PATH = {"smollm_finetune.py": "data.tokenizer_path", "sft_lora.py": "data.tokenizer_path"}


@pytest.mark.parametrize(
    "name", sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py"))
)
def test_every_shipped_config_is_valid(name):
    from transformer.errors import ConfigError
    from transformer.train.config import RunConfig, load_config_file

    config = load_config_file(os.path.join(ROOT, "configs", name))
    if name in NEEDS_A_PATH:
        with pytest.raises(ConfigError, match=NEEDS_A_PATH[name]):
            RunConfig.from_any(config)
        return
    model_cfg = RunConfig.from_any(config).model_config(65)
    assert model_cfg.max_len >= config.data.seq_len
