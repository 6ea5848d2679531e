#!/usr/bin/env python3
"""RTL benchmark: a preset's full frame on the RTL accelerator (Verilator, DDR model, host
Driver), every task, bit-exact against the golden model; cycles, latency at 300 MHz, MAC-array
utilisation, stall cycles, DDR MB, the schedule model's estimate beside each, simulated cycles
per second; with --synth, the yosys DSP48E2 count of the whole accelerator (hierarchical
multiplier mapping of m3v_accel, ~20 minutes for 32x48) and the resources of its datapath units.

    scripts/bench_rtlsim.py [--preset edge-moe] [--parallel 32x48] [--task T] [--block N | --instrs A:B]
                            [--trace] [--synth] [--keep DIR] [--json]

The preset's multi-task backbone is exported with random-init weights (seed 0), calibrated on
--calib-images bundled photographs and compiled for the hardware configuration (hw.json, or
--parallel); `m3vit rtlsim BUILD` then runs every task. The first run builds the Verilator model
of the accelerator for that configuration (cached under build/rtl). `--block N` runs only the
instructions of transformer block N (rtlsim --instrs: from the Python executor's arena), which is
how a block of m3vit-small is measured without simulating the frame up to it.

The table ends with the published figures the issue compares against: Edge-MoE (ICCAD 2023)
34.64 ms per frame on a ZCU102 (2,520 DSP, 32-bit activations, 16-bit weights) and M3ViT's FPGA
figure of 69.03 ms on a ZCU104 (pascal; 84.54 ms for nyud).
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
    ap.add_argument("--preset", default="edge-moe", help="edge-moe, m3vit-small or tiny")
    ap.add_argument("--parallel", help="MAC array PINxPOUT (default: hw.json's)")
    ap.add_argument("--calib-images", type=int, default=4)
    ap.add_argument("--task", action="append", help="task name or index (repeatable; default: every task)")
    ap.add_argument("--block", type=int, help="run only transformer block N (its instructions)")
    ap.add_argument("--instrs", metavar="A:B", help="run only instructions A..B-1")
    ap.add_argument("--dataset", help="the preset's dataset (m3vit-small: pascal or nyud)")
    ap.add_argument("--trace", action="store_true", help="compare every layer")
    ap.add_argument("--synth", action="store_true",
                    help="also count the whole design's DSP48E2 and the datapath's resources with yosys")
    ap.add_argument("--keep", metavar="DIR", help="keep the build (and rtlsim's whole report, rtlsim.json) in DIR")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from m3vit.model.config import resolve_config
    from m3vit.model.export import export_onnx
    from m3vit.model.vit import build_model

    with tempfile.TemporaryDirectory(prefix="m3vit-bench-") as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        cfg = resolve_config(args.preset, dataset=args.dataset) if args.dataset else resolve_config(args.preset)
        onnx = root / f"{cfg.name}.onnx"
        export_onnx(build_model(cfg, with_heads=False), onnx, all_tasks=True)
        build = root / f"{cfg.name}-build"
        extra = ["--parallel", args.parallel] if args.parallel else []
        comp, t_comp = _m3vit("compile", str(onnx), "--out", str(build), "--calib-images", str(args.calib_images),
                              *extra)
        span = args.instrs
        if args.block is not None:
            prog = json.loads((build / "program.json").read_text())
            idx = [e["index"] for e in prog["instructions"] if e.get("name", "").startswith(f"blocks.{args.block}.")]
            if not idx:
                raise SystemExit(f"bench_rtlsim: {cfg.name} has no block {args.block}")
            span = f"{min(idx)}:{max(idx) + 1}"
        sim_args = [*(["--trace"] if args.trace else []), *(["--instrs", span] if span else []),
                    *[a for t in (args.task or []) for a in ("--task", t)]]
        rep, t_sim = _m3vit("rtlsim", str(build), *sim_args)
        if args.keep:
            # the whole report (cycles per instruction and class beside the model's) stays with the build
            (root / "rtlsim.json").write_text(json.dumps(rep, sort_keys=True))
        out = {"preset": cfg.name, "dataset": cfg.dataset, "instructions_run": rep["instructions_run"],
               "compile_seconds": round(t_comp, 1), "rtlsim_seconds": round(t_sim, 1),
               "bit_exact": rep["bit_exact"], "mismatches": rep["mismatches"], "parallel": comp.get("parallel"),
               "simulated_cycles_per_second": rep["simulated_cycles_per_second"],
               "simulated_cycles_per_cpu_second": rep["simulated_cycles_per_cpu_second"],
               "build_seconds": rep["build_seconds"], "simulation_seconds": rep["seconds"],
               "run_seconds": rep["run_seconds"], "tasks": []}
        for e in rep["tasks"]:
            out["tasks"].append({k: e[k] for k in ("task", "total_cycles", "latency_ms_300mhz", "utilization",
                                                   "stall_cycles", "ddr_bytes", "schedule_estimate_cycles")})
        if args.synth:
            top, t_top = _m3vit("synth", "--unit", "m3v_accel", *extra)
            syn, t_syn = _m3vit("synth", "--unit", "all", *extra)
            t = syn["total"]
            out["synth"] = {"seconds": round(t_top + t_syn, 1), "dsp": top["total"]["dsp"],
                            "dsp_by_instance": top["units"]["m3v_accel"]["dsp_by_instance"],
                            "dsp_budget": top["budget"]["dsp"], "datapath_dsp": t["dsp"],
                            "datapath_lut": syn["lut_including_lutram_srl"], "datapath_ff": t["ff"],
                            "datapath_bram": t["bram36"], "fits": top["fits"] and syn["fits"]}
        from m3vit.rtl_sim.hwconfig import load_hw_config

        out["dsp_model"] = load_hw_config(build / "hw.json").dsp_datapath
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0 if out["bit_exact"] else 1
    a, b = out["instructions_run"]
    what = "full frame" if args.block is None and not args.instrs else \
        (f"block {args.block}" if args.block is not None else "") + f" (instructions {a}..{b - 1})"
    print(f"{out['preset']} / {out['dataset']}, {what.strip()}, on the RTL ({out['parallel']} MACs): "
          f"{'bit-exact' if out['bit_exact'] else 'MISMATCH'}; compile {out['compile_seconds']} s, rtlsim "
          f"{out['rtlsim_seconds']} s (Verilator build {out['build_seconds']} s, simulation "
          f"{out['simulation_seconds']} s, of which the runs {out['run_seconds']} s: "
          f"{out['simulated_cycles_per_second']:,.0f} simulated cycles/s)")
    dsp = out["synth"]["dsp"] if "synth" in out else f"{out['dsp_model']} (model)"
    print("| task | cycles | ms at 300 MHz | utilisation | stall cycles | DDR MB | DSP | schedule estimate | "
          "RTL / estimate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in out["tasks"]:
        ratio = t["total_cycles"] / t["schedule_estimate_cycles"] if t["schedule_estimate_cycles"] else 0
        print(f"| {t['task']} | {t['total_cycles']:,} | {t['latency_ms_300mhz']:.3f} | {100 * t['utilization']:.1f} % | "
              f"{t['stall_cycles']:,} | {t['ddr_bytes'] / 1e6:.2f} | {dsp} | {t['schedule_estimate_cycles']:,} | "
              f"{ratio:.3f} |")
    print("published, for comparison: Edge-MoE 34.64 ms per frame (ZCU102, 2,520 DSP, 32-bit activations, "
          "16-bit weights); M3ViT 69.03 ms (ZCU104, pascal), 84.54 ms (nyud)")
    if "synth" in out:
        s = out["synth"]
        parts = ", ".join(f"{k} {v}" for k, v in sorted(s["dsp_by_instance"].items(), key=lambda kv: -kv[1]))
        print(f"yosys, whole design: DSP48E2 {s['dsp']} of {s['dsp_budget']} "
              f"({'fits' if s['dsp'] <= s['dsp_budget'] else 'OVER BUDGET'}; {parts})")
        print(f"yosys, datapath units: DSP {s['datapath_dsp']:g}, LUT {s['datapath_lut']:g}, FF {s['datapath_ff']:g}, "
              f"BRAM36 {s['datapath_bram']:g} ({s['seconds']} s for both)")
    return 0 if out["bit_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
