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
    checked = 0
    for img in _inputs(graph):
        for task in range(len(graph.tasks)):
            ref_out, ref = golden.run(graph, img, task, trace=True, stats=SatCounter())
            res = px.execute_build(d, img, task, hw_hash=hw.hash(), trace=True)
            assert list(res.trace) == list(ref) == graph.trace_names()
            for name in ref:
                assert res.trace[name].shape == ref[name].shape, name
                assert np.array_equal(res.trace[name], ref[name]), f"{name}, task {task}"
            assert np.array_equal(res.output, ref_out)
            assert res.executed == meta["header"]["n_instr"]
            checked += len(ref)
    assert checked == 5 * len(graph.tasks) * len(graph.trace_names())


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
        for name in ref:
            assert np.array_equal(res.trace[name], ref[name]), f"{name}, task {task}"
