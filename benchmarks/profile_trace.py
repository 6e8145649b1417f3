"""Where a training step's device time goes, from profiler traces of ours and PyTorch's, side by
side.

    python benchmarks/profile_trace.py --config configs/gpt2_small.py --vocab 50257 --batch 16 \\
        --set model.attention_dropout_rate=0.0 --set model.attention_impl=auto   # on a GPU
    python benchmarks/profile_trace.py --layers 2 --heads 2 --width 64 --context 64 --batch 2 \\
        --vocab 512                                                             # on a CPU

Takes every option of train_throughput.py (the same model, step and reference) plus `--top`.
Ours: `--steps` steps of the compiled train step under `jax.profiler`, the trace read back in
Python (`jax.profiler.ProfileData`, no TensorBoard). Each XLA op is named by its HLO
instruction; the compiled module's metadata gives every instruction the op name JAX recorded:
the Flax module path (`decoder/layers_3/mlp/wi`, `norm_mlp`, `embed`) and the library's named
scopes (`sdpa` for softmax(QK^T)V itself, `dropout`, `logits`, `loss`, `optimizer`), which put
it in one of `CATEGORIES`. The reference: transformers GPT-2 trained by torch as in
train_throughput.py, traced with `torch.profiler` in the same run; its ops (and their kernels'
device time on CUDA) are put in the same categories by name, the output projection's matrix
products by their vocabulary-sized shape.

Printed: ms per step of each category for both, the `--top` ops of each, and device-busy time
(the union of op intervals: ours; the sum of op times: torch) against wall time per step. On a
CPU the ops of one step run on several threads, so busy time is the time any op ran.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time
from typing import Any

import _common as common
import jax
import numpy as np
import train_throughput as throughput

CATEGORIES = (
    "embedding",
    "attention",
    "matmuls (projections, MLP)",
    "norms",
    "dropout random numbers",
    "loss and logits",
    "optimizer and casts",
    "copies and transposes",
    "other",
)
_COPIES = {"copy", "transpose", "concatenate", "slice", "dynamic_slice", "dynamic_update_slice"}
_COPIES |= {"reshape", "broadcast_in_dim", "pad", "gather", "scatter", "squeeze", "bitcast"}
_PROJECTIONS = {"qkv", "query", "key_value", "out", "wi", "wo", "wi_gate", "wi_up"}
_TRANSFORM = re.compile(r"^[\w.]+\((.*)\)$")  # jvp(GPT), transpose(jvp(loss)), ...


def scopes(op_name: str) -> list[str]:
    """The op name's path with JAX's transformation wrappers taken off: transpose(jvp(loss))
    is `loss`; the last entry is the primitive."""
    out = []
    for part in op_name.split("/"):
        while match := _TRANSFORM.match(part):
            part = match.group(1)
        out.append(part)
    return out


def our_category(op_name: str) -> str:
    """The category of one of our XLA ops, from the op name JAX recorded for it."""
    path = scopes(op_name)
    names, primitive = set(path), path[-1]
    if "optimizer" in names:
        return "optimizer and casts"
    if names & {"loss", "logits"}:
        return "loss and logits"
    if "dropout" in names or "random_bits" in primitive or "threefry" in primitive:
        return "dropout random numbers"
    if "sdpa" in names:
        return "attention"
    if any(p.startswith("norm") or p == "final_norm" for p in path):
        return "norms"
    if primitive in ("dot_general", "dot") and names & _PROJECTIONS:
        return "matmuls (projections, MLP)"
    if "embed" in names:
        return "embedding"
    if primitive in _COPIES:
        return "copies and transposes"
    if primitive == "convert_element_type":
        return "optimizer and casts"
    return "other"


def instruction_category(name: str, op_names: dict[str, str]) -> str:
    """The category of an HLO instruction: by its op name, or for an instruction without one
    (XLA's own copies, say) by its name."""
    if name in op_names:
        return our_category(op_names[name])
    return "copies and transposes" if name.startswith(("copy", "transpose")) else "other"


_METADATA = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{[^}]*?op_name="([^"]+)"', re.M)


def instruction_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the op name in its metadata, from a compiled module's text."""
    return {name: op_name for name, op_name in _METADATA.findall(hlo_text)}


def op_events(path: str, module: str) -> list[tuple[str, int, int]]:
    """(instruction, start ns, duration ns) of every XLA op of `module` in an xplane trace: the
    GPU's "XLA Ops" line, or the CPU thunks that carry an `hlo_op`."""
    events = []
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        device = plane.name.startswith("/device:")
        for line in plane.lines:
            if device and line.name != "XLA Ops":
                continue
            for event in line.events:
                stats = dict(event.stats)
                if not device and "hlo_op" not in stats:
                    continue
                if module not in str(stats.get("hlo_module", module)):
                    continue
                events.append((event.name, int(event.start_ns), int(event.duration_ns)))
    return events


def busy_ns(events: list[tuple[str, int, int]]) -> int:
    """The union of the events' intervals: time during which any op ran."""
    total, end = 0, None
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if end is None or start >= end:
            total, end = total + duration, stop
        elif stop > end:
            total, end = total + stop - end, stop
    return total


def breakdown(
    times: dict[str, tuple[str, float]], steps: int, top: int, what: dict[str, str] | None = None
) -> dict[str, Any]:
    """Per-category ms per step and the top ops, from op name -> (category, total seconds);
    `what` describes an op (ours: the end of the op name JAX recorded)."""
    categories = dict.fromkeys(CATEGORIES, 0.0)
    for category, seconds in times.values():
        categories[category] += 1e3 * seconds / steps
    ranked = sorted(times.items(), key=lambda item: -item[1][1])[:top]
    what = what or {}
    top_ops = [
        {"name": name, "what": what.get(name, ""), "category": category}
        | {"ms_per_step": 1e3 * seconds / steps}
        for name, (category, seconds) in ranked
    ]
    return {"categories": categories, "top_ops": top_ops}


def trace_ours(ours: throughput.Ours, steps: int, top: int) -> dict[str, Any]:
    """Our step under jax.profiler, read back and put into categories."""
    with tempfile.TemporaryDirectory(prefix="profile_trace-") as directory:
        with ours.setup.within_mesh():
            jax.profiler.start_trace(directory)
            start = time.perf_counter()
            for _ in range(steps):
                ours.step()  # waits for the step
            wall = time.perf_counter() - start
            jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
        events = op_events(path, "train_step")
    op_names = instruction_op_names(ours.step_fn.as_text())
    times: dict[str, list] = collections.defaultdict(lambda: ["other", 0.0])
    for name, _, duration in events:
        times[name] = [instruction_category(name, op_names), times[name][1] + duration]
    totals = {name: (category, ns / 1e9) for name, (category, ns) in times.items()}
    what = {name: "/".join(scopes(op_names[name])[-3:]) for name in totals if name in op_names}
    return {
        **breakdown(totals, steps, top, what),
        "busy_ms_per_step": busy_ns(events) / 1e6 / steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "ops_per_step": len(events) / steps,
        # The share of device time whose ops carry an op name (loop-carried copies do not).
        "named_time": sum(d for name, _, d in events if name in op_names)
        / max(sum(d for _, _, d in events), 1),
    }


# torch: the first rule whose keyword is in an op's name (or, failing that, in one of its
# callers' names, nearest first) gives its category. Short keywords must be a whole word.
_TORCH_RULES = (
    ("optimizer and casts", ("optimizer", "adam", "foreach", "clip_grad", "to_copy")),
    ("loss and logits", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("dropout random numbers", ("bernoulli", "dropout", "philox", "rand")),
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax", "bmm")),
    ("norms", ("layer_norm", "layernorm")),
    ("embedding", ("embedding",)),
    ("matmuls (projections, MLP)", ("addmm", "mm", "matmul", "linear", "gemm", "cutlass")),
    ("copies and transposes", ("copy", "transpose", "clone", "contiguous", "cat", "permute")),
)
_MATMULS = ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")


def _rule(name: str) -> str | None:
    lowered = name.lower()
    words = set(re.split(r"[^a-z0-9]+", lowered))
    for category, keywords in _TORCH_RULES:
        if any(k in words if len(k) <= 4 else k in lowered for k in keywords):
            return category
    return None


def torch_category(event: Any, vocab: int) -> str:
    """The category of one torch profiler event: the output projection's products by their
    vocabulary-sized operand, everything else by `_TORCH_RULES`."""
    shapes = getattr(event, "input_shapes", None) or []
    if event.name in _MATMULS and any(vocab in shape for shape in shapes if shape):
        return "loss and logits"
    caller = event
    while caller is not None:
        category = _rule(caller.name)
        if category is not None:
            return category
        caller = caller.cpu_parent
    return "other"


def trace_reference(reference: throughput.Reference, steps: int, top: int) -> dict[str, Any]:
    """The reference's step under torch.profiler: each op's own time (its kernels' device time
    on CUDA), put into categories."""
    from torch.profiler import ProfilerActivity, profile

    cuda = reference.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            reference.step()  # waits for the step
        wall = time.perf_counter() - start
    totals: dict[str, tuple[str, float]] = {}
    for event in prof.events():
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros <= 0:
            continue
        category = torch_category(event, reference.vocab)
        previous = totals.get(event.name, (category, 0.0))[1]
        totals[event.name] = (category, previous + micros / 1e6)
    busy = sum(seconds for _, seconds in totals.values())
    return {
        **breakdown(totals, steps, top),
        "busy_ms_per_step": 1e3 * busy / steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "busy_is": "sum of kernel times" if cuda else "sum of op self CPU times",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both models built and warmed up as train_throughput.py does, then traced."""
    config = throughput.build_config(args)
    machine = common.machine()
    batch, seq_len = config.train.batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, args.vocab, (batch, seq_len + 1), np.int32)
    ours, _, _ = throughput.warm_up_ours(config, args.vocab, tokens, max(args.warmup, 1))
    results: dict[str, Any] = {
        "machine": machine,
        "shape": throughput.shape_results(args, ours.model_cfg, batch, seq_len),
        "steps": args.steps,
        "ours": trace_ours(ours, args.steps, args.top),
    }
    device, skipped = common.reference_device(args.reference_device, machine["platform"])
    if device is None:
        results["reference_skipped"] = skipped
        return results
    reference, error = throughput.warm_up_reference(args, config, ours.model_cfg, tokens, device)
    if reference is None:
        results["reference_error"] = error
        return results
    results["reference_description"] = reference.description
    try:
        results["reference"] = trace_reference(reference, args.steps, args.top)
    except Exception as e:  # noqa: BLE001 - ours is measured and reported either way
        results["reference_error"] = common.short_error(e)
    return results


def report(results: dict[str, Any], top: int) -> None:
    ours, reference = results["ours"], results.get("reference")
    s = results["shape"]
    print(
        f"device time per step by category, {results['steps']} traced steps; GPT {s['layers']} x "
        f"{s['d_model']}, context {s['context']}, batch {s['batch']}, {s['dtype']}; "
        f"{results['machine']['platform']} ({results['machine']['device_kind']})"
    )
    columns = [("ours", ours)] + ([("torch", reference)] if reference else [])
    rows = [
        (c, *(f"{r['categories'][c]:.2f}" for _, r in columns))
        for c in CATEGORIES
        if any(r["categories"][c] for _, r in columns)
    ]
    for label, key in (("device busy", "busy_ms_per_step"), ("wall", "wall_ms_per_step")):
        rows.append((label, *(f"{r[key]:.2f}" for _, r in columns)))
    common.print_table(["ms per step", *(name for name, _ in columns)], rows)
    if reference is None:
        print(f"torch: {results.get('reference_error') or results.get('reference_skipped')}")
    else:
        print(f"torch: {results['reference_description']}; busy = {reference['busy_is']}")
    for name, r in columns:
        print(f"\ntop {top} ops, {name} (ms per step):")
        ops = [
            (o["name"][:60], o["what"][-50:], o["category"], f"{o['ms_per_step']:.3f}")
            for o in r["top_ops"]
        ]
        common.print_table(["op", "recorded as", "category", "ms"], ops)


def main() -> None:
    parser = throughput.argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=25, help="ops listed per framework")
    parser.set_defaults(steps=5, warmup=2)
    args = parser.parse_args()
    if args.no_reference:
        args.reference_device = "none"
    common.make_room_for_torch(args.reference_device)
    results = run(args)
    report(results, args.top)
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
