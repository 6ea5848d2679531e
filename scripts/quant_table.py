#!/usr/bin/env python3
"""Fidelity table for docs/quantization.md: one model, several precision specs, one calibration.

    scripts/quant_table.py --preset edge-moe [--checkpoint F] [--spec NAME=P ...] [--images 8]
                           [--calib-images 16] [--task T ...] [--json out.json]
    scripts/quant_table.py --markdown out.json [more.json ...]

Each --spec is NAME=P with P a preset (W8A8), a spec file, inline JSON, or `default` (the default
spec, quantize.DEFAULT_SPEC). The float model is calibrated once; every spec re-derives its
formats from the same ranges. `--task` evaluates only those tasks, so a large model's tasks can run
as separate processes sharing one `--calib-file`; `--markdown` merges the reports of one model and
spec (one row, minimum over all their tasks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_SPECS = [
    "W8A8=W8A8",
    'W8A8+gate16={"precision": "W8A8", "layer_type": {"gate": "W16A16", "moe_input": "A16"}}',
    "W8A16=W8A16",
    'W8A16+gate16={"precision": "W8A16", "layer_type": {"gate": "W16A16"}}',
    "W16A16=W16A16",
    "default=default",
]


def _spec(text: str):
    from m3vit.compiler.quantize import load_precision, normalise_spec

    text = text.strip()
    if text == "default":
        return load_precision(None)
    return normalise_spec(json.loads(text)) if text.startswith("{") else load_precision(text)


def markdown_row(rep: dict) -> str:
    """| spec | output cosine (mean, min over tasks) | worst image | output SQNR | routing e2e | isolated | worst layer e2e |"""
    m = rep["model"]
    init = "trained" if m.get("checkpoint") else "random"
    worst_layer = rep.get("routing_agreement_min_layer", {}).get("min", 1.0)
    sqnr = rep["output_sqnr_db"]["min"]
    return (f"| {m['name']} | {init} | {rep.get('spec_name', rep['precision']['precision'])} | "
            f"{rep['output_cosine']['min']:.6f} | {rep['output_cosine_worst_image']['min']:.6f} | "
            f"{sqnr if isinstance(sqnr, str) else f'{sqnr:.1f}'} | {rep['routing_agreement']['min']:.2%} | "
            f"{rep['routing_agreement_isolated']['min']:.2%} | {worst_layer:.2%} | "
            f"{'yes' if rep['targets']['met'] else 'no'} |")


PER_TASK_KEYS = ("output_cosine", "output_cosine_worst_image", "output_sqnr_db", "routing_agreement",
                 "routing_agreement_isolated", "routing_agreement_min_layer")


def _num(v) -> float:
    return float(v) if not isinstance(v, str) else (float("inf") if v == "inf" else float("-inf"))


def merge_reports(reps: list[dict]) -> list[dict]:
    """Reports of the same model, checkpoint and spec on disjoint task sets, merged into one
    (per-task entries united, minima and the targets recomputed); others pass unchanged."""
    groups: dict[tuple, list[dict]] = {}
    for rep in reps:
        m = rep["model"]
        key = (m["name"], m.get("dataset"), m.get("checkpoint"), rep.get("spec_name"), json.dumps(rep["precision"]))
        groups.setdefault(key, []).append(rep)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        if any(r["images"] != group[0]["images"] for r in group):
            raise SystemExit(f"cannot merge {group[0]['model']['name']} reports over different images")
        merged = dict(group[0])
        for key in PER_TASK_KEYS:
            if key not in merged:
                continue
            tasks = {}
            for r in group:
                tasks.update({t: v for t, v in r[key].items() if t != "min"})
            merged[key] = {**tasks, "min": min(tasks.values(), key=_num)}
        tg = merged["targets"]
        met = _num(merged["output_cosine"]["min"]) >= tg["output_cosine"] and \
            _num(merged["routing_agreement"]["min"]) >= tg["routing_agreement"]
        merged["targets"] = {**tg, "met": bool(met)}
        out.append(merged)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="edge-moe")
    ap.add_argument("--dataset")
    ap.add_argument("--checkpoint")
    ap.add_argument("--spec", action="append", help="NAME=P (repeatable)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--calib-file", metavar="FILE", help="reuse this calibration if it exists, else write it")
    ap.add_argument("--task", action="append", help="evaluate only this task (repeatable; default: every task)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--markdown", nargs="+", metavar="JSON", help="print the table rows of saved results and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        reps = []
        for path in args.markdown:
            with open(path) as f:
                reps.extend(json.load(f))
        for rep in merge_reports(reps):
            print(markdown_row(rep))
        return 0

    from m3vit.compiler.fidelity import eval_images, evaluate, summary_text
    from m3vit.compiler.from_torch import build_qgraph
    from m3vit.compiler.quantize import calibrate, load_calibration
    from m3vit.model.checkpoint import load_checkpoint
    from m3vit.model.config import preset_config
    from m3vit.model.vit import build_model

    model = load_checkpoint(args.checkpoint) if args.checkpoint else build_model(preset_config(args.preset, args.dataset))
    model.heads = None
    t0 = time.perf_counter()
    if args.calib_file and Path(args.calib_file).is_file():
        base = load_calibration(args.calib_file)
    else:
        base = calibrate(model, n_images=args.calib_images, progress=True)
        if args.calib_file:
            base.save(args.calib_file)
    print(f"calibrated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    images = eval_images(model.cfg.img_size, args.images, seed=1)
    rows = []
    for item in args.spec or DEFAULT_SPECS:
        name, _, text = item.partition("=")
        graph = build_qgraph(model, base.with_spec(model, _spec(text)))
        rep = evaluate(model, graph, images, tasks=args.task, progress=True)
        rep["spec_name"] = name
        rep["model"]["checkpoint"] = args.checkpoint
        rows.append(rep)
        print(f"== {name}\n{summary_text(rep)}\n", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
