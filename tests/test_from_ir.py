"""IR -> QGraph: our exports give the PyTorch path's graph exactly, foreign graphs quantize and run
in the golden model close to the float IR, and a wrong calibration is one clear error."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from foreign_models import handwritten_vit
from m3vit.compiler import golden, qgraph
from m3vit.compiler.from_ir import calibrate_ir, ir_config, ir_float_trace, load_ir, qgraph_from_ir, qgraph_from_onnx
from m3vit.compiler.from_torch import build_qgraph, float_trace
from m3vit.compiler.ir_exec import run_ir
from m3vit.compiler.numerics import SatCounter
from m3vit.compiler.onnx_import import import_onnx
from m3vit.compiler.quantize import calibrate, calibration_images
from m3vit.errors import ConfigError, UsageError
from m3vit.model import export as ex
from m3vit.model.config import resolve_config
from m3vit.model.vit import build_model

# The golden model against the float IR on held-out images; measured >= 0.99999 on every graph below.
MIN_COSINE = 0.999


def _tiny_exports(routing, folder, head=False):
    """The tiny preset, its PyTorch calibration, and its exports: multi-task, each single task and
    with ``head`` the last task with its dense-prediction head."""
    model = build_model(resolve_config("tiny", overrides={"routing": routing}), with_heads=head)
    cal = calibrate(model, calibration_images(model.cfg.img_size, 3))
    files = {"all": folder / "all.onnx"}
    ex.export_onnx(model, files["all"], all_tasks=True)
    for t, name in enumerate(model.cfg.task_names):
        files[t] = folder / f"{name}.onnx"
        ex.export_onnx(model, files[t], task=t)
    if head:
        files["head"] = folder / "head.onnx"
        ex.export_onnx(model, files["head"], task=len(model.cfg.tasks) - 1, with_head=True)
    return model, cal, files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_exports("multi-gate", tmp_path_factory.mktemp("from-ir"), head=True)


@pytest.fixture(scope="module")
def tiny_task_conditioned(tmp_path_factory):
    return _tiny_exports("task-conditioned", tmp_path_factory.mktemp("from-ir-tc"))


def _eval_images(size, n=2):
    return calibration_images(size, 8 + n, seed=11)[8:]  # random images that calibration did not see


def _one_task(graph: qgraph.QGraph, t: int) -> qgraph.QGraph:
    """The graph of one task's pathway: its gates only, the config narrowed to that task."""
    g = copy.deepcopy(graph)
    g.tasks = [graph.tasks[t]]
    g.config["tasks"] = [graph.config["tasks"][t]]
    for op in g.ops:
        if op.kind == "moe":
            for k in ("gate_w", "gate_b", "gate_w_frac", "gate_shift"):
                op.params[k] = op.params[k][t:t + 1]
    return g.validate()


def test_our_multi_task_export_gives_the_pytorch_graph(tiny):
    _same_graph_as_pytorch(*tiny)


def test_task_conditioned_export_gives_the_pytorch_graph(tiny_task_conditioned):
    _same_graph_as_pytorch(*tiny_task_conditioned)


def _same_graph_as_pytorch(model, cal, files):
    ref = build_qgraph(model, cal)
    got = qgraph_from_onnx(files["all"], calib=cal)
    assert qgraph.graphs_equal(got, ref)
    # An IR imported apart (as `m3vit compile` does) has lost the file's metadata: the calibration's
    # configuration, once it matches the graph, stands in for it.
    assert qgraph.graphs_equal(qgraph_from_onnx(import_onnx(files["all"], host_head=True), calib=cal), ref)
    for _, x in _eval_images(model.cfg.img_size):
        for t in range(len(model.cfg.tasks)):
            want, want_tr = golden.run(ref, x, t, trace=True, stats=SatCounter())
            out, tr = golden.run(got, x, t, trace=True, stats=SatCounter())
            assert np.array_equal(out, want)
            assert tr.keys() == want_tr.keys() and all(np.array_equal(tr[k], want_tr[k]) for k in tr)


def test_single_task_exports_give_that_tasks_graph(tiny, tmp_path):
    model, cal, files = tiny
    ref = build_qgraph(model, cal)
    path = cal.save(tmp_path / "calib.json")  # through the file, as `m3vit compile` reads it
    last = len(model.cfg.tasks) - 1
    for t, file in [*((t, files[t]) for t in range(last + 1)), (last, files["head"])]:
        got = qgraph_from_onnx(file, calib=path)  # a head stays on the host: the graph ends at `norm`
        assert got.tasks == [model.cfg.task_names[t]]
        assert qgraph.graphs_equal(got, _one_task(ref, t))
        for _, x in _eval_images(model.cfg.img_size):
            assert np.array_equal(golden.run(got, x, 0, stats=SatCounter())[0],
                                  golden.run(ref, x, t, stats=SatCounter())[0])


def test_ir_trace_matches_the_pytorch_trace(tiny):
    """The IR's float trace has the PyTorch trace's names and values (float64 against float32)."""
    model, _, files = tiny
    ir = load_ir(files["all"])
    cfg, _ = ir_config(ir)
    _, x = _eval_images(model.cfg.img_size, 1)[0]
    for t in range(2):
        want = float_trace(model, x, t, scores=True)
        got = ir_float_trace(ir, cfg, x, t)
        assert got.keys() == want.keys()
        for k, w in want.items():
            if k.endswith(".topk"):
                assert np.array_equal(got[k], w), k
            else:
                assert got[k].shape == w.shape, k
                assert np.abs(got[k] - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), k


def test_ir_calibration_is_the_pytorch_calibration(tiny):
    """Calibrating on the IR takes the same shared code: every range within float32 noise of the
    PyTorch calibration's, and the same formats."""
    model, _, files = tiny
    images = calibration_images(model.cfg.img_size, 2)
    ref = calibrate(model, images)
    got = calibrate_ir(load_ir(files["all"]), images)
    assert got.ranges.keys() == ref.ranges.keys()
    for k, r in ref.ranges.items():
        for a, b in zip(got.ranges[k] if isinstance(r, list) else [got.ranges[k]], r if isinstance(r, list) else [r]):
            assert a["count"] == b["count"], k
            assert abs(a["max"] - b["max"]) <= 1e-5 * max(1.0, b["max"]), k
    # The traces differ by float32 rounding, so a range on a format boundary could pick the
    # neighbouring format (edge-moe, 2 images: one tensor); the tiny preset has none on a boundary.
    assert got.formats == ref.formats and got.weights == ref.weights
    assert got.config == ref.config and got.images == ref.images


@pytest.mark.slow
def test_edge_moe_export_gives_the_pytorch_graph(tmp_path):
    model = build_model(resolve_config("edge-moe"), with_heads=False)
    cal = calibrate(model, calibration_images(model.cfg.img_size, 1))
    ex.export_onnx(model, tmp_path / "all.onnx", all_tasks=True)
    ref = build_qgraph(model, cal)
    got = qgraph_from_onnx(tmp_path / "all.onnx", calib=cal)
    assert qgraph.graphs_equal(got, ref)
    _, x = _eval_images(model.cfg.img_size, 1)[0]
    for t in range(len(model.cfg.tasks)):
        assert np.array_equal(golden.run(got, x, t, stats=SatCounter())[0],
                              golden.run(ref, x, t, stats=SatCounter())[0])


FOREIGN = [
    ("dense-gemm-tanh", dict()),
    ("dense-interleaved-head", dict(classes=7, head_ln=True, qkv="interleaved", ln="reciprocal", gelu="erf")),
    ("dense-layernorm-op", dict(ln="op", gelu="op", opset=20)),
    ("moe-block1", dict(moe_blocks=(1,), gelu="erf")),
    ("moe-every-block-opset18", dict(opset=18, moe_blocks=(0, 1), gelu="tanh")),
]


@pytest.mark.parametrize("name,kw", FOREIGN, ids=[n for n, _ in FOREIGN])
def test_foreign_graph_quantizes_and_runs(name, kw):
    data = handwritten_vit(**kw)
    ir = load_ir(data)
    cfg, _ = ir_config(ir)
    assert cfg.moe_blocks == list(kw.get("moe_blocks", ()))
    graph = qgraph_from_onnx(data, n_images=3)
    assert graph.config["moe_blocks"] == list(kw.get("moe_blocks", ()))
    eps = 1e-6 if kw.get("ln") == "op" else 1e-5  # the builder's LayerNormalization op / decomposed eps
    assert set(graph.config["ln_eps_by_layer"].values()) == {eps} and len(graph.config["ln_eps_by_layer"]) == 5
    assert [op.kind for op in graph.ops].count("moe") == len(kw.get("moe_blocks", ()))
    for _, x in _eval_images(cfg.img_size):
        want = run_ir(ir, x, 0, trace=True)[1]["norm"]
        q, _ = golden.run(graph, x, 0, stats=SatCounter())
        got = graph.tensors["norm"].dequantize(q)
        cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos >= MIN_COSINE, f"cosine {cos:.6f}"


def test_deterministic(tmp_path):
    data = handwritten_vit(moe_blocks=(1,), gelu="erf")
    a = qgraph_from_onnx(data, n_images=2)
    b = qgraph_from_onnx(load_ir(data), n_images=2)
    assert qgraph.graphs_equal(a, b)
    pa, pb = qgraph.save(a, tmp_path / "a"), qgraph.save(b, tmp_path / "b")
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(pa[1:], pb[1:]))


def test_precision_and_calibration_file_of_an_ir(tmp_path):
    data = handwritten_vit(moe_blocks=(1,), gelu="erf")
    ir = load_ir(data)
    cal = calibrate_ir(ir, calibration_images(ir_config(ir)[0].img_size, 2))
    path = cal.save(tmp_path / "c.json")
    g8 = qgraph_from_onnx(data, calib=path, precision="W8A8")
    assert {t.bits for t in g8.tensors.values() if t.signed} == {8}
    g16 = qgraph_from_onnx(data, calib=path)  # the file's own spec: the default, 8-bit experts
    assert g16.tensors["blocks.0.attn.qkv"].bits == 16
    assert np.abs(g16.op("blocks.1.moe").params["w1"]).max() <= 128
    assert qgraph.graphs_equal(g16, qgraph_from_ir(ir, cal))


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


def test_calibration_of_another_model_is_one_clear_error(tiny, tmp_path):
    model, cal, files = tiny
    path = cal.save(tmp_path / "tiny.json")
    with pytest.raises(ConfigError, match="another model") as info:
        qgraph_from_onnx(handwritten_vit(), calib=path)
    _one_line(info)
    other = build_model(model.cfg, with_heads=False, seed=1)  # same configuration, other weights
    wrong = calibrate(other, calibration_images(model.cfg.img_size, 1))
    with pytest.raises(ConfigError, match="other weights") as info:
        qgraph_from_onnx(files["all"], calib=wrong)
    _one_line(info)
    narrowed = dataclasses.replace(cal, tasks=["semseg"])
    with pytest.raises(ConfigError, match="no ranges for task") as info:
        qgraph_from_onnx(files[1], calib=narrowed)
    _one_line(info)


def test_bad_calibration_sources_are_one_clear_usage_error(tmp_path):
    data = handwritten_vit()
    empty = tmp_path / "empty"
    empty.mkdir()
    for calib, message in [(empty, "holds no images"), (tmp_path / "missing", "neither a calibration file"),
                           (42, "calib must be")]:
        with pytest.raises(UsageError, match=message) as info:
            qgraph_from_onnx(data, calib=calib)
        _one_line(info)
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    with pytest.raises(UsageError, match="not a calibration file") as info:
        qgraph_from_onnx(data, calib=junk)
    _one_line(info)


def test_limits_apply_to_an_ir_too():
    ir = load_ir(handwritten_vit())
    with pytest.raises(UsageError, match="max_dim"):
        qgraph_from_onnx(ir, limits={"max_dim": 16})


def test_a_graph_the_qgraph_cannot_hold_is_one_clear_error():
    ir = load_ir(handwritten_vit())
    no_norm = ir.copy()
    no_norm.ops = [op for op in no_norm.ops if op.name != "norm"]
    no_norm.output.inputs = ["blocks.1.residual2"]
    gelu_fc2 = ir.copy()
    gelu_fc2["blocks.0.mlp.fc2"].attrs["gelu"] = True
    for graph, message in [(no_norm, "ends at 'blocks.1.residual2', before the final LayerNorm"),
                           (gelu_fc2, "'blocks.0.mlp.fc2' has a GELU")]:
        with pytest.raises(UsageError, match=message) as info:
            qgraph_from_onnx(graph.validate(), n_images=1)
        _one_line(info)
