"""Lowering a QGraph to a Program: every pass held to the golden model bit for bit, the MoE
expansion, the attention plan, allocation, weight packing, limits, determinism; the register map
and the generated headers."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from m3vit.compiler import golden, isa, lower, regmap
from m3vit.compiler import program_exec as px
from m3vit.compiler.fidelity import eval_images
from m3vit.compiler.from_torch import build_qgraph
from m3vit.compiler.passes import PassVerificationError, run_to_fixed_point
from m3vit.compiler.quantize import calibrate, calibration_images
from m3vit.errors import UsageError
from m3vit.model.config import resolve_config
from m3vit.model.vit import build_model
from m3vit.rtl_sim.hwconfig import HwConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def graph():
    cfg = resolve_config("tiny")
    model = build_model(cfg)
    return build_qgraph(model, calibrate(model, calibration_images(cfg.img_size, 8)))


@pytest.fixture(scope="module")
def hw():
    return HwConfig.default()


@pytest.fixture(scope="module")
def cases(graph):
    imgs = [golden.quantize_input(graph, im) for _, im in eval_images(tuple(graph.input.shape[1:]), 2)]
    fmt = graph.input.fmt
    imgs.append(np.random.default_rng(7).integers(fmt.min, fmt.max + 1, graph.input.shape))
    return [(im, t) for im in imgs for t in range(len(graph.tasks))]


@pytest.fixture(scope="module")
def lowered(graph, hw):
    return lower.lower(graph, hw)


def _idle_graph(graph):
    """A gate bias that sends every token to experts 0 and 2: experts 1 and 3 stay idle."""
    g = dataclasses.replace(graph, ops=[dataclasses.replace(o, params=dict(o.params)) for o in graph.ops], bounds={})
    for op in g.ops:
        if op.kind == "moe":
            gb = op.params["gate_b"].copy()
            gb[:, 2] += 1 << 40
            gb[:, 0] += 1 << 39
            op.params["gate_b"] = gb
    g.validate()
    return g


def test_every_pass_is_bit_exact_against_golden(graph, hw, cases):
    v = lower.LoweringVerifier(graph, cases)
    lir = lower.lower(graph, hw, v)
    assert lir.meta["passes"] == ["lower-ops", "expand-moe", "fuse-residual", "plan-attention", "allocate"]
    assert [e["pass"] for e in v.log] == ["import", "pass lower-ops", "pass expand-moe", "pass fuse-residual",
                                          "pass plan-attention", "pass allocate"]
    assert v.log[-1]["executed_as"] == "program" and v.log[1]["executed_as"] == "lir"
    adds = sum(o.kind == "add" for o in graph.ops)
    full = len(graph.trace_names())
    # fusion removes one intermediate per residual add; the rest is still compared
    assert [e["tensors"] for e in v.log] == [full] * 3 + [full - adds] * 3
    assert all(e["cases"] == len(cases) for e in v.log)


def test_unfused_passes_are_bit_exact_against_golden(graph, hw, cases):
    v = lower.LoweringVerifier(graph, cases[:2])
    lir = lower.lower(graph, hw, v, fuse=False)
    assert lir.meta["passes"] == ["lower-ops", "expand-moe", "plan-attention", "allocate"]
    assert all(e["tensors"] == len(graph.trace_names()) for e in v.log)
    assert sum(n.op == "add" for n in lir.nodes) == sum(o.kind == "add" for o in graph.ops)


def test_fusion_takes_every_residual_add_of_tiny(graph, lowered):
    """Every block's two adds: residual1 into attn.proj (its second operand, so the shifts swap),
    residual2 into mlp.fc2 or the MoE's combine."""
    add_ops = {o.name: o for o in graph.ops if o.kind == "add"}
    fused = [n for n in lowered.nodes if n.fused]
    assert not [n for n in lowered.nodes if n.op == "add"]
    assert len(fused) == len(add_ops) == 2 * resolve_config("tiny").depth
    _, _, meta = lower.encode(lowered)
    for n in fused:
        (name,) = n.fused
        op = add_ops[name]
        assert n.name == op.output and n.refs["y_ref" if n.op == "gemm" else "out_ref"] == op.output
        assert n.flags["residual"] and n.flags.get("xmode", "direct") == n.flags.get("ymode", "direct") == "direct"
        v = n.origin
        assert v in op.inputs and v not in lowered.tensors and v not in meta["tensors"] and v not in meta["trace"]
        r = op.inputs[1] if op.inputs[0] == v else op.inputs[0]
        assert n.refs["res_ref"] == r
        want = (op.attrs["a_shift"], op.attrs["b_shift"]) if op.inputs[0] == v else \
            (op.attrs["b_shift"], op.attrs["a_shift"])
        assert isa.unpack_res_shifts(n.fields["res_shifts"]) == want
        kind = "moe_combine" if v.endswith(".moe") else "gemm"
        assert n.op == kind and v.endswith((".attn.proj", ".mlp.fc2", ".moe")), v
        entry = next(i for i in meta["instructions"] if i["name"] == op.output)
        assert entry["fused"] == [name] and entry["intermediate"] == v and "residual" in entry["flags"]
    assert lower.trace_subset(meta, graph.trace_names()) == meta["trace"]
    assert len(meta["trace"]) == len(graph.trace_names()) - len(add_ops)


def _pre_fusion(graph, hw):
    lir = lower.initial_lir(graph, hw)
    for p in (lower.LowerOps(), lower.ExpandMoE()):
        lir, _ = p.apply(lir)
    return lir


def test_fusion_keeps_an_add_whose_operand_is_read_elsewhere_or_late(graph, hw, cases):
    lir = _pre_fusion(graph, hw)
    idx = {n.name: i for i, n in enumerate(lir.nodes)}
    # another reader of blocks.0.attn.proj: its value must stay in memory
    extra = dataclasses.replace(lir.nodes[idx["blocks.0.residual1"]], name="blocks.0.extra",
                                refs={"a_ref": "blocks.0.attn.proj", "b_ref": "blocks.0.attn.proj",
                                      "y_ref": "blocks.0.extra"})
    # blocks.0.residual2's other operand written after mlp.fc2: moving the add earlier would read it early
    late = dataclasses.replace(lir.nodes[idx["blocks.0.residual1"]], name="blocks.0.late",
                               refs={"a_ref": "blocks.0.residual1", "b_ref": "blocks.0.residual1",
                                     "y_ref": "blocks.0.late"})
    res2 = lir.nodes[idx["blocks.0.residual2"]]
    res2 = dataclasses.replace(res2, refs={**res2.refs, "a_ref": "blocks.0.late"})
    nodes = list(lir.nodes)
    nodes[idx["blocks.0.residual2"]] = res2
    nodes.insert(idx["blocks.0.residual2"], late)
    nodes.insert(idx["blocks.0.residual1"] + 1, extra)
    lir.nodes = nodes
    lir.tensors["blocks.0.extra"] = lir.tensors["blocks.0.late"] = lir.tensors["blocks.0.residual1"]
    out, changed = lower.FuseResidual().apply(lir)
    assert changed
    kept = {n.name for n in out.nodes if n.op == "add"}
    assert {"blocks.0.residual1", "blocks.0.residual2"} <= kept
    assert "blocks.1.residual1" not in kept and "blocks.0.attn.proj" in out.tensors
    # a graph output is never fused away, and the pass is idempotent
    assert lower.FuseResidual().apply(out) == (out, False)


def test_fusion_leaves_the_graph_output_and_queue_gemms(graph, hw):
    lir = _pre_fusion(graph, hw)
    idx = {n.name: i for i, n in enumerate(lir.nodes)}
    nodes = list(lir.nodes)
    # a GEMM writing the graph output that a residual add then reads: the output must stay
    proj, res1 = nodes[idx["blocks.0.attn.proj"]], nodes[idx["blocks.0.residual1"]]
    nodes[idx["blocks.0.attn.proj"]] = dataclasses.replace(proj, refs={**proj.refs, "y_ref": graph.output})
    nodes[idx["blocks.0.residual1"]] = dataclasses.replace(res1, refs={**res1.refs, "b_ref": graph.output})
    lir.nodes = nodes
    out, _ = lower.FuseResidual().apply(lir)
    assert any(n.name == "blocks.0.residual1" and n.op == "add" for n in out.nodes)
    assert not any(n.fused for n in out.nodes if n.op == "gemm" and n.flags.get("xmode", "direct") != "direct")
    assert sum(bool(n.fused) for n in out.nodes) == sum(o.kind == "add" for o in graph.ops) - 1


def test_verifier_catches_a_wrong_pass(graph, hw, cases):
    class OffByOneShift(lower.LoweringPass):
        name = "bad-shift"

        def rewrite(self, lir):
            for i, n in enumerate(lir.nodes):
                if n.op == "add" and n.fields["b_shift"] != 7:
                    lir.nodes[i] = dataclasses.replace(n, fields={**n.fields, "b_shift": 7})
                    return True
            return False

    v = lower.LoweringVerifier(graph, cases[:1])
    with pytest.raises(PassVerificationError, match="bad-shift.*residual1"):
        run_to_fixed_point(lower.initial_lir(graph, hw), [lower.LowerOps(), OffByOneShift()], v)


def test_idle_experts_are_zero_row_instructions(graph, hw, cases):
    g = _idle_graph(graph)
    v = lower.LoweringVerifier(g, cases[:2])
    lir = lower.lower(g, hw, v)  # bit-exact with two idle experts per layer
    program, weights, meta = lower.encode(lir)
    res = px.execute(program, weights, cases[0][0], 0, hw_hash=hw.hash(), meta=json.loads(lower.meta_json(meta)),
                     trace=True)
    moe = next(o.name for o in g.ops if o.kind == "moe")
    assert res.trace[f"{moe}.e1.fc1"].shape == (0, g.op(moe).attrs["hidden"])
    assert res.trace[f"{moe}.e3.fc2"].shape[0] == 0
    names = [i["name"] for i in meta["instructions"]]
    assert f"{moe}.e1.fc1" in names and f"{moe}.e3.fc2" in names


def test_moe_expansion_fetches_each_expert_once(graph, lowered):
    for op in (o for o in graph.ops if o.kind == "moe"):
        n, k = op.attrs["experts"], op.attrs["top_k"]
        t = graph.tensors[op.name].shape[0]
        nodes = [nd for nd in lowered.nodes if nd.name.startswith(op.name + ".") or (nd.origin or nd.name) == op.name]
        assert [nd.op for nd in nodes] == ["moe_gate"] + ["gemm"] * (2 * n) + ["moe_combine"]
        for e in range(n):
            fc1, fc2 = nodes[1 + 2 * e], nodes[2 + 2 * e]
            assert fc1.flags == {"gelu": True, "w16": False, "bias": True, "xmode": "gather", "ymode": "queue"}
            assert fc2.flags == {"gelu": False, "w16": False, "bias": True, "xmode": "queue", "ymode": "scatter"}
            assert fc1.refs["y_ref"] == fc2.refs["x_ref"] == f"{op.name}.hidden"
            assert fc1.fields["expert"] == fc2.fields["expert"] == e
            assert fc1.fields["queue_shape"] == n | (t * k) << 16
        assert lowered.tensors[f"{op.name}.hidden"].shape == (t * k, op.attrs["hidden"])
        assert lowered.tensors[f"{op.name}.experts"].shape == (t * k, graph.tensors[op.name].shape[1])
    uses: dict[str, int] = {}
    for nd in lowered.nodes:
        if nd.op == "gemm":
            uses[nd.refs["w_ref"]] = uses.get(nd.refs["w_ref"], 0) + 1
    assert set(uses.values()) == {1}


def test_allocation_aligned_disjoint_and_spaces(graph, lowered):
    _, _, meta = lower.encode(lowered)
    spans = []
    for name, t in meta["tensors"].items():
        assert t["offset"] % isa.ALIGN == 0
        if t["rows"] == "all" and t["space"] == "arena":
            n = int(np.prod(t["shape"])) * {"int16": 2, "uint16": 2}[t["dtype"]]
            spans.append((t["offset"], t["offset"] + n, name))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "arena regions overlap"
    assert spans[-1][1] <= meta["header"]["arena_bytes"]
    assert meta["tensors"]["input"]["space"] == "in" and meta["tensors"][graph.output]["space"] == "out"
    wspans = sorted((w["offset"], w["offset"] + w["bytes"]) for w in meta["weights"].values())
    assert all(w[0] % isa.ALIGN == 0 for w in wspans) and all(a[1] <= b[0] for a, b in zip(wspans, wspans[1:]))
    assert wspans[-1][1] == meta["header"]["weight_bytes"]


def test_weight_encodings(graph, lowered):
    program, weights, meta = lower.encode(lowered)
    for op in graph.ops:
        if op.kind == "linear":
            w = meta["weights"][f"{op.name}.w"]
            fits8 = op.params["w"].min() >= -128 and op.params["w"].max() <= 127
            assert w["dtype"] == ("int8" if fits8 else "int16")
            raw = np.frombuffer(weights, w["dtype"], op.params["w"].size, w["offset"])
            assert np.array_equal(raw.reshape(op.params["w"].shape), op.params["w"])
            ins = next(i for i in meta["instructions"] if i.get("intermediate", i["name"]) == op.name)
            assert ("w16" in ins["flags"]) == (w["dtype"] == "int16")
        if op.kind == "moe":
            g = meta["weights"][f"{op.name}.gate.w"]
            assert g["tasks"] == len(graph.tasks) and g["stride"] % isa.ALIGN == 0
            for t in range(len(graph.tasks)):
                raw = np.frombuffer(weights, g["dtype"], op.params["gate_w"][t].size, g["offset"] + t * g["stride"])
                assert np.array_equal(raw.reshape(op.params["gate_w"][t].shape), op.params["gate_w"][t])
            assert meta["weights"][f"{op.name}.e0.fc1.w"]["dtype"] == "int8"


def test_attention_plan_from_score_buffer(graph, hw, cases):
    t = graph.tensors["embed"].shape[0]
    small = hw.replace(buffers=dataclasses.replace(hw.buffers, scores=2 * t * 7))
    lir = lower.lower(graph, small, lower.LoweringVerifier(graph, cases[:1]))
    _, _, meta = lower.encode(lir)
    att = [i for i in meta["instructions"] if i["op"] == "attention"]
    heads = att[0]["fields"]["heads"]
    tiles = -(-t // 7)
    assert all(i["fields"]["q_tile"] == 7 and i["plan"]["tiles_per_head"] == tiles for i in att)
    assert att[0]["plan"]["first_tile"] == [h % tiles for h in range(heads)]
    full = [n for n in lower.lower(graph, hw).nodes if n.op == "attention"]
    assert all(n.fields["q_tile"] == t for n in full)
    tiny_buf = hw.replace(buffers=dataclasses.replace(hw.buffers, scores=2 * t - 2))
    # the gate's T x N scores share the buffer and are the larger need of this model
    with pytest.raises(UsageError, match=r"blocks\.1\.moe: the gate's 25 x 4 .*exceed buffers\.scores"):
        lower.lower(graph, tiny_buf)
    dense = dataclasses.replace(graph, ops=[o for o in graph.ops if o.name.startswith(("patch_embed", "embed",
                                                                                         "blocks.0."))])
    with pytest.raises(UsageError, match=r"blocks\.0\.attn: one row of 25 16-bit scores .*buffers\.scores"):
        lower.lower(dense, tiny_buf)


def test_limits_name_the_op_and_the_limit(graph, hw):
    few = hw.replace(limits=dataclasses.replace(hw.limits, max_experts=2, max_k=2))
    with pytest.raises(UsageError, match=r"blocks\.1\.moe: 4 experts exceed limits\.max_experts = 2"):
        lower.lower(graph, few)
    with pytest.raises(UsageError, match=r"limits\.max_heads = 2"):
        lower.lower(graph, hw.replace(limits=dataclasses.replace(hw.limits, max_heads=2)))
    with pytest.raises(UsageError, match=r"limits\.max_tokens = 16"):
        lower.lower(graph, hw.replace(limits=dataclasses.replace(hw.limits, max_tokens=16)))
    with pytest.raises(UsageError, match=r"patch_embed: weights need 16 bits.*weight_bits\) has 12"):
        lower.lower(graph, hw.replace(weight_bits=12))
    with pytest.raises(UsageError, match=r"weight tile .* buffers\.weights"):
        lower.lower(graph, hw.replace(buffers=dataclasses.replace(hw.buffers, weights=1024)))


def test_patch_band_must_fit_patchify_buffer(graph, hw, monkeypatch):
    from m3vit.rtl_sim import hwconfig

    c, _, w = graph.tensors[next(o for o in graph.ops if o.kind == "patch_embed").inputs[0]].shape
    p = int(next(o for o in graph.ops if o.kind == "patch_embed").attrs["patch"])
    need = hw.patch_band_beats(c, p, w)
    assert need <= hw.patch_band_capacity
    lower.lower(graph, hw)
    monkeypatch.setattr(hwconfig, "PATCH_BAND_BYTES", (need - 1) * hw.axi_width_bits // 8)
    with pytest.raises(UsageError, match=rf"patch_embed: a band of {c} channels x {p} rows x {w} pixels takes "
                                         rf"{need} beats, more than the {need - 1} of patchify's band buffer"):
        lower.lower(graph, hw)


def test_compile_is_deterministic(graph, hw, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sa = lower.compile_qgraph(graph, hw, a)
    sb = lower.compile_qgraph(graph, hw, b)
    for f in ("program.bin", "weights.bin", "program.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert sa["instructions"] == sb["instructions"] == len(json.loads((a / "program.json").read_text())["instructions"])
    prog = (a / "program.bin").read_bytes()
    h, instrs = isa.decode_program(prog, hw_hash=hw.hash())
    assert (h.n_instr, h.weight_bytes, h.arena_bytes, h.n_tasks) == (sa["instructions"], sa["weights_bytes"],
                                                                     sa["arena_bytes"], len(graph.tasks))
    assert instrs[-1].op == "end" and len(prog) == isa.RECORD_BYTES * (1 + h.n_instr)
    with pytest.raises(UsageError, match="no such directory"):
        lower.compile_qgraph(graph, hw, tmp_path / "missing")


# ---- the encoding -------------------------------------------------------------------------------
def test_residual_aliases_round_trip():
    """gemm's res_ref / res_shifts / res_fmt are the words of queue_ref / expert / queue_shape."""
    assert isa.VERSION == 2 and isa.FLAGS["residual"] == 3
    fields = {"x_ref": isa.ref("arena", 64), "y_ref": isa.ref("arena", 128), "rows": 5, "in_dim": 8, "out_dim": 4,
              "res_ref": isa.ref("arena", 4096), "res_shifts": isa.pack_res_shifts(-3, 7),
              "res_fmt": isa.pack_fmt(16, 9)}
    flags = isa.make_flags(residual=True, bias=True)
    assert flags == 1 << 3 | 1 << 2
    ins = isa.Instr("gemm", fields, flags)
    rec = ins.encode()
    assert struct.unpack_from("<I", rec)[0] >> 11 & 1 == 1
    back = isa.decode_instr(rec)
    assert back.has("residual") and back.xmode == back.ymode == 0
    for alias, word in isa.ALIASES["gemm"].items():
        assert back.fields[alias] == back.fields[word] == fields[alias]
        assert struct.unpack_from("<I", rec, 4 * (1 + isa.FIELDS["gemm"].index(word)))[0] == fields[alias]
    assert isa.unpack_res_shifts(back.fields["res_shifts"]) == (-3, 7)
    assert isa.decode_instr(isa.Instr("gemm", back.fields, back.flags).encode()).fields == back.fields
    assert "res_ref" not in isa.decode_instr(isa.Instr("gemm", {"queue_ref": 64}, 0).encode()).fields
    with pytest.raises(ValueError, match="same word"):
        isa.Instr("gemm", {"res_ref": 64, "queue_ref": 128}, flags).encode()
    with pytest.raises(ValueError, match="16 signed bits"):
        isa.pack_res_shifts(1 << 15, 0)
    assert isa.unpack_res_shifts(isa.pack_res_shifts(-(1 << 15), (1 << 15) - 1)) == (-(1 << 15), (1 << 15) - 1)
    consts = {n: v for n, v, _ in isa.c_constants()}
    assert consts["FLAG_RESIDUAL"] == 3 and consts["VERSION"] == 2
    assert (consts["F_GEMM_RES_REF"], consts["F_GEMM_RES_SHIFTS"], consts["F_GEMM_RES_FMT"]) == \
        (consts["F_GEMM_QUEUE_REF"], consts["F_GEMM_EXPERT"], consts["F_GEMM_QUEUE_SHAPE"]) == (13, 14, 15)
    assert [consts[f"F_MOE_COMBINE_{n}"] for n in ("FMT", "RES_REF", "RES_SHIFTS", "RES_FMT")] == [9, 10, 11, 12]
    comb = isa.Instr("moe_combine", {"res_ref": 64, "res_shifts": isa.pack_res_shifts(1, -2), "res_fmt": 16},
                     isa.make_flags(residual=True))
    assert isa.decode_instr(comb.encode()).fields["res_shifts"] == isa.pack_res_shifts(1, -2)


# ---- register map and generated headers -------------------------------------------------------
def test_register_map_layout(hw):
    regs = regmap.registers()
    off = {r.name: r.offset for r in regs}
    assert [off[n] for n in ("CTRL", "GIE", "IER", "ISR", "TASK")] == [0x00, 0x04, 0x08, 0x0C, 0x10]
    assert len(set(off.values())) == len(regs) and all(o % 4 == 0 for o in off.values())
    for base in ["PROG", "WGT", "ARENA", "IN", "OUT", "CYCLES", "STALL_CYCLES", "DDR_RD_BYTES", "DDR_WR_BYTES"] + \
            [f"OP_CYCLES_{op.upper()}" for op in isa.OPCODES]:
        assert off[base + "_LO"] % 8 == 0 and off[base + "_HI"] == off[base + "_LO"] + 4
    for n in ("STATUS", "HW_HASH", "INSTR_COUNT"):
        assert n in off
    # HW_HASH reads word 2 of a Program header compiled for this configuration
    hdr = isa.Header(bytes.fromhex(hw.hash()), 0, 0, 0, 1, 0, 0).encode()
    assert struct.unpack_from("<I", hdr, 8)[0] == regmap.hw_hash32(hw)


def test_headers_render_deterministically_and_completely(hw, tmp_path):
    other = hw.replace(p_out=32)
    h = regmap.render_regmap_header(hw)
    assert h == regmap.render_regmap_header(hw) and h != regmap.render_regmap_header(other)
    for r in regmap.registers():
        assert re.search(rf"REG_{r.name} = 0x{r.offset:02X}u;", h)
        assert f"`define M3V_REG_{r.name} 8'h{r.offset:02X}" in regmap.render_regmap_svh(hw)
    isa_h, isa_svh = regmap.render_isa_header(), regmap.render_isa_svh()
    assert isa.encoding_digest() in isa_h and isa.encoding_digest() in isa_svh
    for name, value, _ in isa.c_constants():
        assert f"constexpr unsigned {name} = {value}u;" in isa_h
        assert f"`define M3V_ISA_{name} {value}" in isa_svh
    data = json.loads(regmap.render_regmap_json(hw))
    assert data["hw_hash32"] == regmap.hw_hash32(hw) and len(data["registers"]) == len(regmap.registers())
    paths = regmap.write_headers(tmp_path, hw)
    stamps = [p.stat().st_mtime_ns for p in paths]
    regmap.write_headers(tmp_path, hw)
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    if shutil.which("g++"):
        src = tmp_path / "t.cpp"
        src.write_text('#include "m3v_isa.h"\n#include "m3v_regmap.h"\n'
                       "static_assert(m3v::regmap::REG_TASK == 0x10u, \"\");\n"
                       f"static_assert(m3v::isa::OP_GEMM == {isa.OPCODES['gemm']}u, \"\");\nint main() {{}}\n")
        subprocess.run(["g++", "-std=c++14", "-fsyntax-only", "-I", str(tmp_path), str(src)], check=True)


def test_docs_carry_the_register_table(hw):
    assert regmap.render_regmap_markdown(hw) in (DOCS / "program.md").read_text()
