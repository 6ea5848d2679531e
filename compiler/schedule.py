"""The schedule model: an analytic cycle estimate of a Program on the accelerator.

``estimate(instrs, hw, queue_lengths)`` walks a Program (decoded ``isa.Instr`` records, a
``program.json``/``program.bin`` or its parsed JSON) and charges every instruction what the
accelerator does for it (rtl_sim/rtl): the controller's fetch of its record, then its engine's
phases on the DDR model's ports (latency, beats, bursts in flight, the shared bandwidth) and on
its datapath, overlapped as the engine overlaps them. Expert GEMMs take their row counts from the
running task's queue lengths (a golden run's ``blocks.i.moe.topk``, or a uniform spread). The
free parameters are the fields of ``Assumptions``; the constants below that are fitted say so.
docs/schedule.md has the description, the measured agreement with the RTL and the presets.

    result = estimate(instrs, HwConfig.default(), queue_lengths=trace)
    print(format_table(result))
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3vit.compiler import isa
from m3vit.compiler.isa import Instr
from m3vit.errors import UsageError
from m3vit.rtl_sim.hwconfig import HwConfig

CLASSES = ("patchify", "patch_embed", "embed", "layernorm", "qkv", "attention", "proj", "add", "mlp", "gate",
           "experts", "combine", "gemm", "end")
BOUNDS = ("compute", "ddr", "latency")

BIAS_BYTES = 8      # int64 accumulator-format biases
SHIFT_BYTES = 1     # int8 per-channel shifts
INDEX_BYTES = 2     # uint16 top-k indices, scores and queue entries
GAMMA_BYTES = 2     # int16 LayerNorm gamma
EPILOGUE_LATENCY = 19   # the GELU epilogue's fixed depth (compute_unit.sv EPI_LAT), always in the path
REQUANT_LATENCY = 5


@dataclass(frozen=True)
class Assumptions:
    """The model's free parameters (docs/schedule.md). ``None`` derives the value from hw.json."""

    ddr_peak_gbps: float = 12.8         # shared by every port, reads and writes
    ddr_latency: int = 100              # read request -> first beat, write's last beat -> response
    max_outstanding: int = 8            # bursts in flight per port (m3v_accel MAX_OUT, the DDR model's limit)
    pipeline_latency: int | None = None  # compute unit, last beat -> output FIFO (compute_unit_latency)
    softmax_lanes: int | None = None    # exp evaluations/cycle of the attention engine (hw.softmax_lanes)
    layernorm_lanes: int | None = None  # elements/cycle of the LayerNorm unit (eng_ln LP = min(P_out, 8))

    def validated(self) -> "Assumptions":
        if not self.ddr_peak_gbps > 0:
            raise UsageError(f"ddr_peak_gbps must be positive, got {self.ddr_peak_gbps}")
        for name, lo in (("ddr_latency", 0), ("max_outstanding", 1), ("pipeline_latency", 0), ("softmax_lanes", 1),
                         ("layernorm_lanes", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        return self


# Structure of the RTL that hw.json does not carry (rtl_sim/rtl/*.sv).
RECORD_BYTES = 64       # one instruction record, fetched by the controller before it is decoded
GEMM_GROUP_TILES = 4    # eng_gemm GT: output tiles per weight group (one half of the weight store)
GEMM_READ_BURST = 64    # eng_gemm's long-segment readers (x rows, weight rows): beats per burst
MAX_BURST = 16          # every other reader and writer

# Cycles the RTL spends that the structure above does not account for (handshakes, state
# changes, short pipelines), one constant per engine and phase (each engine's block below has
# its own). Fitted on the random configurations of scripts/bench_schedule_fit.py --seed 0
# --configs 8 at 32x48 and on single instructions (docs/schedule.md), not derived.
FETCH_EXTRA = 4         # controller: request, decode, start, retire around the record's latency and beats
GEMM_EXTRA = -11        # eng_gemm: what the latencies and streams above over-count at the ends
GEMM_LANE_EXTRA = 0.77  # eng_gemm: per output column of every tile after the first (cause not pinned down)
GEMM_PRE_EXTRA = 128    # eng_gemm: the queue read, beyond one latency (its weights load meanwhile)
GEMM_EMPTY_EXTRA = 13   # eng_gemm: an expert with an empty queue, beyond its first weight group


def compute_unit_latency(hw: HwConfig) -> int:
    """Cycles from accepting a row's last beat to its output FIFO push (compute_unit.sv ROW_LAT):
    A/B and M registers, the adder tree or the combine term, accumulate, requant, epilogue."""
    tree = 1 + max(0, math.ceil(math.log2(hw.p_in)))
    return 2 + max(tree, 1 + REQUANT_LATENCY) + REQUANT_LATENCY + EPILOGUE_LATENCY


@dataclass(frozen=True)
class _Machine:
    hw: HwConfig
    a: Assumptions
    bw: float           # DDR bytes per cycle, all ports together
    beat: int           # bytes per AXI beat
    lat: int            # DDR latency
    pipe: int
    sm_lanes: int
    ln_lanes: int
    ab: int             # activation bytes
    fetch: int          # cycles to fetch and decode one instruction

    @classmethod
    def of(cls, hw: HwConfig, a: Assumptions) -> "_Machine":
        beat = hw.axi_width_bits // 8
        axi = hw.axi_ports * beat
        ddr = a.ddr_peak_gbps * 1e9 / (hw.clock_mhz * 1e6)
        return cls(hw, a, min(axi, ddr), beat, a.ddr_latency,
                   compute_unit_latency(hw) if a.pipeline_latency is None else a.pipeline_latency,
                   a.softmax_lanes or hw.softmax_lanes, a.layernorm_lanes or min(hw.p_out, 8), (hw.act_bits + 7) // 8,
                   a.ddr_latency + -(-RECORD_BYTES // beat) + FETCH_EXTRA)

    def beats(self, nbytes: float) -> int:
        return -(-int(nbytes) // self.beat)

    def stream(self, segments: int, seg_bytes: float, ports: int = 1, burst: int = MAX_BURST) -> float:
        """Cycles a port group needs for ``segments`` equal segments (after the first latency): one
        beat per cycle and port at most, and at most max_outstanding bursts per port awaiting their
        data (or, for writes, their response), each for the DDR latency and its beats."""
        if segments <= 0 or seg_bytes <= 0:
            return 0.0
        sb = self.beats(seg_bytes)
        bursts = -(-sb // burst)
        per_port = -(-segments // ports)
        return self.port_time(per_port * bursts, per_port * sb)

    def port_time(self, bursts: int, beats: int, share: int = 1) -> float:
        """Cycles one port needs for ``bursts`` bursts of ``beats`` beats in all, after the first
        latency, beside ``share`` - 1 other ports streaming alike: beat-bound, or latency-bound.
        A burst's slot frees with its last beat and the next request takes it, so burst j of round
        r (max_outstanding bursts a round) ends at r round trips plus j + 1 + r bursts' beats."""
        if bursts <= 0:
            return 0.0
        per_burst = beats / bursts * max(1.0, share * self.beat / self.bw)
        r, j = divmod(bursts - 1, self.a.max_outstanding)
        return max(bursts * per_burst, r * self.lat + (j + 1 + r) * per_burst)

    def slice_read(self, start: int, stride: int, rows: int, nbytes: int, share: int = 1) -> float:
        """Cycles one port needs to read ``rows`` segments of ``nbytes`` bytes, row r at byte
        ``start + r·stride`` of a 4 KB-aligned buffer, as the slice readers cut them: the beats a
        segment touches, in bursts of at most MAX_BURST beats that never cross a 4 KB line."""
        if rows <= 0 or nbytes <= 0:
            return 0.0
        s = start + stride * np.arange(rows, dtype=np.int64)
        b0, b1 = s // self.beat, (s + nbytes - 1) // self.beat      # first and last beat
        page = 4096 // self.beat
        cut = np.minimum(b1 + 1, (b0 // page + 1) * page)           # the first 4 KB line after b0
        first, rest = cut - b0, b1 + 1 - cut
        bursts = -(-first // MAX_BURST) - (-rest // MAX_BURST)
        return self.port_time(int(bursts.sum()), int((b1 - b0 + 1).sum()), share)


@dataclass
class _Cost:
    cycles: float = 0.0     # the instruction's cycles, fetch included
    compute: float = 0.0    # the datapath's busy cycles
    ddr: float = 0.0        # the DDR streaming time (bandwidth and outstanding limits)
    read: int = 0
    write: int = 0
    macs: int = 0
    rows: int = 0

    @property
    def latency(self) -> float:
        return max(0.0, self.cycles - max(self.compute, self.ddr))


# ---------------------------------------------------------------------------- GEMM engine
def _passes(rows: int, block: int) -> list[int]:
    full, rem = divmod(rows, block)
    return [block] * full + ([rem] if rem else [])


def _gemm_groups(m: _Machine, k: int, n: int, w16: bool) -> tuple[int, int, int]:
    """(K chunks, output tiles, tiles per weight group) as eng_gemm sizes them."""
    hw = m.hw
    ks, ot = -(-k // hw.p_in), -(-n // hw.p_out)
    ks_max = -(-max(hw.limits.max_dim, hw.limits.max_hidden) // hw.p_in)
    # store entries per half: what half of buffers.weights holds, at least one whole-K tile
    half = max(ks_max, hw.buffers.weights // (2 * hw.p_in * hw.p_out * -(-hw.weight_bits // 8)))
    packed = hw.weight_bits >= 16 and not w16       # int8 weights two to a store entry
    gsz = max(1, min(GEMM_GROUP_TILES, half * (2 if packed else 1) // max(1, ks)))
    return ks, ot, gsz


def _gemm_cost(m: _Machine, rows: int, k: int, n: int, w16: bool, bias: bool, residual: bool = False,
               queued: bool = False) -> _Cost:
    """eng_gemm: weight groups of up to GT tiles in two halves of the weight store. A group's load
    (biases and shifts on port 1, then its K weight rows dealt to ports 1..3) starts once the
    previous one is in and a half is free, so loads follow each other a latency apart while the
    previous group computes; x rows are read once when they fit the resident store (else once
    per group); each row's output tile is one write segment (ports 2, 0, 3). The last group's
    beats and writes follow its load."""
    hw, L = m.hw, m.lat
    wb = 2 if w16 else 1
    ks, ot, gsz = _gemm_groups(m, k, n, w16)
    groups = -(-ot // gsz)
    wbytes = k * n * wb + n * SHIFT_BYTES + (n * BIAS_BYTES if bias else 0)
    nw = 1 if n <= hw.p_out else (2 if residual else 3)
    pre = L + GEMM_PRE_EXTRA if queued else 0        # the queue range (and list) before the rows
    seg = min(n, hw.p_out) * m.ab

    def load(cols: int) -> float:
        # port 1 first takes the group's biases and shifts, one value per cycle each
        params = max(cols * (2 if bias else 1), m.stream(1, cols * (SHIFT_BYTES + (BIAS_BYTES if bias else 0)), 1))
        if n <= hw.p_out:
            rows_t = m.stream(1, k * n * wb, 1, GEMM_READ_BURST)
        else:
            rows_t = m.stream(k, cols * wb, nw, GEMM_READ_BURST)
        return max(params + rows_t, k * cols * wb / m.bw)

    widths = [min(gsz * hw.p_out, n - g * gsz * hw.p_out) for g in range(groups)]
    tiles = [-(-w // hw.p_out) for w in widths]
    load_b = [k * w * wb + w * (SHIFT_BYTES + (BIAS_BYTES if bias else 0)) for w in widths]
    if rows <= 0:
        # an empty queue: the first group was asked for with the queue read and streams in whole
        first = load(widths[0])
        return _Cost(m.fetch + L + first + GEMM_EMPTY_EXTRA, 0, first, load_b[0], 0, 0, 0)
    blocks = _passes(rows, hw.token_block)
    x_res = rows * ks <= hw.buffers.activations // 2 // (2 * hw.p_in)
    x_reads = 1 if x_res else groups
    x_bytes = rows * k * m.ab
    xs = m.stream(rows, k * m.ab, 1, GEMM_READ_BURST)
    comp = [t * ks * sum(blocks) for t in tiles]
    # one write segment per row and tile (ports 2, 0, 3); the residual one segment per row and group (port 3)
    wr = [m.stream(rows * t, seg, 3) for t in tiles]
    res = [m.stream(rows, w * m.ab, 1) if residual else 0.0 for w in widths]
    out_b = [rows * w * m.ab * (2 if residual else 1) for w in widths]
    loads = [load(w) for w in widths]
    # The first group's weights share the DDR with x; a group computes once its weights are in
    # (its last K chunk needs every weight row) and its x block is; the next group's weights load
    # meanwhile, a latency after the previous load ended. A group's beats, writes and residual
    # reads run together.
    x_end = max(xs, (x_bytes + load_b[0]) / m.bw)
    load_end = max(loads[0], (load_b[0] + min(x_bytes, loads[0] * m.beat)) / m.bw)
    load_end = max(0.0, load_end - pre)               # a queued GEMM's weights load during its queue read
    done = 0.0
    for g in range(groups):
        if g:
            load_end += L + loads[g]
        again = 0.0 if x_res or g == 0 else xs
        phase = max(comp[g], wr[g], res[g], again, (out_b[g] + (0 if x_res or g == 0 else x_bytes)) / m.bw)
        done = max(done, load_end) + phase
        if g == 0:
            done = max(done, x_end + comp[0] / len(blocks))
    t = done
    tail = m.pipe
    read = wbytes + x_bytes * x_reads + (rows * n * m.ab if residual else 0)
    write = rows * n * m.ab
    cycles = m.fetch + pre + L + t + tail + L + (sum(tiles) - 1) * hw.p_out * GEMM_LANE_EXTRA + GEMM_EXTRA
    return _Cost(cycles, sum(comp), max(sum(loads), xs * x_reads, sum(wr), (read + write) / m.bw), read, write,
                 rows * k * n, rows)


def _cost_gemm(m: _Machine, ins: Instr, rows: int) -> _Cost:
    f = ins.fields
    queued = bool(ins.xmode or ins.ymode)
    gather = ins.xmode == isa.XMODES["gather"]
    scatter = ins.ymode == isa.YMODES["scatter"]
    c = _gemm_cost(m, rows, f["in_dim"], f["out_dim"], ins.has("w16"), ins.has("bias"), ins.has("residual"), queued)
    if queued:
        c.read += 4 + INDEX_BYTES * rows * (gather + scatter)
    return c


# ---------------------------------------------------------------------------- attention engine
ATTN_START = 117        # eng_attn: checks and the divider, decode to the first load
ATTN_Y_START = 20       # eng_attn: a row's last AV beat to its y segment's address (raw row, FIN)
ATTN_Y_END = 3          # eng_attn: the last write response to done, besides the DDR latency
ATTN_HEAD_EXTRA = 3     # eng_attn: per head, the last FIN -> the next head's start (S_NEXT, S_HEAD)
ATTN_EXP_LATENCY = 30   # eng_attn: exp_unit, the row sum and recip_unit behind a group's last EXP step
ATTN_FIN_LATENCY = 12   # eng_attn: a raw row into the finish lanes and its y segment out
ATTN_SEG_QUEUE = 8      # eng_attn SEG_D: y segments waiting for the writer
ATTN_SEG_EXTRA = 2      # eng_attn: the y writer's cycles per segment besides its beats (take, address)


def _cost_attention(m: _Machine, ins: Instr, notes: list[str]) -> _Cost:
    """eng_attn: per head, the Q, K and V slices of all T rows (three ports, one segment per row;
    the next head's while this one computes when a head fits half of the buffers); the queries in
    groups of G. One tile builder feeds the compute unit in the order QK(0), QK(1), AV(0), QK(2),
    AV(1), ...: a QK build reads 2·P_in dims of a key per cycle (P_out cycles for two dim chunks,
    or for one chunk of two keys when a head is P_in wide), an AV build one value row per cycle
    (P_in cycles); each tile takes G beats. EXP(g) (softmax
    lanes) starts when QK(g) is done, AV(g) when EXP(g) is; QK(g) overwrites the scores of g − 2."""
    f, hw, L = ins.fields, m.hw, m.lat
    T, D, h = f["tokens"], f["dim"], max(1, f["heads"])
    d = max(1, D // h)
    qt = min(T, f.get("q_tile") or hw.token_block)
    g = max(1, min(hw.token_block, qt, hw.buffers.scores // 2 // max(1, T * INDEX_BYTES)))
    po, pi, sm = hw.p_out, hw.p_in, m.sm_lanes
    nc, nct, nkt, nkc = -(-d // pi), -(-d // po), -(-T // po), -(-T // pi)
    qk1 = -(-po // 2) if d == pi else po     # the build of a lone dim chunk
    buf = min(hw.limits.max_tokens * hw.limits.max_dim, hw.buffers.activations // 4)
    dbuf = T * d <= buf // 2
    # per head, the Q, K and V slices on their own ports: the head has arrived with the slowest
    qkv = isa.split_ref(f["qkv_ref"])[1]
    reads = [max(m.slice_read(qkv + (s * D + hh * d) * m.ab, 3 * D * m.ab, T, d * m.ab, 3) for s in range(3))
             for hh in range(h)]
    exp_row = (T // pi) * -(-pi // sm) + -(-(T % pi) // sm)
    fin_row = -(-min(d, po) // sm)          # the finish pieces of a row's first output tile
    last_fin = -(-(d - (nct - 1) * po) // sm)

    # beats a y segment spans: rows are D apart, a head's columns start at its first dim
    aligned = (D * m.ab) % m.beat == 0 and (d * m.ab) % m.beat == 0 and (po * m.ab) % m.beat == 0
    offsets = [0] if aligned else range(0, m.beat, m.ab)
    seg_cycles = sum(ATTN_SEG_EXTRA + sum(-(-(o + min(po, d - ot * po) * m.ab) // m.beat) for o in offsets)
                     / len(offsets) for ot in range(nct))

    def job(cu: float, bt: float, ready: float, builds: int, b: int, k: int, beats: float) -> tuple[float, float]:
        """(the job's last beat, when the builder is free for the next job): ``builds`` builds of
        ``b`` cycles, ``k`` tiles each of ``beats`` beats; the builder runs ahead of the unit by
        the two staging tiles, the unit starts at ``cu``, a build when its rows are ``ready``."""
        first = max(bt, ready - (builds - 1) * b) + b
        end = max(first + (builds - 1) * b + k * beats, max(cu, first) + builds * k * beats)
        return end, max(first + (builds - 1) * b, end - 2 * beats)

    def qk(cu: float, bt: float, ready: float, rows: int) -> tuple[float, float]:
        if nc >= 2:
            cu, bt = job(cu, bt, ready, nkt * (nc // 2), po, 2, rows)
        if nc % 2:
            cu, bt = job(cu, bt, ready, nkt, qk1, 1, rows)
        return cu, bt

    groups = _passes(T, g)
    n = len(groups)
    t = wr = 0.0             # the head's start, the writer's last segment
    load_start = 0.0
    for hh in range(h):
        if not dbuf:
            load_start = t
        arrived = load_start + L + reads[hh]
        cu = bt = t
        exp_end, fin_end = [0.0] * n, [0.0] * n

        def run_qk(j: int, cu: float, bt: float) -> tuple[float, float]:
            cu, bt = qk(max(cu, exp_end[j - 2] if j >= 2 else 0.0), bt, arrived, groups[j])
            # the exp lanes take the next group's rows while the last row sums and (r, k) finish
            ex_s = max(cu + m.pipe, exp_end[j - 1] - ATTN_EXP_LATENCY if j else 0.0,
                       fin_end[j - 2] if j >= 2 else 0.0)
            exp_end[j] = ex_s + groups[j] * exp_row + ATTN_EXP_LATENCY
            return cu, bt

        cu, bt = run_qk(0, cu, bt)
        for j in range(n):
            if j + 1 < n:
                cu, bt = run_qk(j + 1, cu, bt)
            rows = groups[j]
            s_av = max(cu, exp_end[j])
            beats = max(rows, fin_row * rows / nkc)
            cu, bt = job(s_av, bt, arrived, nct * nkc, pi, 1, beats)
            # the y segments (one per row and output tile) leave through the one writer, a
            # segment at a time: its address, then its beats; the first once its row has seen
            # every key chunk
            wr = max(wr, s_av + (nkc - 1) * beats + ATTN_Y_START) + max(
                rows * seg_cycles, m.stream(rows * nct, min(d, po) * m.ab, hw.axi_ports))
            # FIN is done once its last segments are queued (SEG_D of them wait for the writer)
            queued = min(rows * nct, ATTN_SEG_QUEUE) * seg_cycles / nct
            fin_end[j] = max(cu + rows * last_fin + ATTN_FIN_LATENCY, wr - queued)
        if dbuf:
            # the next head's load follows this one's once this head has started
            load_start = max(arrived, t)
        t = fin_end[-1] + ATTN_HEAD_EXTRA
    # the compute unit's time with its tile builds (a tile takes max(build, G beats))
    compute = h * sum(nkt * ((nc // 2) * max(po, 2 * r) + (nc % 2) * max(qk1, r)) + nct * nkc * max(pi, r)
                      for r in groups)
    # done with the last y burst's write response
    cycles = m.fetch + ATTN_START + max(t, wr + L + ATTN_Y_END)
    if qt * T * INDEX_BYTES > hw.buffers.scores:
        notes.append(f"{ins.name or 'attention'}: a {qt}-query score tile ({qt * T * INDEX_BYTES} bytes) exceeds "
                     f"buffers.scores")
    return _Cost(cycles, compute, sum(reads), 3 * T * D * m.ab, T * D * m.ab, 2 * h * T * T * d, T)


# ---------------------------------------------------------------------------- gate engine
# fitted on the even-numbered half of scripts/bench_engines.py --spread at 32x48 (docs/schedule.md)
GATE_EXTRA = 105        # eng_gate: checks and phase hand-overs less what the chain above over-counts
GATE_X_BEAT_CYCLES = 1.09   # eng_gate: cycles per x beat on port 1; the lanes' write bursts, opened
                            # when their commands are issued, take DDR credit beside it
TOPK_LATENCY = 36       # topk_gate: a token's o beat 2N + k + 36 cycles after it is accepted
TOPK_ISSUED = 1         # topk_gate: scan (N + 1) and issue (N) of the last token -> the prefix sum


def _cost_gate(m: _Machine, ins: Instr) -> _Cost:
    """eng_gate (rtl_sim/rtl/eng_gate.sv, topk_gate.sv): port 0 reads the task's gate matrix (one
    w row of N weights a cycle at most), then its biases, then its shifts: three commands, each
    issued once gate_chunk_reader has delivered the one before (a latency apart), a value a
    cycle. x streams on port 1 meanwhile (a row buffer of two tokens). Once the parameters are in,
    a token costs the largest of topk_gate's scan (N + 1), its x row on port 1 and its compute-unit
    beats. After the last token's logits (the unit's pipeline): its top-k result 2N + k + 36
    cycles later, or later the queue table's prefix sum (MAX_E) and scatter (T·k) that start
    once its choices are issued; then the T·k queue entries one a cycle, and the writes' response."""
    f, hw, L = ins.fields, m.hw, m.lat
    T, D = f["tokens"], f["dim"]
    N, k = f["experts_k"] & 0xFFFF, f["experts_k"] >> 16
    wb = 2 if ins.has("w16") else 1
    wbytes = D * N * wb + N * (BIAS_BYTES + SHIFT_BYTES)
    table = 3 * L + max(D, D * N * wb / m.beat) + 2 * N
    beats = -(-N // hw.p_out) * -(-D // hw.p_in)
    # the row buffer's two tokens are in before the parameters are: their x rows cost nothing more
    ahead = min(T, 2)
    per_token = max(N + 1, D * m.ab / m.beat * GATE_X_BEAT_CYCLES, beats)
    tail = max(2 * N + k + TOPK_LATENCY, 2 * N + TOPK_ISSUED + hw.limits.max_experts + T * k) + T * k
    compute = ahead * max(N + 1, beats) + (T - ahead) * per_token
    write = T * N * m.ab + T * k * 2 * INDEX_BYTES + isa.queue_layout(N, T, k)[2]
    cycles = m.fetch + table + compute + m.pipe + tail + L + GATE_EXTRA
    return _Cost(cycles, T * beats, max(table, T * D * m.ab / m.beat), wbytes + T * D * m.ab, write, T * D * N, T)


# ---------------------------------------------------------------------------- combine (eng_gemm)
COMBINE_EXTRA = 177     # eng_gemm combine: checks, block hand-over, the last write
COMBINE_BEAT_CYCLES = 4 # eng_gemm combine: cycles per beat, each with its own parameter tile


def _cost_combine(m: _Machine, ins: Instr, experts: int) -> _Cost:
    """moe_combine on eng_gemm: the indices, then the experts' shifts (two dependent reads), then
    blocks of SLOTS tokens (scores, indices, expert-output rows on ports 0 and 1; the next block
    loads while this one computes, but only once this one's load is in, so every block's load
    pays the latency of its scores and indices again), one beat per token, output tile and slot."""
    f, hw, L = ins.fields, m.hw, m.lat
    T, k, D = f["tokens"], f["k"], f["dim"]
    ot = -(-D // hw.p_out)
    rows = m.stream(T * k, D * m.ab, 2, GEMM_READ_BURST)
    res = m.stream(T, D * m.ab, 1) if ins.has("residual") else 0.0     # one segment per row (port 3)
    out = m.stream(T * ot, min(D, hw.p_out) * m.ab, 3)
    compute = T * k * ot * COMBINE_BEAT_CYCLES
    read = T * k * (2 * INDEX_BYTES + D * m.ab) + experts * SHIFT_BYTES + (T * D * m.ab if ins.has("residual") else 0)
    write = T * D * m.ab
    # a block's load starts once the previous block's is in: its scores and indices (port 1)
    # come a latency after their request, and the rows after them
    blocks = -(-T // hw.token_block)
    gaps = (blocks - 1) * (L + 2 * m.beats(min(T, hw.token_block) * k * INDEX_BYTES))
    ddr = max(rows, res, out, (read + write) / m.bw) + gaps
    cycles = m.fetch + 2 * L + max(compute, ddr) + m.pipe + L + COMBINE_EXTRA
    return _Cost(cycles, compute, ddr, read, write, 0, T)


# ---------------------------------------------------------------------------- LayerNorm engine
LN_EXTRA = 147           # eng_ln: checks, the read-out pipeline and the last write beyond one latency
                        # (fitted on the even-numbered half of bench_engines.py --spread at 32x48)
LN_STATS = 25           # layernorm_unit: a row's last input beat -> its first read is LN_STATS +
                        # ceil(log2 LP) (the unit's header says 26 + LV when it runs free; 25 fits)
LN_SLOTS = 4            # layernorm_unit NS: rows held on chip


def _cost_layernorm(m: _Machine, ins: Instr) -> _Cost:
    """eng_ln (rtl_sim/rtl/eng_ln.sv, layernorm_unit.sv): beta (8 bytes a channel, port 0), gamma and
    the shifts (ports 1, 2) load the unit's table while x (port 3) already fills its row slots;
    the read-out waits for the table's last entry, then rows pass at one unit beat of LP lanes a
    cycle. With four slots, four rows of B beats take 4B + max(0, S - 2B) cycles (S, a row's
    statistics); y is written as it comes (port 0) and the instruction ends with its last response."""
    f, L = ins.fields, m.lat
    rows, D = f["rows"], f["dim"]
    if rows <= 0 or D <= 0:
        return _Cost(m.fetch, 0, 0, 0, 0, 0, 0)
    B = -(-D // m.ln_lanes)
    S = LN_STATS + max(0, math.ceil(math.log2(m.ln_lanes)))
    # the first LN_SLOTS rows' statistics hide behind the table load; every later group of
    # LN_SLOTS rows waits for a free slot unless its rows are long enough to cover them
    compute = rows * B + (rows - 1) // LN_SLOTS * max(0, S - (LN_SLOTS - 2) * B)
    read = rows * D * m.ab + D * (GAMMA_BYTES + BIAS_BYTES + SHIFT_BYTES)
    write = rows * D * m.ab
    table = m.stream(1, D * BIAS_BYTES, 1)          # beta, 8 bytes a channel: the longest table stream
    ddr = (read + write) / m.bw
    # after the table, x in and y out share the DDR with nothing else of this instruction
    cycles = m.fetch + L + table + max(compute, 2 * write / m.bw) + LN_EXTRA
    return _Cost(cycles, compute, ddr, read, write, 0, rows)


# ---------------------------------------------------------------------------- add / embed (eng_elem)
ELEM_EXTRA = 114         # eng_elem: checks, the adder's depth, the last response


def _cost_elem(m: _Machine, ins: Instr) -> _Cost:
    """eng_elem: B (port 0) and A (port 1) read as long streams, y written (port 2), one beat each per
    cycle; embed's A is the CLS row, then (a second command, after the first delivered) the patches."""
    f, L = ins.fields, m.lat
    if ins.op == "add":
        rows, cols = f["rows"], f["cols"]
        a_bytes, b_bytes, y_bytes, chain = rows * cols * m.ab, rows * cols * m.ab, rows * cols * m.ab, 1
        n = rows
    else:
        n_p, D = f["patches"], f["dim"]
        a_bytes, b_bytes, y_bytes, chain = n_p * D * m.ab, (n_p + 1) * D * m.ab, (n_p + 1) * D * m.ab, 1
        n = n_p + 1
    stream = max(m.beats(a_bytes), m.beats(b_bytes), m.beats(y_bytes))
    read = a_bytes + b_bytes + (D * m.ab if ins.op == "embed" else 0)
    ddr = max(stream, (read + y_bytes) / m.bw)
    cycles = m.fetch + chain * L + ddr + L + ELEM_EXTRA
    return _Cost(cycles, stream, ddr, read, y_bytes, 0, n)


# ---------------------------------------------------------------------------- patchify engine
PATCHIFY_EXTRA = 30     # eng_patchify: checks, the band hand-over, the last response
DIVIDER_CYCLES = 32     # eng_patchify: the serial divider for H mod p and W mod p


def _cost_patchify(m: _Machine, ins: Instr) -> _Cost:
    """eng_patchify: per band of p source rows, C reads (one command each, the next once the
    previous delivered) into one half of the band buffer while the other half drains at
    min(p, elements per beat) elements per cycle into one long write."""
    f, L = ins.fields, m.lat
    C, H, W, p = f["channels"], f["height"], f["width"], max(1, f["patch"])
    bands = H // p
    per_beat = m.beat // m.ab
    block = m.beats(p * W * m.ab) + 1
    load = C * (L + block)
    drain = C * p * W / min(p, per_beat)
    out = C * (H // p * p) * (W // p * p)
    compute = bands * drain
    cycles = m.fetch + DIVIDER_CYCLES + bands * max(load, drain) + drain + L + PATCHIFY_EXTRA
    return _Cost(cycles, compute, bands * load, C * H * W * m.ab, out * m.ab, 0, bands * (W // p))


def _cost_end(m: _Machine) -> _Cost:
    """END: its fetch; the Program's header is fetched the same way before the first instruction."""
    return _Cost(2 * m.fetch)


# ---------------------------------------------------------------------------- names and classes
_MOE_RE = re.compile(r"^(blocks\.\d+\.moe)(\..*)?$")
_EXPERT_RE = re.compile(r"\.moe\.e\d+\.fc[12]$")


def layer_of(ins: Instr, index: int) -> str:
    """The QGraph op (canonical name) an instruction belongs to; a fused instruction belongs to
    the op it computed before fusion (its residual add is charged there)."""
    name = ins.origin or ins.name
    if not name:
        return f"{ins.op}#{index}"
    hit = _MOE_RE.match(name)
    if hit:
        return hit.group(1)
    if name.startswith("patch_embed"):
        return "patch_embed"
    return name


def class_of(ins: Instr) -> str:
    name = ins.origin or ins.name or ""
    if ins.op == "gemm":
        if ins.xmode or ins.ymode or _EXPERT_RE.search(name):
            return "experts"
        for suffix, cls in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.fc1", "mlp"), ("mlp.fc2", "mlp"),
                            ("patch_embed", "patch_embed")):
            if name.endswith(suffix):
                return cls
        return "gemm"
    return {"moe_gate": "gate", "moe_combine": "combine"}.get(ins.op, ins.op)


_OUTPUTS = {"gemm": ("y_ref",), "attention": ("y_ref",), "layernorm": ("y_ref",), "add": ("y_ref",),
            "embed": ("y_ref",), "patchify": ("dst_ref",), "moe_gate": ("logits_ref", "idx_ref", "score_ref",
                                                                         "queue_ref"),
            "moe_combine": ("out_ref",)}


# ---------------------------------------------------------------------------- routing
@dataclass
class _MoeLayer:
    name: str
    tokens: int
    experts: int
    k: int


def _moe_layers(instrs: list[Instr]) -> tuple[list[_MoeLayer], dict[int, int]]:
    """The MoE layers in program order, and for every instruction index its layer (experts and
    combine: the gate whose queue table they read, else the latest gate)."""
    layers: list[_MoeLayer] = []
    by_queue: dict[int, int] = {}
    owner: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        if ins.op == "moe_gate":
            f = ins.fields
            name = layer_of(ins, i)
            layers.append(_MoeLayer(name if _MOE_RE.match(name) else f"moe{len(layers)}", f["tokens"],
                                    f["experts_k"] & 0xFFFF, f["experts_k"] >> 16))
            by_queue[f.get("queue_ref", -1)] = len(layers) - 1
            owner[i] = len(layers) - 1
        elif ins.op == "gemm" and (ins.xmode or ins.ymode) or ins.op == "moe_combine":
            j = by_queue.get(ins.fields.get("queue_ref", -1), len(layers) - 1)
            if j < 0:
                raise UsageError(f"instruction {i} ({ins.name or ins.op}) reads expert queues before any moe_gate")
            owner[i] = j
    return layers, owner


def uniform_queues(tokens: int, experts: int, k: int) -> list[int]:
    """T·k token slots spread as evenly as possible: every expert active (the most weight traffic)."""
    base, extra = divmod(tokens * k, experts)
    return [base + (e < extra) for e in range(experts)]


def queue_lengths_from_trace(trace: Mapping[str, Any], experts: int | None = None) -> dict[str, list[int]]:
    """Per MoE layer (``blocks.i.moe``) the tokens routed to each expert, from a trace's
    ``blocks.i.moe.topk`` tables."""
    out = {}
    for key in sorted((k for k in trace if k.endswith(".moe.topk")), key=lambda s: int(s.split(".")[1])):
        idx = np.asarray(trace[key]).astype(np.int64).ravel()
        n = experts if experts is not None else int(idx.max(initial=-1)) + 1
        out[key[:-len(".topk")]] = np.bincount(idx, minlength=n).tolist()
    return out


def _resolve_queues(layers: list[_MoeLayer], given) -> tuple[list[list[int]], str]:
    if given is None:
        return [uniform_queues(L.tokens, L.experts, L.k) for L in layers], "uniform"
    if isinstance(given, Mapping):
        if any(str(k).endswith(".topk") for k in given):
            given = {k: v for k, v in given.items() if str(k).endswith(".moe.topk")}
            counts = {k[:-len(".topk")]: v for k, v in given.items()}
        else:
            counts = dict(given)
        names = [L.name for L in layers]
        if all(n in counts for n in names):
            seq = [counts[n] for n in names]
        elif len(counts) == len(layers) and all(re.fullmatch(r"moe\d+", n) for n in names):
            # a Program without names (program.bin): its MoE layers in block order
            seq = [counts[k] for k in sorted(counts, key=lambda s: [int(t) if t.isdigit() else t
                                                                      for t in re.split(r"(\d+)", str(s))])]
        else:
            missing = [n for n in names if n not in counts]
            raise UsageError(f"queue lengths: no entry for MoE layer {missing[0]} (have {', '.join(map(str, counts))})")
    else:
        seq = list(given)
        if len(seq) != len(layers):
            raise UsageError(f"queue lengths: {len(seq)} layers given, the Program has {len(layers)} MoE layers")
    out = []
    for L, q in zip(layers, seq):
        arr = np.asarray(q)
        if arr.ndim == 2:           # a [T, k] top-k table
            arr = np.bincount(arr.astype(np.int64).ravel(), minlength=L.experts)
        q = [int(v) for v in arr.ravel()]
        if len(q) != L.experts or min(q, default=0) < 0 or max(q, default=0) > L.tokens or sum(q) != L.tokens * L.k:
            raise UsageError(f"queue lengths of {L.name}: need {L.experts} counts, each 0..{L.tokens}, summing to "
                             f"T·k = {L.tokens * L.k}; got {q}")
        out.append(q)
    return out, "given"


# ---------------------------------------------------------------------------- Programs
def load_program(src) -> list[Instr]:
    """Instructions from a list of ``Instr``, a program.json / program.bin path, its bytes, or the
    parsed JSON (``{"instructions": [...]}`` or the list itself)."""
    if isinstance(src, (list, tuple)) and all(isinstance(i, Instr) for i in src):
        return list(src)
    if isinstance(src, (str, Path)):
        p = Path(src)
        if p.is_dir():
            p = p / "program.json" if (p / "program.json").is_file() else p / "program.bin"
        if p.suffix == ".bin":
            return isa.decode_program(p.read_bytes(), str(p))[1]
        try:
            src = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{p}: cannot read the Program: {exc}") from None
    if isinstance(src, (bytes, bytearray)):
        return isa.decode_program(bytes(src))[1]
    if isinstance(src, Mapping):
        src = src.get("instructions", src.get("program"))
    if not isinstance(src, (list, tuple)):
        raise UsageError("a Program must be a list of instructions or a program.json object with 'instructions'")
    return [_instr_from_json(d, i) for i, d in enumerate(src)]


def _instr_from_json(d: Any, i: int) -> Instr:
    if isinstance(d, Instr):
        return d
    if not isinstance(d, Mapping) or "op" not in d:
        raise UsageError(f"program.json instruction {i}: expected an object with 'op'")
    op = d["op"]
    if op not in isa.FIELDS:
        raise UsageError(f"program.json instruction {i}: unknown op {op!r}")
    src = d.get("fields", d)
    fields = {n: int(src[n]) for n in isa.FIELDS[op] if n in src and isinstance(src[n], (int, np.integer))}
    flags = d.get("flags", 0)
    if not isinstance(flags, int):
        names = [k for k, v in flags.items() if v] if isinstance(flags, Mapping) else list(flags)
        flags = isa.make_flags(**{n: True for n in names if n in isa.FLAGS})
    for key, shift, table in (("xmode", isa.XMODE_SHIFT, isa.XMODES), ("ymode", isa.YMODE_SHIFT, isa.YMODES)):
        if isinstance(d.get(key), str):
            flags = (flags & ~(3 << shift)) | (table[d[key]] << shift)
    return Instr(op, fields, flags, str(d.get("name", "")), str(d.get("intermediate") or ""))


# ---------------------------------------------------------------------------- the estimate
def estimate(instrs, hw: HwConfig | None = None, queue_lengths=None, assumptions: Assumptions | None = None,
             **overrides) -> dict[str, Any]:
    """Cycles, MACs and DDR traffic of a Program, per instruction, layer and class, and in total.

    ``queue_lengths``: None (uniform spread), ``{"blocks.i.moe": [count per expert]}``, a list of
    per-layer counts in program order, or a golden trace (its ``blocks.i.moe.topk`` tables).
    ``overrides`` replace single fields of ``assumptions``."""
    prog = load_program(instrs)
    hw = hw or HwConfig.default()
    a = dataclasses.replace(assumptions or Assumptions(), **overrides).validated()
    m = _Machine.of(hw, a)
    layers, owner = _moe_layers(prog)
    queues, routing = _resolve_queues(layers, queue_lengths)
    notes: list[str] = []
    rows_out: list[dict[str, Any]] = []
    for i, ins in enumerate(prog):
        if ins.op == "gemm" and (ins.xmode or ins.ymode):
            j = owner[i]
            e = ins.fields.get("expert", 0)
            if not 0 <= e < layers[j].experts:
                raise UsageError(f"instruction {i} ({ins.name or 'gemm'}): expert {e} of {layers[j].experts}")
            c = _cost_gemm(m, ins, queues[j][e])
        elif ins.op == "gemm":
            c = _cost_gemm(m, ins, ins.fields["rows"])
        elif ins.op == "attention":
            c = _cost_attention(m, ins, notes)
        elif ins.op == "moe_gate":
            c = _cost_gate(m, ins)
        elif ins.op == "moe_combine":
            c = _cost_combine(m, ins, layers[owner[i]].experts)
        elif ins.op == "layernorm":
            c = _cost_layernorm(m, ins)
        elif ins.op in ("add", "embed"):
            c = _cost_elem(m, ins)
        elif ins.op == "patchify":
            c = _cost_patchify(m, ins)
        elif ins.op == "end":
            c = _cost_end(m)
        else:
            raise UsageError(f"the schedule model has no cost for opcode '{ins.op}'")
        cycles = math.ceil(c.cycles)
        parts = {"compute": c.compute, "ddr": c.ddr, "latency": c.latency}
        bound = max(BOUNDS, key=lambda b: parts[b])
        rows_out.append({"index": i, "op": ins.op, "name": ins.name, "layer": layer_of(ins, i), "class": class_of(ins),
                         "rows": c.rows, "cycles": cycles, "compute_cycles": math.ceil(c.compute),
                         "ddr_cycles": math.ceil(c.ddr), "latency_cycles": math.ceil(c.latency), "macs": c.macs,
                         "ddr_read": c.read, "ddr_write": c.write, "bound": bound})
        if ins.op == "end":
            break
    return _summarise(rows_out, hw, a, m, layers, queues, routing, notes)


def _agg(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"instructions": len(rows), "active": sum(r["bound"] != "idle" for r in rows),
           "cycles": sum(r["cycles"] for r in rows), "macs": sum(r["macs"] for r in rows),
           "ddr_read": sum(r["ddr_read"] for r in rows), "ddr_write": sum(r["ddr_write"] for r in rows),
           "compute_cycles": sum(r["compute_cycles"] for r in rows), "ddr_cycles": sum(r["ddr_cycles"] for r in rows)}
    out["by_bound"] = {b: sum(r["cycles"] for r in rows if r["bound"] == b) for b in BOUNDS}
    return out


def _summarise(rows, hw, a, m, layers, queues, routing, notes) -> dict[str, Any]:
    peak = hw.p_in * hw.p_out
    total = _agg(rows)
    cycles = total["cycles"]
    total["ddr_bytes"] = total["ddr_read"] + total["ddr_write"]
    total["latency_ms"] = cycles / (hw.clock_mhz * 1e3)
    total["fps"] = hw.clock_mhz * 1e6 / cycles if cycles else None
    total["utilisation"] = total["macs"] / (peak * cycles) if cycles else 0.0
    by_layer: dict[str, list] = {}
    by_class: dict[str, list] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
        by_class.setdefault(r["class"], []).append(r)
    classes = {c: _agg(by_class[c]) for c in sorted(by_class, key=lambda c: CLASSES.index(c) if c in CLASSES else 99)}
    for v in classes.values():
        v["utilisation"] = v["macs"] / (peak * v["cycles"]) if v["cycles"] else 0.0
        v["share"] = v["cycles"] / cycles if cycles else 0.0
    return {
        "total_cycles": cycles,
        "latency_ms": total["latency_ms"],
        "hw": {"p_in": hw.p_in, "p_out": hw.p_out, "clock_mhz": hw.clock_mhz, "token_block": hw.token_block,
               "ddr_bytes_per_cycle": m.bw, "ddr_latency": a.ddr_latency, "pipeline_latency": m.pipe,
               "layernorm_lanes": m.ln_lanes, "softmax_lanes": m.sm_lanes, "fetch_cycles": m.fetch,
               "max_outstanding": a.max_outstanding, "hash": hw.hash()},
        "assumptions": dataclasses.asdict(a),
        "routing": routing,
        "queue_lengths": {L.name: q for L, q in zip(layers, queues)},
        "instructions": rows,
        "layers": {k: _agg(v) for k, v in by_layer.items()},
        "classes": classes,
        "total": total,
        "notes": notes,
    }


# ---------------------------------------------------------------------------- text
def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The total and one line per instruction class."""
    t, hw = result["total"], result["hw"]
    fps = f"{t['fps']:.1f}" if t["fps"] else "-"
    lines = [f"schedule estimate: {t['cycles']:,} cycles = {t['latency_ms']:.3f} ms at {hw['clock_mhz']} MHz "
             f"({fps} frames/s), MAC utilisation {100 * t['utilisation']:.1f} %, "
             f"DDR {_mb(t['ddr_bytes'])} MB ({result['routing']} routing)"]
    lines.append(f"  {'class':<12}{'instr':>6}{'cycles':>12}{'share':>8}{'GMAC':>8}{'util':>7}"
                 f"{'read MB':>9}{'write MB':>9}{'compute':>10}{'ddr':>10}{'latency':>9}")
    for c, v in result["classes"].items():
        b = v["by_bound"]
        lines.append(f"  {c:<12}{v['active']:>6}{v['cycles']:>12,}{100 * v['share']:>7.1f}%{v['macs'] / 1e9:>8.3f}"
                     f"{100 * v['utilisation']:>6.1f}%{_mb(v['ddr_read']):>9}{_mb(v['ddr_write']):>9}"
                     f"{b['compute']:>10,}{b['ddr']:>10,}{b['latency']:>9,}")
    return lines


def format_table(result: dict[str, Any], layers: bool = False) -> str:
    """Text summary: machine and assumptions, per-class lines and the total (per layer with
    ``layers``); the last three columns split each class's cycles by what bounds them."""
    hw, a = result["hw"], result["assumptions"]
    head = (f"{hw['p_in']}x{hw['p_out']} MACs at {hw['clock_mhz']} MHz, token_block {hw['token_block']}, "
            f"DDR {hw['ddr_bytes_per_cycle']:.1f} B/cycle, latency {hw['ddr_latency']} cycles, "
            f"{hw['max_outstanding']} bursts in flight per port, pipeline {hw['pipeline_latency']} cycles, "
            f"{hw['fetch_cycles']} cycles per instruction fetch")
    lines = [head] + summary_lines(result)
    if layers:
        lines.append(f"  {'layer':<28}{'cycles':>12}{'GMAC':>8}{'read MB':>9}{'write MB':>9}")
        for name, v in result["layers"].items():
            lines.append(f"  {name:<28}{v['cycles']:>12,}{v['macs'] / 1e9:>8.3f}{_mb(v['ddr_read']):>9}"
                         f"{_mb(v['ddr_write']):>9}")
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines)
