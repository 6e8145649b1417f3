"""The lm-evaluation-harness backend against lm-eval's own `hf` backend on the exported model.

One tiny character-level GPT is trained (its vocabulary padded: 80 tokens in 128 rows) and
exported with its tokenizer; three tasks over local jsonl files (multiple choice, rolling
log-likelihood, generation) run offline through the `hf` backend on the export and through ours
on the workdir and on the export. Log-likelihoods agree to 1e-3 and accuracies exactly.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, device_env, read_metrics, run_python, train

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from transformer.evaluation import harness  # noqa: E402
from transformer.evaluation.harness import TransformerLM  # noqa: E402
from transformer.evaluation.scoring import Scorer  # noqa: E402
from transformer.evaluation.tasks import evaluate_tasks  # noqa: E402
from transformer.hf import export_hf  # noqa: E402
from transformer.hf.tokenizer import export_tokenizer  # noqa: E402
from transformer.inference import generate  # noqa: E402
from transformer.model.sharding import make_mesh  # noqa: E402
from transformer.store.rundir import load_run  # noqa: E402

TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]
WORDS = ["ROMEO", "JULIET", "KING", "QUEEN", "lord", "love", "death", "night", "day", "sword"]
VERSE = "ROMEO: But soft, what light through yonder window breaks? It is the east. "


def _task(name: str, data: str, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"
    )


def write_tasks(directory):
    """Three offline tasks: multiple choice, loglikelihood_rolling, generate_until."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    mc = []
    for i in range(12):  # an English word among letter salad, mostly where the answer says
        choices = [" " + "".join(rng.choice(list("qxzjvkw"), 4)) for _ in range(3)]
        choices.insert(i % 4, " " + WORDS[i % len(WORDS)].lower())
        mc.append({"question": f"{WORDS[i % 3]}:\nThe", "choices": choices, "answer": i % 4})
    for doc in mc[::4]:
        doc["answer"] = (doc["answer"] + 1) % 4
    docs = {
        "mc": mc,
        "text": [{"text": VERSE * (i + 1)} for i in range(3)],  # 1-3 windows of 32 tokens
        "gen": [{"prompt": p, "target": " x"} for p in ["ROMEO:", "JULIET:\nO", "KING"]],
    }
    for name, rows in docs.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bodies = {
        "tiny_mc": (
            "mc",
            "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
            "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        ),
        "tiny_ppl": (
            "text",
            "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
            "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        ),
        "tiny_gen": (
            "gen",
            "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
            "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['the']\n"
            "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
        ),
    }
    for name, (data, body) in bodies.items():
        (directory / f"{name}.yaml").write_text(_task(name, directory / f"{data}.jsonl", body))
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    workdir, hf_dir = root / "run", root / "hf"
    # Long enough (same seconds: the steps are tiny) that greedy text is words, not one letter.
    steps = "--config.train.num_steps=400"
    train(
        workdir, steps, "--config.checkpoint.every_steps=400", "--config.train.eval_every_steps=400"
    )
    cfg, params, tokenizer = load_run(workdir)
    assert cfg.vocab_size > cfg.num_classes == tokenizer.vocab_size  # padded rows exist
    export_hf(cfg, params, hf_dir, vocab_size=tokenizer.vocab_size)
    export_tokenizer(tokenizer, hf_dir, max_len=cfg.max_len)
    tasks = write_tasks(root / "tasks")
    manager = TaskManager(include_path=str(tasks), include_defaults=False)

    def run(model, model_args=""):
        return lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=TASKS, task_manager=manager, batch_size=8
        )

    return {
        "workdir": workdir,
        "hf_dir": hf_dir,
        "tasks": tasks,
        "model": (cfg, params, tokenizer),
        # logits_cache=False: with it, the hf backend shares one forward pass among requests
        # whose tokens but one agree, and in a batch of rolling windows that share their tokens
        # scores one of them wrongly (-268.292 here; batch_size=1 and ours: -268.326).
        "hf": run("hf", f"pretrained={hf_dir},dtype=float32,device=cpu,logits_cache=False"),
        # By name, as `lm_eval --model transformer` in a process that imported our module.
        "workdir_run": run("transformer", f"workdir={workdir}"),
        "hf_dir_run": run(TransformerLM(hf_dir=str(hf_dir), batch_size=8)),
    }


def responses(results, task):
    """Each request's response, in document order."""
    return [[r for r in sample["resps"]] for sample in results["samples"][task]]


@pytest.mark.parametrize("ours", ["workdir_run", "hf_dir_run"])
def test_multiple_choice_matches_hf_backend(setup, ours):
    theirs, mine = setup["hf"], setup[ours]
    pairs = list(zip(responses(theirs, "tiny_mc"), responses(mine, "tiny_mc"), strict=True))
    assert len(pairs) == 12
    differences = []
    for their_doc, my_doc in pairs:
        for [(their_lp, their_greedy)], [(my_lp, my_greedy)] in zip(their_doc, my_doc, strict=True):
            differences.append(abs(their_lp - my_lp))
            assert my_greedy == their_greedy
    assert max(differences) < 1e-3, max(differences)
    assert 0 < theirs["results"]["tiny_mc"]["acc,none"] < 1  # the choices are not all alike
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]


@pytest.mark.parametrize("ours", ["workdir_run", "hf_dir_run"])
def test_rolling_loglikelihood_matches_hf_backend(setup, ours):
    theirs = [doc[0][0] for doc in responses(setup["hf"], "tiny_ppl")]
    mine = [doc[0][0] for doc in responses(setup[ours], "tiny_ppl")]
    np.testing.assert_allclose(mine, theirs, atol=1e-3, rtol=0)
    assert len(set(np.round(mine))) == 3  # texts of 1, 2 and 3 windows: different sums
    ppl = "bits_per_byte,none"
    assert setup[ours]["results"]["tiny_ppl"][ppl] == pytest.approx(
        setup["hf"]["results"]["tiny_ppl"][ppl], abs=1e-5
    )


def test_generation_matches_hf_backend_and_generate(setup):
    theirs = [doc[0][0] for doc in responses(setup["hf"], "tiny_gen")]
    mine = [doc[0][0] for doc in responses(setup["workdir_run"], "tiny_gen")]
    assert mine == theirs
    cfg, params, tokenizer = setup["model"]
    prompts = ["ROMEO:", "JULIET:\nO", "KING"]
    expected = generate(cfg, params, tokenizer, prompts, max_new_tokens=8, temperature=0.0)
    assert mine == [text.split("the")[0] for text in expected]
    assert all(mine) and any(len(text) < 8 for text in mine)  # cut at 'the' or 8 tokens


def test_generate_until_stops_at_until_strings(setup):
    cfg, params, tokenizer = setup["model"]
    lm = TransformerLM.from_model(cfg, params, tokenizer, batch_size=8)
    prompts = ["ROMEO:", "KING RICHARD:", "To be"]
    full = generate(cfg, params, tokenizer, prompts, max_new_tokens=12, temperature=0.0)
    stops = [text[3] for text in full]  # a character the greedy text reaches
    requests = [
        Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 12}), 0)
        for p, s in zip(prompts, stops, strict=True)
    ]
    texts = lm.generate_until(requests)
    assert texts == [text.split(stop)[0] for text, stop in zip(full, stops, strict=True)]
    assert all(len(t) <= 3 for t in texts)
    short = lm.generate_until([Instance("generate_until", {}, ("ROMEO:", {"max_gen_toks": 3}), 0)])
    assert short == [full[0][:3]]


def test_sharded_and_bfloat16_scores(setup):
    cfg, params, tokenizer = setup["model"]
    requests = [(tokenizer.encode(VERSE[:n]), tokenizer.encode(VERSE[n : n + 9])) for n in (3, 30)]
    requests.append((tokenizer.encode(VERSE * 2), tokenizer.encode(" light")))  # left-truncated
    one = Scorer(cfg, params, make_mesh(1, 1, 1, jax.devices()[:1]), batch_size=2)
    sharded = TransformerLM(workdir=str(setup["workdir"]), fsdp=2, tensor=2, batch_size=2).scorer
    assert dict(sharded.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharded.batch_size == 4  # a multiple of data x fsdp
    embedding = sharded.params["embed"]["token_embedding"]
    assert embedding.sharding.mesh == sharded.mesh and not embedding.sharding.is_fully_replicated
    reference = one.loglikelihoods(requests)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(
        sharded.loglikelihoods(requests), reference, strict=True
    ):
        assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy
    bf16 = TransformerLM.from_model(cfg, params, tokenizer, dtype="bfloat16", batch_size=8)
    assert bf16.cfg.dtype == "bfloat16"
    low = [lp for lp, _ in bf16.scorer.loglikelihoods(requests)]
    np.testing.assert_allclose(low, [lp for lp, _ in reference], rtol=5e-2)
    assert low != [lp for lp, _ in reference]


def test_evaluate_tasks_for_training(setup):
    cfg, params, tokenizer = setup["model"]
    metrics = evaluate_tasks(
        cfg,
        params,
        tokenizer,
        ["tiny_mc"],
        include_path=str(setup["tasks"]),
        limit=12,
        mesh=make_mesh(),
        batch_size=8,
    )
    hf = setup["hf"]["results"]["tiny_mc"]
    assert metrics == {
        "eval/tiny_mc/acc": pytest.approx(hf["acc,none"]),
        "eval/tiny_mc/acc_norm": pytest.approx(hf["acc_norm,none"]),
    }


def test_training_logs_task_metrics_at_evaluation_steps(setup, tmp_path):
    """train.eval_tasks: lm-eval's metrics of the step's parameters in metrics.jsonl and
    TensorBoard at every evaluation; unknown tasks stop the run before it starts."""
    env = device_env(1, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    tasks = [
        "--config.train.eval_tasks=tiny_mc",
        f"--config.train.eval_tasks_path={setup['tasks']}",
        "--config.train.eval_tasks_limit=12",
    ]
    workdir = tmp_path / "run"
    train(
        workdir, *tasks, "--config.train.num_steps=4", "--config.train.eval_every_steps=2", env=env
    )
    logged = {m["step"]: m for m in read_metrics(workdir) if "eval/tiny_mc/acc" in m}
    assert sorted(logged) == [2, 4]
    cfg, params, tokenizer = load_run(workdir)
    final = evaluate_tasks(
        cfg, params, tokenizer, ["tiny_mc"], include_path=str(setup["tasks"]), limit=12
    )
    assert logged[4]["eval/tiny_mc/acc"] == pytest.approx(final["eval/tiny_mc/acc"])
    events = b"".join(p.read_bytes() for p in workdir.glob("events.out.tfevents*"))
    assert b"eval/tiny_mc/acc_norm" in events

    bad = train(
        tmp_path / "bad", "--config.train.eval_tasks=tiny_mc,nope", *tasks[1:], env=env, check=False
    )
    assert bad.returncode == 2
    assert "lm-eval has no task nope" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_command_prints_metrics(setup):
    env = device_env(8, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = run_python(
        "-m",
        "transformer.evaluate",
        f"--workdir={setup['workdir']}",
        "--tasks=tiny_mc",
        f"--include_path={setup['tasks']}",
        "--batch_size=8",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.search(r"\|\s*tiny_mc\s*\|.*\|\s*acc\s*\|[^|]*\|\s*([0-9.]+)\s*\|", proc.stdout)
    assert row, proc.stdout
    assert float(row.group(1)) == pytest.approx(
        setup["hf"]["results"]["tiny_mc"]["acc,none"], abs=1e-4
    )

    bad = run_python("-m", "transformer.evaluate", "--workdir=/no/such/run", "--tasks=x", env=env)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transformer.evaluate: error:"), bad.stderr
    assert "/no/such/run" in lines[0]


def test_missing_lm_eval_is_one_clear_error():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "try:\n    import transformer.evaluation.harness\n"
        "except ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=device_env(1), capture_output=True, text=True
    ).stdout
    assert out.startswith("MissingDependencyError") and 'pip install -e ".[eval]"' in out, out


def test_mesh_of_the_run_or_the_arguments(caplog):
    _mesh = harness._mesh
    assert dict(_mesh({"data": -1, "fsdp": 4, "tensor": 1}, {}).shape)["fsdp"] == 4
    assert dict(_mesh({"fsdp": 4}, {"tensor": 2, "data": None}).shape) == {
        "data": 4,
        "fsdp": 1,
        "tensor": 2,
    }
    # A run trained on 3 devices evaluates on this machine's 8.
    assert dict(_mesh({"data": 3, "fsdp": 1, "tensor": 1}, {}).shape)["data"] == 8
    assert "does not fit" in caplog.text
