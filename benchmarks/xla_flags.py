"""Which XLA flags make the shipped training step faster: the step of `train_throughput.py`
under each flag set, each in a fresh process (XLA reads XLA_FLAGS once, when JAX starts its
backend), and each set's tokens/s against XLA's defaults.

    python benchmarks/xla_flags.py --config configs/gpt2_small.py --batch 16 --vocab 50257 \\
        --steps 10 --warmup 2 --rounds 1 --json flags.json

Every option this script does not know goes to `train_throughput.py` as it is (the model, the
batch, --set overrides, the steps), which always runs without its torch reference. The sets
(--flag-set NAME=FLAGS, repeatable, replaces them): XLA's defaults, the latency-hiding
scheduler (what `train.py` ships for GPUs, `transformer/train/xla_flags.py`), cuBLASLt matmuls,
cuDNN layer norm, command buffers (CUDA graphs) off, and the defaults once more, last, as the
run-to-run spread. Each set is added to the XLA_FLAGS this process was started with. The GPU
flags parse on a CPU too and change nothing there, so `GPU_CHECK_TINY=1` runs the same sets; a
flag this XLA does not know aborts its process, which shows as that set failing. A set that
fails or runs out of time is reported as such and the next one runs; no set starts with under
--min-run-s of --budget-s left. A set counts as faster when its ratio beats 1 by more than
--margin and by more than the defaults' own spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common

HERE = Path(__file__).resolve().parent
DEFAULT = "default"
AGAIN = "default again"
FLAG_SETS: tuple[tuple[str, str], ...] = (
    (DEFAULT, ""),
    ("latency hiding", "--xla_gpu_enable_latency_hiding_scheduler=true"),
    ("cublaslt", "--xla_gpu_enable_cublaslt=true"),
    ("cudnn layer norm", "--xla_gpu_enable_cudnn_layer_norm=true"),
    ("command buffer off", "--xla_gpu_enable_command_buffer="),
    (AGAIN, ""),
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest (for train_throughput.py)."""
    # No abbreviations: --set (train_throughput.py's) must not read as --flag-set.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--flag-set",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="a flag set to time (repeatable; the first is the baseline); default: "
        + "; ".join(f"{name}={flags or '(none)'}" for name, flags in FLAG_SETS),
    )
    parser.add_argument("--timeout-s", type=float, default=90, help="limit per process")
    parser.add_argument("--budget-s", type=float, default=600, help="limit for all sets")
    parser.add_argument("--min-run-s", type=float, default=20, help="start no set with less left")
    parser.add_argument("--margin", type=float, default=0.02, help="least gain that counts")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_known_args(argv)


def flag_sets(items: list[str]) -> list[tuple[str, str]]:
    """--flag-set NAME=FLAGS items as (name, flags), or the default sets."""
    if not items:
        return list(FLAG_SETS)
    sets = []
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--flag-set {item!r}: expected NAME=FLAGS (FLAGS may be empty)")
        sets.append((name, flags.strip()))
    return sets


def run_set(train_args: list[str], flags: str, timeout: float) -> dict[str, Any]:
    """train_throughput.py with `flags` added to XLA_FLAGS: its numbers, or why it has none."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [sys.executable, str(HERE / "train_throughput.py"), *train_args]
        command += ["--no-reference", "--json", str(out)]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timeout after {timeout:.0f} s", "wall_s": timeout}
        wall = time.monotonic() - start
        if proc.returncode == 0 and out.exists():
            o = json.loads(out.read_text())["ours"]
            return {
                "status": "ok",
                "wall_s": wall,
                "tokens_per_s": o["tokens_per_s"],
                "step_s_median": o["step_s_median"],
                "compile_s": o["compile_s"],
                "mfu_vs_published_peak": o["mfu_vs_published_peak"],
            }
    lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
    last = lines[-1][:200] if lines else ""
    return {"status": f"failed (exit {proc.returncode}): {last}", "wall_s": wall}


def compare(runs: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """Each run's tokens/s against the first's (`ratio`, set in place), the defaults' spread
    (the first set's flags run again, if it ran) and the sets that beat both it and `margin`."""
    base = runs[0].get("tokens_per_s") if runs else None
    for run in runs:
        tps = run.get("tokens_per_s")
        run["ratio"] = tps / base if tps and base else None
    again = [r["ratio"] for r in runs[1:] if r["flags"] == runs[0]["flags"] and r["ratio"]]
    spread = max((abs(x - 1) for x in again), default=None)
    bar = 1 + max(margin, spread or 0.0)
    faster = [r["name"] for r in runs[1:] if r["flags"] and r["ratio"] and r["ratio"] > bar]
    ranked = sorted((r for r in runs if r["ratio"]), key=lambda r: -r["ratio"])
    return {
        "baseline": runs[0]["name"] if runs else None,
        "spread": spread,
        "bar": bar,
        "faster": faster,
        "fastest": ranked[0]["name"] if ranked else None,
    }


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    base = os.environ.get("XLA_FLAGS", "")
    results: dict[str, Any] = {"base_xla_flags": base, "train_args": train_args, "runs": []}
    print(f"train_throughput.py {' '.join(train_args)}; XLA_FLAGS {base or '(none)'} plus:")
    for name, flags in flag_sets(args.flag_set):
        left = deadline - time.monotonic()
        if left < args.min_run_s:
            run: dict[str, Any] = {"status": f"not run: {max(left, 0):.0f} s of the budget left"}
        else:
            run = run_set(train_args, flags, min(args.timeout_s, left))
        results["runs"].append({"name": name, "flags": flags, **run})
        print(f"  {name} ({flags or 'no flags'}): {describe(results['runs'][-1])}", flush=True)
        common.write_json(args.json, results)  # as it goes: a run cut short keeps what it did
    results["comparison"] = compare(results["runs"], args.margin)
    report(results)
    common.write_json(args.json, results)
    return 0 if results["runs"] and results["runs"][0]["status"] == "ok" else 1


def describe(run: dict[str, Any]) -> str:
    if run["status"] != "ok":
        return run["status"]
    return (
        f"{run['tokens_per_s']:,.0f} tokens/s, compile {run['compile_s']:.1f} s, "
        f"{run['wall_s']:.0f} s in all"
    )


def report(results: dict[str, Any]) -> None:
    runs, c = results["runs"], results["comparison"]
    rows = [
        (
            r["name"],
            r["flags"] or "-",
            f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-",
            "n/a" if r.get("ratio") is None else f"{r['ratio']:.3f}x",
            f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
            r["status"],
        )
        for r in runs
    ]
    common.print_table(
        ["set", "XLA flags", "tokens/s", f"/ {c['baseline']}", "compile s", "status"], rows
    )
    print(summary_line(c))


def summary_line(c: dict[str, Any]) -> str:
    """One line: which sets beat the baseline by more than the bar, and the spread."""
    spread = "n/a" if c["spread"] is None else f"{100 * c['spread']:.1f}%"
    faster = ", ".join(c["faster"]) or "none"
    return (
        f"faster than {c['baseline']} by over {100 * (c['bar'] - 1):.1f}%: {faster} "
        f"(fastest: {c['fastest'] or 'n/a'}; {c['baseline']}'s own run-to-run spread {spread})"
    )


if __name__ == "__main__":
    sys.exit(main())
