"""The Python Program executor: bit-exact with the golden model on every task and several inputs
(output and every traced tensor, read back from the arena), and every refusal with its status."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from m3vit.compiler import golden, isa, lower
from m3vit.compiler import program_exec as px
from m3vit.compiler.fidelity import eval_images
from m3vit.compiler.from_torch import build_qgraph
from m3vit.compiler.numerics import SatCounter
from m3vit.compiler.quantize import calibrate, calibration_images
from m3vit.model.config import resolve_config
from m3vit.model.vit import build_model
from m3vit.rtl_sim.hwconfig import HwConfig


@pytest.fixture(scope="module")
def graph():
    cfg = resolve_config("tiny", overrides={"routing": "task-conditioned"})
    model = build_model(cfg)
    return build_qgraph(model, calibrate(model, calibration_images(cfg.img_size, 8)))


@pytest.fixture(scope="module")
def build(graph, tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    hw = HwConfig.default()
    lower.compile_qgraph(graph, hw, d)
    return hw, d, (d / "program.bin").read_bytes(), (d / "weights.bin").read_bytes(), \
        json.loads((d / "program.json").read_text())


def _inputs(graph):
    imgs = [golden.quantize_input(graph, im) for _, im in eval_images(tuple(graph.input.shape[1:]), 3)]
    fmt = graph.input.fmt
    rng = np.random.default_rng(11)
    imgs.append(rng.integers(fmt.min, fmt.max + 1, graph.input.shape))
    imgs.append(rng.integers(fmt.min // 64, fmt.max // 64, graph.input.shape))
    return imgs


def test_bit_exact_every_task_every_tensor(graph, build):
    hw, d, _, _, meta = build
    traced = lower.trace_subset(meta, graph.trace_names())
    # every name but the intermediates of the fused residual adds
    assert len(traced) == len(graph.trace_names()) - sum(o.kind == "add" for o in graph.ops)
    checked = 0
    for img in _inputs(graph):
        for task in range(len(graph.tasks)):
            ref_out, ref = golden.run(graph, img, task, trace=True, stats=SatCounter())
            res = px.execute_build(d, img, task, hw_hash=hw.hash(), trace=True)
            assert list(res.trace) == traced
            for name in traced:
                assert res.trace[name].shape == ref[name].shape, name
                assert np.array_equal(res.trace[name], ref[name]), f"{name}, task {task}"
            assert np.array_equal(res.output, ref_out)
            assert res.executed == meta["header"]["n_instr"]
            checked += len(res.trace)
    assert checked == 5 * len(graph.tasks) * len(traced)


@pytest.fixture(scope="module")
def unfused(graph, tmp_path_factory):
    d = tmp_path_factory.mktemp("unfused")
    lower.compile_qgraph(graph, HwConfig.default(), d, fuse=False)
    return d, json.loads((d / "program.json").read_text())


def test_fused_and_unfused_programs_agree(graph, build, unfused):
    """The same outputs and the same bits in every tensor both Programs trace; the unfused one
    traces every golden name, the fused one saves an instruction and a tensor per residual add."""
    hw, d, _, _, meta = build
    d0, meta0 = unfused
    adds = sum(o.kind == "add" for o in graph.ops)
    assert meta0["trace"] == graph.trace_names() and not any(i.get("fused") for i in meta0["instructions"])
    assert meta["header"]["n_instr"] == meta0["header"]["n_instr"] - adds
    assert meta["header"]["arena_bytes"] < meta0["header"]["arena_bytes"]
    assert (d / "weights.bin").read_bytes() == (d0 / "weights.bin").read_bytes()
    for img in _inputs(graph)[:3]:
        for task in range(len(graph.tasks)):
            a = px.execute_build(d, img, task, hw_hash=hw.hash(), trace=True)
            b = px.execute_build(d0, img, task, hw_hash=hw.hash(), trace=True)
            assert np.array_equal(a.output, b.output)
            assert set(a.trace) < set(b.trace)
            for name in a.trace:
                assert np.array_equal(a.trace[name], b.trace[name]), name


def test_trace_subset_refuses_a_short_or_foreign_trace(graph, build):
    meta = build[4]
    names = graph.trace_names()
    with pytest.raises(ValueError, match="traces no tensor"):
        lower.trace_subset({**meta, "trace": []}, names)
    with pytest.raises(ValueError, match="does not trace blocks.0.norm1"):
        lower.trace_subset({**meta, "trace": [n for n in meta["trace"] if n != "blocks.0.norm1"]}, names)
    with pytest.raises(ValueError, match="golden model does not produce"):
        lower.trace_subset({**meta, "trace": meta["trace"] + ["nowhere"]}, names)
    # a fusion record is what excuses a missing name
    plain = [{k: v for k, v in i.items() if k not in ("fused", "intermediate")} for i in meta["instructions"]]
    with pytest.raises(ValueError, match="attn.proj"):
        lower.trace_subset({**meta, "instructions": plain}, names)


def _patch(program: bytes, index: int, **changes) -> bytes:
    """Instruction ``index`` (0-based, after the header) with fields or word 0 replaced."""
    at = isa.RECORD_BYTES * (1 + index)
    words = list(struct.unpack(f"<{isa.WORDS}I", program[at:at + isa.RECORD_BYTES]))
    op = isa.OPCODE_NAMES[words[0] & 0xFF]
    for k, v in changes.items():
        if k == "word0":
            words[0] = v
        else:
            words[1 + isa.FIELDS[op].index(isa.ALIASES.get(op, {}).get(k, k))] = v & 0xFFFFFFFF
    return program[:at] + struct.pack(f"<{isa.WORDS}I", *words) + program[at + isa.RECORD_BYTES:]


def test_fused_instruction_refusals(graph, build):
    hw, _, program, weights, meta = build
    img = _inputs(graph)[0]
    ins = meta["instructions"]
    g = next(i for i in ins if i["op"] == "gemm" and i.get("fused"))
    e = next(i for i in ins if i["op"] == "gemm" and i["xmode"] != "direct")
    c = next(i for i in ins if i["op"] == "moe_combine" and i.get("fused"))
    # residual with a queue mode is not an encoding
    _refused("bad_opcode", _patch(program, e["index"], word0=e["word0"] | 1 << (8 + isa.FLAGS["residual"])),
             weights, img)
    for mode in (isa.make_flags(xmode="gather"), isa.make_flags(ymode="scatter")):
        _refused("bad_opcode", _patch(program, g["index"], word0=g["word0"] | mode << 8), weights, img)
    # the residual operand past the end of its space, and a residual format wider than 16 bits
    end = isa.ref("arena", (meta["header"]["arena_bytes"] - 64) // 64 * 64)
    for i in (g, c):
        _refused("over_limit", _patch(program, i["index"], res_ref=end), weights, img)
        _refused("over_limit", _patch(program, i["index"], res_fmt=isa.pack_fmt(20, 8)), weights, img)


def test_fused_shifts_and_operand_are_used(graph, build):
    """Each field of a fused instruction changes the result: the shifts, the operand, the format."""
    hw, _, program, weights, meta = build
    img = _inputs(graph)[0]
    good = px.execute(program, weights, img, 0, meta=meta).output
    ins = meta["instructions"]
    for i in (next(i for i in ins if i["op"] == k and i.get("fused")) for k in ("gemm", "moe_combine")):
        a, b = isa.unpack_res_shifts(i["fields"]["res_shifts"])
        for changed in (dict(res_shifts=isa.pack_res_shifts(a + 1, b)), dict(res_shifts=isa.pack_res_shifts(a, b - 1)),
                        dict(res_ref=meta["tensors"]["blocks.0.norm1"]["ref"]),
                        dict(res_fmt=isa.pack_fmt(6, isa.unpack_fmt(i["fields"]["res_fmt"])[1]))):
            out = px.execute(_patch(program, i["index"], **changed), weights, img, 0, meta=meta).output
            assert not np.array_equal(out, good), (i["name"], changed)


def test_tasks_route_differently(graph, build):
    """The TASK register alone selects the gate: the same image routes differently per task."""
    hw, d, *_ = build
    img = _inputs(graph)[0]
    moe = next(o.name for o in graph.ops if o.kind == "moe")
    a = px.execute_build(d, img, 0, trace=True).trace[f"{moe}.gate"]
    b = px.execute_build(d, img, 1, trace=True).trace[f"{moe}.gate"]
    assert not np.array_equal(a, b)


def test_a_corrupt_weight_changes_the_result(graph, build):
    hw, _, program, weights, meta = build
    img = _inputs(graph)[0]
    w = meta["weights"]["blocks.0.attn.qkv.w"]
    bad = bytearray(weights)
    bad[w["offset"]] ^= 0x40
    good = px.execute(program, weights, img, 0, meta=meta).output
    assert not np.array_equal(px.execute(program, bytes(bad), img, 0, meta=meta).output, good)


def _refused(status, program, weights, img, task=0, **kw):
    with pytest.raises(px.ProgramError) as e:
        px.execute(program, weights, img, task, **kw)
    assert e.value.status == isa.STATUS[status] and "\n" not in str(e.value)
    return str(e.value)


def test_refusals_carry_the_status(graph, build):
    hw, _, program, weights, meta = build
    img = _inputs(graph)[0]
    bad_magic = b"XXXX" + program[4:]
    _refused("bad_magic", bad_magic, weights, img)
    bad_version = program[:4] + struct.pack("<I", isa.VERSION + 1) + program[8:]
    _refused("bad_version", bad_version, weights, img)
    other = hw.replace(p_out=32)
    msg = _refused("hw_mismatch", program, weights, img, hw_hash=other.hash())
    assert "recompile" in msg
    _refused("bad_task", program, weights, img, task=len(graph.tasks))
    _refused("bad_task", program, weights, img, task=-1)
    rec = isa.RECORD_BYTES * 3
    bad_op = program[:rec] + bytes([0x7F]) + program[rec + 1:]
    _refused("bad_opcode", bad_op, weights, img)
    _refused("over_limit", program, weights[:-64], img)
    # a ref past its space
    ins = isa.decode_instr(program[isa.RECORD_BYTES * 2:isa.RECORD_BYTES * 3])
    assert ins.op == "gemm"
    words = list(struct.unpack(f"<{isa.WORDS}I", program[isa.RECORD_BYTES * 2:isa.RECORD_BYTES * 3]))
    words[1 + isa.FIELDS["gemm"].index("w_ref")] = isa.ref("wgt", (len(weights) // 64) * 64)
    far = program[:isa.RECORD_BYTES * 2] + struct.pack(f"<{isa.WORDS}I", *words) + program[isa.RECORD_BYTES * 3:]
    _refused("over_limit", far, weights, img)
    # a store into the read-only weight space
    words = list(struct.unpack(f"<{isa.WORDS}I", program[isa.RECORD_BYTES * 2:isa.RECORD_BYTES * 3]))
    words[1 + isa.FIELDS["gemm"].index("y_ref")] = isa.ref("wgt", 0)
    store = program[:isa.RECORD_BYTES * 2] + struct.pack(f"<{isa.WORDS}I", *words) + program[isa.RECORD_BYTES * 3:]
    assert "read-only wgt" in _refused("over_limit", store, weights, img)


def test_program_for_another_hw_config_is_refused(graph, build, tmp_path):
    hw, d, program, weights, meta = build
    other = hw.replace(p_out=32)
    lower.compile_qgraph(graph, other, tmp_path)
    img = _inputs(graph)[0]
    _refused("hw_mismatch", (tmp_path / "program.bin").read_bytes(), (tmp_path / "weights.bin").read_bytes(), img,
             hw_hash=hw.hash())
    # the same model for the other configuration computes the same bits
    res = px.execute_build(tmp_path, img, 1, hw_hash=other.hash())
    assert np.array_equal(res.output, golden.run(graph, img, 1, stats=SatCounter())[0])


def test_trace_reads_the_arena_dump(graph, build):
    """The trace is the arena read through the tensor map: clobbering a tensor's bytes shows up."""
    hw, _, program, weights, meta = build
    img = _inputs(graph)[0]
    res = px.execute(program, weights, img, 0, meta=meta)
    t = meta["tensors"]["blocks.0.norm1"]
    res.memories["arena"][t["offset"]:t["offset"] + 2] = b"\x00\x00"
    before = golden.run(graph, img, 0, trace=True, stats=SatCounter())[1]["blocks.0.norm1"]
    got = px.read_tensor(res.memories, meta, "blocks.0.norm1")
    assert got[0, 0] == 0 and np.array_equal(got.reshape(-1)[1:], before.reshape(-1)[1:])


def test_validated_inputs():
    """Executor guards that need no build: a too-short Program is bad magic."""
    with pytest.raises(px.ProgramError) as e:
        px.execute(b"M3", b"", np.zeros((1,), np.int16), 0)
    assert e.value.status == isa.STATUS["bad_magic"]


@pytest.mark.slow
def test_edge_moe_frame_bit_exact(tmp_path):
    """The full-size preset: every canonical tensor of one frame per task, and the frame time."""
    import time

    cfg = resolve_config("edge-moe")
    model = build_model(cfg)
    imgs = calibration_images(cfg.img_size, 2)
    graph = build_qgraph(model, calibrate(model, imgs))
    hw = HwConfig.default()
    lower.compile_qgraph(graph, hw, tmp_path)
    img = golden.quantize_input(graph, imgs[0][1])
    for task in range(len(graph.tasks)):
        _, ref = golden.run(graph, img, task, trace=True, stats=SatCounter())
        start = time.perf_counter()
        res = px.execute_build(tmp_path, img, task, hw_hash=hw.hash(), trace=True)
        assert time.perf_counter() - start < 30
        meta = json.loads((tmp_path / "program.json").read_text())
        assert list(res.trace) == lower.trace_subset(meta, list(ref))
        for name in res.trace:
            assert np.array_equal(res.trace[name], ref[name]), f"{name}, task {task}"
