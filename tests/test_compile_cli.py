"""`m3vit compile` end to end on the tiny preset: the build folder, determinism, atomicity, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m3vit.cli import main
from m3vit.compiler import golden, isa
from m3vit.compiler.numerics import SatCounter
from m3vit.compiler import qgraph as qg
from m3vit.model.config import resolve_config
from m3vit.model.export import export_onnx
from m3vit.model.vit import build_model
from m3vit.rtl_sim.hwconfig import HwConfig


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """The multi-task backbone of the tiny preset, as `m3vit export --all-tasks` writes it."""
    import torch

    torch.manual_seed(0)
    model = build_model(resolve_config("tiny")).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, path, all_tasks=True)
    return path


def _compile(onnx: Path, out: Path, *extra: str) -> int:
    return main(["compile", str(onnx), "--out", str(out), "--calib-images", "2", "--json", *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_folder_is_complete_and_deterministic(tiny_onnx, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _compile(tiny_onnx, a) == 0
    summary = json.loads(capsys.readouterr().out)
    assert _compile(tiny_onnx, b) == 0
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    for name in ("program.bin", "program.json", "weights.bin", "qgraph.json", "qgraph.npz", "hw.json",
                 "schedule.json", "summary.json", "hls/run_hls.tcl"):
        assert name in fa, name
    # the Program is built for the configuration the folder records
    hw = HwConfig.from_dict(json.loads(fa["hw.json"]))
    header, instrs = isa.decode_program(fa["program.bin"], hw_hash=hw.hash())
    assert header.n_instr == len(instrs) and instrs[-1].op == "end"
    assert summary["tasks"] == list(resolve_config("tiny").task_names)
    assert summary["estimated_cycles"] > 0
    # nothing temporary is left next to the folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_the_program_runs_the_graph_bit_exactly(tiny_onnx, tmp_path):
    """The folder's Program, run by the Python executor, gives the golden model's bits on the
    folder's quantized graph, for every task."""
    from m3vit.compiler.program_exec import execute_build

    out = tmp_path / "build"
    assert _compile(tiny_onnx, out) == 0
    graph = qg.load(out / "qgraph")
    hw = HwConfig.from_dict(json.loads((out / "hw.json").read_text()))
    x = golden.quantize_input(graph, np.random.default_rng(3).standard_normal(graph.input.shape), SatCounter())
    for t in range(len(graph.tasks)):
        want, _ = golden.run(graph, x, t, stats=SatCounter())
        got = execute_build(out, x, t, hw_hash=hw.hash()).output
        assert np.array_equal(got, want)


def test_no_fuse_keeps_the_residual_adds(tiny_onnx, tmp_path, capsys):
    """--no-fuse: one add instruction per residual add, every golden name traced; the default fuses
    each of them and estimates fewer cycles; both Programs give the golden output."""
    from m3vit.compiler.program_exec import execute_build

    fused, plain = tmp_path / "fused", tmp_path / "plain"
    assert _compile(tiny_onnx, fused) == 0
    sf = json.loads(capsys.readouterr().out)
    assert _compile(tiny_onnx, plain, "--no-fuse") == 0
    sp = json.loads(capsys.readouterr().out)
    graph = qg.load(plain / "qgraph")
    adds = sum(o.kind == "add" for o in graph.ops)
    assert sp["ops"]["add"] == adds == sf["fused"] > 0 and sp["fused"] == 0 and "add" not in sf["ops"]
    assert "fuse-residual" in sf["passes"] and "fuse-residual" not in sp["passes"]
    assert sf["instructions"] == sp["instructions"] - adds and sf["estimated_cycles"] < sp["estimated_cycles"]
    assert json.loads((plain / "program.json").read_text())["trace"] == graph.trace_names()
    hw = HwConfig.from_dict(json.loads((plain / "hw.json").read_text()))
    x = golden.quantize_input(graph, np.random.default_rng(4).standard_normal(graph.input.shape), SatCounter())
    want, _ = golden.run(graph, x, 0, stats=SatCounter())
    for d in (fused, plain):
        assert np.array_equal(execute_build(d, x, 0, hw_hash=hw.hash()).output, want)


@pytest.mark.parametrize("extra, needle", [
    (("--board", "zcu102"), "--board zcu102 is not supported"),
    (("--parallel", "0x4"), "p_in must be between 1 and 256"),
    (("--precision", "W3A9"), "weight width must be one of 8, 16"),
    (("--calib-images", "0"), "--calib-images"),
])
def test_usage_errors_are_one_line_and_write_nothing(tiny_onnx, tmp_path, capsys, extra, needle):
    out = tmp_path / "build"
    assert _compile(tiny_onnx, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_model_files(tmp_path, capsys):
    assert _compile(tmp_path / "missing.onnx", tmp_path / "b1") == 2
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a model")
    assert _compile(junk, tmp_path / "b2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("m3vit compile: error:") for line in err)
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_a_failing_stage_leaves_the_previous_build(tiny_onnx, tmp_path, monkeypatch, capsys):
    out = tmp_path / "build"
    assert _compile(tiny_onnx, out) == 0
    before = _files(out)
    import m3vit.compiler.lower as lower

    def broken(*args, **kwargs):
        raise RuntimeError("lowering exploded")

    monkeypatch.setattr(lower, "compile_qgraph", broken)
    assert _compile(tiny_onnx, out) == 1
    assert "lowering exploded" in capsys.readouterr().err
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]
