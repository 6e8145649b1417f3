"""Where a GPT training step's time goes: each part of a layer timed alone, forward and backward.

    python benchmarks/step_profile.py                  # the train_throughput.py default shape
    python benchmarks/step_profile.py --layers 12 --width 768 --heads 12 --context 1024 --batch 4

Times, at the step's shapes, the layer's own functions (the four projections, attention, the
norms, GELU) forward and forward+backward as separately jitted calls, and the whole donated
train step. The parts times the layer count, against the whole step, leave the rest: embedding,
output head, loss, optimizer update and what fusing across parts saves or costs. Parts with
matrix products show the GFLOP/s they reach (attention: of the products it really computes,
3/4 of the t x t scores under the causal split), next to a large float32 matrix product
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import _common as common
import jax
import jax.numpy as jnp
import numpy as np

from transformer.model import ops
from transformer.model.layers import causal_mask
from transformer.train import hostmem
from transformer.train.metrics import measure_matmul_flops


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="decoder layers")
    parser.add_argument("--heads", type=int, default=6, help="attention heads")
    parser.add_argument("--width", type=int, default=384, help="d_model")
    parser.add_argument("--context", type=int, default=256, help="sequence length")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--vocab", type=int, default=65, help="tokenizer vocabulary")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per part (median)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def median_ms(fn: Any, *args: Any, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forward_and_backward(f: Any, *args: Any) -> tuple[Any, Any]:
    """Jitted forward, and jitted forward + backward for a given output cotangent."""

    def both(*a: Any) -> Any:
        *inputs, cotangent = a
        out, vjp = jax.vjp(f, *inputs)
        return out, vjp(cotangent)

    return jax.jit(f), jax.jit(both)


def parts(args: argparse.Namespace) -> list[tuple[str, Any, float, tuple[Any, ...]]]:
    """(name, function, matmul FLOPs of its forward, inputs) for one layer."""
    b, t, d, n = args.batch, args.context, args.width, args.heads
    h, f = d // n, 4 * d
    key = iter(jax.random.split(jax.random.key(0), 32))

    def normal(*shape: int) -> jax.Array:
        return jax.random.normal(next(key), shape)

    rows = 2 * b * t
    mask = causal_mask(t)
    # The products attention really computes: with the causal split, 3/4 of the t x t scores.
    attention_flops = sum(4 * b * n * (end - start) * keys * h for start, end, keys in
                          ops.query_blocks(t, causal=True))  # fmt: skip
    return [
        ("qkv projection", lambda x, w: ops.matmul(x, w, 1), rows * d * 3 * d,
         (normal(b, t, d), normal(d, 3, n, h))),
        ("attention", lambda qkv: ops.self_attention(qkv, mask, True), attention_flops,
         (normal(b, t, 3, n, h),)),
        ("output projection", lambda x, w: ops.matmul(x, w, 2), rows * d * d,
         (normal(b, t, n, h), normal(n, h, d))),
        ("feed-forward in", lambda x, w: ops.matmul(x, w, 1), rows * d * f,
         (normal(b, t, d), normal(d, f))),
        ("GELU", ops.gelu, 0, (normal(b, t, f),)),
        ("feed-forward out", lambda x, w: ops.matmul(x, w, 1), rows * f * d,
         (normal(b, t, f), normal(f, d))),
        ("2 x LayerNorm", lambda x, scale, bias: ops.layer_norm(x, scale, bias, 1e-5), 0,
         (normal(b, t, d), normal(d), normal(d))),
    ]  # fmt: skip


def whole_step_ms(args: argparse.Namespace, repeats: int) -> float:
    import train_throughput

    config = train_throughput.base_config()
    config.model.update(train_throughput.PRESETS["gpt2_small"])
    config.model.update(
        vocab_size=0, num_decoder_layers=args.layers, num_heads=args.heads, d_model=args.width,
        d_ff=4 * args.width, max_len=args.context, dropout_rate=0.0, attention_dropout_rate=0.0,
        dtype="float32",
    )  # fmt: skip
    config.data.seq_len, config.train.batch_size = args.context, args.batch
    config.train.update(num_steps=10**6, warmup_steps=0, grad_accum_steps=1)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.context + 1))
    ours = train_throughput.Ours(config, args.vocab, tokens.astype(np.int32))
    ours.step()
    ours.step()
    return 1e3 * common.median(common.time_calls(ours.step, repeats))


def main() -> None:
    args = parse_args()
    keep_memory = hostmem.configure()
    machine = common.machine()
    step_ms = whole_step_ms(args, args.repeats)
    peak = max(measure_matmul_flops() for _ in range(3))
    rows, results, layer_ms = [], [], 0.0
    for name, f, flops, inputs in parts(args):
        forward, both = forward_and_backward(f, *inputs)
        cotangent = jnp.ones_like(forward(*inputs))
        forward_ms = median_ms(forward, *inputs, repeats=args.repeats)
        both_ms = median_ms(both, *inputs, cotangent, repeats=args.repeats)
        count = 2 if name.startswith("2 x") else 1
        ms = count * both_ms
        layer_ms += ms
        rate = f"{3 * flops / both_ms / 1e6:.0f}" if flops else "-"
        share = args.layers * ms / step_ms
        rows.append([name, f"{forward_ms:.2f}", f"{both_ms:.2f}", rate, f"{100 * share:.1f}%"])
        results.append(
            {"part": name, "forward_ms": forward_ms, "forward_backward_ms": both_ms,
             "per_layer": count, "matmul_flops_forward": flops, "share_of_step": share}
        )  # fmt: skip
    rest = step_ms - args.layers * layer_ms
    rows.append(["rest of the step", "", "", "", f"{100 * rest / step_ms:.1f}%"])
    print(
        f"GPT {args.layers} layers x {args.heads} heads x {args.width} wide, context "
        f"{args.context}, batch {args.batch}, float32; {machine['platform']}, "
        f"{machine['cores']} cores, jax {machine['jax']}, load {machine['load_average']}"
        + (", freed host memory kept" if keep_memory else "")
    )
    common.print_table(
        ["part (one layer)", "forward ms", "fwd+bwd ms", "GFLOP/s", "share of step"], rows
    )
    print(
        f"whole train step {step_ms:.1f} ms; parts x {args.layers} layers "
        f"{args.layers * layer_ms:.1f} ms; measured float32 matmul {peak / 1e9:.0f} GFLOP/s"
    )
    common.write_json(
        args.json,
        {"machine": machine, "args": vars(args) | {"json": None}, "step_ms": step_ms,
         "measured_matmul_flops": peak, "parts": results, "rest_ms": rest},
    )  # fmt: skip


if __name__ == "__main__":
    main()
