"""The schedule model: MACs agree with the profile's analytic count, cycles respect the compute and
DDR lower bounds, bandwidth acts monotonically, the engines' structure on hand-sized cases (fetch,
DDR round trips per window of bursts, GEMM beats, queue reads and weight groups, attention heads,
the vector engines' per-row costs), idle experts, 16-bit weights, the Program's forms agree."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from m3vit.compiler import golden, isa, lower, schedule
from m3vit.compiler.from_torch import build_qgraph
from m3vit.compiler.isa import Instr
from m3vit.compiler.numerics import SatCounter
from m3vit.compiler.quantize import calibrate
from m3vit.errors import UsageError
from m3vit.model.config import preset_config, resolve_config
from m3vit.model.images import input_batch
from m3vit.model.profile import analytic_layers
from m3vit.model.vit import build_model
from m3vit.rtl_sim.hwconfig import Buffers, HwConfig

HW = HwConfig.default()
PEAK = HW.p_in * HW.p_out
RTL = Path(__file__).resolve().parents[1] / "rtl_sim" / "rtl" / "compute_unit.sv"


def _ref(i: int) -> int:
    return isa.ref("arena", 64 * i)


def _gemm(rows, k, n, x=0, y=1, w16=False, name="g", **modes):
    return Instr("gemm", {"x_ref": _ref(x), "y_ref": _ref(y), "rows": rows, "in_dim": k, "out_dim": n},
                 isa.make_flags(w16=w16, bias=True, **modes), name)


def _moe(T=64, D=96, H=128, N=4, k=2, name="blocks.1.moe"):
    """gate, two GEMMs per expert, combine, with distinct buffers as lower.py lays them out."""
    q, hid, eout, x = _ref(10), _ref(11), _ref(12), _ref(13)
    out = [Instr("moe_gate", {"x_ref": x, "logits_ref": _ref(14), "idx_ref": _ref(15), "score_ref": _ref(16),
                              "queue_ref": q, "tokens": T, "dim": D, "experts_k": N | k << 16},
                 isa.make_flags(w16=True), f"{name}.gate")]
    for e in range(N):
        out.append(Instr("gemm", {"x_ref": x, "y_ref": hid, "queue_ref": q, "expert": e, "rows": T, "in_dim": D,
                                  "out_dim": H}, isa.make_flags(gelu=True, bias=True, xmode="gather", ymode="queue"),
                         f"{name}.e{e}.fc1"))
        out.append(Instr("gemm", {"x_ref": hid, "y_ref": eout, "queue_ref": q, "expert": e, "rows": T, "in_dim": H,
                                  "out_dim": D}, isa.make_flags(bias=True, xmode="queue", ymode="scatter"),
                         f"{name}.e{e}.fc2"))
    out.append(Instr("moe_combine", {"score_ref": _ref(16), "idx_ref": _ref(15), "y_ref": eout, "out_ref": _ref(17),
                                     "tokens": T, "k": k, "dim": D}, 0, name))
    return out


def _attention(T, D, heads, q_tile):
    return [Instr("attention", {"qkv_ref": _ref(0), "y_ref": _ref(1), "tokens": T, "dim": D, "heads": heads,
                                "q_tile": q_tile}, 0, "blocks.0.attn")]


# ------------------------------------------------------------------ lowered presets
def _lowered(cfg):
    model = build_model(cfg)
    photo = input_batch(cfg.img_size, 1)
    graph = build_qgraph(model, calibrate(model, images=photo))
    _, _, meta = lower.encode(lower.lower(graph, HW))
    traces = {t: golden.run(graph, photo[0][1], t, trace=True, stats=SatCounter())[1] for t in cfg.task_names}
    return cfg, graph, meta, traces


@pytest.fixture(scope="module")
def tiny():
    return _lowered(resolve_config("tiny"))


@pytest.fixture(scope="module")
def edge():
    return _lowered(preset_config("edge-moe"))


PROFILE_CLASSES = {"patch_embed": ("patch_embed",), "qkv": ("qkv",), "attention": ("attn_qk", "attn_av"),
                   "proj": ("proj",), "mlp": ("mlp",), "gate": ("gate",), "experts": ("experts",)}


@pytest.mark.parametrize("which", ["tiny", "edge"])
def test_useful_macs_equal_the_profile(which, request):
    cfg, _, meta, traces = request.getfixturevalue(which)
    for task, trace in [(cfg.task_names[0], None)] + list(traces.items()):
        r = schedule.estimate(meta, HW, queue_lengths=trace)
        layers = analytic_layers(cfg, task, with_head=False)
        assert r["total"]["macs"] == sum(x["macs"] for x in layers)
        for cls, prof in PROFILE_CLASSES.items():
            want = sum(x["macs"] for x in layers if x["op_class"] in prof)
            assert r["classes"].get(cls, {"macs": 0})["macs"] == want, cls


def _check_bounds(r, hw=HW):
    bw = r["hw"]["ddr_bytes_per_cycle"]
    for row in r["instructions"]:
        assert row["cycles"] * hw.p_in * hw.p_out >= row["macs"], row
        assert row["cycles"] >= math.floor((row["ddr_read"] + row["ddr_write"]) / bw), row
        assert row["cycles"] >= row["compute_cycles"], row
    t = r["total"]
    assert t["cycles"] == sum(x["cycles"] for x in r["instructions"]) == r["total_cycles"]
    assert t["cycles"] == sum(c["cycles"] for c in r["classes"].values())
    assert t["cycles"] == sum(v["cycles"] for v in r["layers"].values())
    assert t["cycles"] == sum(t["by_bound"].values())
    assert 0 < t["utilisation"] <= 1
    assert t["latency_ms"] == pytest.approx(t["cycles"] / (hw.clock_mhz * 1e3))
    assert t["cycles"] >= t["macs"] / (hw.p_in * hw.p_out)


@pytest.mark.parametrize("which", ["tiny", "edge"])
def test_cycles_respect_compute_and_ddr_bounds(which, request):
    cfg, _, meta, traces = request.getfixturevalue(which)
    for trace in [None, *traces.values()]:
        _check_bounds(schedule.estimate(meta, HW, queue_lengths=trace))


def test_more_bandwidth_never_costs_cycles(edge):
    _, _, meta, traces = edge
    trace = next(iter(traces.values()))
    runs = [schedule.estimate(meta, HW, queue_lengths=trace, ddr_peak_gbps=g) for g in (1.6, 3.2, 6.4, 12.8, 25.6, 1e4)]
    for slow, fast in zip(runs, runs[1:]):
        assert fast["total"]["cycles"] <= slow["total"]["cycles"]
        for a, b in zip(slow["instructions"], fast["instructions"]):
            assert b["cycles"] <= a["cycles"], a["name"]
    assert runs[0]["total"]["cycles"] > runs[-1]["total"]["cycles"]
    # past the DDR's own limit the AXI ports' sum caps the bandwidth
    assert runs[-1]["hw"]["ddr_bytes_per_cycle"] == HW.axi_ports * HW.axi_width_bits / 8
    # one 128-bit port (16 B/cycle) is slower than the four sharing the DDR's 42.7 B/cycle
    one = schedule.estimate(meta, HW.replace(axi_ports=1), queue_lengths=trace)
    assert one["hw"]["ddr_bytes_per_cycle"] == 16
    assert one["total"]["cycles"] > schedule.estimate(meta, HW, queue_lengths=trace)["total"]["cycles"]


def _weight_bytes(meta, label):
    w = meta["weights"]
    n = 0
    for part, item in (("w", None), ("b", 8), ("shift", 1)):
        e = w[f"{label}.{part}"]
        n += int(np.prod(e["shape"])) * (item or {"int8": 1, "int16": 2}[e["dtype"]])
    return n


def test_idle_experts_read_their_queue_range_and_first_weight_group(edge):
    """An empty queue still costs the fetch, the queue-range read and the first weight group that
    eng_gemm asked for during it; no rows, no MACs, no writes."""
    cfg, _, meta, _ = edge
    T, N, k = cfg.num_tokens, cfg.num_experts, cfg.top_k
    moe = [f"blocks.{i}.moe" for i in cfg.moe_blocks]
    busy = {name: [T] * k + [0] * (N - k) for name in moe}
    conc = schedule.estimate(meta, HW, queue_lengths=busy)
    uni = schedule.estimate(meta, HW)
    assert uni["queue_lengths"][moe[0]] == schedule.uniform_queues(T, N, k) and min(uni["queue_lengths"][moe[0]]) > 0
    idle = [r for r in conc["instructions"]
            if r["class"] == "experts" and int(re.search(r"\.e(\d+)\.", r["name"]).group(1)) >= k]
    active = [r for r in conc["instructions"] if r["class"] == "experts" and r not in idle]
    assert idle and all(r["rows"] == r["macs"] == r["ddr_write"] == 0 for r in idle)
    assert max(r["cycles"] for r in idle) < min(r["cycles"] for r in active)
    for r in idle:
        f = meta["instructions"][r["index"]]["fields"]
        _, ot, gsz = schedule._gemm_groups(schedule._Machine.of(HW, schedule.Assumptions()), f["in_dim"],
                                           f["out_dim"], "w16" in meta["instructions"][r["index"]]["flags"])
        cols = min(f["out_dim"], gsz * HW.p_out)
        wb = 2 if "w16" in meta["instructions"][r["index"]]["flags"] else 1
        # the queue range (two entries) and the first group's weights, shifts and biases
        assert r["ddr_read"] == 4 + cols * (f["in_dim"] * wb + 1 + 8)
        assert r["ddr_read"] <= 4 + _weight_bytes(meta, r["name"])
    assert uni["classes"]["experts"]["macs"] == conc["classes"]["experts"]["macs"]


def test_golden_routing_gives_rows_only_to_the_routed_experts(edge):
    cfg, _, meta, traces = edge
    for trace in traces.values():
        r = schedule.estimate(meta, HW, queue_lengths=trace)
        for i in cfg.moe_blocks:
            used = set(np.unique(trace[f"blocks.{i}.moe.topk"]).tolist())
            rows = [x for x in r["instructions"] if x["name"].startswith(f"blocks.{i}.moe.e")]
            active = {int(re.search(r"\.e(\d+)\.", x["name"]).group(1)) for x in rows if x["macs"]}
            assert active == used
            assert sum(x["rows"] for x in rows if x["name"].endswith("fc1")) == cfg.num_tokens * cfg.top_k


def test_16_bit_weights_cost_two_bytes_and_the_same_macs():
    for rows, k, n in ((129, 192, 576), (7, 40, 50)):
        w8 = schedule.estimate([_gemm(rows, k, n)], HW)["instructions"][0]
        w16 = schedule.estimate([_gemm(rows, k, n, w16=True)], HW)["instructions"][0]
        assert w16["ddr_read"] - w8["ddr_read"] == k * n
        assert w16["macs"] == w8["macs"] == rows * k * n and w16["compute_cycles"] == w8["compute_cycles"]
        assert w16["cycles"] >= w8["cycles"]


FAST = dict(ddr_peak_gbps=1e5, ddr_latency=0)


def _cycles(prog, hw=HW, **kw):
    return schedule.estimate(prog, hw, **kw)["instructions"][0]["cycles"]


def test_instruction_fetch_and_the_program_header():
    """Every instruction is fetched (one 64-byte record: a DDR latency and its beats) before it
    runs; END's row also carries the header, fetched the same way."""
    beats = 64 // (HW.axi_width_bits // 8)
    for lat in (0, 100, 250):
        end = schedule.estimate([Instr("end")], HW, ddr_latency=lat)
        assert end["total_cycles"] == 2 * (lat + beats + schedule.FETCH_EXTRA)
        assert end["instructions"][0]["class"] == "end"
    narrow = HW.replace(axi_width_bits=64)
    assert schedule.estimate([Instr("end")], narrow)["total_cycles"] == 2 * (100 + 8 + schedule.FETCH_EXTRA)


def test_ddr_streams_pay_a_round_trip_per_window_of_bursts():
    m = schedule._Machine.of(HW, schedule.Assumptions())
    L, beat = m.lat, m.beat
    assert m.stream(8, beat) == 8                                # one window of one-beat bursts
    assert m.stream(9, beat) == L + 1 + 1                        # the ninth waits for the first
    assert m.stream(17, beat) == 2 * (L + 1) + 1
    assert m.stream(9, beat, ports=3) == 3                       # three ports: three bursts each
    assert m.stream(40, 16 * beat) == 40 * 16                    # long bursts: one beat per cycle
    assert m.stream(1, 200 * beat, burst=64) == 200              # a long segment is beat-bound
    more = schedule._Machine.of(HW, schedule.Assumptions(max_outstanding=16))
    assert more.stream(9, beat) == 9 and more.stream(17, beat) == L + 1 + 1


def test_a_burst_slot_frees_with_its_last_beat():
    m = schedule._Machine.of(HW, schedule.Assumptions())
    L, beat = m.lat, m.beat
    # the second window's bursts take the first window's slots one by one, as their beats end
    assert m.stream(16, 3 * beat) == L + 9 * 3
    assert m.stream(10, 3 * beat) == L + 3 * 3


def test_slice_reads_split_at_4kb_lines_and_unaligned_starts():
    m = schedule._Machine.of(HW, schedule.Assumptions())
    L, beat = m.lat, m.beat
    # eight rows of three beats: one window of bursts, beat-bound
    assert m.slice_read(0, 512, 8, 3 * beat) == 8 * 3
    # a row across a 4 KB line is two bursts: the ninth waits a round trip
    assert m.slice_read(4096 - beat, 512, 8, 3 * beat) == pytest.approx(L + 2 * (8 * 3 / 9))
    # a row starting inside a beat touches one beat more
    assert m.slice_read(8, 512, 8, 3 * beat) == 8 * 4
    # three ports streaming together share the DDR's bytes per cycle
    assert m.bw < 3 * beat
    assert m.slice_read(0, 512, 8, 3 * beat, share=3) == pytest.approx(8 * 3 * 3 * beat / m.bw)


def test_gemm_structure():
    """eng_gemm on hand-sized cases: one beat per row and K chunk and output tile when the DDR is
    infinitely fast, a queued GEMM one queue read (a latency) after the direct one, a weight group
    more costs its load a latency after the previous one."""
    ks, ot = 4, schedule.GEMM_GROUP_TILES          # one weight group
    k, n = ks * HW.p_in, ot * HW.p_out
    a, b = _cycles([_gemm(20, k, n)], **FAST), _cycles([_gemm(21, k, n)], **FAST)
    assert b - a == ks * ot
    direct = schedule.estimate([_gemm(12, k, HW.p_out)], HW)["instructions"][0]
    queued = schedule.estimate(_moe(T=12, D=k, H=HW.p_out, N=1, k=1), HW, queue_lengths=[[12]])["instructions"][1]
    assert queued["rows"] == direct["rows"] == 12
    # the queue range comes first; the weights load meanwhile, so at most the read is added
    assert direct["cycles"] <= queued["cycles"] <= direct["cycles"] + 100 + schedule.GEMM_PRE_EXTRA
    # a small matrix loads faster than the queue read: the read shows
    d8 = _cycles([_gemm(12, 8, 8)])
    q8 = schedule.estimate(_moe(T=12, D=8, H=8, N=1, k=1), HW, queue_lengths=[[12]])["instructions"][1]["cycles"]
    assert d8 < q8 <= d8 + 100 + schedule.GEMM_PRE_EXTRA
    assert queued["ddr_read"] - direct["ddr_read"] == 4 + 2 * 12
    # latencies on the path of a one-group GEMM with few rows: fetch, x and weights, the last write
    lat = [_cycles([_gemm(5, k, HW.p_out)], ddr_latency=v) for v in (100, 200)]
    assert lat[1] - lat[0] == 3 * 100
    # two weight groups: the second group's load waits for the first, a latency later
    two = 2 * schedule.GEMM_GROUP_TILES * HW.p_out
    lat2 = [_cycles([_gemm(5, k, two, w16=True)], ddr_latency=v) for v in (100, 200)]
    assert lat2[1] - lat2[0] > lat[1] - lat[0]


def test_utilisation_of_aligned_and_ragged_gemms():
    aligned = schedule.estimate([_gemm(4096, 4 * HW.p_in, 8 * HW.p_out)], HW, **FAST)["total"]
    assert aligned["utilisation"] > 0.97
    # one input more than three K slices wastes most of the fourth (a row's output tile is two
    # cycles of writes on each of three ports, so the array stays the bottleneck)
    ragged = schedule.estimate([_gemm(4096, 3 * HW.p_in + 1, 8 * HW.p_out)], HW, **FAST)["instructions"][0]
    assert ragged["bound"] == "compute"
    util = ragged["macs"] / (PEAK * ragged["cycles"])
    assert 0.95 * (3 * HW.p_in + 1) / (4 * HW.p_in) < util <= (3 * HW.p_in + 1) / (4 * HW.p_in)


def test_attention_reads_each_slice_once_and_overlaps_the_next_head():
    T, d = 129, 64
    r = schedule.estimate(_attention(T, 3 * d, 3, T), HW)["instructions"][0]
    assert r["macs"] == 2 * 3 * T * T * d
    assert r["ddr_write"] == T * 3 * d * 2 and r["ddr_read"] == 3 * T * 3 * d * 2
    # heads of the same size cost the same: the cycles grow linearly with them
    c = [_cycles(_attention(T, h * d, h, T)) for h in (1, 2, 3, 4)]
    assert c[2] - c[1] == c[1] - c[0] == c[3] - c[2] > 0
    # the next head's slices come in beside this head's stages, so a head costs less than the first
    assert c[1] - c[0] < c[0]


@pytest.mark.parametrize("d", [HW.p_in - 8, HW.p_in])
def test_small_query_groups_wait_for_the_tile_builds(d):
    # at T = 1025 half of a 64 KB score buffer holds 15 queries: every group rebuilds all key and
    # value tiles (P_out cycles per key tile, P_out / 2 for a head exactly P_in wide, whose reads
    # hold two keys; P_in per value tile) for 15 beats each
    T = 1025
    small = HW.replace(buffers=dataclasses.replace(HW.buffers, scores=65536))
    g = small.buffers.scores // 2 // (2 * T)
    assert g < HW.p_in
    groups = -(-T // g)
    key_build = HW.p_out // 2 if d == HW.p_in else HW.p_out
    builds = -(-T // HW.p_out) * key_build + -(-T // HW.p_in) * HW.p_in
    c = schedule.estimate(_attention(T, d, 1, T), small)["instructions"][0]["cycles"]
    assert c >= groups * builds
    assert c < groups * builds * 1.15 + T * 4 + 1000      # plus the slices' arrival and the ends
    # twice the score buffer: twice the queries share each build, the builds halve
    big = small.replace(buffers=dataclasses.replace(small.buffers, scores=2 * small.buffers.scores))
    c2 = schedule.estimate(_attention(T, d, 1, T), big)["instructions"][0]["cycles"]
    assert c2 < 0.6 * c


def test_combine_blocks_load_one_after_another():
    # a DDR-bound combine: each block of token_block tokens starts its load once the previous
    # block's is in, so one more block costs at least a latency beyond its bytes
    m = schedule._Machine.of(HW, schedule.Assumptions())

    def cost(T):
        ins = Instr("moe_combine", {"score_ref": _ref(16), "idx_ref": _ref(15), "y_ref": _ref(12),
                                    "out_ref": _ref(17), "tokens": T, "k": 2, "dim": 192},
                    isa.make_flags(residual=True), "blocks.1.moe")
        return schedule._cost_combine(m, ins, 16)

    b = HW.token_block
    full, more = cost(3 * b), cost(3 * b + 1)
    assert full.ddr > full.compute
    one_token = (2 * (2 * 2 + 192 * 2) + 2 * 192 * 2) / m.bw
    assert more.cycles - full.cycles >= m.lat + one_token
    # within a block a token costs only its bytes
    assert cost(3 * b + 2).cycles - more.cycles < m.lat / 2


def test_softmax_lanes_bound_attention_when_they_are_few():
    prog = _attention(257, 256, 4, 32)
    base = _cycles(prog, ddr_peak_gbps=1e5)
    wide = _cycles(prog, ddr_peak_gbps=1e5, softmax_lanes=4096)
    narrow = _cycles(prog, ddr_peak_gbps=1e5, softmax_lanes=1)
    assert wide <= base < narrow
    assert narrow >= 4 * 257 * 257      # every exp on one lane


def test_large_gemm_restreams_its_input_per_weight_group():
    rows, k, n = 300, 1536, 384
    x = rows * k * 2
    # eng_gemm keeps x on chip when its rows x K chunks fit half of buffers.activations
    small = HW.replace(buffers=Buffers(weights=HW.buffers.weights, activations=1 << 19, scores=HW.buffers.scores))
    assert rows * (k // HW.p_in) <= HW.buffers.activations // 2 // (2 * HW.p_in)
    reads = [schedule.estimate([_gemm(rows, k, n, w16=True)], hw)["instructions"][0]["ddr_read"] for hw in (small, HW)]
    _, ot, gsz = schedule._gemm_groups(schedule._Machine.of(HW, schedule.Assumptions()), k, n, True)
    assert reads[0] - reads[1] == (-(-ot // gsz) - 1) * x > 0


def test_vector_engines_per_row_and_token_costs():
    """LayerNorm: a unit beat of min(P_out, 8) lanes per cycle, and per group of four rows the
    statistics the group's other rows do not cover; the gate: per token the largest of the top-k
    scan (N + 1), the x row and the compute-unit beats, plus its k queue entries (scattered and
    read out); patchify: C reads of one band, each a latency and its beats."""
    lp = min(HW.p_out, 8)
    stats = schedule.LN_STATS + math.ceil(math.log2(lp))

    def ln(rows, dim):
        return _cycles([Instr("layernorm", {"rows": rows, "dim": dim})], **FAST)

    short = -(-48 // lp)            # rows of 6 beats: the statistics show
    assert stats > 2 * short
    assert ln(41, 48) - ln(40, 48) == short + stats - 2 * short       # a new group of four
    assert ln(42, 48) - ln(41, 48) == short                           # a row in a started group
    long = -(-384 // lp)            # 48 beats hide them
    assert ln(41, 384) - ln(40, 384) == ln(42, 384) - ln(41, 384) == long
    # the table (beta, 8 bytes a channel) comes before the first read-out: a one-row LayerNorm
    # grows by the table's beats plus the row's beats
    beat = HW.axi_width_bits // 8
    assert ln(1, 768) - ln(1, 384) == 384 * 8 // beat + (768 - 384) // lp

    def gate(t, d, n, k, w16=False):
        ins = Instr("moe_gate", {"tokens": t, "dim": d, "experts_k": n | k << 16}, isa.make_flags(w16=w16))
        return schedule.estimate([ins], HW, **FAST)["instructions"][0]["cycles"]

    # top-k bound (N + 1 > the x row's D·2/beat beats), T·k past the queue's prefix sum
    assert gate(31, 64, 16, 2) - gate(30, 64, 16, 2) == 16 + 1 + 2 * 2
    # x-row bound: D·2/beat beats a token at GATE_X_BEAT_CYCLES each
    xrow = 384 * 2 / beat * schedule.GATE_X_BEAT_CYCLES
    assert abs(gate(61, 384, 4, 1) - gate(60, 384, 4, 1) - (xrow + 2)) <= 1
    # compute-unit bound when the experts take several P_OUT tiles (a narrow array)
    narrow = HW.replace(p_in=4, p_out=4, token_block=4, softmax_lanes=4)
    g = [schedule.estimate([Instr("moe_gate", {"tokens": t, "dim": 64, "experts_k": 16 | 1 << 16})], narrow,
                           **FAST)["instructions"][0]["cycles"] for t in (30, 31)]
    assert g[1] - g[0] == 4 * 16 + 2
    # the two tokens of the row buffer are read during the parameter load: only later ones pay x
    assert gate(3, 384, 4, 1) - gate(2, 384, 4, 1) > gate(2, 384, 4, 1) - gate(1, 384, 4, 1)
    # an int16 gate of 16 experts needs two beats a w row: its table load takes D cycles more
    assert gate(8, 192, 16, 2, w16=True) - gate(8, 192, 16, 2) == 192
    p, C, W = 8, 3, 64
    band = [_cycles([Instr("patchify", {"channels": C, "height": h, "width": W, "patch": p})]) for h in (16, 24)]
    beats = -(-p * W * 2 // (HW.axi_width_bits // 8)) + 1
    assert band[1] - band[0] == max(C * (100 + beats), C * p * W / min(p, HW.axi_width_bits // 16))


def test_more_outstanding_bursts_never_cost_cycles(edge):
    _, _, meta, traces = edge
    trace = next(iter(traces.values()))
    runs = [schedule.estimate(meta, HW, queue_lengths=trace, max_outstanding=n)["total_cycles"] for n in (2, 8, 64)]
    assert runs[0] > runs[1] >= runs[2]


def test_queue_lengths_forms_and_checks():
    prog = _moe(T=10, N=4, k=2)
    topk = np.array([[0, 1]] * 6 + [[2, 3]] * 4)
    counts = np.bincount(topk.ravel(), minlength=4).tolist()
    a = schedule.estimate(prog, HW, queue_lengths={"blocks.1.moe": counts})
    b = schedule.estimate(prog, HW, queue_lengths=[counts])
    c = schedule.estimate(prog, HW, queue_lengths={"blocks.1.moe.topk": topk, "blocks.1.norm2": np.zeros((10, 96))})
    assert a["queue_lengths"] == b["queue_lengths"] == c["queue_lengths"] == {"blocks.1.moe": counts}
    assert a["total"] == b["total"] == c["total"]
    assert schedule.queue_lengths_from_trace({"blocks.1.moe.topk": topk}, 4) == {"blocks.1.moe": counts}
    bad_forms = ([[10, 10, 0]], [[11, 9, 0, 0]], [[12, 8, -1, 1]], [[5, 5, 5, 4]], [counts, counts],
                 {"blocks.3.moe": counts})
    for bad in bad_forms:
        with pytest.raises(UsageError):
            schedule.estimate(prog, HW, queue_lengths=bad)
    for t, n, k in ((10, 4, 2), (129, 16, 2), (3, 16, 4)):
        q = schedule.uniform_queues(t, n, k)
        assert sum(q) == t * k and max(q) - min(q) <= 1 and len(q) == n


def test_program_forms_agree(edge, tmp_path):
    _, _, meta, traces = edge
    trace = next(iter(traces.values()))
    base = schedule.estimate(meta, HW, queue_lengths=trace)
    (tmp_path / "program.json").write_text(json.dumps(meta))
    blob = isa.Header(bytes(32), len(meta["instructions"]), 0, 0, 1, 0, 0).encode()
    instrs = schedule.load_program(meta)
    blob += b"".join(i.encode() for i in instrs)
    # program.bin carries no names: MoE layers are matched to the trace in order
    for src in (tmp_path / "program.json", tmp_path, instrs, blob):
        got = schedule.estimate(src, HW, queue_lengths=trace)
        assert got["total"] == base["total"]
        assert [x["cycles"] for x in got["instructions"]] == [x["cycles"] for x in base["instructions"]]


def test_result_is_json_and_deterministic(tiny):
    _, _, meta, traces = tiny
    a = schedule.estimate(meta, HW, queue_lengths=next(iter(traces.values())))
    b = schedule.estimate(meta, HW, queue_lengths=next(iter(traces.values())))
    assert json.dumps(a, sort_keys=True, allow_nan=False) == json.dumps(b, sort_keys=True, allow_nan=False)
    text = schedule.format_table(a, layers=True)
    assert f"{a['total']['cycles']:,} cycles" in text
    for cls in a["classes"]:
        assert re.search(rf"^  {cls}\s", text, re.M), cls
    for layer in a["layers"]:
        assert layer in text
    assert schedule.summary_lines(a)[0] in text


def test_pipeline_latency_follows_the_rtl():
    src = RTL.read_text()
    lat = {n: int(v) for n, v in re.findall(r"localparam int (RQ_LAT|EPI_LAT)\s*=\s*(\d+)", src)}
    assert set(lat) == {"RQ_LAT", "EPI_LAT"}
    for p_in in (2, 8, 32, 128):
        hw = HW.replace(p_in=p_in, p_out=8)
        tree = 1 + math.ceil(math.log2(p_in))
        assert schedule.compute_unit_latency(hw) == 2 + max(tree, 1 + lat["RQ_LAT"]) + lat["RQ_LAT"] + lat["EPI_LAT"]


def test_bad_inputs_are_usage_errors():
    with pytest.raises(UsageError):
        schedule.estimate([_moe()[1]], HW)                       # an expert before any gate
    with pytest.raises(UsageError):
        schedule.estimate({"instructions": [{"op": "nope"}]}, HW)
    for bad in (dict(max_outstanding=0), dict(layernorm_lanes=0), dict(ddr_peak_gbps=0), dict(ddr_latency=-1)):
        with pytest.raises(UsageError):
            schedule.estimate([_gemm(1, 1, 1)], HW, **bad)
    with pytest.raises(UsageError):
        schedule.estimate("/nonexistent/program.json", HW)
    empty = schedule.estimate([Instr("end")], HW)
    assert empty["total"]["macs"] == 0 and f"{empty['total']['cycles']:,} cycles" in schedule.format_table(empty)


@pytest.mark.parametrize("which", ["tiny", "edge"])
def test_residual_fusion_saves_cycles_and_ddr_bytes(which, request):
    """Per fused add: the intermediate's write and read and the add's read of its other operand
    become one read of the residual operand beside the GEMM's (or combine's) output write:
    2·T·D·2 bytes fewer, the same MACs, fewer cycles."""
    cfg, graph, meta, traces = request.getfixturevalue(which)
    _, _, plain = lower.encode(lower.lower(graph, HW, fuse=False))
    adds = [graph.tensors[o.output].shape for o in graph.ops if o.kind == "add"]
    assert sum(bool(i.get("fused")) for i in meta["instructions"]) == len(adds) > 0
    for trace in (None, next(iter(traces.values()))):
        f = schedule.estimate(meta, HW, queue_lengths=trace)
        u = schedule.estimate(plain, HW, queue_lengths=trace)
        assert f["total"]["macs"] == u["total"]["macs"]
        assert u["total"]["ddr_bytes"] - f["total"]["ddr_bytes"] == sum(2 * t * d * 2 for t, d in adds)
        assert f["total_cycles"] < u["total_cycles"]
        assert "add" in u["classes"] and "add" not in f["classes"]
        # the fused instructions are charged to the op they computed (proj, mlp, combine)
        assert f["classes"]["proj"]["ddr_read"] > u["classes"]["proj"]["ddr_read"]
        assert set(f["layers"]) == set(u["layers"]) - {o.name for o in graph.ops if o.kind == "add"}
        _check_bounds(f)
