"""Memory of a train step by loss: the plain formula on float32 logits, the fused loss on
logits in the compute dtype, and the fused loss in chunks of positions.

    python benchmarks/loss_memory.py                       # configs/gpt2_small.py, 16 x 1024
    python benchmarks/loss_memory.py --batch 8 --chunk 256 --json out.json

Compiles `train_step` on abstract (shape-only) inputs three times: `model.loss_impl=reference`
(float32 logits, log-softmax and a gathered target, differentiated by JAX: the loss before the
fused one), the default `fused` loss, and the fused loss with `model.loss_chunk_len` (no
[b, t, v] logits at all); it reads XLA's buffer assignment (`compiled.memory_analysis()`): the
temporary memory a step needs besides its arguments and outputs. Nothing runs, so it works on a
CPU for any model size; the numbers are XLA's for the backend it compiles for (on a GPU, run it
there).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _common as common
import jax

from transformer.model.sharding import batch_sharding
from transformer.train.config import RunConfig
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


def step_memory(config: Any, vocab: int, loss_impl: str, chunk: int) -> dict[str, float]:
    config.model.loss_impl, config.model.loss_chunk_len = loss_impl, chunk
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


# (JSON key, row label, model.loss_impl, chunked)
VARIANTS = (
    ("reference", "loss_impl=reference (float32 logits)", "reference", False),
    ("whole", "loss_impl=fused", "fused", False),
    ("chunked", "loss_impl=fused, loss_chunk_len={chunk}", "fused", True),
)


def report(results: dict[str, Any], config: Any, args: argparse.Namespace) -> None:
    m = config.model
    print(
        f"{args.config}: {m.num_decoder_layers} layers x {m.d_model}, {m.dtype}, remat "
        f"{m.remat_policy}, batch {args.batch} x {config.data.seq_len}, vocab {args.vocab} "
        f"(float32 logits: {results['float32_logits_gib']:.2f} GiB); "
        f"{jax.devices()[0].platform}"
    )
    rows = [
        (label.format(chunk=args.chunk), *(f"{results[key][k]:.2f}" for k in COLUMNS))
        for key, label, _, _ in VARIANTS
    ]
    common.print_table(["", "temporary (GiB)", "arguments (GiB)", "outputs (GiB)"], rows)
    pairs = (("fused_saved_gib", "fused loss", "reference"), ("chunk_saved_gib", "chunks", "whole"))
    for key, what, base in pairs:
        share = results[key] / max(results[base]["temp_gib"], 1e-9)
        print(f"{what}: {results[key]:.2f} GiB less temporary memory per step ({share:.0%})")


COLUMNS = ("temp_gib", "arguments_gib", "outputs_gib")


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
    }
    for key, _, impl, chunked in VARIANTS:
        results[key] = step_memory(config, args.vocab, impl, args.chunk if chunked else 0)
    temp = {key: results[key]["temp_gib"] for key, *_ in VARIANTS}
    results["fused_saved_gib"] = temp["reference"] - temp["whole"]
    results["chunk_saved_gib"] = temp["whole"] - temp["chunked"]
    report(results, config, args)
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
