"""Sampling speed of the default GPT: KV-cached decoding vs recomputing the whole sequence each
step, and vs Hugging Face `transformers` GPT2LMHeadModel.generate on torch CPU.

    python benchmarks/generation.py                    # configs/default.py shapes, 512 new tokens
    python benchmarks/generation.py --json out.json    # also write the numbers as JSON

All three decode greedily from the same prompt with randomly initialised weights of the same
shapes (speed does not depend on the values). Ours runs the whole sampling loop in one jitted
`lax.while_loop` over a KV cache (`transformer.decode.sample` over `gpt_tokens_to_logits`). The
no-cache baseline is a plain Python loop calling the jitted full forward pass on the growing
sequence, padded to its final length so that it compiles once. The reference is
`GPT2LMHeadModel.generate(use_cache=True, do_sample=False)` with as many torch threads as cores.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import _common as common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import ModelConfig
from transformer.decode import sample
from transformer.inference import gpt_init_cache, gpt_tokens_to_logits
from transformer.metrics import count_params
from transformer.models import GPT
from transformer.run_config import RunConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py", help="run config for shapes")
    parser.add_argument("--vocab", type=int, default=65, help="tokenizer vocabulary (default 65)")
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens to generate")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=1, help="sequences generated together")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers+torch")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    config = common.load_run_config(args.config)
    # The config's context (128 for default.py) is too short for 512 new tokens: raise max_len.
    config.model.max_len = max(config.model.max_len, args.prompt_len + args.new_tokens)
    config.model.dropout_rate = 0.0
    config.model.attention_dropout_rate = 0.0
    return RunConfig.from_any(config).model_config(args.vocab)


@functools.partial(jax.jit, static_argnames=("cfg", "num_classes", "max_new_tokens"))
def cached_generate(
    params: Any, prompt: jax.Array, *, cfg: ModelConfig, num_classes: int, max_new_tokens: int
) -> jax.Array:
    b, t = prompt.shape
    cache = gpt_init_cache(cfg, b, t + max_new_tokens, jnp.zeros((b,), jnp.int32))
    return sample(
        gpt_tokens_to_logits(cfg, params, num_classes),
        prompt,
        cache,
        jax.random.key(0),
        max_new_tokens=max_new_tokens,
        temperature=0.0,
    )


def uncached_generate(
    forward: Any, params: Any, prompt: np.ndarray, new_tokens: int, num_classes: int
) -> np.ndarray:
    """Greedy decoding that re-runs the full forward pass over the whole sequence every step."""
    b, t = prompt.shape
    tokens = jnp.zeros((b, t + new_tokens), jnp.int32).at[:, :t].set(prompt)
    out = []
    for i in range(new_tokens):
        # Causal attention: padding after position t + i - 1 does not change its logits.
        tokens, token = forward(params, tokens, t + i, num_classes)
        out.append(token)
    return np.stack(jax.device_get(out), axis=1)


def make_forward(cfg: ModelConfig) -> Any:
    model = GPT(cfg)

    @functools.partial(jax.jit, static_argnums=3, donate_argnums=1)
    def forward(params: Any, tokens: jax.Array, length: jax.Array, num_classes: int) -> Any:
        logits = model.apply({"params": params}, tokens)  # [b, T, v]
        last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
        token = jnp.argmax(last[:, :num_classes], axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_index_in_dim(tokens, token, length, axis=1), token

    return forward


def hf_reference(cfg: ModelConfig, vocab: int, prompt: np.ndarray, new_tokens: int) -> Any:
    import torch

    model = common.reference_gpt2(cfg, vocab).eval()
    inputs = torch.from_numpy(prompt).long()
    attention_mask = torch.ones_like(inputs)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(
                inputs,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
            )
        return out[:, prompt.shape[1] :].numpy()

    return run, sum(p.numel() for p in model.parameters())


def main() -> None:
    args = parse_args()
    machine = common.machine()
    cfg = model_config(args)
    params = nn.meta.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    prompt = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt_len))
    prompt = prompt.astype(np.int32)
    n = args.new_tokens
    generated = args.batch * n

    # Cached: one compiled program for the whole loop.
    run_cached = functools.partial(
        cached_generate,
        params,
        jnp.asarray(prompt),
        cfg=cfg,
        num_classes=args.vocab,
        max_new_tokens=n,
    )
    start = time.perf_counter()
    cached_tokens = np.asarray(run_cached())
    cached_first = time.perf_counter() - start
    cached_times = common.time_calls(lambda: run_cached().block_until_ready(), args.repeats)

    # Recomputing: compile the fixed-length forward once, then time whole generations.
    forward = make_forward(cfg)
    start = time.perf_counter()
    uncached_generate(forward, params, prompt, 1, args.vocab)
    uncached_compile = time.perf_counter() - start
    uncached_repeats = max(1, min(args.repeats, 2))
    uncached_times = []
    for _ in range(uncached_repeats):
        start = time.perf_counter()
        uncached_tokens = uncached_generate(forward, params, prompt, n, args.vocab)
        uncached_times.append(time.perf_counter() - start)

    results: dict[str, Any] = {
        "machine": machine,
        "model": {
            "config": args.config,
            "layers": cfg.num_decoder_layers,
            "heads": cfg.num_heads,
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "vocab": args.vocab,
            "max_len": cfg.max_len,
            "num_params": count_params(params),
            "dtype": cfg.dtype,
        },
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "cached": {
            "s_median": common.median(cached_times),
            "s_min": min(cached_times),
            "first_call_s": cached_first,
        },
        "recompute": {
            "s_median": common.median(uncached_times),
            "s_min": min(uncached_times),
            "compile_s": uncached_compile,
        },
        # Greedy from the same weights: the two of ours must agree token for token (up to
        # float near-ties, which random weights make rare).
        "cached_equals_recompute": float(np.mean(cached_tokens == uncached_tokens)),
    }
    for name in ("cached", "recompute"):
        results[name]["tokens_per_s"] = generated / results[name]["s_median"]
    results["cached_speedup_vs_recompute"] = (
        results["recompute"]["s_median"] / results["cached"]["s_median"]
    )
    if not args.no_reference:
        run_hf, hf_params = hf_reference(cfg, args.vocab, prompt, n)
        run_hf()  # warm-up
        hf_times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            hf_tokens = run_hf()
            hf_times.append(time.perf_counter() - start)
        assert hf_tokens.shape == (args.batch, n), hf_tokens.shape
        results["reference"] = {
            "library": "transformers GPT2LMHeadModel.generate(use_cache=True), torch CPU",
            "num_params": hf_params,
            "s_median": common.median(hf_times),
            "s_min": min(hf_times),
            "tokens_per_s": generated / common.median(hf_times),
        }
        results["cached_speedup_vs_reference"] = (
            results["reference"]["s_median"] / results["cached"]["s_median"]
        )
    results["machine"]["load_average_end"] = common.load_average()
    report(results)
    common.write_json(args.json, results)


def report(results: dict[str, Any]) -> None:
    m, mod = results["machine"], results["model"]
    load = common.format_load(m["load_average"])
    print(
        f"GPT {mod['layers']} layers x {mod['heads']} heads x {mod['d_model']} wide "
        f"({mod['num_params'] / 1e6:.2f}M params, {mod['config']}, max_len {mod['max_len']}): "
        f"batch {results['batch']}, prompt {results['prompt_len']}, "
        f"{results['new_tokens']} new tokens, greedy"
    )
    print(f"{m['platform']}, {m['cores']} cores, jax {m['jax']}, load average {load} at start")
    rows = [
        ("ours, KV cache (one jitted while_loop)", results["cached"]),
        ("ours, recompute full sequence each step", results["recompute"]),
    ]
    if "reference" in results:
        rows.append(("transformers generate(use_cache=True)", results["reference"]))
    common.print_table(
        ["", "seconds (median)", "tokens/s"],
        [(name, f"{r['s_median']:.3f}", f"{r['tokens_per_s']:,.0f}") for name, r in rows],
    )
    print(f"cached vs recompute: {results['cached_speedup_vs_recompute']:.1f}x faster")
    if "reference" in results:
        print(
            f"cached vs transformers generate: {results['cached_speedup_vs_reference']:.1f}x faster"
        )
    print(
        f"cached tokens equal recompute tokens: {100 * results['cached_equals_recompute']:.1f}%; "
        f"first cached call (compile + run) {results['cached']['first_call_s']:.2f} s"
    )
    end = m.get("load_average_end")
    if end:
        print(f"load average at end: {', '.join(f'{x:.2f}' for x in end)}")


if __name__ == "__main__":
    main()
