#!/usr/bin/env python3
"""Compile and C-simulation benchmark: `m3vit compile` time per preset, then `m3vit csim` of every
task (bit-exact check and seconds).

    scripts/bench_compile.py [--preset edge-moe --preset m3vit-small] [--no-csim] [--trace] [--json]

Each preset's multi-task backbone is exported with random-init weights (seed 0) into a scratch
folder and calibrated once with `m3vit calibrate` (timed on its own: calibration runs once per
model and its file is reused). The compile time is the whole `m3vit compile --calib-file`
command (ONNX import, quantization, lowering, HLS project, schedule model); the schedule model's
cycle estimate is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _m3vit(*args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "m3vit", *args, "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise SystemExit(f"m3vit {args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout), seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="edge-moe, m3vit-small, tiny (repeatable; default edge-moe "
                                                      "and m3vit-small)")
    ap.add_argument("--calib-images", type=int, default=4)
    ap.add_argument("--no-csim", action="store_true", help="only compile")
    ap.add_argument("--trace", action="store_true", help="compare every layer in the C-simulation")
    ap.add_argument("--keep", metavar="DIR", help="keep the builds in DIR")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from m3vit.model.config import resolve_config
    from m3vit.model.export import export_onnx
    from m3vit.model.vit import build_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="m3vit-bench-") as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        for preset in args.preset or ["edge-moe", "m3vit-small"]:
            cfg = resolve_config(preset)
            onnx = root / f"{cfg.name}.onnx"
            export_onnx(build_model(cfg, with_heads=False), onnx, all_tasks=True)
            calib = root / f"{cfg.name}.calib.json"
            _, t_calib = _m3vit("calibrate", "--preset", preset, "--calib-images", str(args.calib_images),
                                "--out", str(calib))
            build = root / f"{cfg.name}-build"
            comp, t_compile = _m3vit("compile", str(onnx), "--out", str(build), "--calib-file", str(calib))
            row = {"preset": cfg.name, "dataset": cfg.dataset, "calibrate_s": round(t_calib, 2),
                   "compile_s": round(t_compile, 2),
                   "compile_stages_s": comp.get("seconds"), "instructions": comp.get("instructions"),
                   "estimated_cycles": comp.get("estimated_cycles"), "estimated_ms": comp.get("estimated_ms")}
            if not args.no_csim:
                sim, t_sim = _m3vit("csim", str(build), *(["--trace"] if args.trace else []))
                row.update(csim_bit_exact=sim["bit_exact"], csim_mismatches=sim["mismatches"],
                           csim_s=round(sim["seconds"], 2), csim_wall_s=round(t_sim, 2), tasks=comp.get("tasks"))
            rows.append(row)
            if not args.json:
                line = (f"{cfg.name:<12} calibrate {t_calib:6.1f} s   compile {t_compile:6.1f} s   "
                        f"{row['instructions']} instructions   "
                        f"estimate {row['estimated_cycles']:,} cycles ({row['estimated_ms']:.3f} ms)")
                if not args.no_csim:
                    line += (f"   csim {row['csim_s']:.1f} s, bit-exact {row['csim_bit_exact']} "
                             f"({row['csim_mismatches']} mismatching elements)")
                print(line, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
