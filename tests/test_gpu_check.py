"""benchmarks/gpu_check.sh: its pieces that need no accelerator (the memory line of the largest-
model search, the scaling stage's shapes, variants and compile prediction, the flags stage's
comparison, the summary of a profile, out-of-memory detection, stage selection, the shell
syntax), and, among the slow tests, the whole script in its tiny CPU mode with every stage
succeeding."""

import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import gpu_check_summary  # noqa: E402
import largest_model  # noqa: E402
import model_scaling  # noqa: E402
import xla_flags  # noqa: E402


def test_fit_depth_finds_the_deepest_model_under_the_capacity():
    # 1 GiB per layer and 3 GiB besides: 12 GiB holds 9 layers, not 10.
    gib = 2**30
    a = {"layers": 8, "bytes": 11 * gib, "num_params": 8 * 100 + 50}
    b = {"layers": 16, "bytes": 19 * gib, "num_params": 16 * 100 + 50}
    fit = largest_model.fit_depth(a, b, 12.5 * gib)
    assert fit["predicted_layers"] == 9
    assert fit["bytes_per_layer"] == gib and fit["bytes_fixed"] == 3 * gib
    assert fit["params_per_layer"] == 100 and fit["params_fixed"] == 50
    assert largest_model.fit_depth(a, b, 2 * gib)["predicted_layers"] == 0


def test_shapes_parse_and_reject_malformed_items():
    shapes = model_scaling.parse_shapes(model_scaling.GPT2_SHAPES)
    assert [s["name"] for s in shapes] == ["small", "medium", "large", "xl"]
    assert shapes[-1] == {"name": "xl", "layers": 48, "heads": 25, "width": 1600, "batch": 4}
    with pytest.raises(SystemExit):
        model_scaling.parse_shapes("small:12:12:768")


def test_out_of_memory_is_told_apart_from_other_errors():
    assert _common.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while"))
    assert _common.is_out_of_memory("torch.OutOfMemoryError: CUDA out of memory. Tried to")
    assert not _common.is_out_of_memory(ValueError("shapes do not match"))


def test_scaling_runs_scan_variants_first_and_unrolled_smallest_first():
    small, xl = model_scaling.parse_shapes("small:12:12:768:16,xl:48:25:1600:4")
    runs = [
        (s["name"], v) for s, v in model_scaling.plan([xl, small], list(model_scaling.VARIANTS))
    ]
    assert runs == [
        ("xl", "scan"),
        ("xl", "unroll"),
        ("small", "scan"),
        ("small", "unroll"),
        ("small", "unrolled"),  # the unrolled ones last, the largest one last of all
        ("xl", "unrolled"),
    ]
    assert model_scaling.variant_overrides("unroll", 4) == [
        "model.scan_layers=true",
        "model.scan_unroll=4",
    ]
    assert model_scaling.variant_overrides("scan", 4)[1] == "model.scan_unroll=1"
    assert model_scaling.variant_overrides("unrolled", 4) == ["model.scan_layers=false"]


def test_unrolled_compile_is_extrapolated_from_scan_and_unroll():
    # 10 s compiling 1 layer, 16 s compiling 4: 2 s a layer, so 48 layers compile in 104 s;
    # 8 s of each run is outside the compile.
    xl = {"name": "xl", "layers": 48}
    rows = [
        {"name": "xl", "variant": "scan", "compile_s": 10.0, "wall_s": 18.0},
        {"name": "xl", "variant": "unroll", "compile_s": 16.0, "wall_s": 24.0},
    ]
    assert model_scaling.predict_unrolled_s(rows, xl, unroll=4) == pytest.approx(112.0)
    assert model_scaling.predict_unrolled_s(rows[:1], xl, unroll=4) is None
    rows.append({"name": "xl", "variant": "unrolled", "tokens_per_s": 1300.0})
    rows[0]["tokens_per_s"], rows[1]["tokens_per_s"] = 1000.0, 1200.0
    speedups = model_scaling.speedups(rows)
    assert speedups["xl", "unroll"] == pytest.approx(1.2)
    assert speedups["xl", "unrolled"] == pytest.approx(1.3)


def flag_run(name: str, flags: str, tokens_per_s: float | None) -> dict:
    if tokens_per_s is None:
        return {"name": name, "flags": flags, "status": "failed (exit 1): Unknown flag"}
    return {"name": name, "flags": flags, "status": "ok", "tokens_per_s": tokens_per_s}


def test_flag_sets_beat_the_default_only_beyond_its_spread_and_the_margin():
    runs = [
        flag_run("default", "", 100.0),
        flag_run("a", "--xla_a=true", 105.0),  # beats 3% spread and 2% margin
        flag_run("b", "--xla_b=true", 102.5),  # within the default's own spread
        flag_run("c", "--xla_c=true", None),  # failed: no ratio, not faster
        flag_run("default again", "", 97.0),
    ]
    c = xla_flags.compare(runs, margin=0.02)
    assert [r["ratio"] for r in runs] == pytest.approx([1.0, 1.05, 1.025, None, 0.97])
    assert c["spread"] == pytest.approx(0.03) and c["bar"] == pytest.approx(1.03)
    assert c["faster"] == ["a"] and c["fastest"] == "a"
    line = xla_flags.summary_line(c)
    assert line.startswith("faster than default by over 3.0%: a (fastest: a;")
    # No second default run: the margin alone is the bar.
    c = xla_flags.compare(runs[:4], margin=0.02)
    assert c["spread"] is None and c["faster"] == ["a", "b"]
    # The default failed: no ratios at all.
    c = xla_flags.compare([flag_run("default", "", None), runs[1]], margin=0.02)
    assert c["faster"] == [] and c["fastest"] is None


def test_flags_script_passes_the_step_options_through():
    args, rest = xla_flags.parse_args(
        ["--set", "model.dtype=float32", "--flag-set", "lhs=--xla_x=true", "--budget-s", "60"]
    )
    assert rest == ["--set", "model.dtype=float32"]  # --set is train_throughput.py's
    assert xla_flags.flag_sets(args.flag_set) == [("lhs", "--xla_x=true")]
    assert xla_flags.flag_sets([])[0] == ("default", "")
    with pytest.raises(SystemExit):
        xla_flags.flag_sets(["no flags given"])


def test_summary_sets_a_profile_side_by_side(tmp_path, capsys):
    side = {
        "categories": {"attention": 5.0, "matmuls (projections, MLP)": 20.0},
        "busy_ms_per_step": 25.0,
        "wall_ms_per_step": 30.0,
        "top_ops": [{"name": "fusion.7", "category": "attention", "ms_per_step": 5.0}] * 4,
    }
    reference = {**side, "categories": {"matmuls (projections, MLP)": 16.0, "other": 1.0}}
    (tmp_path / "profile.json").write_text(json.dumps({"ours": side, "reference": reference}))
    args = argparse.Namespace(
        stages=tmp_path,
        train=None,
        profile="profile.json",
        flags=None,
        decode=[],
        scaling=None,
        largest=None,
        stage=["profile:0:50"],
        json=None,
    )
    summary = gpu_check_summary.summarize(args)
    assert len(summary["profile"]["ours"]["top_ops"]) == 3
    gpu_check_summary.report(summary)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("  ", "busy", "wall"))]
    assert rows[0] == ["matmuls", "(projections,", "MLP)", "20.00", "16.00", "1.25x"]  # first
    assert ["attention", "5.00", "-", "n/a"] in rows and ["other", "-", "1.00", "n/a"] in rows
    assert ["wall", "30.00", "30.00", "1.00x"] in rows
    assert any(
        line.startswith("costliest ops, torch: fusion.7 (attention) 5.00 ms") for line in lines
    )
    # No profile file: no profile lines, and no error.
    summary = gpu_check_summary.summarize(
        argparse.Namespace(**{**vars(args), "stages": tmp_path / "x"})
    )
    gpu_check_summary.report(summary)
    assert "ms per step" not in capsys.readouterr().out


def run_script(tmp_path, **env_values: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(GPU_CHECK_TINY="1", OUT=str(tmp_path), PYTHON=sys.executable, **env_values)
    return subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_stages_are_chosen_by_name_and_a_wrong_name_is_refused(tmp_path):
    proc = run_script(tmp_path, GPU_CHECK_STAGES="train,sclaing")
    assert proc.returncode == 2 and "no stage 'sclaing'" in proc.stderr
    proc = run_script(tmp_path, GPU_CHECK_STAGES="summary")  # nothing but the summary
    assert proc.returncode == 0, proc.stderr
    assert "stages: summary" in proc.stdout and "SUMMARY" in proc.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == []


def test_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_tiny_mode_runs_every_stage(tmp_path):
    """About 5 minutes on two cores: every stage at a tiny shape on the CPU, torch included."""
    proc = run_script(tmp_path, GPU_CHECK_STAGES="all")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SUMMARY" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s["status"] for s in summary["stages"]}
    assert set(stages.values()) == {"ok"}, stages
    assert set(stages) == {
        "train",
        "profile",
        "flags",
        "scaling",
        "decode batch 1",
        "decode batch 2",
        "largest",
    }
    assert summary["ratios"]["train ours / torch"] > 0
    assert {"ours", "reference"} <= set(summary["profile"])
    flag_runs = summary["flags"]["runs"]
    assert len(flag_runs) == len(xla_flags.FLAG_SETS)
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in flag_runs)  # GPU flags parse
    variants = {(r["name"], r["variant"]) for r in summary["scaling"] if "tokens_per_s" in r}
    assert variants == {(s, v) for s in ("small", "xl") for v in model_scaling.VARIANTS}
    assert not summary["errors"]
    assert all(r["reference_tokens_per_s"] for r in summary["decode"])
    assert (tmp_path / "gpu_check.log").exists()
