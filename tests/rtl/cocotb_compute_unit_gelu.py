"""cocotb tests of compute_unit.sv with the fused GELU epilogue (numerics.gemm_gelu), bit-exact
against the golden model: the GEMM row from refmodel.py (itself checked against numerics.gemm),
then m3vit.compiler.numerics.gelu. Uses the compute unit's bench (tests/rtl/cocotb_compute_unit.py).
"""

from __future__ import annotations

import random

import cocotb
import numpy as np

from cocotb_compute_unit import ACT_W, P_IN, P_OUT, SLOTS, W_W, Bench, gemm_job, rand_signed, random_tags, reset, scaled
from m3vit.compiler import numerics as nx


def gelu_ref(row, in_frac, out_frac, out_bits):
    fmt = nx.Fmt(out_bits or ACT_W, out_frac)
    return [int(v) for v in nx.gelu(np.array(row, dtype=np.int64), in_frac, fmt, stats=nx.SatCounter())]


def random_gemm_gelu(bench, rng, mixed=True):
    T = rng.randint(1, 2 * SLOTS + 3)
    K = rng.randint(1, 3 * P_IN + 1)
    N = rng.randint(1, 2 * P_OUT + 1)
    a_bits, w_bits = rng.randint(2, ACT_W), rng.randint(2, W_W)
    mid_bits = rng.choice([ACT_W, rng.randint(2, ACT_W)])
    x = [[rand_signed(rng, a_bits) for _ in range(K)] for _ in range(T)]
    w = [[rand_signed(rng, w_bits) for _ in range(N)] for _ in range(K)]
    bias = [rand_signed(rng, a_bits + w_bits + 2) for _ in range(N)]
    base = a_bits + w_bits + (K.bit_length() // 2) - mid_bits
    shift = [max(-64, min(63, rng.randint(base - 2, base + 2))) for _ in range(N)]
    # Mostly an input fraction that puts the mid values around GELU's table range (|x| < 8).
    lo, hi = nx.GELU_IN_FRAC
    in_frac = rng.randint(lo, hi) if rng.random() < 0.3 else max(lo, min(hi, mid_bits - 4 + rng.randint(-2, 2)))
    out_frac = in_frac + rng.randint(-3, 3)
    gelu = (in_frac, out_frac, rng.choice([0, ACT_W, rng.randint(1, ACT_W)]))
    gemm_job(bench, x, w, bias, shift, mid_bits, random_tags(rng, T), gelu=gelu, gelu_ref=gelu_ref)
    if mixed:   # a plain GEMM in between: the select must switch cleanly per tile
        gemm_job(bench, x[:3], w, bias, shift, mid_bits, random_tags(rng, min(3, T)))


@cocotb.test()
async def gemm_gelu_random(dut):
    """GEMM + GELU with random formats, interleaved with plain GEMMs; random gaps and backpressure."""
    rng = random.Random(51)
    await reset(dut)
    bench = Bench(dut, rng)
    for _ in range(scaled(8)):
        random_gemm_gelu(bench, rng)
    await bench.run()
    bench.save_digest("gemm_gelu_random")


@cocotb.test()
async def gemm_gelu_full_rate(dut):
    """GEMM + GELU back to back without gaps or backpressure."""
    rng = random.Random(61)
    await reset(dut)
    bench = Bench(dut, rng, x_gap=0.0, w_gap=0.0, ready=1.0, idle_noise=False)
    for _ in range(scaled(4)):
        random_gemm_gelu(bench, rng, mixed=False)
    await bench.run()
    bench.save_digest("gemm_gelu_full_rate")
