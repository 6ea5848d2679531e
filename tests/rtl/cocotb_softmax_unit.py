"""cocotb tests of softmax_unit.sv, bit-exact against the golden attention of
m3vit.compiler.numerics (attention, attention_scores, softmax_av_partial, softmax_av_finish).

Run through tests/test_rtl_softmax.py, which passes the hardware configuration in M3V_HW_CONFIG
and a directory for the results in M3V_TEST_DIR. One beat is one key of a query row (its score
and P value lanes); the row's parameters are driven on every beat but only the first beat's are
used, so the others carry random values here.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np

from m3vit.compiler import numerics as nx
from m3vit.errors import ConfigError
from m3vit.rtl_sim.hwconfig import HwConfig
from streams import SCALE, StreamBench, pack, reset, unpack

HW = HwConfig.from_dict(json.loads(os.environ["M3V_HW_CONFIG"]), "M3V_HW_CONFIG")
RP = HW.rtl_params()
P = RP["SM_P"]
DATA_W = RP["ACT_W"]
SCORE_W = RP["SCORE_W"]
SHIFT_W = RP["SHIFT_W"]
OB_W = RP["OB_W"]
FRAC_W = 7
MAX_KEYS = nx.CONTRACT.max_keys
KEY_W = MAX_KEYS.bit_length()
DH_W = P.bit_length()
ROW_LAT = 38
FIFO_DEPTH = 16
VMIN, VMAX = -(1 << (DATA_W - 1)), (1 << (DATA_W - 1)) - 1
SMIN, SMAX = -(1 << (SCORE_W - 1)), (1 << (SCORE_W - 1)) - 1
# score fractions the golden exp_int evaluates for every t (its shift f + C - L within [-62, 62]
# and the left shift of t*L2E within 63 bits)
FRAC_LEGAL = (-34, 56)


class Row:
    """One query row: scores s[Tk], values v[Tk, P] (lanes >= dh are don't-care), row max m,
    formats, and the expected output (P values, lanes >= dh zero)."""

    def __init__(self, s, v, m, frac, out_shift, out_bits, dh, expected, keys_port=None):
        self.s, self.v, self.m = [int(x) for x in s], np.asarray(v, dtype=np.int64), int(m)
        self.frac, self.out_shift, self.out_bits, self.dh = frac, out_shift, out_bits, dh
        self.expected = [int(x) for x in expected]
        self.keys_port = len(self.s) if keys_port is None else keys_port

    def beats(self, order, rng):
        out = []
        for n, j in enumerate(order):
            first = n == 0
            out.append({
                "in_score": self.s[j] & ((1 << SCORE_W) - 1),
                "in_v": pack(self.v[j], DATA_W),
                "in_max": (self.m if first else rng.randint(SMIN, SMAX)) & ((1 << SCORE_W) - 1),
                "in_keys": self.keys_port if first else rng.randrange(1 << KEY_W),
                "in_score_frac": (self.frac if first else rng.randrange(1 << FRAC_W)) & ((1 << FRAC_W) - 1),
                "in_out_shift": (self.out_shift if first else rng.randrange(1 << SHIFT_W))
                & ((1 << SHIFT_W) - 1),
                "in_out_bits": self.out_bits if first else rng.randrange(1 << OB_W),
                "in_dh": self.dh if first else rng.randrange(1 << DH_W),
            })
        return out


def eff_dh(dh):
    return P if dh == 0 or dh > P else dh


def eff_bits(out_bits):
    return DATA_W if out_bits == 0 or out_bits > DATA_W else out_bits


def pad(o, dh):
    return [int(x) for x in o] + [0] * (P - dh)


def golden_row(s, v, m, frac, out_shift, out_bits, dh):
    """The golden op on one row given its scores: softmax_av_partial then softmax_av_finish."""
    d = eff_dh(dh)
    psum, pv = nx.softmax_av_partial(np.array([s], dtype=np.int64), np.asarray(v)[:, :d],
                                     np.array([m]), frac)
    o = nx.softmax_av_finish(psum, pv, out_shift, nx.Fmt(eff_bits(out_bits), 0),
                             stats=nx.SatCounter())
    return pad(o[0], d)


def make_row(rng, s, v, m, frac, out_shift, out_bits, dh, keys_port=None):
    """A Row with the golden result; an out_shift the golden model refuses (a left shift beyond
    63 bits) is replaced by 0."""
    try:
        exp = golden_row(s, v, m, frac, out_shift, out_bits, dh)
    except ConfigError:
        out_shift = 0
        exp = golden_row(s, v, m, frac, out_shift, out_bits, dh)
    return Row(s, v, m, frac, out_shift, out_bits, dh, exp, keys_port)


def random_head(rng, n_q, n_k):
    """One attention head end to end: q, k, v -> scores (attention_scores) and output (attention).
    Returns the rows as the unit sees them (scores, row max, v padded with random lanes)."""
    dh = rng.choice([P, rng.randint(1, P)])
    w = DATA_W
    q = np.array([[rng.randint(VMIN, VMAX) >> rng.randint(0, w // 2) for _ in range(dh)]
                  for _ in range(n_q)], dtype=np.int64)
    k = np.array([[rng.randint(VMIN, VMAX) >> rng.randint(0, w // 2) for _ in range(dh)]
                  for _ in range(n_k)], dtype=np.int64)
    v = np.array([[rng.randint(VMIN, VMAX) for _ in range(dh)] for _ in range(n_k)], dtype=np.int64)
    acc_max = int(np.abs(q @ k.T).max(initial=1)) or 1
    score_bits = rng.choice([SCORE_W, SCORE_W, rng.randint(4, SCORE_W)])
    frac = rng.randint(0, 16) if rng.random() < 0.85 else rng.randint(*FRAC_LEGAL)
    # a score shift that spreads the scores over the format, sometimes saturating
    shift = acc_max.bit_length() - (score_bits - 2) + rng.randint(-3, 3)
    score_fmt = nx.Fmt(score_bits, frac)
    out_shift = rng.choice([0, 0, rng.randint(-4, 4), rng.randint(-40, 40)])
    out_bits = rng.choice([DATA_W, DATA_W, rng.randint(1, DATA_W), 0])
    out_fmt = nx.Fmt(eff_bits(out_bits), 0)
    stats = nx.SatCounter()
    s = nx.attention_scores(q, k, shift, score_fmt, stats)
    try:
        o = nx.attention(q, k, v, 1, shift, score_fmt, out_shift, out_fmt, stats)
    except ConfigError:
        out_shift = 0
        o = nx.attention(q, k, v, 1, shift, score_fmt, out_shift, out_fmt, stats)
    dh_port = dh if dh < P else rng.choice([P, 0, (1 << DH_W) - 1])
    rows = []
    for i in range(n_q):
        vp = np.array([list(v[j]) + [rng.randint(VMIN, VMAX) for _ in range(P - dh)]
                       for j in range(n_k)], dtype=np.int64)
        rows.append(Row(s[i], vp, int(s[i].max()), frac, out_shift, out_bits, dh_port, pad(o[i], dh)))
    return rows


def read_y(dut):
    return unpack(dut.out_y.value.to_unsigned(), DATA_W, P)


IDLE = {"in_valid": 0, "out_ready": 0}


async def run_rows(dut, rows, orders, name, seed, gap_max=2, ready_p=0.7, clock=True):
    """Feed rows (keys in the given orders) and check every row's output; returns the outputs."""
    await reset(dut, IDLE, "out_y", clock)
    rng = random.Random(seed)
    items, expected = [], []
    for row, order in zip(rows, orders):
        items += row.beats(order, rng)
        expected.append(row.expected)
    outs = []

    def read(d):
        y = read_y(d)
        outs.append(y)
        return y

    bench = StreamBench(dut, rng, gap_max=gap_max, ready_p=ready_p)
    await bench.run(items, expected, read, max_cycles=200 + ROW_LAT * len(rows) + 20 * len(items)
                    * (gap_max + 2))
    bench.save_digest(name)
    return outs, bench


def shuffled(rng, n):
    order = list(range(n))
    rng.shuffle(order)
    return order


@cocotb.test()
async def softmax_attention_random(dut):
    """Random heads end to end (q, k, v through the golden attention), keys in random order."""
    rng = random.Random(101)
    rows = []
    for _ in range(int(25 * SCALE)):
        rows += random_head(rng, rng.randint(1, 3), rng.choice([1, 2, rng.randint(3, 40)]))
    await run_rows(dut, rows, [shuffled(rng, len(r.s)) for r in rows], "softmax_random", 102)


@cocotb.test()
async def softmax_key_order(dut):
    """The same rows in three key orders give identical bits (and the golden result)."""
    rng = random.Random(201)
    rows = []
    for _ in range(3):
        rows += random_head(rng, 2, rng.randint(5, 30))
    orders = [list(range(len(r.s))) for r in rows]
    orders += [list(reversed(o)) for o in orders]
    orders += [shuffled(rng, len(r.s)) for r in rows]
    outs, _ = await run_rows(dut, rows * 3, orders, "softmax_key_order", 202)
    n = len(rows)
    assert outs[:n] == outs[n:2 * n] == outs[2 * n:], "key order changed the result"


@cocotb.test()
async def softmax_corners(dut):
    """Single keys, ties, score extremes, value extremes and saturation, zeros, every class of
    score fraction, dh and out_bits port conventions, a row max above the scores."""
    rng = random.Random(301)

    def rv(n, lo=VMIN, hi=VMAX):
        return [[rng.randint(lo, hi) for _ in range(P)] for _ in range(n)]

    rows = []
    # one key: p = 2^P, S = 2^P, the output is v (out_shift 0) or v rescaled
    for out_shift in (0, 0, 1, -1, 3, -DATA_W, 20):
        s = rng.randint(SMIN, SMAX)
        rows.append(make_row(rng, [s], rv(1), s, rng.randint(0, 16), out_shift, DATA_W, P))
    rows.append(make_row(rng, [5], [[VMIN] * P], 5, 8, 0, DATA_W, P, keys_port=0))   # 0 keys = 1
    # ties: equal scores give a uniform softmax; rounding ties of the output
    for n in (2, 3, 4, 7):
        rows.append(make_row(rng, [SMAX] * n, rv(n), SMAX, 12, 0, DATA_W, P))
        rows.append(make_row(rng, [0] * n, [[1] * P] + [[0] * P] * (n - 1), 0, 4, 0, DATA_W, P))
    # extreme scores: t = 2^SCORE_W - 1 underflows p to 0, or not for very negative fractions
    for frac in (-34, -7, -6, -5, 0, 1, 15, 16, 17, 24, 40, 56):
        s = [SMAX, SMIN, SMIN + 1, SMAX - 1, 0, -1]
        rows.append(make_row(rng, s, rv(len(s)), SMAX, frac, 0, DATA_W, P))
        s = [rng.randint(SMIN, SMAX) for _ in range(5)]
        rows.append(make_row(rng, s, rv(5), max(s), frac, rng.randint(-3, 3), DATA_W, P))
    # value extremes, saturation through narrow formats and left shifts, zeros
    for out_bits, out_shift in ((DATA_W, 0), (1, 0), (2, -1), (DATA_W - 1, -2), (0, -DATA_W),
                                (DATA_W, -60), (DATA_W, 63), (3, 5)):
        for vals in ([[VMAX] * P] * 3, [[VMIN] * P] * 3, [[VMIN, VMAX] * P][:1] * 2 + [[0] * P],
                     [[0] * P] * 4):
            vals = [list(x)[:P] + [0] * (P - len(x)) for x in vals]
            n = len(vals)
            s = [rng.randint(-50, 50) for _ in range(n)]
            rows.append(make_row(rng, s, vals, max(s), 6, out_shift, out_bits, P))
    # dh port: 1, P - 1, P, 0 (= P), above P (= P)
    for dh in sorted({1, max(1, P - 1), P, 0, (1 << DH_W) - 1}):
        s = [rng.randint(-300, 300) for _ in range(6)]
        rows.append(make_row(rng, s, rv(6), max(s), 8, 0, DATA_W, dh))
    # m above every score: S from 2^P down to small sums (the reciprocal's left normalisation)
    for gap in [1, 40, 2000] + [rng.randint(0, 3000) for _ in range(int(20 * SCALE))]:
        s = [rng.randint(-3000, 3000) for _ in range(rng.randint(1, 6))]
        m = min(SMAX, max(s) + gap)
        rows.append(make_row(rng, s, rv(len(s)), m, 10, 0, DATA_W, P))
    await run_rows(dut, rows, [shuffled(rng, len(r.s)) for r in rows], "softmax_corners", 302,
                   gap_max=1, ready_p=0.8)


@cocotb.test()
async def softmax_long_and_short_rows(dut):
    """MAX_KEYS-key rows at the accumulators' bound (all keys at the max, values at the format's
    extremes), a random long row, then one-key rows back to back against a slow reader (the
    credits must hold back rows, not lose them)."""
    rng = random.Random(401)
    n = MAX_KEYS
    rows = [make_row(rng, [7] * n, [[VMIN] * P] * n, 7, 9, 0, DATA_W, P),
            make_row(rng, [7] * n, [[VMAX] * P] * n, 7, 9, -3, DATA_W, P)]
    s = [rng.randint(-2000, 2000) for _ in range(min(MAX_KEYS, int(1000 * SCALE)))]
    rows.append(make_row(rng, s, [[rng.randint(VMIN, VMAX) for _ in range(P)] for _ in s], max(s),
                         9, 0, DATA_W, P))
    await run_rows(dut, rows, [shuffled(rng, len(r.s)) for r in rows], "softmax_long", 402,
                   gap_max=0, ready_p=1.0)
    short = []
    for _ in range(int(60 * SCALE)):
        s = rng.randint(SMIN, SMAX)
        short.append(make_row(rng, [s], [[rng.randint(VMIN, VMAX) for _ in range(P)]], s,
                              rng.randint(0, 16), rng.randint(-2, 2), DATA_W, P))
    _, bench = await run_rows(dut, short, [[0]] * len(short), "softmax_short_a", 403, gap_max=0,
                              ready_p=1.0, clock=False)
    # one-key rows: FIFO_DEPTH rows in flight per ROW_LAT cycles (the credits), nothing slower
    bound = -(-len(short) // FIFO_DEPTH) * (ROW_LAT + 3) + ROW_LAT + 40
    assert bench.cycles <= bound, f"{bench.cycles} cycles for {len(short)} one-key rows"
    await run_rows(dut, short, [[0]] * len(short), "softmax_short_b", 404, gap_max=0, ready_p=0.1,
                   clock=False)
