"""Training throughput and memory as a GPT grows, on one device: GPT-2 small (124M), medium
(350M), large (774M) and XL (1.5B) shapes at context 1024, a few steps each.

    python benchmarks/model_scaling.py --json scaling.json
    python benchmarks/model_scaling.py --shapes small:12:12:768:16,xl:48:25:1600:4 --steps 4

Each shape (NAME:LAYERS:HEADS:WIDTH:BATCH) is trained by `train_throughput.py` in a process of
its own, so that each has the device's memory to itself and its own peak-memory reading; this
process never touches the accelerator. A shape runs first with no rematerialisation
(`model.remat_policy=none`); if that runs out of memory, it runs again with `--fallback-remat`
(default full) and the table says so. Everything else comes from `--config` (default
configs/gpt2_small.py: bfloat16 compute, float32 parameters and AdamW, layers unrolled) and the
`--set` overrides (gpu_check.sh sets model.scan_layers=true, so that four shapes compile within
its time box). Measured per shape: tokens/s (median step), MFU against the chip's
published dense bf16 peak (`transformer.metrics.known_peak_flops`) and against a matmul measured
in the same process, peak memory (JAX's device `peak_bytes_in_use`; the process's RSS on a
CPU) and the compile time. JAX may take --memory-fraction of the GPU (its default is 75%).
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
    common.add_set_argument(parser, "model.dtype=float32", "a config field for every shape")
    parser.add_argument("--fallback-remat", default="full", help="remat policy after an OOM")
    parser.add_argument("--memory-fraction", type=float, default=0.9, help="of the GPU, for JAX")
    parser.add_argument("--timeout-s", type=float, default=90, help="limit per training process")
    parser.add_argument("--budget-s", type=float, default=600, help="limit for all shapes")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


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


def train(args: argparse.Namespace, shape: dict[str, Any], remat: str, timeout: float) -> Any:
    """One `train_throughput.py` run: its JSON results, or a short reason it gave none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [
            sys.executable,
            str(HERE / "train_throughput.py"),
            "--config",
            args.config,
            "--layers",
            str(shape["layers"]),
            "--heads",
            str(shape["heads"]),
            "--width",
            str(shape["width"]),
            "--batch",
            str(shape["batch"]),
            "--context",
            str(args.context),
            "--vocab",
            str(args.vocab),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--rounds",
            "1",
            "--no-reference",
            "--json",
            str(out),
        ]
        for item in [*args.set, f"model.remat_policy={remat}"]:
            command += ["--set", item]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timeout after {timeout:.0f} s"
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        log = proc.stderr + proc.stdout
        if common.is_out_of_memory(log):
            return "out of memory"
        lines = [line for line in log.strip().splitlines() if line.strip()]
        return f"failed (exit {proc.returncode}): {lines[-1][:200] if lines else ''}"


def row_of(shape: dict[str, Any], remat: str, result: dict[str, Any]) -> dict[str, Any]:
    o = result["ours"]
    return {
        **shape,
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
        "loss_last": o["loss_last"],
        "published_peak_flops": result["published_peak_flops"],
        "device_kind": result["machine"]["device_kind"],
        "status": "ok",
    }


def main() -> None:
    args = parse_args()
    deadline = time.monotonic() + args.budget_s
    common.limit_jax_gpu_memory(args.memory_fraction)  # inherited by the training processes
    results: dict[str, Any] = {
        "config": args.config,
        "context": args.context,
        "vocab": args.vocab,
        "steps": args.steps,
        "overrides": args.set,
        "rows": [],
    }
    print(
        f"{args.config} at context {args.context}, vocab {args.vocab}, {args.steps} timed steps "
        f"per shape; remat none, else {args.fallback_remat} after an out-of-memory",
        flush=True,
    )
    for shape in parse_shapes(args.shapes):
        row: dict[str, Any] = {**shape, "remat_policy": "none", "status": "skipped (time box)"}
        for remat in ("none", args.fallback_remat):
            left = deadline - time.monotonic()
            if left < 10:
                break
            result = train(args, shape, remat, min(args.timeout_s, left))
            if isinstance(result, dict):
                row = row_of(shape, remat, result)
                if remat != "none":
                    row["status"] = "ok after OOM without remat"
                break
            row = {**shape, "remat_policy": remat, "status": result}
            if result != "out of memory":
                break
        results["rows"].append(row)
        print(f"  {shape['name']}: {describe(row)}", flush=True)
        common.write_json(args.json, results)  # as it goes: a run cut short keeps what it did
    report(results)


def describe(row: dict[str, Any]) -> str:
    shape = f"{row['layers']} x {row['width']}, batch {row['batch']}, remat {row['remat_policy']}"
    if "tokens_per_s" not in row:
        return f"{shape}: {row['status']}"
    return f"{shape}: {row['tokens_per_s']:,.0f} tokens/s, {mfu(row)} MFU ({row['status']})"


def mfu(row: dict[str, Any]) -> str:
    value = row.get("mfu_vs_published_peak")
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report(results: dict[str, Any]) -> None:
    rows = results["rows"]
    done = [r for r in rows if "tokens_per_s" in r]
    peak = next((r["published_peak_flops"] for r in done if r["published_peak_flops"]), None)
    peak_name = f"{peak / 1e12:.0f} TFLOP/s" if peak else "published peak"
    table = []
    for r in rows:
        if "tokens_per_s" not in r:
            table.append(
                (r["name"], f"{r['layers']} x {r['width']}", "-", r["batch"], r["remat_policy"])
                + ("-",) * 5
                + (r["status"],)
            )
            continue
        table.append(
            (
                r["name"],
                f"{r['layers']} x {r['width']}",
                common.format_count(r["num_params"]),
                r["batch"],
                r["remat_policy"],
                f"{r['tokens_per_s']:,.0f}",
                mfu(r),
                f"{100 * r['mfu_vs_measured_matmul']:.1f}%",
                f"{r['peak_memory_bytes'] / 2**30:.2f}",
                f"{r['compile_s']:.1f}",
                r["status"],
            )
        )
    common.print_table(
        [
            "shape",
            "layers x width",
            "params",
            "batch",
            "remat",
            "tokens/s",
            f"MFU ({peak_name})",
            "MFU (matmul)",
            "peak GiB",
            "compile s",
            "status",
        ],
        table,
    )
    source = done[0]["peak_memory_source"] if done else "n/a"
    print(
        f"context {results['context']}; peak memory: {source}; MFU (matmul): against a matrix "
        "product measured in the same process"
    )


if __name__ == "__main__":
    main()
