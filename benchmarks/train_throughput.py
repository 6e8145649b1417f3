"""Training throughput of a GPT: tokens/s, step time, compile time, memory and MFU, side by side
with Hugging Face `transformers` GPT2LMHeadModel trained with torch in the same run.

    python benchmarks/train_throughput.py                    # 6 layers x 384, context 256, batch 8
    python benchmarks/train_throughput.py --json out.json    # also write the numbers as JSON
    python benchmarks/train_throughput.py --config configs/gpt2_small.py --vocab 50257 \\
        --batch 16 --set model.attention_impl=cudnn --set model.attention_dropout_rate=0

The default shape is a character-level GPT (vocabulary 65, float32, AdamW, no dropout). Both
models train on the same random tokens for the same steps, in alternating blocks so that load
from other processes hits both alike. The reference runs where JAX runs (`--reference-device`):
on the CPU in float32, eagerly, with as many torch threads as this process has cores; on a GPU
as one would train it there: SDPA attention, bfloat16 autocast when our model computes in
bfloat16, fused AdamW and `torch.compile` (JAX then takes at most 45% of the GPU's memory, so
that torch has room in the same process).
MFU counts 6N + 12 L H Q T FLOPs per token (`transformer.metrics.flops_per_token`) against a
float32 matrix product measured in the same run and, on known accelerators, the published dense
bfloat16 peak. On CPU, freed host memory is kept for reuse as `train.py` does
(`transformer/train/hostmem.py`); `--no-keep-host-memory` measures without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import _common as common
import jax
import jax.numpy as jnp
import numpy as np
from _steps import Ours, Reference

from transformer.model import ops
from transformer.model.config import PRESETS
from transformer.train import hostmem, xla_flags
from transformer.train.config import base_config
from transformer.train.metrics import (
    flops_per_token,
    known_peak_flops,
    measure_matmul_flops,
)


def parse_args() -> argparse.Namespace:
    return argument_parser(__doc__.split("\n")[0]).parse_args()


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options of the model, the run and the reference (also `profile_trace.py`'s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="benchmark a run config (configs/NAME.py) instead")
    parser.add_argument("--layers", type=int, help="decoder layers (default 6)")
    parser.add_argument("--heads", type=int, help="attention heads (default 6)")
    parser.add_argument("--width", type=int, help="d_model (default 384)")
    parser.add_argument("--ff", type=int, help="feed-forward width (default 4 x width)")
    parser.add_argument("--context", type=int, help="sequence length (default 256)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8)")
    parser.add_argument("--dtype", help="compute dtype: float32 (default) | bfloat16")
    parser.add_argument("--vocab", type=int, default=65, help="tokenizer vocabulary (default 65)")
    common.add_set_argument(parser, "model.scan_layers=true")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks of timed steps")
    parser.add_argument(
        "--reference-device",
        choices=("auto", "cpu", "cuda", "none"),
        default="auto",
        help="where the transformers+torch reference trains: auto (default) = where JAX runs, "
        "CPU or CUDA (none on other accelerators); none skips it",
    )
    parser.add_argument(
        "--reference-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the reference's forward pass and loss under torch.compile; default: on CUDA "
        "only. A compile that fails (no C++ compiler, say) falls back to eager and says why",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the reference (--reference-device none)"
    )
    parser.add_argument(
        "--keep-host-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let glibc reuse freed memory instead of unmapping it (transformer/train/hostmem.py); "
        "default: as train.py does, i.e. on when running on the CPU. Applies to both models, "
        "since they share the process",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def build_config(args: argparse.Namespace) -> Any:
    if args.config:
        config = common.load_run_config(args.config)
    else:
        config = base_config()
        config.model.update(PRESETS["gpt2_small"])  # pre-norm, GELU, learned positions, tied
        config.model.update(
            vocab_size=0,
            num_decoder_layers=6,
            num_heads=6,
            d_model=384,
            d_ff=4 * 384,
            max_len=256,
            dropout_rate=0.0,
            attention_dropout_rate=0.0,
            dtype="float32",
        )
        config.data.seq_len = 256
        config.train.batch_size = 8
    for flag, key in (
        ("layers", "num_decoder_layers"),
        ("heads", "num_heads"),
        ("width", "d_model"),
    ):
        if getattr(args, flag) is not None:
            config.model[key] = getattr(args, flag)
    if args.width is not None and args.ff is None:
        config.model.d_ff = 4 * args.width
    if args.ff is not None:
        config.model.d_ff = args.ff
    if args.dtype is not None:
        config.model.dtype = args.dtype
    if args.context is not None:
        config.data.seq_len = args.context
    if args.batch is not None:
        config.train.batch_size = args.batch
    config.train.grad_accum_steps = 1  # one micro-batch per step: the batch is the step
    common.apply_overrides(config, args.set)
    config.model.max_len = max(config.model.max_len, config.data.seq_len)
    config.train.num_steps = 10**6  # no schedule end in sight
    config.train.warmup_steps = 0
    return config


@dataclasses.dataclass(frozen=True)
class Yardstick:
    """What turns either model's step times into throughput and MFU."""

    tokens_per_step: int
    devices: int  # 1 on the CPU: simulated CPU devices share its cores
    measured_flops: float  # the machine's limit: the best matmul any round reached
    published_flops: float | None  # the dense bfloat16 peak of a known accelerator

    def summary(
        self, times: list[float], losses: list[float], num_params: int, flops: float
    ) -> dict[str, Any]:
        """One model's numbers, from its step `times` and `losses`; `flops` per token."""
        step_s = common.median(times)
        tokens_per_s = self.tokens_per_step / step_s
        achieved = tokens_per_s * flops / self.devices
        published = self.published_flops
        return {
            "tokens_per_s": tokens_per_s,
            "step_s_median": step_s,
            "step_s_min": min(times),
            "steps_timed": len(times),
            "num_params": num_params,
            "flops_per_token": flops,
            "achieved_flops_per_device": achieved,
            "mfu_vs_measured_matmul": achieved / self.measured_flops,
            "mfu_vs_published_peak": achieved / published if published else None,
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }


def main() -> None:
    args = parse_args()
    if args.no_reference:
        args.reference_device = "none"
    common.make_room_for_torch(args.reference_device)
    keep_memory = hostmem.configure(args.keep_host_memory)
    xla_flags.configure()  # as train.py: the shipped GPU flags, unless XLA_FLAGS is set
    config = build_config(args)
    machine = common.machine()  # load average now, before this run adds to it
    machine["keep_freed_host_memory"] = keep_memory
    results = benchmark(args, config, machine)
    results["machine"]["load_average_end"] = common.load_average()
    report(results)
    common.write_json(args.json, results)


def benchmark(args: argparse.Namespace, config: Any, machine: dict[str, Any]) -> dict[str, Any]:
    """Both models warmed up, then timed in alternating rounds: the results `report` prints."""
    batch, seq_len = config.train.batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, args.vocab, (batch, seq_len + 1), np.int32)
    platform = machine["platform"]
    ref_device, ref_skipped = common.reference_device(args.reference_device, platform)
    if ref_device is None and args.reference_device != "none":
        print(f"transformers+torch reference skipped: {ref_skipped}")

    ours, memory_ours, memory_source = warm_up_ours(config, args.vocab, tokens, args.warmup)
    cfg = ours.model_cfg
    reference, reference_error = None, None
    if ref_device is not None:
        reference, reference_error = warm_up_reference(args, config, cfg, tokens, ref_device)
    rss_all = common.peak_host_memory_bytes()

    # float32 on CPU; on accelerators the compute dtype (bfloat16 for GPT-2 small).
    matmul_dtype = jnp.float32 if platform == "cpu" else jnp.dtype(config.model.dtype)
    times, measured = time_rounds(args, ours, reference, platform, matmul_dtype)
    devices = 1 if platform == "cpu" else jax.device_count()
    yardstick = Yardstick(
        batch * seq_len, devices, measured, known_peak_flops(jax.local_devices()[0])
    )
    ours_flops = flops_per_token(cfg, ours.num_params, seq_len)
    results: dict[str, Any] = {
        "machine": machine,
        "shape": shape_results(args, cfg, batch, seq_len),
        "measured_matmul_flops": measured,
        "measured_matmul_dtype": jnp.dtype(matmul_dtype).name,
        "published_peak_flops": yardstick.published_flops,
        "ours": {
            **yardstick.summary(times["ours"], ours.losses, ours.num_params, ours_flops),
            "lower_s": ours.lower_s,
            "compile_s": ours.compile_s,
            "peak_memory_bytes": memory_ours,
            "peak_memory_source": memory_source,
        },
    }
    if reference_error is not None:
        results["reference_error"] = reference_error
    if reference is not None:
        # The reference's own shape: `vocab` embedding rows where ours may pad.
        ref_cfg = dataclasses.replace(cfg, vocab_size=args.vocab)
        ref_flops = flops_per_token(ref_cfg, reference.num_params, seq_len)
        throughput = yardstick.summary(
            times["reference"], reference.losses, reference.num_params, ref_flops
        )
        results["reference"] = reference_results(reference, throughput, rss_all)
        results["ratio_tokens_per_s"] = (
            results["ours"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
        )
    return results


def warm_up_ours(config: Any, vocab: int, tokens: np.ndarray, warmup: int) -> tuple[Ours, int, str]:
    """Our train step compiled and run `warmup` times; its peak memory and where that is from."""
    ours = Ours(config, vocab, tokens)
    for _ in range(warmup):
        ours.step()
    memory = common.device_peak_memory_bytes()
    if memory is None:
        return ours, common.peak_host_memory_bytes(), "process RSS high-water"
    return ours, memory, "device peak_bytes_in_use"


def warm_up_reference(
    args: argparse.Namespace, config: Any, model_cfg: Any, tokens: np.ndarray, device: str
) -> tuple[Reference | None, str | None]:
    """The reference on `device` after its warm-up steps, or None and why it failed."""
    compile_ref = device == "cuda" if args.reference_compile is None else args.reference_compile
    try:
        reference = Reference(config, model_cfg, args.vocab, tokens, device, compile_ref)
        for _ in range(max(args.warmup, 1)):  # the first step compiles, if compiling
            reference.step()
    except Exception as error:  # noqa: BLE001 - ours still gets measured and reported
        reference_error = common.short_error(error)
        print(f"transformers+torch reference failed; ours alone: {reference_error}")
        return None, reference_error
    return reference, None


def time_rounds(
    args: argparse.Namespace,
    ours: Ours,
    reference: Reference | None,
    platform: str,
    matmul_dtype: Any,
) -> tuple[dict[str, list[float]], float]:
    """Step times of each model, and the best matmul FLOP/s of any round."""
    # Alternate blocks of steps (and the matmul peak) so that outside load affects all alike.
    size = 2048 if platform == "cpu" else 8192
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    matmul: list[float] = []
    per_round = max(args.steps // args.rounds, 1)
    for _ in range(args.rounds):
        with ours.setup.within_mesh():
            times["ours"] += common.time_calls(ours.step, per_round)
        matmul.append(measure_matmul_flops(size=size, dtype=matmul_dtype))
        if reference is not None:
            time.sleep(0.2)  # let torch's and XLA's worker threads go idle between blocks
            times["reference"] += common.time_calls(reference.step, per_round)
            time.sleep(0.2)
    return times, max(matmul)


def shape_results(args: argparse.Namespace, cfg: Any, batch: int, seq_len: int) -> dict[str, Any]:
    """The model and run shape, as configured and as resolved."""
    return {
        "layers": cfg.num_decoder_layers,
        "heads": cfg.num_heads,
        "d_model": cfg.d_model,
        "d_ff": cfg.d_ff,
        "context": seq_len,
        "batch": batch,
        "vocab": args.vocab,
        "embedding_rows": cfg.vocab_size,
        "dtype": cfg.dtype,
        "scan_layers": cfg.scan_layers,
        "remat_policy": cfg.remat_policy,
        "attention_impl": cfg.attention_impl,
        "kernels": cfg.kernels,
        "kernels_resolved": ops.kernels(cfg.kernels).name,
        "config": args.config or "default",
        "overrides": list(args.set),
    }


def reference_results(
    reference: Reference, throughput: dict[str, Any], rss_all: int
) -> dict[str, Any]:
    """The reference's `throughput` and how it ran; `rss_all` is the process's peak, both
    models' together."""
    return {
        **throughput,
        "library": reference.description,
        "device": reference.device,
        "torch": reference.torch.__version__,
        "attention": reference.attention,
        "autocast_bfloat16": reference.autocast,
        "fused_adamw": reference.fused_adamw,
        "compiled": reference.compiled,
        "compile_error": reference.compile_error,
        "first_step_s": reference.first_step_s,
        "threads": reference.torch.get_num_threads(),
        "peak_memory_bytes": reference.peak_memory_bytes(),
        "peak_memory_bytes_process": rss_all,
    }


def mfu(x: dict[str, Any], key: str) -> str:
    """An MFU fraction as a table cell."""
    if x[key] is None:
        return "n/a"
    if x[key] > 1.0:  # a limit measured while something else held the cores: not a limit
        return "n/a (peak measured too low)"
    return f"{100 * x[key]:.1f}%"


def report(results: dict[str, Any]) -> None:
    s, m, o = results["shape"], results["machine"], results["ours"]
    r = results.get("reference")
    print(
        f"GPT {s['layers']} layers x {s['heads']} heads x {s['d_model']} wide (ff {s['d_ff']}), "
        f"context {s['context']}, batch {s['batch']}, vocab {s['vocab']} "
        f"({s['embedding_rows']} embedding rows), {s['dtype']}, {o['num_params'] / 1e6:.2f}M params"
    )
    load = common.format_load(m["load_average"])
    print(
        f"{m['platform']} ({m['device_kind']}), {m['cores']} cores, jax {m['jax']}, "
        f"load average {load} at start"
        + (", freed host memory kept (as train.py on CPU)" if m["keep_freed_host_memory"] else "")
    )
    rows = ours_rows(results)
    if r is not None:
        print_side_by_side(rows, r)
    else:
        common.print_table(["", "ours (JAX/Flax)"], rows)
    peak = results["published_peak_flops"]
    print(
        f"machine limit: measured {results['measured_matmul_dtype']} matmul "
        f"{results['measured_matmul_flops'] / 1e9:,.1f} GFLOP/s"
        + (f"; published peak {peak / 1e12:,.0f} TFLOP/s" if peak else "")
        + f"; peak memory: {o['peak_memory_source']}"
    )
    if r is not None:
        print(f"ours / transformers+torch tokens/s: {results['ratio_tokens_per_s']:.2f}x")
    end = m.get("load_average_end")
    if end:
        print(f"load average at end: {', '.join(f'{x:.2f}' for x in end)}")


def ours_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's first two columns: what each row measures, and our number."""
    o = results["ours"]
    return [
        ("tokens/s", f"{o['tokens_per_s']:,.0f}"),
        ("step time, median (ms)", f"{1e3 * o['step_s_median']:.1f}"),
        ("step time, min (ms)", f"{1e3 * o['step_s_min']:.1f}"),
        ("compile time (s)", f"{o['compile_s']:.2f}"),
        ("peak memory (MiB)", f"{o['peak_memory_bytes'] / 2**20:,.0f}"),
        ("achieved GFLOP/s", f"{o['achieved_flops_per_device'] / 1e9:,.1f}"),
        (
            f"MFU vs measured {results['measured_matmul_dtype']} matmul",
            mfu(o, "mfu_vs_measured_matmul"),
        ),
        ("MFU vs published bf16 peak", mfu(o, "mfu_vs_published_peak")),
        ("loss first -> last", f"{o['loss_first']:.3f} -> {o['loss_last']:.3f}"),
    ]


def print_side_by_side(rows: list[tuple[str, str]], r: dict[str, Any]) -> None:
    """The table with the reference's column `r` next to ours, then what the reference was."""
    on_cuda = r.get("device") == "cuda"
    memory = (
        f"{r['peak_memory_bytes'] / 2**20:,.0f}"
        if on_cuda and r.get("peak_memory_bytes") is not None
        else f"{r['peak_memory_bytes_process'] / 2**20:,.0f} (both)"
    )
    first = r.get("first_step_s")
    ref = [
        f"{r['tokens_per_s']:,.0f}",
        f"{1e3 * r['step_s_median']:.1f}",
        f"{1e3 * r['step_s_min']:.1f}",
        "-" if first is None else f"{first:.2f} (first step)",
        memory,
        f"{r['achieved_flops_per_device'] / 1e9:,.1f}",
        mfu(r, "mfu_vs_measured_matmul"),
        mfu(r, "mfu_vs_published_peak"),
        f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
    ]
    where = "CUDA" if on_cuda else f"{r['threads']} threads"
    if r.get("compiled"):
        where += ", compiled"
    common.print_table(
        ["", "ours (JAX/Flax)", f"transformers+torch ({where})"],
        [(name, value, theirs) for (name, value), theirs in zip(rows, ref, strict=False)],
    )
    print(f"reference: {r['library']}")
    if r.get("compile_error"):
        print(f"reference: torch.compile failed, ran eagerly: {r['compile_error']}")


if __name__ == "__main__":
    main()
