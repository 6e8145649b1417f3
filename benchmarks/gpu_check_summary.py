"""The closing block of `gpu_check.sh`: every stage's headline number and every ratio, from the
JSON files the stages wrote, in one place; and all of it, the stages' own JSON included, in one
JSON file (--json).

    python benchmarks/gpu_check_summary.py --stages DIR --train train_shipped.json \\
        --profile profile.json --flags flags.json --scaling scaling.json --decode decode_b1.json \\
        --stage train:0:95 --json summary.json

--train FILE is the shipped step beside its torch reference, --profile where each spent its
step, --flags the XLA flag sets, --scaling the model sizes, --decode FILE the decoding runs and
--largest the largest model, all in --stages; --stage NAME:EXIT:SECONDS the stages as the shell
ran them. A missing or unreadable file shows as n/a (the profile and largest-model lines are
left out): a stage that failed leaves its line empty, not the summary. Exits with status 3 when
a torch reference failed inside a stage that otherwise succeeded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _common as common
import model_scaling
import xla_flags


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=Path, required=True, help="folder of the stages' JSON")
    parser.add_argument("--train", metavar="FILE")
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--flags", metavar="FILE")
    parser.add_argument("--decode", action="append", default=[], metavar="FILE")
    parser.add_argument("--scaling", metavar="FILE")
    parser.add_argument("--largest", metavar="FILE")
    parser.add_argument("--stage", action="append", default=[], metavar="NAME:EXIT:SECONDS")
    parser.add_argument("--json", type=Path, help="write everything to this JSON file")
    return parser.parse_args()


def load(folder: Path, name: str | None, raw: dict[str, Any]) -> dict[str, Any] | None:
    """A stage's JSON (also kept in `raw`), or None if it wrote none."""
    if not name:
        return None
    try:
        raw[name] = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    return raw[name]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the block prints, as plain data (also what summary.json holds)."""
    folder, raw = args.stages, {}
    stages = [stage_row(item) for item in args.stage]
    out: dict[str, Any] = {"stages": stages, "decode": [], "ratios": {}, "errors": []}
    shipped_tps = add_train_run(out, load(folder, args.train, raw), args.train)
    profile = load(folder, args.profile, raw)
    if profile is not None:
        out["profile"] = profile_table(profile)
    flags = load(folder, args.flags, raw)
    if flags is not None:
        out["flags"] = {"runs": flags["runs"], "comparison": flags.get("comparison")}
    scaling = load(folder, args.scaling, raw)
    if scaling is not None:
        add_scaling(out, scaling, shipped_tps)
    for name in args.decode:
        add_decode_run(out, name, load(folder, name, raw))
    largest = load(folder, args.largest, raw)
    if largest is not None:
        import largest_model

        out["largest"] = {
            "line": largest_model.summary_line(largest),
            "policies": largest["policies"],
        }
    out["raw"] = raw
    return out


def stage_row(item: str) -> dict[str, str]:
    """A --stage NAME:EXIT:SECONDS item; 124 and 137 are `timeout` ending it."""
    name, rc, seconds = item.rsplit(":", 2)
    status = {"0": "ok", "124": "time box", "137": "time box", "skipped": "skipped"}
    return {"name": name, "exit": rc, "status": status.get(rc, "failed"), "seconds": seconds}


def add_train_run(out: dict[str, Any], r: dict[str, Any] | None, name: str | None) -> float | None:
    """The shipped step's row and its torch reference; returns its tokens/s (None when the
    stage wrote nothing)."""
    out["train"] = {"file": name}
    if r is None:
        return None
    o = r["ours"]
    out["train"].update(
        tokens_per_s=o["tokens_per_s"],
        step_s=o["step_s_median"],
        mfu=o["mfu_vs_published_peak"],
        mfu_matmul=o["mfu_vs_measured_matmul"],
        peak_memory_bytes=o["peak_memory_bytes"],
        compile_s=o["compile_s"],
        published_peak_flops=r["published_peak_flops"],
        device_kind=r["machine"]["device_kind"],
        shape=r["shape"],
    )
    out.setdefault("device", f"{r['machine']['device_kind']} ({r['machine']['platform']})")
    out.setdefault("jax", r["machine"]["jax"])
    if r.get("reference_error"):
        out["errors"].append(f"training: torch: {r['reference_error']}")
    add_train_reference(out, r)
    return o["tokens_per_s"]


def add_train_reference(out: dict[str, Any], r: dict[str, Any]) -> None:
    """The torch reference of the first training run, if it ran, and ours against it."""
    ref = r.get("reference")
    if ref is None:
        return
    out["train_reference"] = {
        "label": ref["library"],
        "tokens_per_s": ref["tokens_per_s"],
        "step_s": ref["step_s_median"],
        "mfu": ref["mfu_vs_published_peak"],
        "mfu_matmul": ref["mfu_vs_measured_matmul"],
        "peak_memory_bytes": ref.get("peak_memory_bytes"),
        "compile_error": ref.get("compile_error"),
    }
    out["torch"] = ref.get("torch")
    out["ratios"]["train ours / torch"] = ratio(r["ours"]["tokens_per_s"], ref["tokens_per_s"])


def add_scaling(out: dict[str, Any], scaling: dict[str, Any], shipped_tps: float | None) -> None:
    """The scaling rows, each with its tokens/s over its shape's scan variant's, and the `small`
    shape's variants against the shipped step's tokens/s."""
    speedups = model_scaling.speedups(scaling["rows"])
    unroll = scaling.get("unroll", 1)
    out["scaling"] = [
        {
            **r,
            "label": model_scaling.label(r.get("variant", "scan"), unroll),
            "vs_scan": speedups.get((r["name"], r.get("variant"))),
        }
        for r in scaling["rows"]
    ]
    for r in out["scaling"]:
        if shipped_tps and r["name"] == "small" and "tokens_per_s" in r:
            how = f"{r['label']}, remat {r['remat_policy']}"
            out["ratios"][f"train scaling small ({how}) / shipped"] = ratio(
                r["tokens_per_s"], shipped_tps
            )


def profile_table(profile: dict[str, Any]) -> dict[str, Any]:
    """From profile_trace.py's JSON: each side's (ours, and torch's `reference` when it ran)
    milliseconds per step by category, busy and wall, and its three costliest ops."""
    return {
        side: {
            "categories": profile[side].get("categories") or {},
            "busy_ms_per_step": profile[side].get("busy_ms_per_step"),
            "wall_ms_per_step": profile[side].get("wall_ms_per_step"),
            "top_ops": (profile[side].get("top_ops") or [])[:3],
        }
        for side in ("ours", "reference")
        if profile.get(side)
    }


def add_decode_run(out: dict[str, Any], name: str, r: dict[str, Any] | None) -> None:
    """A row for one --decode FILE (just the name when it wrote nothing) and ours against
    transformers at its batch size."""
    row: dict[str, Any] = {"file": name}
    if r is not None:
        if r.get("reference_error"):
            out["errors"].append(f"decode batch {r['batch']}: {r['reference_error']}")
        ref = r.get("reference") or {}
        row.update(
            batch=r["batch"],
            prompt_len=r["prompt_len"],
            new_tokens=r["new_tokens"],
            ours_tokens_per_s=r["cached"]["tokens_per_s"],
            reference_tokens_per_s=ref.get("tokens_per_s"),
            reference=ref.get("library"),
            reference_compile_error=ref.get("compile_error"),
        )
        out["ratios"][f"decode batch {r['batch']} ours / transformers"] = ratio(
            r["cached"]["tokens_per_s"], ref.get("tokens_per_s")
        )
    out["decode"].append(row)


def report(s: dict[str, Any]) -> None:
    print("=" * 30 + " SUMMARY " + "=" * 30)
    print(
        f"device {s.get('device', 'n/a')}, jax {s.get('jax', 'n/a')}, "
        f"torch {s.get('torch') or 'n/a'}"
    )
    if "tokens_per_s" in s["train"]:
        report_training(s["train"], s.get("train_reference"))
    else:
        print(f"training: n/a (no {s['train']['file'] or 'file given'})")
    if s.get("profile"):
        report_profile(s["profile"])
    print(flags_line(s["flags"]) if "flags" in s else "XLA flags: n/a")
    if "scaling" in s:
        report_scaling(s["scaling"])
    else:
        print("scaling: n/a")
    report_decoding([r for r in s["decode"] if "batch" in r])
    if "largest" in s:
        print(s["largest"]["line"])
    print("ratios: " + "; ".join(f"{k} {times(v)}" for k, v in s["ratios"].items()))
    for error in s["errors"]:
        print(f"reference failed in {error}")
    print(
        "stages: " + ", ".join(f"{x['name']} {x['status']} ({x['seconds']} s)" for x in s["stages"])
    )


def report_profile(p: dict[str, Any]) -> None:
    """Milliseconds per step by category, ours beside torch's, costliest first; then busy and
    wall time, and each side's three costliest ops."""
    sides = [side for side in ("ours", "reference") if side in p]
    names = {"ours": "ours", "reference": "torch"}
    categories = {c for side in sides for c in p[side]["categories"]}
    lines = [
        (f"  {c}", [p[side]["categories"].get(c) for side in sides])
        for c in sorted(categories, key=lambda c: -max(p[s]["categories"].get(c, 0) for s in sides))
    ]
    lines += [(key, [p[side][f"{key}_ms_per_step"] for side in sides]) for key in ("busy", "wall")]
    rows = []
    for name, values in lines:
        row = [name, *("-" if v is None else f"{v:.2f}" for v in values)]
        rows.append(row + ([times(ratio(*values))] if len(sides) == 2 else []))
    header = ["profile, ms per step", *(names[side] for side in sides)]
    common.print_table(header + (["ours / torch"] if len(sides) == 2 else []), rows)
    for side in sides:
        ops = "; ".join(
            f"{op['name'][:48]} ({op.get('category', '?')}) {op['ms_per_step']:.2f} ms"
            for op in p[side]["top_ops"]
        )
        print(f"costliest ops, {names[side]}: {ops or 'n/a'}")


def flags_line(f: dict[str, Any]) -> str:
    """Each XLA flag set's tokens/s over the default's (or why it has none), and the verdict."""
    parts = [
        f"{r['name']} {times(r['ratio'])}" if r.get("ratio") else f"{r['name']} {r['status']}"
        for r in f["runs"][1:]
    ]
    line = "XLA flags, tokens/s / default: " + ("; ".join(parts) or "n/a")
    if f.get("comparison"):
        line += "\n  " + xla_flags.summary_line(f["comparison"])
    return line


def report_training(r: dict[str, Any], ref: dict[str, Any] | None) -> None:
    """The shipped step and its torch reference as one table, then how each was configured."""
    sh = r["shape"]
    peak = r["published_peak_flops"]
    print(
        f"training step: {sh['layers']} layers x {sh['d_model']}, batch {sh['batch']} x "
        f"{sh['context']} tokens, {sh['dtype']}, vocab {sh['vocab']}"
    )
    peak_name = f"MFU ({peak / 1e12:.0f} TFLOP/s)" if peak else "MFU (published)"
    table = [
        (
            "ours",
            f"{r['tokens_per_s']:,.0f}",
            f"{1e3 * r['step_s']:.1f}",
            pct(r["mfu"]),
            pct(r["mfu_matmul"]),
            common.format_bytes(r["peak_memory_bytes"]),
        )
    ]
    if ref:
        memory = ref["peak_memory_bytes"]
        table.append(
            (
                "transformers+torch",
                f"{ref['tokens_per_s']:,.0f}",
                f"{1e3 * ref['step_s']:.1f}",
                pct(ref["mfu"]),
                pct(ref["mfu_matmul"]),
                "n/a" if memory is None else common.format_bytes(memory),
            )
        )
    common.print_table(["", "tokens/s", "step ms", peak_name, "MFU (matmul)", "peak memory"], table)
    kernels = sh.get("kernels_resolved") or sh.get("kernels") or "n/a"
    print(
        f"ours: {sh['config']} + {' '.join(sh.get('overrides', []))} "
        f"(attention {sh['attention_impl']}, kernels {kernels}, remat "
        f"{sh['remat_policy']}, scan {sh['scan_layers']}; compile {r['compile_s']:.1f} s)"
    )
    if ref:
        print(f"torch: {ref['label']}")
        if ref["compile_error"]:
            print(f"torch.compile failed, eager instead: {ref['compile_error']}")


def report_scaling(rows: list[dict[str, Any]]) -> None:
    """A row per scaling shape and variant: its numbers, or why it has none."""
    table = []
    for r in rows:
        how = (r["name"], r["label"], r["remat_policy"])
        if "tokens_per_s" not in r:
            table.append((*how, "-", r["batch"], "-", "-", "-", "-", "-", r["status"]))
            continue
        table.append(
            (
                *how,
                common.format_count(r["num_params"]),
                r["batch"],
                f"{r['tokens_per_s']:,.0f}",
                times(r["vs_scan"]),
                pct(r["mfu_vs_published_peak"]),
                f"{r['compile_s']:.1f}",
                common.format_bytes(r["peak_memory_bytes"]),
                r["status"],
            )
        )
    print("scaling: the layers under nn.scan, several per scan iteration, or unrolled")
    common.print_table(
        ["shape", "layers run", "remat", "params", "batch", "tokens/s", "/ scan", "MFU"]
        + ["compile s", "peak memory", "status"],
        table,
    )


def report_decoding(rows: list[dict[str, Any]]) -> None:
    """The decoding runs that wrote results, one row per batch size (the prompt and reference
    named are the first run's)."""
    if not rows:
        print("decoding: n/a")
        return
    r0 = rows[0]
    print(
        f"decoding: prompt {r0['prompt_len']}, {r0['new_tokens']} new tokens, greedy; "
        f"reference {r0['reference'] or 'n/a'}"
    )
    common.print_table(
        ["batch", "ours tokens/s", "transformers tokens/s", "ours / transformers"],
        [
            (
                r["batch"],
                f"{r['ours_tokens_per_s']:,.0f}",
                "n/a"
                if r["reference_tokens_per_s"] is None
                else f"{r['reference_tokens_per_s']:,.0f}",
                times(ratio(r["ours_tokens_per_s"], r["reference_tokens_per_s"])),
            )
            for r in rows
        ],
    )


def main() -> None:
    args = parse_args()
    summary = summarize(args)
    report(summary)
    common.write_json(args.json, summary)
    if summary["errors"]:
        raise SystemExit(3)


if __name__ == "__main__":
    main()
