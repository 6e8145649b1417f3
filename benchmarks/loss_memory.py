"""Memory of a train step with the loss computed whole vs in chunks of positions.

    python benchmarks/loss_memory.py                       # configs/gpt2_small.py, 16 x 1024
    python benchmarks/loss_memory.py --batch 8 --chunk 256 --json out.json

Compiles `train_step` on abstract (shape-only) inputs, once with `model.loss_chunk_len=0` (the
full [b, t, v] float32 logits) and once with chunks, and reads XLA's buffer assignment
(`compiled.memory_analysis()`): the temporary memory a step needs besides its arguments and
outputs. Nothing runs, so it works on a CPU for any model size; the numbers are XLA's for the
backend it compiles for (on a GPU, run it there).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _common as common
import jax

from transformer.train.config import RunConfig
from transformer.train.sharding import batch_sharding
from transformer.train.trainer import Trainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt2_small.py", help="run config")
    parser.add_argument("--vocab", type=int, default=50257, help="tokenizer vocabulary")
    parser.add_argument(
        "--batch", type=int, default=16, help="sequences per step (one micro-batch)"
    )
    parser.add_argument("--chunk", type=int, default=128, help="positions per loss chunk")
    common.add_set_argument(parser, "model.remat_policy=none")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def step_memory(config: Any, vocab: int, chunk: int) -> dict[str, float]:
    config.model.loss_chunk_len = chunk
    run_cfg = RunConfig.from_any(config)
    trainer = Trainer.build(run_cfg, run_cfg.model_config(vocab), devices=jax.devices()[:1])
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(trainer.mesh))
        for k, v in trainer.task.dummy_batch(config.train.batch_size, config.data.seq_len).items()
    }
    with trainer.within_mesh():
        compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    stats = compiled.memory_analysis()
    gib = 1024.0**3
    return {
        "temp_gib": stats.temp_size_in_bytes / gib,
        "arguments_gib": stats.argument_size_in_bytes / gib,
        "outputs_gib": stats.output_size_in_bytes / gib,
    }


def main() -> None:
    args = parse_args()
    config = common.load_run_config(args.config)
    common.apply_overrides(config, args.set)
    config.train.batch_size, config.train.grad_accum_steps = args.batch, 1
    config.mesh.data = 1
    logits_gib = args.batch * config.data.seq_len * (-(-args.vocab // 64) * 64) * 4 / 1024.0**3
    results: dict[str, Any] = {
        "machine": common.machine(),
        "config": args.config,
        "batch": args.batch,
        "seq_len": config.data.seq_len,
        "chunk": args.chunk,
        "float32_logits_gib": logits_gib,
        "whole": step_memory(config, args.vocab, 0),
        "chunked": step_memory(config, args.vocab, args.chunk),
    }
    saved = results["whole"]["temp_gib"] - results["chunked"]["temp_gib"]
    results["temp_saved_gib"] = saved
    m = config.model
    print(
        f"{args.config}: {m.num_decoder_layers} layers x {m.d_model}, {m.dtype}, remat "
        f"{m.remat_policy}, batch {args.batch} x {config.data.seq_len}, vocab {args.vocab} "
        f"(float32 logits: {logits_gib:.2f} GiB); {jax.devices()[0].platform}"
    )
    rows = [
        (name, f"{r['temp_gib']:.2f}", f"{r['arguments_gib']:.2f}", f"{r['outputs_gib']:.2f}")
        for name, r in (
            ("loss_chunk_len=0", results["whole"]),
            (f"loss_chunk_len={args.chunk}", results["chunked"]),
        )
    ]
    common.print_table(["", "temporary (GiB)", "arguments (GiB)", "outputs (GiB)"], rows)
    print(
        f"chunked loss: {saved:.2f} GiB less temporary memory per step "
        f"({saved / max(results['whole']['temp_gib'], 1e-9):.0%})"
    )
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
