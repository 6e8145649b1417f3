"""benchmarks/gpu_check.sh: its pieces that need no accelerator (the memory line of the largest-
model search, the shape list, out-of-memory detection, the shell syntax), and, among the slow
tests, the whole script in its tiny CPU mode with every stage succeeding."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import largest_model  # noqa: E402
import model_scaling  # noqa: E402


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


def test_script_parses():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_tiny_mode_runs_every_stage(tmp_path):
    """About 5 minutes on two cores: every stage at a tiny shape on the CPU, torch included."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(GPU_CHECK_TINY="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SUMMARY" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s["status"] for s in summary["stages"]}
    assert set(stages.values()) == {"ok"}, stages
    assert {"train", "scaling", "decode batch 1", "decode batch 2", "largest"} <= set(stages)
    assert summary["ratios"]["train ours / torch"] > 0
    assert not summary["errors"]
    assert all(r["reference_tokens_per_s"] for r in summary["decode"])
    assert (tmp_path / "gpu_check.log").exists()
