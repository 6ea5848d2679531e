#!/usr/bin/env python3
"""Golden-executor frame time: one quantized frame per task, min and median over a few runs.

    scripts/bench_golden.py [--preset edge-moe] [--precision W8A16 ...] [--task T ...] [--runs 5] [--json]

Calibration (on a few images) and graph building happen once per precision and are not timed;
each timed run is a whole backbone frame of one task (quantize the image, every op, MoE routing).
Wall time is reported with the CPU time of the process (BLAS is pinned to one thread in a run, so
that is the frame's single-core time) and the 1-minute load average: on a shared machine the wall
time grows with the load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="edge-moe")
    ap.add_argument("--dataset")
    ap.add_argument("--checkpoint")
    ap.add_argument("--precision", action="append", help="preset or spec file; repeat for several (default: the default spec)")
    ap.add_argument("--task", action="append", help="task name; repeat for several (default: every task)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calib-images", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from m3vit.compiler import golden
    from m3vit.compiler.fidelity import spec_text
    from m3vit.compiler.from_torch import build_qgraph
    from m3vit.compiler.numerics import SatCounter
    from m3vit.compiler.quantize import calibrate, load_precision
    from m3vit.model.checkpoint import load_checkpoint
    from m3vit.model.config import preset_config
    from m3vit.model.images import input_batch
    from m3vit.model.vit import build_model

    model = load_checkpoint(args.checkpoint) if args.checkpoint else build_model(preset_config(args.preset, args.dataset))
    cfg = model.cfg
    _, x = input_batch(cfg.img_size, 1)[0]
    tasks = [cfg.task_index(t) for t in args.task] if args.task else range(len(cfg.task_names))
    base = calibrate(model, n_images=args.calib_images)
    rows = []
    for prec in args.precision or [None]:
        spec = load_precision(prec)
        graph = build_qgraph(model, base.with_spec(model, spec))
        for t in tasks:
            task = cfg.task_names[t]
            golden.run(graph, x, t, stats=SatCounter())  # warm-up: tables, allocator
            times, cpu = [], []
            for _ in range(args.runs):
                t0, c0 = time.perf_counter(), time.process_time()
                golden.run(graph, x, t, stats=SatCounter())
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            rows.append({"preset": cfg.name, "dataset": cfg.dataset, "precision": spec_text(spec),
                         "spec": spec, "task": task, "runs": args.runs,
                         "min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
                         "cpu_min_s": round(min(cpu), 4), "load_1min": round(os.getloadavg()[0], 2)})
            if not args.json:
                print(f"{cfg.name:<12} {spec_text(spec):<26} {task:<12} min {min(times):.3f} s   "
                      f"median {statistics.median(times):.3f} s   CPU min {min(cpu):.3f} s   "
                      f"({args.runs} runs, load {rows[-1]['load_1min']})",
                      flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
