"""The largest GPT that trains on one device, with and without rematerialisation: how many
layers of a given width fit one train step (AdamW, float32 parameters and optimizer state,
bfloat16 compute, GPT-2 layers under nn.scan, context 1024), found from XLA's own memory
estimate and then checked by training a couple of steps.

    python benchmarks/largest_model.py --json largest.json           # width 2048, 16 heads
    python benchmarks/largest_model.py --width 1600 --heads 25 --batch 8

For each remat policy (--policies, default none and full) the train step is compiled on
abstract inputs (nothing allocated) at two depths (--probe-layers). Under nn.scan the memory XLA
assigns to the step (`compiled.memory_analysis()`: arguments + outputs - donated + temporaries)
grows linearly with the depth, so the two points give the bytes per layer and the rest, and
hence the deepest model whose step fits in what JAX's allocator may hold (`bytes_limit`, less
--headroom; this script lets JAX have --memory-fraction of the GPU). That depth is then built,
compiled and trained for --steps steps; if it runs out of memory the depth shrinks by --shrink
until one trains, within the time box --budget-s. On a CPU, which has no allocator limit, pass
--capacity-gib to search against a made-up capacity (to check the script).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path
from typing import Any

import _common as common


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gpt2_small.py", help="base run config")
    parser.add_argument("--width", type=int, default=2048, help="d_model (d_ff = 4 x width)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads")
    parser.add_argument("--context", type=int, default=1024, help="sequence length")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--vocab", type=int, default=50257, help="tokenizer vocabulary")
    parser.add_argument("--policies", default="none,full", help="remat policies to search")
    parser.add_argument(
        "--probe-layers", default="8,16", help="the two depths compiled to fit the memory line"
    )
    parser.add_argument("--steps", type=int, default=2, help="steps trained at the found depth")
    common.add_set_argument(parser, "model.dtype=float32")
    parser.add_argument("--memory-fraction", type=float, default=0.95, help="of the GPU, for JAX")
    parser.add_argument(
        "--headroom", type=float, default=0.03, help="fraction of the limit left free"
    )
    parser.add_argument("--shrink", type=float, default=0.9, help="depth factor after an OOM")
    parser.add_argument("--capacity-gib", type=float, help="search against this, not the device")
    parser.add_argument("--budget-s", type=float, default=600, help="time box for the search")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def run_config(args: argparse.Namespace, layers: int, remat: str) -> Any:
    """The config `train_throughput.py` would build for this shape (one micro-batch per step)."""
    import train_throughput

    shape = argparse.Namespace(
        config=args.config,
        layers=layers,
        heads=args.heads,
        width=args.width,
        ff=None,
        dtype=None,
        context=args.context,
        batch=args.batch,
        set=["model.scan_layers=true", f"model.remat_policy={remat}", *args.set],
    )
    return train_throughput.build_config(shape)


def step_memory(args: argparse.Namespace, layers: int, remat: str) -> dict[str, Any]:
    """Bytes XLA assigns to one train step at this depth, and the parameter count, from a
    compile on abstract inputs."""
    import jax

    from transformer.model.sharding import batch_sharding
    from transformer.train.config import RunConfig
    from transformer.train.metrics import count_params
    from transformer.train.trainer import Trainer

    config = run_config(args, layers, remat)
    run_cfg = RunConfig.from_any(config)
    model_cfg = run_cfg.model_config(args.vocab)
    trainer = Trainer.build(run_cfg, model_cfg, devices=jax.devices()[:1])
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(trainer.mesh))
        for k, v in trainer.task.dummy_batch(args.batch, args.context).items()
    }
    start = time.perf_counter()
    with trainer.within_mesh():
        compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    stats = compiled.memory_analysis()
    assigned = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return {
        "layers": layers,
        "bytes": int(max(assigned, getattr(stats, "peak_memory_in_bytes", 0) or 0)),
        "num_params": count_params(trainer.abstract_state.params),
        "compile_s": time.perf_counter() - start,
    }


def fit_depth(a: dict[str, Any], b: dict[str, Any], capacity: float) -> dict[str, Any]:
    """The line through two (layers, bytes) points and the deepest depth under `capacity`."""
    per_layer = (b["bytes"] - a["bytes"]) / (b["layers"] - a["layers"])
    fixed = a["bytes"] - per_layer * a["layers"]
    params_per_layer = (b["num_params"] - a["num_params"]) / (b["layers"] - a["layers"])
    params_fixed = a["num_params"] - params_per_layer * a["layers"]
    layers = math.floor((capacity - fixed) / per_layer) if per_layer > 0 else 0
    return {
        "bytes_per_layer": per_layer,
        "bytes_fixed": fixed,
        "params_per_layer": params_per_layer,
        "params_fixed": params_fixed,
        "predicted_layers": max(layers, 0),
    }


def train_steps(args: argparse.Namespace, layers: int, remat: str) -> dict[str, Any]:
    """Builds the model at this depth, compiles its step and trains --steps steps on random
    tokens; raises what JAX raises (out of memory, say)."""
    import numpy as np
    import train_throughput

    config = run_config(args, layers, remat)
    tokens = np.random.default_rng(0).integers(
        0, args.vocab, (args.batch, args.context + 1), np.int32
    )
    start = time.perf_counter()
    ours = train_throughput.Ours(config, args.vocab, tokens)
    with ours.setup.within_mesh():
        for _ in range(args.steps):
            ours.step()
    result = {
        "layers": layers,
        "num_params": ours.num_params,
        "losses": ours.losses,
        "compile_s": ours.compile_s,
        "seconds": time.perf_counter() - start,
        "finite": bool(np.all(np.isfinite(ours.losses))),
    }
    del ours
    gc.collect()
    return result


def search(args: argparse.Namespace, remat: str, capacity: float, deadline: float) -> dict:
    """The predicted and the verified depth for one remat policy (as far as time allows)."""
    out: dict[str, Any] = {"remat_policy": remat, "status": "incomplete (time box)"}
    probes = [int(x) for x in args.probe_layers.split(",")]
    points = []
    for layers in probes:
        if time.monotonic() > deadline:
            return out
        points.append(step_memory(args, layers, remat))
        p = points[-1]
        print(
            f"  remat {remat}: {layers} layers ({common.format_count(p['num_params'])} params) "
            f"need {common.format_bytes(p['bytes'])} (XLA's estimate; compiled in "
            f"{p['compile_s']:.1f} s)",
            flush=True,
        )
    out["probes"] = points
    out.update(fit_depth(points[0], points[1], capacity))
    layers = out["predicted_layers"]
    predicted_params = out["params_fixed"] + out["params_per_layer"] * layers
    print(
        f"  remat {remat}: {common.format_bytes(out['bytes_per_layer'])} per layer + "
        f"{common.format_bytes(out['bytes_fixed'])} -> at most {layers} layers "
        f"({common.format_count(predicted_params)} params) in {common.format_bytes(capacity)}",
        flush=True,
    )
    out["attempts"] = []
    while layers >= 1:
        if time.monotonic() > deadline:
            return out
        try:
            trained = train_steps(args, layers, remat)
        except Exception as error:  # noqa: BLE001 - out of memory is what we look for
            oom, message = common.is_out_of_memory(error), common.short_error(error)
            trained = None  # the failed state is freed once the traceback is gone, below
        if trained is None:
            gc.collect()
            out["attempts"].append({"layers": layers, "error": "out of memory" if oom else message})
            print(f"  remat {remat}: {layers} layers: {'out of memory' if oom else message}")
            if not oom:
                out["status"] = f"failed: {message}"
                return out
            layers = min(layers - 1, math.floor(layers * args.shrink))
            continue
        out["attempts"].append(trained)
        out.update(
            status="ok" if trained["finite"] else "trained, but the loss is not finite",
            largest_layers=layers,
            largest_params=trained["num_params"],
        )
        print(
            f"  remat {remat}: {layers} layers ({common.format_count(trained['num_params'])} "
            "params) "
            f"trained {args.steps} steps, loss {trained['losses'][-1]:.3f}, in "
            f"{trained['seconds']:.1f} s (compile {trained['compile_s']:.1f} s)",
            flush=True,
        )
        return out
    out["status"] = "nothing fits"
    return out


def main() -> None:
    args = parse_args()
    deadline = time.monotonic() + args.budget_s
    common.limit_jax_gpu_memory(args.memory_fraction)  # before JAX touches the GPU
    limit = common.device_memory_limit_bytes()
    if args.capacity_gib is not None:
        limit, source = args.capacity_gib * 2**30, "--capacity-gib"
    elif limit is not None:
        source = f"JAX's allocator limit ({args.memory_fraction:.0%} of the GPU asked)"
    else:
        raise SystemExit("the device reports no memory limit (a CPU?): pass --capacity-gib")
    capacity = limit * (1 - args.headroom)
    machine = common.machine()
    print(
        f"largest GPT on one {machine['device_kind'] or machine['platform']}: width "
        f"{args.width}, {args.heads} heads, context {args.context}, batch {args.batch}; "
        f"{common.format_bytes(limit)} ({source}), {args.headroom:.0%} left free",
        flush=True,
    )
    results: dict[str, Any] = {
        "machine": machine,
        "config": args.config,
        "width": args.width,
        "heads": args.heads,
        "context": args.context,
        "batch": args.batch,
        "limit_bytes": limit,
        "limit_source": source,
        "capacity_bytes": capacity,
        "policies": [],
    }
    for remat in args.policies.split(","):
        results["policies"].append(search(args, remat, capacity, deadline))
        common.write_json(args.json, results)  # as it goes: a run cut short keeps what it did
    print(summary_line(results))


def summary_line(results: dict[str, Any]) -> str:
    """One line: the largest depth and size that trained, per remat policy."""
    parts = []
    for p in results["policies"]:
        if "largest_layers" in p:
            parts.append(
                f"remat {p['remat_policy']}: {p['largest_layers']} layers "
                f"({common.format_count(p['largest_params'])} params) trains"
            )
        else:
            parts.append(f"remat {p['remat_policy']}: {p['status']}")
    return (
        f"LARGEST GPT, width {results['width']}, batch {results['batch']} x "
        f"{results['context']}: " + "; ".join(parts)
    )


if __name__ == "__main__":
    main()
