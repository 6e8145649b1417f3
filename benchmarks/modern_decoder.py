"""GPT-2-style decoder vs the modern (Llama-style) decoder on the same data and budget.

    python benchmarks/modern_decoder.py                 # both configs' full 1700 steps
    python benchmarks/modern_decoder.py --steps 300     # a shorter comparison
    python benchmarks/modern_decoder.py --json out.json

Trains `configs/default.py` (learned positions, GELU, LayerNorm, multi-head attention, biases)
and `configs/llama_shakespeare.py` (rotary positions, SwiGLU, RMSNorm, 6 query heads over 2
key/value heads, no biases) one after the other in this process, on the same character-level
Shakespeare batches for the same steps, and prints for each: parameters, the final validation
loss, training tokens/s (the median of the logged intervals, compile excluded), and the bytes of
a KV cache for one sequence of the full context. The machine's float32 matmul rate, measured in
the same run, is printed beside the speeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _common as common
import jax
import jax.numpy as jnp

from transformer.inference.gpt import gpt_init_cache
from transformer.train.metrics import count_params, measure_matmul_flops, read_metrics
from transformer.train.run import train_and_evaluate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "GPT-2 style (configs/default.py)": ROOT / "configs" / "default.py",
    "Llama style (configs/llama_shakespeare.py)": ROOT / "configs" / "llama_shakespeare.py",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="training steps of both (default: the configs')")
    common.add_set_argument(parser, "train.batch_size=8", "a field of both configs")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def kv_cache_bytes(model_cfg) -> int:
    """Bytes of the KV cache of one sequence of `max_len` tokens."""
    cache = gpt_init_cache(model_cfg, 1, model_cfg.max_len, jnp.zeros((1,), jnp.int32))["kv"]
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))


def run(path: Path, args: argparse.Namespace, workdir: str) -> dict:
    config = common.load_run_config(str(path))
    if args.steps is not None:
        config.train.num_steps = args.steps
        config.train.eval_every_steps = min(config.train.eval_every_steps, args.steps)
        config.train.log_every_steps = min(config.train.log_every_steps, max(args.steps // 5, 1))
    config.checkpoint.every_steps = 10**9  # no checkpoints in between: time the steps alone
    common.apply_overrides(config, args.set)
    result = train_and_evaluate(config, workdir)
    records = read_metrics(workdir)
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]  # 1st: compile
    model_cfg = result.trainer.model_cfg
    return {
        "params": count_params(result.state.params),
        "steps": int(result.state.step),
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
        "tokens_per_sec": statistics.median(speeds) if speeds else float("nan"),
        "kv_cache_bytes": kv_cache_bytes(model_cfg),
    }


def main() -> None:
    args = parse_args()
    matmul = measure_matmul_flops()
    results = {}
    for name, path in CONFIGS.items():
        with tempfile.TemporaryDirectory() as workdir:
            results[name] = run(path, args, workdir)
    info = common.machine()
    print(
        f"\n{info['platform']} {info['device_kind']}, {info['cores']} cores, "
        f"float32 matmul {matmul / 1e9:.0f} GFLOP/s measured in this run, load "
        f"{common.format_load(common.load_average())}"
    )
    rows = [
        (
            name,
            f"{r['params']:,}",
            r["steps"],
            f"{r['val_loss']:.4f}",
            f"{r['tokens_per_sec']:,.0f}",
            f"{r['kv_cache_bytes'] / 1024:.0f} KiB",
        )
        for name, r in results.items()
    ]
    common.print_table(["model", "params", "steps", "val loss", "tokens/s", "KV cache"], rows)
    gpt2, llama = results.values()
    print(
        f"\nmodern / GPT-2 style: val loss {llama['val_loss'] - gpt2['val_loss']:+.4f} nats, "
        f"speed x{llama['tokens_per_sec'] / gpt2['tokens_per_sec']:.2f}, KV cache "
        f"x{llama['kv_cache_bytes'] / gpt2['kv_cache_bytes']:.2f}"
    )
    common.write_json(args.json, {"machine": info, "matmul_flops": matmul, "results": results})


if __name__ == "__main__":
    main()
