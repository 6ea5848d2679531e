"""The HLS kernel (m3v_decoder.h behind m3v_top) C-simulated with g++ against the golden model:
every task of the tiny preset, several inputs, every canonical tensor through the arena dump;
refusals (another hardware configuration, bad magic / version / task / opcode, sizes); the
comparison failing on a corrupted weight. One testbench build (per hardware configuration,
cached by source hash) serves every test here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from m3vit.compiler import isa
from m3vit.compiler import qgraph as qg
from m3vit.compiler.from_torch import build_qgraph
from m3vit.compiler.lower import compile_qgraph
from m3vit.compiler.quantize import calibrate, calibration_images
from m3vit.errors import UsageError
from m3vit.hls import csim
from m3vit.hls.project import decoder_buffers, emit_project
from m3vit.model.config import resolve_config
from m3vit.model.vit import build_model
from m3vit.rtl_sim.hwconfig import Buffers, HwConfig


def make_build(out: Path, hw: HwConfig, preset: str = "tiny", seed: int = 0, overrides=None, fuse: bool = True) -> Path:
    """What `m3vit compile` writes, from a PyTorch model (the ONNX path is tested elsewhere)."""
    torch.manual_seed(seed)
    cfg = resolve_config(preset, overrides=overrides or [])
    model = build_model(cfg).eval()
    graph = build_qgraph(model, calibrate(model, calibration_images(cfg.img_size, 4)))
    out.mkdir(parents=True, exist_ok=True)
    qg.save(graph, out / "qgraph")
    compile_qgraph(graph, hw, out, fuse=fuse)
    emit_project(out / "hls", hw, out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_build(tmp_path_factory.mktemp("csim") / "tiny", HwConfig.default())


@pytest.fixture(scope="module")
def exe(tiny):
    return csim.build_testbench(tiny / "hls")[0]


def _cli(argv: list[str], capsys) -> tuple[int, dict]:
    p = argparse.ArgumentParser()
    csim.add_csim_args(p)
    rc = csim.cli_csim(p.parse_args(argv + ["--json"]))
    return rc, json.loads(capsys.readouterr().out)


def test_tiny_every_task_several_inputs_traced_bit_exact(tiny, exe, tmp_path, capsys):
    from PIL import Image

    graph = qg.load(tiny / "qgraph")
    c, h, w = graph.input.shape
    rng = np.random.default_rng(5)
    np.save(tmp_path / "noise.npy", rng.uniform(-2.5, 2.5, (c, h, w)).astype(np.float32))
    # a saturating input: far outside the calibrated range
    np.save(tmp_path / "loud.npy", rng.choice([-40.0, 40.0], (c, h, w)).astype(np.float32))
    Image.fromarray(rng.integers(0, 256, (h + 7, w + 3, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    for extra in ([], ["--input", str(tmp_path / "noise.npy")], ["--input", str(tmp_path / "loud.npy")],
                  ["--input", str(tmp_path / "img.png")]):
        rc, r = _cli([str(tiny), "--trace", *extra], capsys)
        assert rc == 0 and r["bit_exact"] is True and r["mismatches"] == 0, (extra, r["first_mismatch"])
        assert [e["task"] for e in r["tasks"]] == list(graph.tasks)
        n_traced = len(json.loads((tiny / "program.json").read_text())["trace"]) - 1
        for e in r["tasks"]:
            assert e["tensors_compared"] == n_traced and e["output_mismatches"] == 0
        assert r["seconds"] > 0 and r["seconds_per_frame"] > 0


def test_arena_equals_the_python_program_executor(tiny, exe):
    """Byte for byte, the whole arena (queue tables, top-k, logits, padding included) and the
    output equal those of compiler/program_exec.py, the reference executor of Programs."""
    from m3vit.compiler.program_exec import execute_build

    graph = qg.load(tiny / "qgraph")
    x = csim.quantized_input(graph, csim.default_image(graph))
    for task in range(len(graph.tasks)):
        r = csim.run_testbench(exe, tiny, x, task, arena=True)
        ref = execute_build(tiny, x, task, hw_hash=HwConfig.default().hash())
        assert r["status"] == 0
        assert r["arena"] == bytes(ref.memories["arena"])
        assert r["output"] == bytes(ref.memories["out"])


def test_single_task_by_name_and_index(tiny, exe, capsys):
    graph = qg.load(tiny / "qgraph")
    rc, r = _cli([str(tiny), "--task", graph.tasks[-1]], capsys)
    assert rc == 0 and [e["task"] for e in r["tasks"]] == [graph.tasks[-1]]
    rc, r = _cli([str(tiny), "--task", "0"], capsys)
    assert rc == 0 and [e["task"] for e in r["tasks"]] == [graph.tasks[0]]
    with pytest.raises(UsageError, match="task 'nope'"):
        _cli([str(tiny), "--task", "nope"], capsys)


def test_corrupted_weight_is_reported_at_its_layer(tiny, exe, tmp_path, capsys):
    """The comparison can fail: one flipped weight byte of the first qkv GEMM shows up at that
    tensor first, and the command exits 1."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    meta = json.loads((bad / "program.json").read_text())
    gemm = next(i for i in meta["instructions"] if i["op"] == "gemm" and i["name"] == "blocks.0.attn.qkv")
    _, off = isa.split_ref(gemm["fields"]["w_ref"])
    weights = bytearray((bad / "weights.bin").read_bytes())
    weights[off] ^= 0x40
    (bad / "weights.bin").write_bytes(bytes(weights))
    rc, r = _cli([str(bad), "--trace", "--task", "0"], capsys)
    assert rc == 1 and r["bit_exact"] is False and r["mismatches"] > 0
    assert r["first_mismatch"]["tensor"] == "blocks.0.attn.qkv"
    rc, r = _cli([str(bad), "--task", "0"], capsys)  # without the trace: the output still differs
    assert rc == 1 and r["tasks"][0]["output_mismatches"] > 0


def test_project_of_a_build_is_reproducible(tiny, exe):
    """Emitting the project again for the same build gives the same bytes; its C-sim vectors are
    the build's Program and the default image."""
    again = emit_project(tiny / "hls_again", HwConfig.default(), tiny)
    for p in sorted((tiny / "hls").iterdir()):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    graph = qg.load(tiny / "qgraph")
    x = csim.quantized_input(graph, csim.default_image(graph))
    assert (again / "tb_input.bin").read_bytes() == x.astype("<i2").tobytes()
    assert "../program.bin" in (again / "run_hls.tcl").read_text()
    depth = dict(re.findall(r"#define M3V_DEPTH_(\w+) (\d+)", (again / "m3v_depth.h").read_text()))
    assert int(depth["WGT"]) * 16 >= (tiny / "weights.bin").stat().st_size


@pytest.mark.parametrize("over", [
    # k = N, odd widths, one head per 10 channels, three tasks with task-conditioned routing
    ["dim=30", "heads=3", "num_experts=3", "top_k=3", "mlp_hidden=21", "expert_hidden=13", "patch=4",
     "img_size=12x20", "depth=2", "routing=task-conditioned", "tasks=a:2,b:3,c:1"],
    # k = 1 of 5 experts, one head, a single task
    ["dim=20", "heads=1", "num_experts=5", "top_k=1", "mlp_hidden=9", "expert_hidden=7", "patch=5",
     "img_size=10x25", "depth=2", "tasks=only:2"],
])
def test_odd_configurations_bit_exact(over, exe, tmp_path):
    b = make_build(tmp_path / "odd", HwConfig.default(), seed=11, overrides=over)
    r = csim.run_csim(b, trace=True)
    assert r["bit_exact"] and r["mismatches"] == 0, r["first_mismatch"]
    assert len(r["tasks"]) == over[-1].count(":") and all(e["tensors_compared"] > 10 for e in r["tasks"])


def test_default_hw_buffers_fit_hw_json():
    hw = HwConfig.default()
    b = decoder_buffers(hw)
    assert b["weights"] <= hw.buffers.weights and b["activations"] <= hw.buffers.activations
    assert b["scores"] <= hw.buffers.scores
    assert b["total"] <= hw.buffers.weights + hw.buffers.activations + hw.buffers.scores


def test_small_buffers_tile_every_op_bit_exact(tmp_path):
    """A hw.json whose buffers force every streaming path: 4-row blocks (25 tokens, one expert's
    queue), a 3 x 5 array (in and out widths of several P_OUT groups, none divisible), key tiles
    of the attention (a head's K and V [25, 16] do not fit what buffers.activations leaves) and
    query tiles of 5 rows."""
    base = HwConfig.default()
    lim = dataclasses.replace(base.limits, max_tokens=32, max_dim=48, max_hidden=192, max_experts=4, max_k=2,
                              max_heads=4)
    hw = base.replace(p_in=3, p_out=5, token_block=4, limits=lim,
                      buffers=Buffers(weights=4096, activations=5632, scores=512))
    buf = decoder_buffers(hw)
    assert buf["total"] <= 4096 + 5632 + 512
    keys_per_tile = buf["kv_elems"] // 16  # tiny: dim 48, 3 heads
    assert 1 < keys_per_tile < 25 // 2, keys_per_tile
    b = make_build(tmp_path / "small", hw, seed=5)
    r = csim.run_csim(b, trace=True)
    assert r["bit_exact"] and r["mismatches"] == 0, r["first_mismatch"]
    assert len(r["tasks"]) == 2 and all(e["tensors_compared"] > 50 for e in r["tasks"])
    cfg = (b / "hls" / "m3v_config.h").read_text()
    assert "TOKEN_BLOCK = 4;" in cfg and "BUF_ACTIVATIONS = 5632;" in cfg and "BUF_SCORES = 512;" in cfg
    assert f"ONCHIP_BYTES = {buf['total']};" in (b / "hls" / "m3v_build.h").read_text()


def test_build_is_cached(tiny, exe):
    again, secs, built = csim.build_testbench(tiny / "hls")
    assert again == exe and not built and secs < 5


def _status(exe: Path, build: Path, task: int = 0, program: bytes | None = None, inp: bytes | None = None) -> int:
    """The testbench's status for (a variant of) the build's Program."""
    d = build.parent / "variant"
    d.mkdir(exist_ok=True)
    (d / "program.bin").write_bytes(program if program is not None else (build / "program.bin").read_bytes())
    shutil.copy(build / "weights.bin", d / "weights.bin")
    graph = qg.load(build / "qgraph")
    x = inp if inp is not None else csim.quantized_input(graph, csim.default_image(graph)).astype("<i2").tobytes()
    return csim.run_testbench(exe, d, np.frombuffer(x, "<i2"), task, False)["status"]


def _word(blob: bytes, i: int, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into("<I", b, 4 * i, value)
    return bytes(b)


def test_refusals_carry_the_status_codes(tiny, exe):
    prog = (tiny / "program.bin").read_bytes()
    S = isa.STATUS
    assert _status(exe, tiny) == S["ok"]
    assert _status(exe, tiny, program=_word(prog, 0, 0x12345678)) == S["bad_magic"]
    assert _status(exe, tiny, program=_word(prog, 1, isa.VERSION + 1)) == S["bad_version"]
    assert _status(exe, tiny, program=_word(prog, 2, struct.unpack_from("<I", prog, 8)[0] ^ 1)) == S["hw_mismatch"]
    n_tasks = struct.unpack_from("<I", prog, 4 * 13)[0]
    assert _status(exe, tiny, task=n_tasks) == S["bad_task"]
    assert _status(exe, tiny, task=-1) == S["bad_task"]
    # the first instruction's opcode replaced by an undefined one
    assert _status(exe, tiny, program=_word(prog, isa.WORDS, 0x7F)) == S["bad_opcode"]
    # an arena announced smaller than the Program's tensors: an access past its end
    assert _status(exe, tiny, program=_word(prog, 12, 64)) == S["over_limit"]
    # an input of the wrong size
    assert _status(exe, tiny, inp=b"\0" * 6) == S["over_limit"]
    # corrupt sizes and strides are refused, not wrapped around: patchify's channels, a GEMM's x_ld
    meta = json.loads((tiny / "program.json").read_text())
    for op, field, value in (("patchify", "channels", 0x7FFFFFFF), ("patchify", "height", 0xFFFFFFF0),
                             ("gemm", "x_ld", 0x40000), ("gemm", "out_dim", 0x80000001), ("attention", "heads", 0)):
        i = next(ins["index"] for ins in meta["instructions"] if ins["op"] == op)
        word = isa.WORDS * (1 + i) + 1 + isa.FIELDS[op].index(field)
        assert _status(exe, tiny, program=_word(prog, word, value)) == S["over_limit"], (op, field)


def _unfused(tiny: Path, out: Path) -> Path:
    """The tiny build's graph compiled without residual fusion, beside the same HLS project."""
    out.mkdir()
    graph = qg.load(tiny / "qgraph")
    compile_qgraph(graph, HwConfig.default(), out, fuse=False)
    qg.save(graph, out / "qgraph")
    shutil.copytree(tiny / "hls", out / "hls")
    return out


def test_unfused_program_bit_exact_and_equal_to_the_fused_one(tiny, exe, tmp_path):
    """Fused (the default) and unfused Programs of one graph: both traced bit-exact, the same output
    bytes, and the same bytes in every tensor both trace."""
    from m3vit.compiler.program_exec import read_tensor

    plain = _unfused(tiny, tmp_path / "plain")
    graph = qg.load(tiny / "qgraph")
    mf, mu = (json.loads((d / "program.json").read_text()) for d in (tiny, plain))
    adds = sum(o.kind == "add" for o in graph.ops)
    assert len(mu["trace"]) == len(graph.trace_names()) == len(mf["trace"]) + adds
    r = csim.run_csim(plain, trace=True)
    assert r["bit_exact"] and all(e["tensors_compared"] == len(mu["trace"]) - 1 for e in r["tasks"])
    x = csim.quantized_input(graph, csim.default_image(graph))
    for task in range(len(graph.tasks)):
        a = csim.run_testbench(exe, tiny, x, task, arena=True)
        b = csim.run_testbench(exe, plain, x, task, arena=True)
        assert a["status"] == b["status"] == 0 and a["output"] == b["output"]
        sa = {"wgt": (tiny / "weights.bin").read_bytes(), "arena": a["arena"], "in": b"", "out": a["output"]}
        sb = {"wgt": (plain / "weights.bin").read_bytes(), "arena": b["arena"], "in": b"", "out": b["output"]}
        for name in mf["trace"][1:]:
            assert np.array_equal(read_tensor(sa, mf, name), read_tensor(sb, mu, name)), name


def test_fused_instruction_refusals_agree_with_the_python_executor(tiny, exe):
    """Residual with a queue mode is bad_opcode; a residual operand past its space or a residual
    format wider than the activations is over_limit: the same status as compiler/program_exec.py."""
    from m3vit.compiler import program_exec as px

    prog = (tiny / "program.bin").read_bytes()
    meta = json.loads((tiny / "program.json").read_text())
    weights = (tiny / "weights.bin").read_bytes()
    graph = qg.load(tiny / "qgraph")
    x = csim.quantized_input(graph, csim.default_image(graph))
    ins = meta["instructions"]
    g = next(i for i in ins if i["op"] == "gemm" and i.get("fused"))
    e = next(i for i in ins if i["op"] == "gemm" and i["xmode"] != "direct")
    c = next(i for i in ins if i["op"] == "moe_combine" and i.get("fused"))
    res = 1 << (8 + isa.FLAGS["residual"])
    end = isa.ref("arena", (meta["header"]["arena_bytes"] - 64) // 64 * 64)

    def field(i, name):
        op = i["op"]
        return isa.WORDS * (1 + i["index"]) + 1 + isa.FIELDS[op].index(isa.ALIASES.get(op, {}).get(name, name))

    cases = [("bad_opcode", isa.WORDS * (1 + e["index"]), e["word0"] | res),
             ("bad_opcode", isa.WORDS * (1 + g["index"]), g["word0"] | isa.make_flags(xmode="gather") << 8),
             ("bad_opcode", isa.WORDS * (1 + g["index"]), g["word0"] | isa.make_flags(ymode="queue") << 8)]
    for i in (g, c):
        cases += [("over_limit", field(i, "res_ref"), end), ("over_limit", field(i, "res_fmt"), isa.pack_fmt(20, 8))]
    for status, word, value in cases:
        bad = _word(prog, word, value)
        assert _status(exe, tiny, program=bad) == isa.STATUS[status], (status, word)
        with pytest.raises(px.ProgramError) as err:
            px.execute(bad, weights, x, 0)
        assert err.value.status == isa.STATUS[status]


def test_idle_experts_and_the_weight_prefetch_bit_exact(tiny, exe, tmp_path):
    """A gate bias that leaves experts 1 and 3 of every MoE layer idle: the kernel's look-ahead
    passes over their GEMMs to prefetch the next active expert's weights; the arena and the output
    stay byte-equal to the Python executor's and the trace to the golden model."""
    from m3vit.compiler import program_exec as px

    graph = qg.load(tiny / "qgraph")
    g = dataclasses.replace(graph, ops=[dataclasses.replace(o, params=dict(o.params)) for o in graph.ops], bounds={})
    for op in g.ops:
        if op.kind == "moe":
            gb = op.params["gate_b"].copy()
            gb[:, 2] += 1 << 40
            gb[:, 0] += 1 << 39
            op.params["gate_b"] = gb
    g.validate()
    d = tmp_path / "idle"
    d.mkdir()
    compile_qgraph(g, HwConfig.default(), d)
    qg.save(g, d / "qgraph")
    shutil.copytree(tiny / "hls", d / "hls")
    x = csim.quantized_input(g, csim.default_image(g))
    moe = next(o.name for o in g.ops if o.kind == "moe")
    for task in range(len(g.tasks)):
        ref = px.execute_build(d, x, task, hw_hash=HwConfig.default().hash(), trace=True)
        assert ref.trace[f"{moe}.e1.fc1"].shape[0] == ref.trace[f"{moe}.e3.fc2"].shape[0] == 0
        r = csim.run_testbench(exe, d, x, task, arena=True)
        assert r["status"] == 0 and r["arena"] == bytes(ref.memories["arena"])
        assert r["output"] == bytes(ref.memories["out"])
    rep = csim.run_csim(d, trace=True)
    assert rep["bit_exact"] and rep["mismatches"] == 0, rep["first_mismatch"]


def test_a_faulting_next_gemm_is_refused_by_itself(tiny, exe):
    """The weights of the second GEMM past the end of wgt: its prefetch during the first GEMM
    fails quietly, the first GEMM completes, and the second ends the run with over_limit, as in
    the Python executor."""
    from m3vit.compiler import program_exec as px

    prog = (tiny / "program.bin").read_bytes()
    meta = json.loads((tiny / "program.json").read_text())
    weights = (tiny / "weights.bin").read_bytes()
    second = [i for i in meta["instructions"] if i["op"] == "gemm"][1]
    word = isa.WORDS * (1 + second["index"]) + 1 + isa.FIELDS["gemm"].index("w_ref")
    bad = _word(prog, word, isa.ref("wgt", len(weights) // 64 * 64))
    assert _status(exe, tiny, program=bad) == isa.STATUS["over_limit"]
    graph = qg.load(tiny / "qgraph")
    with pytest.raises(px.ProgramError) as err:
        px.execute(bad, weights, csim.quantized_input(graph, csim.default_image(graph)), 0)
    assert err.value.status == isa.STATUS["over_limit"] and f"instruction {second['index']}" in str(err.value)


def test_program_for_another_hw_config_is_refused(tiny, exe, tmp_path):
    """A Program compiled for a 16 x 16 array, run by the kernel built for the default hw.json."""
    other = HwConfig.default().with_parallel("16x16")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    graph = qg.load(tiny / "qgraph")
    compile_qgraph(graph, other, foreign)
    qg.save(graph, foreign / "qgraph")
    shutil.copytree(tiny / "hls", foreign / "hls")
    with pytest.raises(UsageError, match="another hardware configuration.*recompile"):
        csim.run_csim(foreign, tasks=[0])
    assert _status(exe, foreign) == isa.STATUS["hw_mismatch"]


def test_usage_errors_name_the_folder_or_file(tiny, tmp_path):
    with pytest.raises(UsageError, match="no program.bin"):
        csim.run_csim(tmp_path)
    (tmp_path / "x.npy").write_bytes(b"junk")
    with pytest.raises(UsageError, match="x.npy"):
        csim.load_input(tmp_path / "x.npy", qg.load(tiny / "qgraph"))


@pytest.mark.slow
def test_narrow_axi_single_port_small_array_bit_exact(tmp_path):
    """A second hardware configuration: 32-bit AXI (64-bit biases span two words), one m_axi port,
    a 8 x 12 array that divides none of the tiny model's widths."""
    hw = HwConfig.default().replace(axi_width_bits=32, axi_ports=1, p_in=8, p_out=12)
    b = make_build(tmp_path / "narrow", hw, seed=3)
    r = csim.run_csim(b, trace=True)
    assert r["bit_exact"] and r["mismatches"] == 0, r["first_mismatch"]


@pytest.mark.slow
def test_edge_moe_bit_exact(tmp_path):
    b = make_build(tmp_path / "edge", HwConfig.default(), preset="edge-moe")
    r = csim.run_csim(b, trace=True)
    print(f"edge-moe C-sim: {r['seconds_per_frame']:.2f} s per frame")
    assert r["bit_exact"] and r["mismatches"] == 0, r["first_mismatch"]
