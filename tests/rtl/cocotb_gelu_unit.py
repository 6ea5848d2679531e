"""cocotb tests of gelu_unit.sv, bit-exact against m3vit.compiler.numerics.gelu (the golden model).

Run through tests/test_rtl_nonlinear.py, which passes the hardware configuration in
M3V_HW_CONFIG and a directory for the results in M3V_TEST_DIR. A beat is P values sharing one
runtime format (in_frac, out_frac, out_bits); formats change from beat to beat.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np

from m3vit.compiler import numerics as nx
from m3vit.rtl_sim.hwconfig import HwConfig
from streams import SCALE, StreamBench, pack, reset, unpack

HW = HwConfig.from_dict(json.loads(os.environ["M3V_HW_CONFIG"]), "M3V_HW_CONFIG")
P = HW.rtl_params()["P_OUT"]
DATA_W = HW.rtl_params()["ACT_W"]
FRAC_W = 7
LATENCY = 19
IN_FRAC = nx.GELU_IN_FRAC
XMIN, XMAX = -(1 << (DATA_W - 1)), (1 << (DATA_W - 1)) - 1


def out_frac_range(in_frac):
    """Output fractions the port holds and the golden model evaluates: right shifts up to 62, left
    shifts while g (|g| < 2^40) times 2^-s stays within 63 bits (beyond that it raises)."""
    k = max(in_frac, nx.CONTRACT.gelu_frac)
    return max(-(1 << (FRAC_W - 1)), k - 62), min((1 << (FRAC_W - 1)) - 1, k + 21)


def beat(xs, in_frac, out_frac, out_bits):
    return {"x": pack(xs, DATA_W), "in_frac": in_frac & ((1 << FRAC_W) - 1),
            "out_frac": out_frac & ((1 << FRAC_W) - 1), "out_bits": out_bits}


def golden(xs, in_frac, out_frac, out_bits):
    y = nx.gelu(np.array(xs, dtype=np.int64), in_frac, nx.Fmt(out_bits, out_frac), stats=nx.SatCounter())
    return [int(v) for v in y]


def read_y(dut):
    return unpack(dut.y.value.to_unsigned(), DATA_W, P)


def random_beat(rng):
    in_frac = rng.randint(*IN_FRAC)
    lo, hi = out_frac_range(in_frac)
    # Mostly formats a quantizer would pick (out_frac near in_frac), sometimes anything legal.
    out_frac = rng.randint(lo, hi) if rng.random() < 0.2 else max(lo, min(hi, in_frac + rng.randint(-4, 4)))
    out_bits = rng.choice([DATA_W, DATA_W, rng.randint(1, DATA_W)])
    xs = []
    for _ in range(P):
        r = rng.random()
        if r < 0.5:       # the table's range, |x| < 8
            lim = min(XMAX, int(8 * 2.0 ** in_frac))
            xs.append(rng.randint(-lim, lim))
        else:
            xs.append(rng.randint(XMIN, XMAX))
    return xs, in_frac, out_frac, out_bits


async def run_beats(dut, beats, name, seed, gap_max=2, ready_p=0.7, clock=True):
    await reset(dut, {"in_valid": 0, "out_ready": 0}, "y", clock)
    bench = StreamBench(dut, random.Random(seed), gap_max=gap_max, ready_p=ready_p)
    items = [beat(*b) for b in beats]
    expected = [golden(*b) for b in beats]
    await bench.run(items, expected, read_y)
    bench.save_digest(name)
    return bench


@cocotb.test()
async def gelu_random(dut):
    rng = random.Random(11)
    beats = [random_beat(rng) for _ in range(int(300 * SCALE))]
    await run_beats(dut, beats, "gelu_random", 12)


@cocotb.test()
async def gelu_corners(dut):
    """Format extremes, saturation, zeros, the table's last interval and beyond, rounding ties."""
    beats = []
    for in_frac in (IN_FRAC[0], -1, 0, 5, 11, 15, 16, 17, 20, IN_FRAC[1]):
        end = int(8 * 2.0 ** in_frac)          # |x| = 8: the first value beyond the table
        near = [end - 1, end, end + 1, -end + 1, -end, -end - 1] if end > 0 else []
        tie = [3 << max(in_frac - 17, 0)] if in_frac > 16 else []   # a grid-rounding tie
        vals = [XMIN, XMAX, 0, 1, -1, XMIN + 1, XMAX - 1] + near + tie
        vals = [max(XMIN, min(XMAX, v)) for v in vals]
        lo, hi = out_frac_range(in_frac)
        for out_frac, out_bits in ((in_frac, DATA_W), (lo, DATA_W), (hi, DATA_W), (hi, 1),
                                   (in_frac + 3, 2), (in_frac - 2, DATA_W - 1), (in_frac, 0)):
            out_frac = max(lo, min(hi, out_frac))
            for i in range(0, len(vals), P):
                chunk = (vals[i:i + P] + [0] * P)[:P]
                beats.append((chunk, in_frac, out_frac, out_bits))
    # out_bits = 0 means the full container in the RTL; the golden model needs the width itself.
    items = [beat(*b) for b in beats]
    expected = [golden(x, fi, fo, ob or DATA_W) for x, fi, fo, ob in beats]
    await reset(dut, {"in_valid": 0, "out_ready": 0}, "y")
    bench = StreamBench(dut, random.Random(21), gap_max=1, ready_p=0.8)
    await bench.run(items, expected, read_y)
    bench.save_digest("gelu_corners")


@cocotb.test()
async def gelu_full_rate(dut):
    """No gaps, ready always high: one beat per cycle, latency LATENCY."""
    rng = random.Random(31)
    beats = [random_beat(rng) for _ in range(int(100 * SCALE))]
    bench = await run_beats(dut, beats, "gelu_full_rate", 32, gap_max=0, ready_p=1.0)
    assert bench.cycles <= len(beats) + LATENCY + 20 + 2, f"{bench.cycles} cycles for {len(beats)} beats"


@cocotb.test()
async def gelu_backpressure(dut):
    """Heavy, bursty backpressure and long input gaps."""
    rng = random.Random(41)
    beats = [random_beat(rng) for _ in range(int(150 * SCALE))]
    await run_beats(dut, beats, "gelu_backpressure_a", 42, gap_max=0, ready_p=0.15)
    await run_beats(dut, beats, "gelu_backpressure_b", 43, gap_max=6, ready_p=0.5,
                     clock=False)
