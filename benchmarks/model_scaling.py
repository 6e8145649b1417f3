"""Training throughput and memory as a GPT grows, on one device: GPT-2 small (124M), medium
(350M), large (774M) and XL (1.5B) shapes at context 1024, a few steps each, with the layers
under `nn.scan`, under `nn.scan` with several layers per iteration, and unrolled.

    python benchmarks/model_scaling.py --json scaling.json
    python benchmarks/model_scaling.py --shapes small:12:12:768:16,xl:48:25:1600:4 --steps 4

Each shape (NAME:LAYERS:HEADS:WIDTH:BATCH) is trained by `train_throughput.py` in a process of
its own per variant, so that each has the device's memory to itself and its own peak-memory
reading; this process never touches the accelerator. The variants (--variants): `scan`
(model.scan_layers=true: one layer compiled whatever the depth), `unroll` (the same with
model.scan_unroll=--unroll layers per scan iteration: most of the unrolled speed for a compile
that does not grow with depth) and `unrolled` (model.scan_layers=false: every layer compiled).
Every shape's scan and unroll variants run first, then the unrolled ones from the smallest
shape up, so that a short --budget-s drops the unrolled variants of the largest shapes first;
an unrolled variant whose compile, extrapolated from the other two (compile time linear in the
layers compiled), would not finish in the time left is not started, and says so. A variant
runs first with no rematerialisation (`model.remat_policy=none`); if that runs out of memory,
it runs again with `--fallback-remat` (default full) and the table says so. Everything else
comes from `--config` (default configs/gpt2_small.py: bfloat16 compute, float32 parameters and
AdamW) and the `--set` overrides. Measured per variant: tokens/s (median step), its ratio to
the same shape's scan, MFU against the chip's published dense bf16 peak
(`transformer.metrics.known_peak_flops`) and against a matmul measured in the same process,
peak memory (JAX's device `peak_bytes_in_use`; the process's RSS on a CPU) and the compile
time. JAX may take --memory-fraction of the GPU (its default is 75%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common

HERE = Path(__file__).resolve().parent
GPT2_SHAPES = "small:12:12:768:16,medium:24:16:1024:8,large:36:20:1280:8,xl:48:25:1600:4"
VARIANTS = ("scan", "unroll", "unrolled")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt2_small.py", help="base run config")
    parser.add_argument(
        "--shapes", default=GPT2_SHAPES, help=f"NAME:LAYERS:HEADS:WIDTH:BATCH,... ({GPT2_SHAPES})"
    )
    parser.add_argument("--context", type=int, default=1024, help="sequence length")
    parser.add_argument("--vocab", type=int, default=50257, help="tokenizer vocabulary")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)} (all)"
    )
    parser.add_argument("--unroll", type=int, default=4, help="layers per scan iteration")
    common.add_set_argument(parser, "model.dtype=float32", "a config field for every shape")
    parser.add_argument("--fallback-remat", default="full", help="remat policy after an OOM")
    parser.add_argument("--memory-fraction", type=float, default=0.9, help="of the GPU, for JAX")
    parser.add_argument("--timeout-s", type=float, default=90, help="limit per training process")
    parser.add_argument("--budget-s", type=float, default=600, help="limit for all shapes")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or not args.variants or args.unroll < 1:
        raise SystemExit(f"--variants: some of {', '.join(VARIANTS)}; --unroll: 1 or more")
    return args


def parse_shapes(spec: str) -> list[dict[str, Any]]:
    """'small:12:12:768:16,...' -> [{'name': 'small', 'layers': 12, ...}, ...]."""
    shapes = []
    for item in spec.split(","):
        fields = item.strip().split(":")
        if len(fields) != 5:
            raise SystemExit(f"--shapes {item!r}: expected NAME:LAYERS:HEADS:WIDTH:BATCH")
        name, *numbers = fields
        layers, heads, width, batch = (int(x) for x in numbers)
        shapes.append(
            {"name": name, "layers": layers, "heads": heads, "width": width, "batch": batch}
        )
    return shapes


def variant_overrides(variant: str, unroll: int) -> list[str]:
    """The config fields a variant sets (after, so over, the --set ones)."""
    if variant == "unrolled":
        return ["model.scan_layers=false"]
    return ["model.scan_layers=true", f"model.scan_unroll={unroll if variant == 'unroll' else 1}"]


def plan(shapes: list[dict[str, Any]], variants: list[str]) -> list[tuple[dict[str, Any], str]]:
    """The runs in order: each shape's scan and unroll variants, then the unrolled ones from the
    smallest shape (layers x width^2) up, so a short budget drops the largest ones first."""
    runs = [(s, v) for s in shapes for v in variants if v != "unrolled"]
    if "unrolled" in variants:
        by_size = sorted(shapes, key=lambda s: s["layers"] * s["width"] ** 2)
        runs += [(s, "unrolled") for s in by_size]
    return runs


def predict_unrolled_s(
    rows: list[dict[str, Any]], shape: dict[str, Any], unroll: int
) -> float | None:
    """Seconds an unrolled run of `shape` should take, from its scan and unroll runs: their time
    outside the compile, plus a compile linear in the layers compiled (1 and min(unroll,
    layers) of them); None without both runs."""
    done = {r["variant"]: r for r in rows if r["name"] == shape["name"] and "compile_s" in r}
    scan, unrolled_k = done.get("scan"), done.get("unroll")
    k = min(unroll, shape["layers"])
    if scan is None or unrolled_k is None or k < 2:
        return None
    per_layer = max(unrolled_k["compile_s"] - scan["compile_s"], 0.0) / (k - 1)
    compile_s = scan["compile_s"] + per_layer * (shape["layers"] - 1)
    return scan["wall_s"] - scan["compile_s"] + compile_s


def train(
    args: argparse.Namespace, shape: dict[str, Any], overrides: list[str], timeout: float
) -> Any:
    """One `train_throughput.py` run: its JSON results (and `wall_s`), or a short reason it
    gave none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [sys.executable, str(HERE / "train_throughput.py"), "--config", args.config]
        for flag in ("layers", "heads", "width", "batch"):
            command += [f"--{flag}", str(shape[flag])]
        command += ["--context", str(args.context), "--vocab", str(args.vocab)]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", "1"]
        command += ["--no-reference", "--json", str(out)]
        for item in [*args.set, *overrides]:
            command += ["--set", item]
        start = time.monotonic()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timeout after {timeout:.0f} s"
        if proc.returncode == 0 and out.exists():
            return {**json.loads(out.read_text()), "wall_s": time.monotonic() - start}
        log = proc.stderr + proc.stdout
        if common.is_out_of_memory(log):
            return "out of memory"
        lines = [line for line in log.strip().splitlines() if line.strip()]
        return f"failed (exit {proc.returncode}): {lines[-1][:200] if lines else ''}"


def row_of(shape: dict[str, Any], variant: str, remat: str, result: dict[str, Any]) -> dict:
    o = result["ours"]
    return {
        **shape,
        "variant": variant,
        "remat_policy": remat,
        "scan_layers": result["shape"]["scan_layers"],
        "num_params": o["num_params"],
        "tokens_per_s": o["tokens_per_s"],
        "step_s_median": o["step_s_median"],
        "mfu_vs_published_peak": o["mfu_vs_published_peak"],
        "mfu_vs_measured_matmul": o["mfu_vs_measured_matmul"],
        "peak_memory_bytes": o["peak_memory_bytes"],
        "peak_memory_source": o["peak_memory_source"],
        "compile_s": o["compile_s"],
        "wall_s": result["wall_s"],
        "loss_last": o["loss_last"],
        "published_peak_flops": result["published_peak_flops"],
        "device_kind": result["machine"]["device_kind"],
        "status": "ok",
    }


def measure(
    args: argparse.Namespace, shape: dict[str, Any], variant: str, deadline: float
) -> dict[str, Any]:
    """A variant's row: without remat, and with --fallback-remat after an out-of-memory."""
    row: dict[str, Any] = {**shape, "variant": variant, "remat_policy": "none"}
    row["status"] = "skipped (time box)"
    for remat in ("none", args.fallback_remat):
        left = deadline - time.monotonic()
        if left < 10:
            break
        overrides = [*variant_overrides(variant, args.unroll), f"model.remat_policy={remat}"]
        result = train(args, shape, overrides, min(args.timeout_s, left))
        if isinstance(result, dict):
            row = row_of(shape, variant, remat, result)
            if remat != "none":
                row["status"] = "ok after OOM without remat"
            break
        row = {**shape, "variant": variant, "remat_policy": remat, "status": result}
        if result != "out of memory":
            break
    return row


def main() -> None:
    args = parse_args()
    deadline = time.monotonic() + args.budget_s
    common.limit_jax_gpu_memory(args.memory_fraction)  # inherited by the training processes
    shapes = parse_shapes(args.shapes)
    results: dict[str, Any] = {
        "config": args.config,
        "context": args.context,
        "vocab": args.vocab,
        "steps": args.steps,
        "unroll": args.unroll,
        "overrides": args.set,
        "rows": [],
    }
    variants = " | ".join(label(v, args.unroll) for v in args.variants)
    print(
        f"{args.config} at context {args.context}, vocab {args.vocab}, {args.steps} timed steps "
        f"per run; layers {variants}; remat none, else {args.fallback_remat} after an "
        "out-of-memory",
        flush=True,
    )
    for shape, variant in plan(shapes, args.variants):
        row = None
        if variant == "unrolled":
            row = too_slow_to_compile(args, results["rows"], shape, deadline)
        row = row or measure(args, shape, variant, deadline)
        results["rows"].append(row)
        names = [s["name"] for s in shapes]  # rows by shape, then variant
        results["rows"].sort(key=lambda r: (names.index(r["name"]), VARIANTS.index(r["variant"])))
        print(f"  {shape['name']}, {label(variant, args.unroll)}: {describe(row)}", flush=True)
        common.write_json(args.json, results)  # as it goes: a run cut short keeps what it did
    report(results)


def too_slow_to_compile(
    args: argparse.Namespace, rows: list[dict[str, Any]], shape: dict[str, Any], deadline: float
) -> dict[str, Any] | None:
    """The row of an unrolled run not started because it would not finish in time, or None."""
    predicted = predict_unrolled_s(rows, shape, args.unroll)
    limit = min(args.timeout_s, deadline - time.monotonic())
    if predicted is None or predicted <= limit:
        return None
    status = f"not run: predicted {predicted:.0f} s > {max(limit, 0):.0f} s left"
    return {**shape, "variant": "unrolled", "remat_policy": "none", "status": status}


def label(variant: str, unroll: int) -> str:
    return f"scan, unroll {unroll}" if variant == "unroll" else variant


def speedups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(shape, variant) -> its tokens/s over the same shape's scan variant's."""
    scan = {r["name"]: r["tokens_per_s"] for r in rows if r.get("variant") == "scan"}
    return {
        (r["name"], r["variant"]): r["tokens_per_s"] / scan[r["name"]]
        for r in rows
        if "tokens_per_s" in r and scan.get(r["name"])
    }


def describe(row: dict[str, Any]) -> str:
    shape = f"{row['layers']} x {row['width']}, batch {row['batch']}, remat {row['remat_policy']}"
    if "tokens_per_s" not in row:
        return f"{shape}: {row['status']}"
    return (
        f"{shape}: {row['tokens_per_s']:,.0f} tokens/s, {mfu(row)} MFU, compile "
        f"{row['compile_s']:.1f} s ({row['status']})"
    )


def mfu(row: dict[str, Any]) -> str:
    value = row.get("mfu_vs_published_peak")
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report(results: dict[str, Any]) -> None:
    rows = results["rows"]
    done = [r for r in rows if "tokens_per_s" in r]
    peak = next((r["published_peak_flops"] for r in done if r["published_peak_flops"]), None)
    peak_name = f"{peak / 1e12:.0f} TFLOP/s" if peak else "published peak"
    vs_scan = speedups(rows)
    table = []
    for r in rows:
        how = (r["name"], f"{r['layers']} x {r['width']}")
        variant = (label(r["variant"], results["unroll"]), r["remat_policy"])
        if "tokens_per_s" not in r:
            table.append(how + ("-", r["batch"]) + variant + ("-",) * 6 + (r["status"],))
            continue
        speedup = vs_scan.get((r["name"], r["variant"]))
        table.append(
            how
            + (common.format_count(r["num_params"]), r["batch"])
            + variant
            + (
                f"{r['tokens_per_s']:,.0f}",
                "-" if speedup is None else f"{speedup:.2f}x",
                mfu(r),
                f"{100 * r['mfu_vs_measured_matmul']:.1f}%",
                f"{r['peak_memory_bytes'] / 2**30:.2f}",
                f"{r['compile_s']:.1f}",
                r["status"],
            )
        )
    common.print_table(
        ["shape", "layers x width", "params", "batch", "layers run", "remat", "tokens/s", "/ scan"]
        + [f"MFU ({peak_name})", "MFU (matmul)", "peak GiB", "compile s", "status"],
        table,
    )
    source = done[0]["peak_memory_source"] if done else "n/a"
    print(
        f"context {results['context']}; peak memory: {source}; MFU (matmul): against a matrix "
        "product measured in the same process"
    )


if __name__ == "__main__":
    main()
