"""The command line of train.py, transformer.sample and transformer.translate, in subprocesses:
--help and its aliases, and bad config values refused in one line before anything is written.
Each run here stops before JAX compiles anything."""

import os

import pytest
from conftest import ROOT, run_python, train

from transformer.train.config import TrainConfig, all_field_names, field_docs, load_config_file

HELP_FLAGS = ["--help", "-h", "--helpshort", "--helpfull"]


def command(*args):
    return run_python(*args, timeout=120)


def tiny_config():
    return load_config_file(ROOT / "configs" / "tiny.py")


@pytest.mark.parametrize("help_flag", HELP_FLAGS)
def test_train_help_lists_every_config_field_with_its_value_and_comment(tmp_path, help_flag):
    proc = train(tmp_path / "run", help_flag, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: python train.py")
    assert "Train a model, or resume the run in --workdir." in out  # the module's docstring
    for flag in ("--config", "--workdir", "--[no]debug", "--coordinator_address"):
        assert f"\n  {flag} " in out
    assert "configs/tiny.py" in out
    # The value is configs/tiny.py's, not the dataclass default; the comment is the field's.
    steps = tiny_config().train.num_steps
    assert steps != TrainConfig.num_steps
    line = next(x for x in out.splitlines() if x.strip().startswith("--config.train.num_steps="))
    assert line.split()[0] == f"--config.train.num_steps={steps}"
    assert line.endswith(field_docs(TrainConfig)["num_steps"])
    for name in all_field_names():
        assert f"  --config.{name}=" in out, name
    assert not (tmp_path / "run").exists()


def test_train_help_shows_the_overrides_and_the_default_config_file(tmp_path):
    proc = command("train.py", "--config.train.num_steps=7", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "  --config.train.num_steps=7 " in proc.stdout
    assert "configs/default.py" in proc.stdout


@pytest.mark.parametrize("help_flag", ["--help", "-h"])
@pytest.mark.parametrize(
    "module, flags",
    [
        ("transformer.sample", ["workdir", "prompt", "max_new_tokens", "temperature", "top_k"]),
        ("transformer.translate", ["workdir", "input", "output", "beam_size", "alpha", "[no]bleu"]),
    ],
)
def test_sample_and_translate_help_list_their_flags(module, flags, help_flag):
    proc = command("-m", module, help_flag)  # no --workdir, although it is required
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {module} --workdir=... [flags]")
    for flag in flags:
        assert f"\n  --{flag} " in proc.stdout, flag
    assert "(required)" in proc.stdout and "(default: " in proc.stdout
    assert "--config." not in proc.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.learning_rate=-0.001", "train.learning_rate=-0.001: must be positive"),
        ("--config.train.batch_size=0", "train.batch_size=0: must be at least 1"),
        (
            "--config.train.num_stesp=10",
            "unknown config field `train.num_stesp`; did you mean `train.num_steps`?",
        ),
        (
            "--config.trian.num_steps=10",
            "unknown config field `trian.num_steps`; did you mean `train.num_steps`?",
        ),
        ("--config.data.tokenizer=wordpiece", "data.tokenizer='wordpiece': must be one of"),
        ("--config.train.schedule=linear", "train.schedule='linear': must be one of"),
        ("--config.model.dropout_rate=1.5", "model.dropout_rate=1.5: must be in [0, 1)"),
        ("--config.mesh.tensor=0", "mesh.tensor=0: must be a positive size"),
        ("--config.checkpoint.init_from=/no/such/dir", "checkpoint.init_from='/no/such/dir'"),
        ("--config.train.num_steps=abc", "config field `train.num_steps` takes an integer"),
        ("--config.train.learning_rate=fast", "config field `train.learning_rate` takes a number"),
        ("--config=configs/no_such_config.py", "no config file configs/no_such_config.py"),
    ],
)
def test_bad_value_is_one_line_and_exit_code_2_before_anything_is_written(
    tmp_path, override, message
):
    workdir = tmp_path / "run"
    proc = train(workdir, override, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("train.py: error: ") and message in lines[0], lines[0]
    if "unknown" in message:  # nothing after the suggestion
        assert lines[0] == f"train.py: error: {message}"
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""  # refused before the run starts
    assert not workdir.exists() and os.listdir(tmp_path) == []
