"""cocotb tests of topk_gate.sv, bit-exact against m3vit.compiler.numerics.moe_gate and
expert_queues (the golden model).

Run through tests/test_rtl_topk_gate.py, which passes the hardware configuration in M3V_HW_CONFIG
and a directory for the results in M3V_TEST_DIR. A run is T tokens (one logits beat each, the
configuration held on the cfg_* inputs), answered by T per-token beats and then the queue table;
runs follow each other without a reset.
"""

from __future__ import annotations

import json
import math
import os
import random

import cocotb
import numpy as np

from m3vit.compiler import numerics as nx
from m3vit.rtl_sim.hwconfig import HwConfig
from streams import SCALE, StreamBench, pack, reset

HW = HwConfig.from_dict(json.loads(os.environ["M3V_HW_CONFIG"]), "M3V_HW_CONFIG")
MAX_E, MAX_K, MAX_T = HW.limits.max_experts, HW.limits.max_k, HW.limits.max_tokens
LOGIT_W = HW.act_bits
FRAC_W = 7
GW = nx.CONTRACT.gate_bits
EW = max(1, math.ceil(math.log2(MAX_E)))
KW = max(1, math.ceil(math.log2(MAX_K)))
OW = math.ceil(math.log2(MAX_T * MAX_K + 1))
LMIN, LMAX = -(1 << (LOGIT_W - 1)), (1 << (LOGIT_W - 1)) - 1
# logit fractions the golden model evaluates for these containers (exp's shift frac + 6 within
# [-62, 62], its left shifts within 63 bits)
FRAC_RANGE = (-30, 56)


def token_latency(n, k):
    """Cycles from a token's acceptance to its o beat at full rate (scan, exp issue and terms,
    reciprocal, scores, output FIFO): topk_gate.sv."""
    return 2 * n + k + 36


def token_period(n):
    """Cycles between tokens at full rate: the scan stage, one logit a cycle plus the hand-off."""
    return n + 1


def run_cycles(t, n, k):
    """Full-rate cycles of a run of t tokens, from the first token's acceptance to the last o beat."""
    return (t - 1) * token_period(n) + token_latency(n, k)


# the slow regression draws other stimulus with another base seed
SEED_BASE = 1000 * int(os.environ.get("M3V_GATE_SEED", "0"))


def rng_for(seed):
    return random.Random(SEED_BASE + seed)


IDLE = {"in_valid": 0, "o_ready": 0, "q_ready": 0, "cfg_n": 0, "cfg_k": 0, "cfg_t": 0, "cfg_frac": 0}


def unsigned(word, width, n):
    mask = (1 << width) - 1
    return tuple((word >> (i * width)) & mask for i in range(n))


def read_o(dut):
    return (dut.o_tag.value.to_unsigned(), unsigned(dut.o_idx.value.to_unsigned(), EW, MAX_K),
            unsigned(dut.o_score.value.to_unsigned(), GW, MAX_K))


def read_q(dut):
    return (dut.q_expert.value.to_unsigned(), dut.q_token.value.to_unsigned(), dut.q_slot.value.to_unsigned(),
            int(dut.q_last.value), unsigned(dut.q_offsets.value.to_unsigned(), OW, MAX_E + 1))


def expected(logits, k, frac):
    """Per-token beats and queue beats from the golden model."""
    T, N = logits.shape
    idx, score = nx.moe_gate(logits, k, frac, stats=nx.SatCounter())
    pad = (0,) * (MAX_K - k)
    outs = [(t, tuple(int(v) for v in idx[t]) + pad, tuple(int(v) for v in score[t]) + pad)
            for t in range(T)]
    queues = nx.expert_queues(idx, N)
    sizes = [len(q.tokens) for q in queues] + [0] * (MAX_E - N)
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)]))
    entries = [(e, int(t), int(s)) for e, q in enumerate(queues) for t, s in zip(q.tokens, q.slots)]
    assert len(entries) == T * k
    qs = [(e, t, s, int(i == len(entries) - 1), offsets) for i, (e, t, s) in enumerate(entries)]
    return outs, qs


def items_for(logits, k, frac, rng):
    T, N = logits.shape
    items = []
    for t in range(T):
        # the experts beyond N carry garbage that must be ignored
        row = [int(v) for v in logits[t]] + [rng.randint(LMIN, LMAX) for _ in range(MAX_E - N)]
        items.append({"logits": pack(row, LOGIT_W), "cfg_n": N, "cfg_k": k, "cfg_t": T,
                      "cfg_frac": frac & ((1 << FRAC_W) - 1)})
    return items


async def gate_run(dut, logits, k, frac, name, seed, gap_max=2, ready_p=0.7):
    """One run: drive the tokens, check every per-token beat, then every queue beat."""
    logits = np.asarray(logits, dtype=np.int64)
    T, N = logits.shape
    rng = rng_for(seed)
    outs, qs = expected(logits, k, frac)
    slow = 1.0 / ready_p * (gap_max + 2)
    tokens = StreamBench(dut, rng, gap_max=gap_max, ready_p=ready_p, out_valid="o_valid", out_ready="o_ready")
    await tokens.run(items_for(logits, k, frac, rng), outs, read_o,
                     max_cycles=int(200 + run_cycles(T, N, k) * slow))
    table = StreamBench(dut, rng, gap_max=0, ready_p=ready_p, out_valid="q_valid", out_ready="q_ready")
    # q_ready returns low, so that the next run's table waits for its own bench
    await table.run([], qs, read_q, max_cycles=int(200 + (MAX_E + 2 * T * k) * slow), idle_ready=False)
    tokens.save_digest(name + "_tokens")
    table.save_digest(name + "_queues")
    return tokens, table


def random_logits(rng, T, N, lo=LMIN, hi=LMAX):
    return np.array([[rng.randint(lo, hi) for _ in range(N)] for _ in range(T)], dtype=np.int64)


def odd_n():
    """An odd expert count other than MAX_E where there is one."""
    n = MAX_E - 1 if MAX_E % 2 == 0 else MAX_E - 2
    return max(1, n)


@cocotb.test()
async def gate_random(dut):
    """Two runtime configurations back to back (N = MAX_E with k = 2, an odd N with k = 3), then a
    one-token, one-expert run."""
    await reset(dut, IDLE, "q_offsets")
    rng = rng_for(101)
    T = min(MAX_T, int(40 * SCALE))
    lg = random_logits(rng, T, MAX_E, LMIN // 8, LMAX // 8)
    await gate_run(dut, lg, min(2, MAX_K), rng.randint(LOGIT_W // 2, LOGIT_W - 2), "random_a", 102)
    n = odd_n()
    lg = random_logits(rng, MAX_T, n)
    await gate_run(dut, lg, min(3, MAX_K, n), rng.randint(*FRAC_RANGE), "random_b", 103)
    await gate_run(dut, random_logits(rng, 1, 1), 1, 8, "random_c", 104)


@cocotb.test()
async def gate_ties(dut):
    """Logits from a tiny range (most rows have ties, many across the top-k boundary) and rows that
    are all equal: ties must go to the lower expert index."""
    await reset(dut, IDLE, "q_offsets")
    rng = rng_for(201)
    for j, (n, k) in enumerate(((MAX_E, MAX_K), (odd_n(), min(MAX_K, odd_n())), (MAX_E, 1))):
        T = min(MAX_T, int(30 * SCALE))
        lg = random_logits(rng, T, n, -2, 1)
        lg[: T // 4] = rng.randint(LMIN, LMAX)            # whole rows equal
        await gate_run(dut, lg, k, rng.choice([0, 4, LOGIT_W - 1]), f"ties_{j}", 202 + j)


@cocotb.test()
async def gate_extremes(dut):
    """Container extremes (max - l up to 2^LOGIT_W - 1), a single dominant expert (score 1.0),
    fraction extremes (every p_e 2^P, or every p_e but the maximum's 0)."""
    await reset(dut, IDLE, "q_offsets")
    rng = rng_for(301)
    n = MAX_E
    rows = []
    for _ in range(min(MAX_T, 24)):
        kind = rng.randrange(4)
        if kind == 0:
            row = [rng.choice([LMIN, LMAX, LMIN + 1, LMAX - 1, 0]) for _ in range(n)]
        elif kind == 1:
            row = [LMIN] * n
            row[rng.randrange(n)] = LMAX
        elif kind == 2:
            row = [LMAX] * n
        else:
            row = [rng.randint(LMIN, LMAX) for _ in range(n)]
        rows.append(row)
    lg = np.array(rows, dtype=np.int64)
    for j, frac in enumerate((FRAC_RANGE[0], -1, 0, LOGIT_W - 1, FRAC_RANGE[1])):
        await gate_run(dut, lg, min(MAX_K, 2 + j % 2), frac, f"extremes_{j}", 302 + j)


def queue_cycles(t, n, k):
    """Queue bench cycles at full rate: the prefix sum and the scatter (MAX_E + T·k cycles and a
    few to start and finish) begin after the last token's exp issue, behind its remaining k + 36
    cycles to the o beat and the token bench's 20 idle cycles; then one queue beat per cycle, then
    the bench's own 20 idle cycles."""
    hidden = (k + 36) + 20
    return max(0, MAX_E + t * k + 8 - hidden) + t * k + 20 + 4


@cocotb.test()
async def gate_full_rate(dut):
    """No gaps, every ready high: the documented cycles per token."""
    await reset(dut, IDLE, "q_offsets")
    rng = rng_for(401)
    T, k = min(MAX_T, 20), min(2, MAX_K)
    tokens, table = await gate_run(dut, random_logits(rng, T, MAX_E), k, 10, "full_rate", 402,
                                   gap_max=0, ready_p=1.0)
    bound = run_cycles(T, MAX_E, k) + 20 + 2
    assert tokens.cycles <= bound, f"{tokens.cycles} cycles for {T} tokens (bound {bound})"
    bound = queue_cycles(T, MAX_E, k)
    assert table.cycles <= bound, f"{table.cycles} cycles for {T * k} queue entries (bound {bound})"


@cocotb.test()
async def gate_back_to_back(dut):
    """Tokens back to back at full rate where the stages are shortest or fullest: one expert
    (a token every two cycles, reciprocals two cycles apart), k = N (every expert chosen, the
    score stage as busy as the issue stage) with ties across consecutive tokens, one token, and
    a run whose outputs stall long enough to fill the output FIFO and hold the pipeline."""
    await reset(dut, IDLE, "q_offsets")
    rng = rng_for(601)
    kn = min(MAX_K, MAX_E)
    cases = [
        (1, 1, random_logits(rng, min(MAX_T, 25), 1)),
        (kn, kn, random_logits(rng, min(MAX_T, 25), kn, -1, 1)),
        (2, 2, random_logits(rng, min(MAX_T, 17), min(2, MAX_E), -1, 0)),
        (MAX_E, kn, np.full((min(MAX_T, 12), MAX_E), 5, dtype=np.int64)),
        (MAX_E, 1, random_logits(rng, 1, MAX_E)),
    ]
    for j, (n, k, lg) in enumerate(cases):
        n = min(n, MAX_E)
        k = min(k, n)
        lg = lg[:, :n]
        T = lg.shape[0]
        tokens, table = await gate_run(dut, lg, k, rng.choice([0, 3, LOGIT_W - 2]), f"b2b_{j}", 602 + j,
                                       gap_max=0, ready_p=1.0)
        bound = run_cycles(T, n, k) + 20 + 2
        assert tokens.cycles <= bound, f"case {j}: {tokens.cycles} cycles for {T} tokens (bound {bound})"
        bound = queue_cycles(T, n, k)
        assert table.cycles <= bound, f"case {j}: {table.cycles} cycles for the queue (bound {bound})"
    # outputs refused for long stretches: tokens keep arriving at full rate
    T = min(MAX_T, 40)
    await gate_run(dut, random_logits(rng, T, 1), 1, 4, "b2b_stall", 610, gap_max=0, ready_p=0.05)


@cocotb.test()
async def gate_backpressure(dut):
    """Heavy, bursty backpressure on both output streams and long input gaps."""
    await reset(dut, IDLE, "q_offsets")
    rng = rng_for(501)
    T = min(MAX_T, int(24 * SCALE))
    await gate_run(dut, random_logits(rng, T, odd_n(), -20, 20), min(MAX_K, 3, odd_n()), 3,
                   "backpressure_a", 502, gap_max=0, ready_p=0.15)
    await gate_run(dut, random_logits(rng, T, MAX_E), MAX_K, 12, "backpressure_b", 503,
                   gap_max=6, ready_p=0.5)
