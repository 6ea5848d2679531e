"""cocotb tests of layernorm_unit.sv, bit-exact against m3vit.compiler.numerics.layernorm.

Run through tests/test_rtl_layernorm.py, which passes the hardware configuration in M3V_HW_CONFIG
and a directory for the results in M3V_TEST_DIR. A "layer" is one set of runtime registers (dim,
eps_int, out_bits) and per-channel table (γ, β' = rshift_round(β, β_shift), out_shift), loaded
while the unit is idle, then a stream of rows; every output beat is compared with the golden op.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np
from cocotb.triggers import ReadOnly, RisingEdge

from m3vit.compiler import numerics as nx
from m3vit.rtl_sim.hwconfig import HwConfig
from streams import SCALE, StreamBench, pack, reset, unpack

HW = HwConfig.from_dict(json.loads(os.environ["M3V_HW_CONFIG"]), "M3V_HW_CONFIG")
RP = HW.rtl_params()
P = min(RP["P_OUT"], 8)              # the module's default lane count
DATA_W = RP["ACT_W"]
G_W = RP["W_W"]
B_W = RP["ACC_W"]
SHIFT_W = RP["SHIFT_W"]
MAX_DIM = HW.limits.max_dim
XMIN, XMAX = -(1 << (min(DATA_W, 16) - 1)), (1 << (min(DATA_W, 16) - 1)) - 1
GMIN, GMAX = -(1 << (G_W - 1)), (1 << (G_W - 1)) - 1
EPS_MAX = (1 << 61) - 1
NMAX = nx.CONTRACT.norm_fmt.maxabs
# out_shift values the golden model evaluates for every affine sum (|sum| < 2^47): left shifts
# up to 14 stay within 63 bits
OSH = (-14, 62)
LATENCY = 41 + (max(P - 1, 0)).bit_length()   # 41 + ceil(log2 P), the module header's figure
NS = 4                                         # the unit's row slots (its default)


class Layer:
    """One LayerNorm configuration and its rows; expected output beats from the golden model."""

    def __init__(self, rng, dim, xs, *, gamma=None, beta=None, beta_shift=0, out_shift=None,
                 eps_int=None, out_bits=DATA_W):
        self.dim = dim
        self.xs = np.asarray(xs, dtype=np.int64).reshape(-1, dim)
        self.gamma = np.asarray(gamma if gamma is not None else
                                [rng.randint(GMIN, GMAX) for _ in range(dim)], dtype=np.int64)
        self.beta = np.asarray(beta if beta is not None else
                               [rng.randint(-(1 << 36), 1 << 36) for _ in range(dim)], dtype=np.int64)
        self.beta_shift = beta_shift
        self.out_shift = np.asarray(out_shift if out_shift is not None else
                                    [rng.randint(8, 24) for _ in range(dim)], dtype=np.int64)
        self.eps_int = eps_int if eps_int is not None else rng.choice(
            [1, nx.layernorm_eps_int(1e-6, dim, rng.randint(4, 13)), rng.randint(1, EPS_MAX)])
        self.out_bits = out_bits            # 0 means the full container in the RTL
        self.bal = nx.rshift_round(self.beta, beta_shift)
        self.rng = rng
        self.stats = nx.SatCounter()
        z = nx.layernorm(self.xs, self.gamma, self.beta, self.eps_int, self.beta_shift, self.out_shift,
                         nx.Fmt(self.out_bits or DATA_W, 0), stats=self.stats)
        self.z = [[int(v) for v in row] for row in z]

    def beats(self):
        """Input items and expected output beats; the padding lanes carry junk that must not matter."""
        items, expected = [], []
        for row, zrow in zip(self.xs, self.z):
            nb = -(-self.dim // P)
            for b in range(nb):
                lanes = [int(v) for v in row[b * P:(b + 1) * P]]
                zl = zrow[b * P:(b + 1) * P]
                pad = P - len(lanes)
                lanes += [self.rng.randint(XMIN, XMAX) for _ in range(pad)]
                items.append({"x": pack(lanes, DATA_W)})
                expected.append((zl + [0] * pad, int(b == nb - 1)))
        return items, expected

    def table(self):
        """(address, γ word, β' word, shift word) per beat of a row."""
        out = []
        for b in range(-(-self.dim // P)):
            sl = slice(b * P, (b + 1) * P)
            pad = P - len(self.gamma[sl])
            g = [int(v) for v in self.gamma[sl]] + [self.rng.randint(GMIN, GMAX) for _ in range(pad)]
            be = [int(v) for v in self.bal[sl]] + [self.rng.randint(-(1 << 40), 1 << 40) for _ in range(pad)]
            s = [int(v) for v in self.out_shift[sl]] + [self.rng.randint(*OSH) for _ in range(pad)]
            out.append((b, pack(g, G_W), pack(be, B_W), pack(s, SHIFT_W)))
        return out


def read_y(dut):
    return unpack(dut.y.value.to_unsigned(), DATA_W, P), int(dut.out_last.value)


async def load(dut, layer):
    """Set the runtime registers and write the table (the unit is idle)."""
    dut.dim.value = layer.dim
    dut.eps_int.value = layer.eps_int
    dut.out_bits.value = layer.out_bits
    for addr, g, be, s in layer.table():
        await RisingEdge(dut.clk)
        dut.tbl_we.value = 1
        dut.tbl_addr.value = addr
        dut.tbl_gamma.value = g
        dut.tbl_beta.value = be
        dut.tbl_shift.value = s
    await RisingEdge(dut.clk)
    dut.tbl_we.value = 0


async def run_layers(dut, layers, name, seed, gap_max=2, ready_p=0.7):
    await reset(dut, {"in_valid": 0, "out_ready": 0, "tbl_we": 0, "out_en": 1}, "y")
    bench = StreamBench(dut, random.Random(seed), gap_max=gap_max, ready_p=ready_p)
    for layer in layers:
        await load(dut, layer)
        items, expected = layer.beats()
        await bench.run(items, expected, read_y)
    bench.save_digest(name)
    return bench


def random_rows(rng, dim, n):
    rows = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:          # activations around a mean, the usual case
            mean, sd = rng.randint(XMIN // 4, XMAX // 4), rng.choice([1, 4, 100, XMAX // 8])
            rows.append([max(XMIN, min(XMAX, int(rng.gauss(mean, sd)))) for _ in range(dim)])
        elif kind < 0.8:        # the whole range
            rows.append([rng.randint(XMIN, XMAX) for _ in range(dim)])
        else:                   # a few outliers on a flat row
            base = rng.randint(XMIN, XMAX)
            row = [base] * dim
            for _ in range(rng.randint(1, 3)):
                row[rng.randrange(dim)] = rng.choice([XMIN, XMAX, rng.randint(XMIN, XMAX)])
            rows.append(row)
    return rows


def random_layer(rng, dim, n_rows):
    out_bits = rng.choice([DATA_W, DATA_W, 0, rng.randint(1, DATA_W)])
    beta_shift = rng.choice([0, 0, rng.randint(-6, 8)])
    return Layer(rng, dim, random_rows(rng, dim, n_rows), beta_shift=beta_shift, out_bits=out_bits,
                 out_shift=[rng.choice([rng.randint(8, 24), rng.randint(*OSH)]) for _ in range(dim)])


def dims():
    """Row lengths: one lane, exact beats, a partial last beat, and some longer rows."""
    return sorted({1, P, P + 1, 3 * P - 1, 4 * P, 37, 100})


@cocotb.test()
async def ln_random(dut):
    rng = random.Random(101)
    layers = [random_layer(rng, d, max(2, int(4 * SCALE))) for d in dims()]
    await run_layers(dut, layers, "ln_random", 102)


@cocotb.test()
async def ln_corners(dut):
    """Variance 0, extreme inputs and eps, the largest row, saturating outputs and affine sums."""
    rng = random.Random(201)
    layers = []
    d = 3 * P - 1
    flat = [[v] * d for v in (0, XMAX, XMIN, rng.randint(XMIN, XMAX))]
    for eps in (1, EPS_MAX, nx.layernorm_eps_int(1e-5, d, 8)):
        layers.append(Layer(rng, d, flat, eps_int=eps))
    alt = [XMIN if i % 2 else XMAX for i in range(d)]
    spike = [XMIN] * d
    spike[d // 2] = XMAX
    dip = [XMAX] * d
    dip[-1] = XMIN
    for eps in (1, EPS_MAX):
        layers.append(Layer(rng, d, [alt, spike, dip], eps_int=eps))
    # the largest row: |n| reaches sqrt(D - 1) (about 27.7 at 768 channels)
    big = [XMIN] * MAX_DIM
    big[7] = XMAX
    layers.append(Layer(rng, MAX_DIM, [big, random_rows(rng, MAX_DIM, 1)[0]], eps_int=1))
    # saturating outputs: extreme γ, left shifts and narrow formats
    sat_rows = [alt, spike] + random_rows(rng, d, 2)
    for out_bits, osh in ((DATA_W, 0), (1, 4), (2, -3), (DATA_W, -14), (DATA_W - 1, 2)):
        layers.append(Layer(rng, d, sat_rows, gamma=[rng.choice([GMIN, GMAX]) for _ in range(d)],
                            out_shift=[osh] * d, out_bits=out_bits, eps_int=1))
        assert layers[-1].stats.saturated > 0, "a saturation corner that does not saturate"
    layers.append(Layer(rng, d, sat_rows, out_shift=[62] * d, out_bits=0, eps_int=1))   # all round to 0
    # the affine sum at the contract's limit, β aligned by both shift directions
    lim = (1 << 47) - 1 - max(-GMIN, GMAX) * NMAX
    for beta, bsh in (([lim, -lim] * d)[:d], 0), (([lim >> 3, -(lim >> 3)] * d)[:d], -3), \
                     (([lim << 5, -(lim << 5)] * d)[:d], 5):
        layers.append(Layer(rng, d, sat_rows, beta=beta, beta_shift=bsh,
                            out_shift=[rng.randint(*OSH) for _ in range(d)]))
    # zeros everywhere
    layers.append(Layer(rng, P + 1, [[0] * (P + 1)], gamma=[0] * (P + 1), beta=[0] * (P + 1)))
    await run_layers(dut, layers, "ln_corners", 202, gap_max=1, ready_p=0.8)


async def first_output_latency(dut, layer):
    """Cycles from the edge that accepts a row's last beat to its first output beat (idle unit)."""
    items, expected = layer.beats()
    dut.out_ready.value = 1
    accepted, last_edge = 0, None
    for cycle in range(1000):
        await RisingEdge(dut.clk)
        if accepted < len(items):
            dut.in_valid.value = 1
            dut.x.value = items[accepted]["x"]
        else:
            dut.in_valid.value = 0
        await ReadOnly()
        if accepted < len(items) and int(dut.in_ready.value):
            accepted += 1
            if accepted == len(items):
                last_edge = cycle + 1
        if int(dut.out_valid.value):
            assert read_y(dut) == expected[0], f"{read_y(dut)} != {expected[0]}"
            return cycle - last_edge
    raise AssertionError("no output")


@cocotb.test()
async def ln_full_rate(dut):
    """No gaps, ready always high: beats stream at one per cycle but for the statistics; the
    first output of a row comes LATENCY cycles after its last input."""
    rng = random.Random(301)
    d = 4 * P + 3
    layer = random_layer(rng, d, int(16 * SCALE))
    await reset(dut, {"in_valid": 0, "out_ready": 0, "tbl_we": 0, "out_en": 1}, "y")
    await load(dut, layer)
    one = Layer(rng, d, layer.xs[:1], gamma=layer.gamma, beta=layer.beta, out_shift=layer.out_shift,
                eps_int=layer.eps_int, out_bits=layer.out_bits)
    lat = await first_output_latency(dut, one)
    assert lat == LATENCY, f"first output {lat} cycles after the last input, expected {LATENCY}"
    for _ in range(len(one.beats()[0]) + 5):          # let the rest of the row drain
        await RisingEdge(dut.clk)
    bench = StreamBench(dut, random.Random(302), gap_max=0, ready_p=1.0)
    items, expected = layer.beats()
    await bench.run(items, expected, read_y)
    bench.save_digest("ln_full_rate")
    # NS row slots: the input of row r + NS waits for row r's output, which starts at most S =
    # LATENCY - 15 cycles after row r's last input; the NS - 2 rows in between hide (NS - 2)·B
    beats, rows = len(items), len(layer.xs)
    b = beats // rows
    bound = beats + max(0, LATENCY - 15 - (NS - 2) * b) * -(-rows // NS) + LATENCY + 20
    assert bench.cycles <= bound, f"{bench.cycles} cycles for {rows} rows of {beats // rows} beats (bound {bound})"


@cocotb.test()
async def ln_backpressure(dut):
    """Heavy, bursty backpressure and long input gaps."""
    rng = random.Random(401)
    layers = [random_layer(rng, d, max(2, int(4 * SCALE))) for d in (P + 1, 2 * P, 29)]
    await run_layers(dut, layers, "ln_backpressure_a", 402, gap_max=0, ready_p=0.15)
    rng = random.Random(403)
    layers = [random_layer(rng, d, max(2, int(4 * SCALE))) for d in (1, 3 * P - 1)]
    bench = StreamBench(dut, random.Random(404), gap_max=6, ready_p=0.5)
    for layer in layers:
        await load(dut, layer)
        items, expected = layer.beats()
        await bench.run(items, expected, read_y)
    bench.save_digest("ln_backpressure_b")


async def load_late(dut, layer, delay):
    """Write the table after delay cycles, with out_en low until the last write."""
    for _ in range(delay):
        await RisingEdge(dut.clk)
    for addr, g, be, s in layer.table():
        dut.tbl_we.value = 1
        dut.tbl_addr.value = addr
        dut.tbl_gamma.value = g
        dut.tbl_beta.value = be
        dut.tbl_shift.value = s
        await RisingEdge(dut.clk)
    dut.tbl_we.value = 0
    dut.out_en.value = 1


@cocotb.test()
async def ln_table_behind_rows(dut):
    """Rows enter, and their statistics run, while the table is still being written: out_en
    holds the read-out until the last table write, so no row is normalised with a stale entry.
    The table writes start early, late (every row slot full) and with the rows already waiting."""
    rng = random.Random(501)
    await reset(dut, {"in_valid": 0, "out_ready": 0, "tbl_we": 0, "out_en": 0}, "y")
    bench = StreamBench(dut, random.Random(502), gap_max=1, ready_p=0.8)
    for j, (d, delay) in enumerate(((P + 1, 3), (37, 60), (2 * P, 0), (1, 25))):
        layer = random_layer(rng, d, 2 * NS + 1)
        dut.out_en.value = 0
        dut.dim.value = layer.dim
        dut.eps_int.value = layer.eps_int
        dut.out_bits.value = layer.out_bits
        writer = cocotb.start_soon(load_late(dut, layer, delay))
        items, expected = layer.beats()
        await bench.run(items, expected, read_y)
        await writer
    bench.save_digest("ln_table_behind_rows")
