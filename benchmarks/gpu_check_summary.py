"""The closing block of `gpu_check.sh`: every stage's headline number and every ratio, from the
JSON files the stages wrote, in one place; and all of it, the stages' own JSON included, in one
JSON file (--json).

    python benchmarks/gpu_check_summary.py --stages DIR --train shipped=train_shipped.json \\
        --train model.kernels=cpu=train_kernels_cpu.json --stage train:0:95 --json summary.json

--train LABEL=FILE names the training runs (the first is the one with the torch reference),
--decode FILE the decoding runs, --scaling and --largest their files, all in --stages;
--stage NAME:EXIT:SECONDS the stages as the shell ran them. A missing or unreadable file shows
as n/a: a stage that failed leaves its line empty, not the summary. Exits with status 3 when
a torch reference failed inside a stage that otherwise succeeded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _common as common


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=Path, required=True, help="folder of the stages' JSON")
    parser.add_argument("--train", action="append", default=[], metavar="LABEL=FILE")
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
    out: dict[str, Any] = {"stages": stages, "train": [], "decode": [], "ratios": {}, "errors": []}
    shipped_tps = add_train_runs(out, folder, args.train, raw)
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


def add_train_runs(
    out: dict[str, Any], folder: Path, items: list[str], raw: dict[str, Any]
) -> float | None:
    """A row per --train LABEL=FILE, the first run's torch reference, and each later run's
    tokens/s against the first run's, which it returns (None when the first wrote nothing)."""
    shipped_tps = None
    for n, item in enumerate(items):
        label, _, name = item.rpartition("=")
        r = load(folder, name, raw)
        row: dict[str, Any] = {"label": label, "file": name}
        if r is not None:
            o = r["ours"]
            row.update(
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
                out["errors"].append(f"training {label}: torch: {r['reference_error']}")
            if n == 0:
                shipped_tps = o["tokens_per_s"]
                add_train_reference(out, r)
            else:
                out["ratios"][f"train {label} / {items[0].rpartition('=')[0]}"] = ratio(
                    o["tokens_per_s"], shipped_tps
                )
        out["train"].append(row)
    return shipped_tps


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
    """The scaling rows, and the tokens/s of its `small` shape against the first training run's
    (the label says how the scaling stage scanned and rematerialised)."""
    out["scaling"] = scaling["rows"]
    if shipped_tps:
        small = next((r for r in scaling["rows"] if r.get("name") == "small"), None)
        if small and "tokens_per_s" in small:
            how = f"scan {small['scan_layers']}, remat {small['remat_policy']}"
            out["ratios"][f"train scaling small ({how}) / shipped"] = ratio(
                small["tokens_per_s"], shipped_tps
            )


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
    rows = [r for r in s["train"] if "tokens_per_s" in r]
    if rows:
        report_training(rows, s.get("train_reference"))
    for r in s["train"]:
        if "tokens_per_s" not in r:
            print(f"training {r['label']}: n/a (no {r['file']})")
    if "scaling" in s:
        report_scaling(s["scaling"])
    else:
        print("scaling: n/a")
    report_decoding([r for r in s["decode"] if "batch" in r])
    print(s["largest"]["line"] if "largest" in s else "largest GPT: n/a")
    print("ratios: " + "; ".join(f"{k} {times(v)}" for k, v in s["ratios"].items()))
    for error in s["errors"]:
        print(f"reference failed in {error}")
    print(
        "stages: " + ", ".join(f"{x['name']} {x['status']} ({x['seconds']} s)" for x in s["stages"])
    )


def report_training(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> None:
    """The training runs that wrote results, and the torch reference, as one table (the shape
    is the first run's), then how each was configured."""
    sh = rows[0]["shape"]
    peak = rows[0]["published_peak_flops"]
    print(
        f"training step: {sh['layers']} layers x {sh['d_model']}, batch {sh['batch']} x "
        f"{sh['context']} tokens, {sh['dtype']}, vocab {sh['vocab']}"
    )
    peak_name = f"MFU ({peak / 1e12:.0f} TFLOP/s)" if peak else "MFU (published)"
    table = [
        (
            f"ours, {r['label']}",
            f"{r['tokens_per_s']:,.0f}",
            f"{1e3 * r['step_s']:.1f}",
            pct(r["mfu"]),
            pct(r["mfu_matmul"]),
            common.format_bytes(r["peak_memory_bytes"]),
        )
        for r in rows
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
    for r in rows:
        sh = r["shape"]
        kernels = sh.get("kernels_resolved") or sh.get("kernels") or "n/a"
        print(
            f"ours, {r['label']}: {sh['config']} + {' '.join(sh.get('overrides', []))} "
            f"(attention {sh['attention_impl']}, kernels {kernels}, remat "
            f"{sh['remat_policy']}, scan {sh['scan_layers']}; compile {r['compile_s']:.1f} s)"
        )
    if ref:
        print(f"torch: {ref['label']}")
        if ref["compile_error"]:
            print(f"torch.compile failed, eager instead: {ref['compile_error']}")


def report_scaling(rows: list[dict[str, Any]]) -> None:
    """One line per scaling shape: its numbers, or why it has none."""
    parts = []
    for r in rows:
        if "tokens_per_s" in r:
            parts.append(
                f"{r['name']} {common.format_count(r['num_params'])} b{r['batch']} "
                f"scan {r['scan_layers']} remat {r['remat_policy']}: "
                f"{r['tokens_per_s']:,.0f} tok/s, "
                f"MFU {pct(r['mfu_vs_published_peak'])}, "
                f"{common.format_bytes(r['peak_memory_bytes'])}"
            )
        else:
            parts.append(f"{r['name']}: {r['status']}")
    print("scaling: " + "\n         ".join(parts))


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
