"""LoRA against full fine-tuning, one train step each on the same model: optimizer-state bytes,
the step's memory and tokens per second.

    python benchmarks/lora_finetune.py                     # configs/sft_lora.py: SmolLM-135M
    python benchmarks/lora_finetune.py --batch 4 --seq 256 --rank 8 --json out.json

Both steps are built from the same config (`configs/sft_lora.py`, the smollm_135m shape), one
with `model.lora_rank=0` (every parameter trains) and one with `--rank` adapters on every
projection (only they train). For each: the optimizer state's bytes (Adam's two moments of the
trainable parameters), XLA's memory of the compiled step (arguments + outputs + temporaries,
less what the outputs alias: the state updated in place), and tokens per second over timed
steps after a warm-up, on random weights and tokens (speed and memory do not depend on them).
The machine's float32 matmul rate, measured in the same run, is printed beside the speeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _common as common
import jax
import numpy as np

from transformer.model.sharding import global_batch
from transformer.train.config import RunConfig
from transformer.train.metrics import measure_matmul_flops
from transformer.train.trainer import Trainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sft_lora.py", help="run config")
    parser.add_argument("--vocab", type=int, default=49152, help="tokenizer vocabulary")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    common.add_set_argument(parser, "model.dtype=bfloat16")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(config: Any, args: argparse.Namespace, rank: int) -> dict[str, float]:
    """Memory and speed of one step with `rank` adapters (0: full fine-tuning)."""
    config.model.lora_rank = rank
    config.model.lora_dropout = 0.0
    run_cfg = RunConfig.from_any(config)
    trainer = Trainer.build(run_cfg, run_cfg.model_config(args.vocab), devices=jax.devices()[:1])
    state = trainer.abstract_state
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    with trainer.within_mesh():
        batch = global_batch({"tokens": tokens}, trainer.mesh)
        compiled = trainer.train_step.lower(state, batch).compile()
        stats = compiled.memory_analysis()
        live = trainer.new_state(0)
        live, metrics = compiled(live, batch)  # warm-up
        jax.block_until_ready(metrics)

        def step() -> None:
            nonlocal live
            live, out = compiled(live, batch)
            jax.block_until_ready(out)

        seconds = common.median(common.time_calls(step, args.steps))
    step_bytes = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    trainable = sum(
        int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_leaves_with_path(state.params)
        if rank == 0 or "lora_" in jax.tree_util.keystr(path)
    )
    return {
        "trainable_params": trainable,
        "params_bytes": nbytes(state.params),
        "opt_state_bytes": nbytes(state.opt_state),
        "step_memory_bytes": step_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "seconds_per_step": seconds,
        "tokens_per_sec": args.batch * args.seq / seconds,
    }


def report(results: dict[str, Any], config: Any, args: argparse.Namespace) -> None:
    full, lora = results["full"], results["lora"]
    m = config.model
    print(
        f"{args.config}: {m.num_decoder_layers} layers x {m.d_model}, vocab {args.vocab}, "
        f"{m.dtype} compute, {m.param_dtype} weights, batch {args.batch} x {args.seq}; "
        f"{jax.devices()[0].platform}, float32 matmul {results['matmul_flops'] / 1e9:.0f} GFLOP/s"
    )
    rows = []
    for label, key, fmt in (
        ("trainable parameters", "trainable_params", common.format_count),
        ("optimizer state", "opt_state_bytes", common.format_bytes),
        ("step memory (XLA)", "step_memory_bytes", common.format_bytes),
        ("tokens/s", "tokens_per_sec", lambda x: f"{x:,.0f}"),
    ):
        ratio = lora[key] / max(full[key], 1e-9)
        rows.append((label, fmt(full[key]), fmt(lora[key]), f"{ratio:.3f}"))
    common.print_table(["", "full fine-tuning", f"LoRA rank {args.rank}", "LoRA / full"], rows)


def main() -> None:
    args = parse_args()
    config = common.load_run_config(args.config)
    common.apply_overrides(config, args.set)
    config.train.batch_size, config.train.grad_accum_steps = args.batch, 1
    config.data.seq_len = config.model.max_len = max(args.seq, 1)
    config.mesh.data = 1
    config.data.tokenizer = "char"  # no data is read: random tokens of --vocab ids
    results: dict[str, Any] = {
        "machine": common.machine(),
        "config": args.config,
        "batch": args.batch,
        "seq_len": args.seq,
        "rank": args.rank,
        "matmul_flops": measure_matmul_flops(),
    }
    results["full"] = measure(config, args, 0)
    results["lora"] = measure(config, args, args.rank)
    report(results, config, args)
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
