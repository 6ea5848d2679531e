#!/usr/bin/env python3
"""The schedule model's cycle estimate of edge-moe (every task) and m3vit-small (pascal).

    scripts/bench_schedule.py [--preset edge-moe --preset m3vit-small:pascal] [--hw hw.json]
                              [--uniform] [--layers] [--no-fuse | --compare-fusion] [--json]

Each preset is a random-init model (seed 0) quantized with the default precision, calibrated on
one bundled photograph, lowered by compiler/lower.py. The routing of every task is that of a
golden run on the same photograph (its ``blocks.i.moe.topk`` tables); the uniform spread (every
expert active, the most weight traffic) is printed beside it, and alone with ``--uniform``.
The Program is the default (residual adds fused); ``--no-fuse`` lowers without residual fusion,
``--compare-fusion`` prints one line per run with both estimates and the saving.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_PRESETS = ("edge-moe", "m3vit-small:pascal")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="PRESET[:DATASET]; repeat for several")
    ap.add_argument("--hw", help="hw.json (default: the shipped one)")
    ap.add_argument("--uniform", action="store_true", help="uniform routing only (no golden run)")
    ap.add_argument("--layers", action="store_true", help="also print the per-layer table")
    ap.add_argument("--no-fuse", action="store_true", help="lower without residual fusion")
    ap.add_argument("--compare-fusion", action="store_true", help="fused against unfused, one line per run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from m3vit.compiler import golden, lower, schedule
    from m3vit.compiler.from_torch import build_qgraph
    from m3vit.compiler.numerics import SatCounter
    from m3vit.compiler.quantize import calibrate
    from m3vit.model.config import preset_config
    from m3vit.model.images import input_batch
    from m3vit.model.vit import build_model
    from m3vit.rtl_sim.hwconfig import HwConfig, load_hw_config

    torch.set_num_threads(1)
    hw = load_hw_config(args.hw) if args.hw else HwConfig.default()
    rows = []
    for spec in args.preset or DEFAULT_PRESETS:
        preset, _, dataset = spec.partition(":")
        t0 = time.perf_counter()
        model = build_model(preset_config(preset, dataset or None))
        cfg = model.cfg
        photo = input_batch(cfg.img_size, 1)
        image = photo[0][1]
        graph = build_qgraph(model, calibrate(model, images=photo))
        program = lower.encode(lower.lower(graph, hw, fuse=not args.no_fuse))[2]
        plain = lower.encode(lower.lower(graph, hw, fuse=False))[2] if args.compare_fusion else None
        _say(f"{cfg.name}/{cfg.dataset}: model, calibration and lowering in {time.perf_counter() - t0:.1f} s")
        runs = [("uniform", None, None)]
        if not args.uniform:
            for task in cfg.task_names:
                # saturation of a random-init model is not this script's concern
                _, trace = golden.run(graph, image, task, trace=True, stats=SatCounter())
                runs.append(("golden", task, schedule.queue_lengths_from_trace(trace, cfg.num_experts)))
        for routing, task, queues in runs:
            result = schedule.estimate(program, hw, queue_lengths=queues)
            title = f"{cfg.name} ({cfg.dataset}, {cfg.num_tokens} tokens), " + (
                f"task {task}, routing of a golden run" if task else "uniform routing (every expert active)")
            if plain is not None:
                before = schedule.estimate(plain, hw, queue_lengths=queues)
                b, a = before["total"], result["total"]
                line = {"preset": cfg.name, "dataset": cfg.dataset, "task": task, "routing": routing,
                        "unfused_cycles": b["cycles"], "fused_cycles": a["cycles"],
                        "unfused_ddr_bytes": b["ddr_bytes"], "fused_ddr_bytes": a["ddr_bytes"],
                        "unfused_instructions": b["active"], "fused_instructions": a["active"],
                        "add_share": before["classes"].get("add", {}).get("share", 0.0)}
                rows.append(line)
                if not args.json:
                    print(f"{title}: {b['cycles']:,} -> {a['cycles']:,} cycles "
                          f"({100 * (1 - a['cycles'] / b['cycles']):.1f} % fewer; "
                          f"{b['latency_ms']:.3f} -> {a['latency_ms']:.3f} ms), DDR {b['ddr_bytes'] / 1e6:.2f} -> "
                          f"{a['ddr_bytes'] / 1e6:.2f} MB, add instructions {100 * line['add_share']:.1f} % of the "
                          f"unfused cycles")
                continue
            rows.append({"preset": cfg.name, "dataset": cfg.dataset, "task": task, "routing": routing,
                         "tokens": cfg.num_tokens, "result": {k: v for k, v in result.items() if k != "instructions"}})
            if not args.json:
                print(f"== {title}")
                print(schedule.format_table(result, layers=args.layers))
                print()
    if args.json:
        print(json.dumps(rows, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
