#!/usr/bin/env python3
"""Engine benchmark: single instructions at a preset's shapes on the RTL accelerator (Verilator,
DDR model, host Driver) at the shipped hw.json, checked byte for byte against the Python Program
executor; RTL cycles and DDR bytes beside the schedule model's estimate for the same instruction.

    scripts/bench_engines.py --op attention [--hw rtl_sim/hw.json] [--json]

Each op is one registry entry (OPS): a function that returns (name, instructions, weights, image,
arena bytes, output bytes) cases for a hardware configuration. The first run builds the Verilator
model of the accelerator for that configuration (cached under build/rtl, about two minutes for
the 32x48 array).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- attention
def _attention_cases(hw, rng):
    """edge-moe's attention: 197 tokens (196 patches + class token), dim 384, 6 heads of 64;
    q_tile as the compiler plans it (as many queries as half the score buffer holds)."""
    from m3vit.compiler import isa

    t, d, heads = 197, 384, 6
    q_tile = min(t, hw.buffers.scores // (2 * t))
    qkv = rng.integers(-3000, 3001, size=(t, 3 * d)).astype("<i2").tobytes()
    fields = dict(qkv_ref=isa.ref("in", 0), y_ref=isa.ref("out", 0), tokens=t, dim=d, heads=heads,
                  score_fmt=isa.pack_fmt(16, 4), score_shift=14, out_shift=2, fmt=isa.pack_fmt(16, 10),
                  q_tile=q_tile)
    y_bytes = 2 * t * d
    return [("attention_edge_moe", [isa.Instr("attention", fields)], bytes(64), qkv,
             isa.align(64), isa.align(y_bytes))]


OPS = {"attention": _attention_cases}


# ---------------------------------------------------------------------------- the runner
def run(op: str, hw, seed: int = 0) -> list[dict]:
    from m3vit.compiler import isa, schedule
    from m3vit.compiler.program_exec import execute
    from m3vit.rtl_sim import rtlsim

    rng = np.random.default_rng(seed)
    cases = OPS[op](hw, rng)
    jobs, instr_lists = [], []
    for name, instrs, weights, image, arena, out in cases:
        prog = rtlsim.program_bytes([*instrs, isa.Instr("end")], hw, weight_bytes=len(weights),
                                    arena_bytes=arena, input_bytes=len(image), output_bytes=out)
        jobs.append(rtlsim.Job(name=name, program=prog, weights=weights, image=image, task=0))
        instr_lists.append(instrs)
    t0 = time.perf_counter()
    results = rtlsim.simulate(jobs, hw, run_name=f"bench-{op}")
    seconds = time.perf_counter() - t0
    rows = []
    for job, instrs, r in zip(jobs, instr_lists, results):
        ref = execute(job.program, job.weights, job.image, job.task, hw_hash=hw.hash())
        exact = (r.status == 0 and r.ddr_errors == 0 and r.output == bytes(ref.memories["out"])
                 and r.arena == bytes(ref.memories["arena"]))
        est = schedule.estimate(instrs, hw)
        model = est["total"]
        rows.append({"case": job.name, "bit_exact": exact, "status": r.status_name,
                     "rtl_cycles": r.cycles, "model_cycles": model["cycles"],
                     "ratio": round(r.cycles / model["cycles"], 3) if model["cycles"] else None,
                     "rtl_ddr_bytes": r.rd_bytes + r.wr_bytes, "rtl_rd_bytes": r.rd_bytes, "rtl_wr_bytes": r.wr_bytes,
                     "model_ddr_bytes": model["ddr_read"] + model["ddr_write"],
                     "model_rd_bytes": model["ddr_read"], "model_wr_bytes": model["ddr_write"],
                     "sim_seconds": round(seconds / len(jobs), 1)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", required=True, choices=sorted(OPS))
    ap.add_argument("--hw", default=str(ROOT / "rtl_sim" / "hw.json"), help="hardware configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from m3vit.rtl_sim.hwconfig import load_hw_config

    hw = load_hw_config(args.hw)
    rows = run(args.op, hw, args.seed)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['case']}: {'bit-exact' if r['bit_exact'] else 'MISMATCH'} ({r['status']}); "
                  f"RTL {r['rtl_cycles']:,} cycles, model {r['model_cycles']:,} ({r['ratio']}x); "
                  f"DDR RTL {r['rtl_rd_bytes']:,} + {r['rtl_wr_bytes']:,} bytes, "
                  f"model {r['model_rd_bytes']:,} + {r['model_wr_bytes']:,}; {r['sim_seconds']} s simulated")
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
