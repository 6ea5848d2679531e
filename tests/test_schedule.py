"""The schedule model: MACs agree with the profile's analytic count, cycles respect the compute and
DDR lower bounds, bandwidth and buffers act monotonically, idle experts cost nothing, 16-bit
weights cost their bytes, the Program's forms (Instr list, program.json, program.bin) agree."""

from __future__ import annotations

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


def test_idle_experts_cost_no_weight_bytes(edge):
    cfg, _, meta, _ = edge
    T, N, k = cfg.num_tokens, cfg.num_experts, cfg.top_k
    moe = [f"blocks.{i}.moe" for i in cfg.moe_blocks]
    busy = {name: [T] * k + [0] * (N - k) for name in moe}
    uni = schedule.estimate(meta, HW)
    conc = schedule.estimate(meta, HW, queue_lengths=busy)
    for row in conc["instructions"]:
        if row["class"] == "experts" and int(re.search(r"\.e(\d+)\.", row["name"]).group(1)) >= k:
            assert row["bound"] == "idle" and row["cycles"] == row["ddr_read"] == row["ddr_write"] == 0
    assert uni["queue_lengths"][moe[0]] == schedule.uniform_queues(T, N, k) and min(uni["queue_lengths"][moe[0]]) > 0
    # same rows in total, so the read difference is exactly the idle experts' parameters
    idle = sum(_weight_bytes(meta, f"{m}.e{e}.{fc}") for m in moe for e in range(k, N) for fc in ("fc1", "fc2"))
    assert uni["classes"]["experts"]["ddr_read"] - conc["classes"]["experts"]["ddr_read"] == idle
    assert uni["classes"]["experts"]["ddr_write"] == conc["classes"]["experts"]["ddr_write"]
    assert uni["classes"]["experts"]["macs"] == conc["classes"]["experts"]["macs"]


def test_golden_routing_reads_only_the_routed_experts(edge):
    cfg, _, meta, traces = edge
    for trace in traces.values():
        r = schedule.estimate(meta, HW, queue_lengths=trace)
        for i in cfg.moe_blocks:
            used = set(np.unique(trace[f"blocks.{i}.moe.topk"]).tolist())
            rows = [x for x in r["instructions"] if x["name"].startswith(f"blocks.{i}.moe.e")]
            active = {int(re.search(r"\.e(\d+)\.", x["name"]).group(1)) for x in rows if x["ddr_read"]}
            assert active == used
            assert sum(x["rows"] for x in rows if x["name"].endswith("fc1")) == cfg.num_tokens * cfg.top_k


def test_16_bit_weights_cost_two_bytes_and_the_same_macs():
    for rows, k, n in ((129, 192, 576), (7, 40, 50)):
        w8 = schedule.estimate([_gemm(rows, k, n)], HW)["instructions"][0]
        w16 = schedule.estimate([_gemm(rows, k, n, w16=True)], HW)["instructions"][0]
        assert w16["ddr_read"] - w8["ddr_read"] == k * n
        assert w16["macs"] == w8["macs"] == rows * k * n and w16["compute_cycles"] == w8["compute_cycles"]
        assert w16["cycles"] >= w8["cycles"]


def test_utilisation_of_aligned_and_ragged_gemms():
    fast = dict(ddr_peak_gbps=1e5, fill_drain="instruction", ddr_latency=0)
    aligned = schedule.estimate([_gemm(4096, 4 * HW.p_in, 4 * HW.p_out)], HW, **fast)["total"]
    assert aligned["utilisation"] > 0.99
    # one input more than a K slice wastes almost half of every second slice
    ragged = schedule.estimate([_gemm(4096, HW.p_in + 1, 8 * HW.p_out)], HW, **fast)["instructions"][0]
    assert ragged["bound"] == "compute"
    util = ragged["macs"] / (PEAK * ragged["cycles"])
    assert 0.97 * (HW.p_in + 1) / (2 * HW.p_in) < util <= (HW.p_in + 1) / (2 * HW.p_in)


def test_fill_drain_and_token_block():
    prog = _moe() + [_gemm(300, 192, 576, x=20, y=21)]
    by = {m: schedule.estimate(prog, HW, fill_drain=m)["total"]["cycles"] for m in schedule.FILL_DRAIN}
    assert by["pass"] >= by["tile"] >= by["instruction"]
    rows = [schedule.estimate([_gemm(1000, 192, 576)], HW.replace(token_block=tb), fill_drain="pass",
                              ddr_peak_gbps=1e5)["instructions"][0] for tb in (8, 32, 128)]
    assert rows[0]["cycles"] > rows[1]["cycles"] > rows[2]["cycles"]
    assert len({r["ddr_read"] for r in rows}) == 1      # weights are read once whatever the block


def test_attention_streams_kv_once_when_it_fits():
    T, D, h = 129, 192, 3
    reads = set()
    for qt in (8, 32, T):
        r = schedule.estimate(_attention(T, D, h, qt), HW)["instructions"][0]
        assert r["macs"] == 2 * h * T * T * (D // h)
        assert r["ddr_write"] == T * D * 2
        reads.add(r["ddr_read"])
    assert reads == {3 * T * D * 2}       # one Q stream and one K/V stream
    # a head's K and V no longer fit: every query tile streams them again
    small = HW.replace(buffers=Buffers(weights=HW.buffers.weights, activations=8192, scores=HW.buffers.scores))
    got = [schedule.estimate(_attention(T, D, h, qt), small)["instructions"][0]["ddr_read"] for qt in (8, 32, T)]
    assert got[0] > got[1] > got[2] == 3 * T * D * 2


def test_softmax_unit_overlaps_av_until_it_is_the_bottleneck():
    prog = _attention(257, 256, 4, 32)
    base = schedule.estimate(prog, HW, ddr_peak_gbps=1e5)["instructions"][0]["compute_cycles"]
    wide = schedule.estimate(prog, HW, ddr_peak_gbps=1e5, softmax_lanes=4096)["instructions"][0]["compute_cycles"]
    narrow = schedule.estimate(prog, HW, ddr_peak_gbps=1e5, softmax_lanes=1)["instructions"][0]["compute_cycles"]
    assert wide == base < narrow
    assert narrow >= 4 * 257 * 257      # every exp on one lane


def test_large_gemm_restreams_its_input_per_weight_group():
    rows, k, n = 1025, 1536, 384          # m3vit-small's fc2: its input does not stay on chip
    x = rows * k * 2
    reads = [schedule.estimate([_gemm(rows, k, n, w16=True)], HW.replace(
        buffers=Buffers(weights=wb, activations=1 << 19, scores=HW.buffers.scores)))["instructions"][0]["ddr_read"]
        for wb in (1 << 18, 1 << 20, 1 << 22)]
    assert reads[0] > reads[1] > reads[2]
    assert reads[0] - reads[2] >= 2 * x


def test_dependent_instructions_expose_the_ddr_latency():
    dep = [_gemm(64, 64, 96, x=0, y=1, name="a"), _gemm(64, 96, 96, x=1, y=2, name="b")]
    indep = [_gemm(64, 64, 96, x=0, y=1, name="a"), _gemm(64, 96, 96, x=3, y=2, name="b")]
    d = schedule.estimate(dep, HW)["instructions"]
    i = schedule.estimate(indep, HW)["instructions"]
    assert d[0]["latency_cycles"] == i[0]["latency_cycles"] == 100    # the first always waits
    assert d[1]["latency_cycles"] == 100 and i[1]["latency_cycles"] == 0
    assert schedule.estimate(dep, HW, ddr_latency=0)["total"]["cycles"] < schedule.estimate(dep, HW)["total"]["cycles"]
    # an expert's fc2 reads what its fc1 wrote; the next fc1 reads the layer input
    moe = schedule.estimate(_moe(), HW)["instructions"]
    assert [r["latency_cycles"] > 0 for r in moe[1:5]] == [True, True, False, True]


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
    for bad in (dict(fill_drain="never"), dict(vector_lanes=0), dict(ddr_peak_gbps=0), dict(act_buffer_share=2)):
        with pytest.raises(UsageError):
            schedule.estimate([_gemm(1, 1, 1)], HW, **bad)
    with pytest.raises(UsageError):
        schedule.estimate("/nonexistent/program.json", HW)
    empty = schedule.estimate([Instr("end")], HW)
    assert empty["total"]["cycles"] == 0 and "0 cycles" in schedule.format_table(empty)


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
