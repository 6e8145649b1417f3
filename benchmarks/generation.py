"""Sampling speed of a GPT: KV-cached decoding vs recomputing the whole sequence each step, and
vs Hugging Face `transformers` GPT2LMHeadModel.generate with torch, in the same run.

    python benchmarks/generation.py                    # configs/default.py shapes, 512 new tokens
    python benchmarks/generation.py --json out.json    # also write the numbers as JSON
    python benchmarks/generation.py --config configs/gpt2_small.py --vocab 50257 --batch 16 \\
        --set model.param_dtype=bfloat16 --cache-implementation static --no-recompute

All three decode greedily from the same prompt with randomly initialised weights of the same
shapes (speed does not depend on the values). Ours runs the whole sampling loop in one jitted
`lax.while_loop` over a KV cache (`transformer.inference.decode.sample_tokens` over
`gpt_tokens_to_logits`). The
no-cache baseline is a plain Python loop calling the jitted full forward pass on the growing
sequence, padded to its final length so that it compiles once (`--no-recompute` skips it).

The reference is `GPT2LMHeadModel.generate(do_sample=False)` where JAX runs
(`--reference-device`): on the CPU in float32 with as many torch threads as cores; on CUDA in
the compute dtype of our model (bfloat16 for gpt2_small). `--cache-implementation static` gives
it a preallocated KV cache, with which `transformers` compiles the decoding step on CUDA
(`torch.compile`); if that compile fails, it decodes eagerly and the report says why.
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

from transformer.inference.decode import sample_tokens
from transformer.inference.gpt import gpt_init_cache, gpt_tokens_to_logits
from transformer.model.config import ModelConfig
from transformer.model.models import GPT
from transformer.train.config import RunConfig
from transformer.train.metrics import count_params


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py", help="run config for shapes")
    parser.add_argument("--vocab", type=int, default=65, help="tokenizer vocabulary (default 65)")
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens to generate")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=1, help="sequences generated together")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    common.add_set_argument(parser, "model.param_dtype=bfloat16")
    parser.add_argument(
        "--no-recompute", action="store_true", help="skip the recompute-everything baseline"
    )
    parser.add_argument(
        "--reference-device",
        choices=("auto", "cpu", "cuda", "none"),
        default="auto",
        help="where transformers generates: auto (default) = where JAX runs (CPU or CUDA)",
    )
    parser.add_argument(
        "--cache-implementation",
        choices=("dynamic", "static"),
        default="dynamic",
        help="the reference's KV cache: dynamic (grows; default) or static (preallocated, and "
        "compiled by transformers on CUDA)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip transformers+torch")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    config = common.load_run_config(args.config)
    common.apply_overrides(config, args.set)
    # The config's context (128 for default.py) is too short for 512 new tokens: raise max_len.
    config.model.max_len = max(config.model.max_len, args.prompt_len + args.new_tokens)
    config.model.dropout_rate = 0.0
    config.model.attention_dropout_rate = 0.0
    return RunConfig.from_any(config).model_config(args.vocab)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def cached_generate(
    params: Any, prompt: jax.Array, *, cfg: ModelConfig, max_new_tokens: int
) -> jax.Array:
    b, t = prompt.shape
    cache = gpt_init_cache(cfg, b, t + max_new_tokens, jnp.zeros((b,), jnp.int32))
    return sample_tokens(
        gpt_tokens_to_logits(cfg, params),
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


class HFReference:
    """`GPT2LMHeadModel.generate`, greedy, exactly `new_tokens` tokens from `prompt`, on `device`
    in `dtype` (float32 on the CPU; our compute dtype on CUDA), with a dynamic or static KV
    cache. On CUDA a static cache makes `transformers` compile the decoding step; `warm_up`
    falls back to eager decoding (`disable_compile`) if that fails, and keeps the reason."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab: int,
        prompt: np.ndarray,
        new_tokens: int,
        device: str,
        cache: str,
    ):
        import torch

        self.torch = torch
        self.device, self.cache = device, cache
        self.dtype = cfg.dtype if device == "cuda" else "float32"
        model = common.reference_gpt2(cfg, vocab).eval()
        self.model = model.to(device=device, dtype=getattr(torch, self.dtype))
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.inputs = torch.from_numpy(prompt).long().to(device)
        self.attention_mask = torch.ones_like(self.inputs)
        self.prompt_len, self.new_tokens = prompt.shape[1], new_tokens
        self.compiles = device == "cuda" and cache == "static"  # transformers' own choice
        self.compile_error: str | None = None

    @property
    def description(self) -> str:
        how = "use_cache=True" if self.cache == "dynamic" else 'cache_implementation="static"'
        where = f"torch {self.torch.__version__} {self.device.upper()} {self.dtype}"
        if self.compiles:
            where += ", decoding step compiled by transformers"
        elif self.compile_error:
            where += ", eager (its compile failed)"
        return f"transformers GPT2LMHeadModel.generate({how}), {where}"

    def run(self) -> np.ndarray:
        kwargs: dict[str, Any] = {"use_cache": True}
        if self.cache == "static":
            kwargs["cache_implementation"] = "static"
            if not self.compiles:
                kwargs["disable_compile"] = True
        with self.torch.inference_mode():
            out = self.model.generate(
                self.inputs,
                attention_mask=self.attention_mask,
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                do_sample=False,
                **kwargs,
            )
        return out[:, self.prompt_len :].cpu().numpy()  # waits for the device

    def warm_up(self) -> float:
        """Runs (and compiles) until timings are steady; returns the seconds it took."""
        start = time.perf_counter()
        try:
            self.run()
        except Exception as error:
            if not self.compiles:
                raise
            self.compile_error = common.short_error(error)
            print(f"transformers' compiled decoding failed, decoding eagerly: {self.compile_error}")
            self.compiles = False
            self.run()
        if self.device == "cuda":
            self.run()  # CUDA graphs are recorded on a later call than the compile
        return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.no_reference:
        args.reference_device = "none"
    common.make_room_for_torch(args.reference_device)
    machine = common.machine()
    cfg = model_config(args)
    params = nn.meta.unbox(GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    prompt = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt_len))
    prompt = prompt.astype(np.int32)
    cached_tokens, cached = time_cached(args, cfg, params, prompt)
    results: dict[str, Any] = {
        "machine": machine,
        "model": model_results(args, cfg, params),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "cached": cached,
    }
    if not args.no_recompute:
        uncached_tokens, results["recompute"] = time_recompute(args, cfg, params, prompt)
        # Greedy from the same weights: the two of ours must agree token for token (up to
        # float near-ties, which random weights make rare).
        results["cached_equals_recompute"] = float(np.mean(cached_tokens == uncached_tokens))
        results["cached_speedup_vs_recompute"] = (
            results["recompute"]["s_median"] / results["cached"]["s_median"]
        )
    device, skipped = common.reference_device(args.reference_device, machine["platform"])
    if device is None and args.reference_device != "none":
        print(f"transformers reference skipped: {skipped}")
    if device is not None:
        try:
            results["reference"] = time_reference(args, cfg, prompt, device)
        except Exception as error:  # noqa: BLE001 - ours is measured and reported regardless
            results["reference_error"] = common.short_error(error)
            print(f"transformers reference failed; ours alone: {results['reference_error']}")
        else:
            results["cached_speedup_vs_reference"] = (
                results["reference"]["s_median"] / results["cached"]["s_median"]
            )
    results["machine"]["load_average_end"] = common.load_average()
    report(results)
    common.write_json(args.json, results)


def model_results(args: argparse.Namespace, cfg: ModelConfig, params: Any) -> dict[str, Any]:
    """The model as the report describes it."""
    return {
        "config": args.config,
        "layers": cfg.num_decoder_layers,
        "heads": cfg.num_heads,
        "d_model": cfg.d_model,
        "d_ff": cfg.d_ff,
        "vocab": args.vocab,
        "max_len": cfg.max_len,
        "num_params": count_params(params),
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
    }


def speed(times: list[float], tokens: int, **first_call_s: float) -> dict[str, float]:
    """Median and best of timed runs that each generate `tokens` tokens, with the seconds of
    the first (compiling) call under the name given."""
    median = common.median(times)
    return {
        "s_median": median,
        "s_min": min(times),
        **first_call_s,
        "tokens_per_s": tokens / median,
    }


def time_cached(
    args: argparse.Namespace, cfg: ModelConfig, params: Any, prompt: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """Ours with the KV cache, one compiled program for the whole loop: its tokens and speed."""
    run = functools.partial(
        cached_generate, params, jnp.asarray(prompt), cfg=cfg, max_new_tokens=args.new_tokens
    )
    start = time.perf_counter()
    tokens = np.asarray(run())
    first_call_s = time.perf_counter() - start
    times = common.time_calls(lambda: run().block_until_ready(), args.repeats)
    return tokens, speed(times, args.batch * args.new_tokens, first_call_s=first_call_s)


def time_recompute(
    args: argparse.Namespace, cfg: ModelConfig, params: Any, prompt: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """Ours recomputing the whole sequence each step: its tokens and speed. The fixed-length
    forward pass compiles once, then whole generations are timed (at most twice: it is slow)."""
    forward = make_forward(cfg)
    start = time.perf_counter()
    uncached_generate(forward, params, prompt, 1, args.vocab)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(max(1, min(args.repeats, 2))):
        start = time.perf_counter()
        tokens = uncached_generate(forward, params, prompt, args.new_tokens, args.vocab)
        times.append(time.perf_counter() - start)
    return tokens, speed(times, args.batch * args.new_tokens, compile_s=compile_s)


def time_reference(
    args: argparse.Namespace, cfg: ModelConfig, prompt: np.ndarray, device: str
) -> dict[str, Any]:
    """`generate` on `device`, warmed up (compiled, if it compiles) and timed: how it ran and
    its speed."""
    n = args.new_tokens
    hf = HFReference(cfg, args.vocab, prompt, n, device, args.cache_implementation)
    warm_up_s = hf.warm_up()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        hf_tokens = hf.run()
        times.append(time.perf_counter() - start)
    assert hf_tokens.shape == (args.batch, n), hf_tokens.shape
    return {
        "library": hf.description,
        "device": device,
        "dtype": hf.dtype,
        "cache_implementation": args.cache_implementation,
        "compiled": hf.compiles,
        "compile_error": hf.compile_error,
        "warm_up_s": warm_up_s,
        "num_params": hf.num_params,
        **speed(times, args.batch * n),
    }


def report(results: dict[str, Any]) -> None:
    m, mod = results["machine"], results["model"]
    load = common.format_load(m["load_average"])
    print(
        f"GPT {mod['layers']} layers x {mod['heads']} heads x {mod['d_model']} wide "
        f"({mod['num_params'] / 1e6:.2f}M params, {mod['config']}, max_len {mod['max_len']}): "
        f"batch {results['batch']}, prompt {results['prompt_len']}, "
        f"{results['new_tokens']} new tokens, greedy"
    )
    print(
        f"{m['platform']} ({m['device_kind']}), {m['cores']} cores, jax {m['jax']}, "
        f"load average {load} at start; ours computes in {mod['dtype']} from "
        f"{mod['param_dtype']} parameters"
    )
    rows = [("ours, KV cache (one jitted while_loop)", results["cached"])]
    if "recompute" in results:
        rows.append(("ours, recompute full sequence each step", results["recompute"]))
    if "reference" in results:
        cache = results["reference"]["cache_implementation"]
        rows.append((f"transformers generate ({cache} cache)", results["reference"]))
    common.print_table(
        ["", "seconds (median)", "tokens/s"],
        [(name, f"{r['s_median']:.3f}", f"{r['tokens_per_s']:,.0f}") for name, r in rows],
    )
    if "recompute" in results:
        print(f"cached vs recompute: {results['cached_speedup_vs_recompute']:.1f}x faster")
    if "reference" in results:
        ref = results["reference"]
        print(f"reference: {ref['library']}")
        if ref["compile_error"]:
            print(f"reference: compile failed, decoded eagerly: {ref['compile_error']}")
        print(
            f"cached vs transformers generate: {results['cached_speedup_vs_reference']:.1f}x faster"
        )
    if "recompute" in results:
        print(
            f"cached tokens equal recompute tokens: {100 * results['cached_equals_recompute']:.1f}%"
        )
    print(f"first cached call (compile + run) {results['cached']['first_call_s']:.2f} s")
    end = m.get("load_average_end")
    if end:
        print(f"load average at end: {', '.join(f'{x:.2f}' for x in end)}")


if __name__ == "__main__":
    main()
