"""cocotb tests of rsqrt_unit.sv, bit-exact against m3vit.compiler.numerics.rsqrt_int.

Run through tests/test_rtl_layernorm.py. The unit has no handshake (a fixed-latency pipeline), so
inputs arrive with random gaps and every output (in order) is compared with (r, e) of the golden
op. Inside a LayerNorm an r that is off by one rarely changes n, which is why the unit is tested on
its own: every mantissa whose Newton result needs the rounding correction is covered.
"""

from __future__ import annotations

import hashlib
import random

import cocotb
import numpy as np
from cocotb.triggers import ReadOnly, RisingEdge

from m3vit.compiler import numerics as nx
from streams import SCALE, TEST_DIR, reset

UW = 62
LATENCY = 17
C = nx.CONTRACT
M = C.rsqrt_mant_frac


def corrected_mantissas():
    """Every mantissa in [2^M, 2^(M+2)) whose Newton step is not already correctly rounded."""
    mant = np.arange(1 << M, 1 << (M + 2), dtype=np.int64)
    r, _ = nx.rsqrt_int(mant)
    return [int(m) for m in mant[r != nx._rsqrt_newton(mant)]]


async def check(dut, us, name, seed, gap_p=0.3):
    """Drive us (with random idle cycles), compare each output with rsqrt_int, save a digest."""
    rng = random.Random(seed)
    r_exp, e_exp = nx.rsqrt_int(np.array(us, dtype=np.int64))
    expected = list(zip((int(v) for v in r_exp), (int(v) for v in e_exp)))
    digest = hashlib.sha256()
    nxt = got = 0
    cycle = 0
    while got < len(expected):
        await RisingEdge(dut.clk)
        present = nxt < len(us) and rng.random() >= gap_p
        dut.in_valid.value = int(present)
        if present:
            dut.u.value = us[nxt]
            nxt += 1
        await ReadOnly()
        if int(dut.out_valid.value):
            value = (dut.r.value.to_unsigned(), dut.e.value.to_unsigned())
            assert got < len(expected), f"cycle {cycle}: output beyond the {len(expected)} expected"
            assert value == expected[got], (
                f"cycle {cycle}: output {got} is {value}, expected {expected[got]} (u = {us[got]})")
            digest.update(f"{cycle}:{value};".encode())
            got += 1
        cycle += 1
        assert cycle < 4 * len(us) + 100, f"timeout: {got} of {len(us)} outputs"
    await RisingEdge(dut.clk)
    dut.in_valid.value = 0
    for _ in range(LATENCY + 2):           # nothing more may come out
        await RisingEdge(dut.clk)
        await ReadOnly()
        assert not int(dut.out_valid.value), "an extra output"
    TEST_DIR.mkdir(parents=True, exist_ok=True)
    (TEST_DIR / f"{name}.digest").write_text(f"{got} {digest.hexdigest()}\n")


@cocotb.test()
async def rsqrt_corrections_and_corners(dut):
    """Every corrected mantissa at a random even scaling, small u exhaustively, powers of two."""
    await reset(dut, {"in_valid": 0}, "r")
    rng = random.Random(7)
    us = []
    for m in corrected_mantissas():
        us.append(m << (2 * rng.randint(0, 22)))   # u = m·4^k: e = 8 + k, the same mantissa
    us += list(range(1, 1 + int(2048 * SCALE)))
    for b in range(UW):
        us += [1 << b, (1 << b) + 1, (2 << b) - 1]
    us = [u for u in us if 1 <= u < 1 << UW]
    await check(dut, us, "rsqrt_corrections", 8)


@cocotb.test()
async def rsqrt_random(dut):
    """Log-uniform u over [1, 2^62)."""
    await reset(dut, {"in_valid": 0}, "r")
    rng = random.Random(17)
    us = [rng.randint(1 << (b - 1), (1 << b) - 1) for b in (rng.randint(1, UW) for _ in range(int(3000 * SCALE)))]
    await check(dut, us, "rsqrt_random", 18, gap_p=0.1)


@cocotb.test(skip=SCALE < 10)
async def rsqrt_every_mantissa(dut):
    """Every mantissa of [2^M, 2^(M+2)) (the long regression only)."""
    await reset(dut, {"in_valid": 0}, "r")
    us = list(range(1 << M, 1 << (M + 2)))
    await check(dut, us, "rsqrt_every_mantissa", 28, gap_p=0.0)
