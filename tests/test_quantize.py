"""Quantization: precision specs and overrides, calibration files, weight formats, accumulator
proofs, QGraph save/load and validation, and the quantization commands."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from m3vit.cli import main
from m3vit.compiler import golden, qgraph
from m3vit.compiler.from_torch import build_qgraph
from m3vit.compiler.numerics import CONTRACT, SatCounter
from m3vit.compiler.quantize import (DEFAULT_SPEC, RangeStats, calibrate, calibration_images, load_calibration,
                                     load_precision, normalise_spec, resolve_precision, weight_fracs)
from m3vit.errors import ConfigError, UsageError
from m3vit.model.config import resolve_config
from m3vit.model.vit import build_model


def _cfg(**overrides):
    return resolve_config("tiny", overrides=overrides)


@pytest.fixture(scope="module")
def images():
    return calibration_images(_cfg().img_size, 4)


@pytest.fixture(scope="module")
def tiny(images):
    model = build_model(_cfg())
    return model, calibrate(model, images)


def test_presets_and_hierarchy():
    cfg = _cfg()
    spec = {"precision": "W8A8",
            "layer_type": {"linear": "W16", "qkv": "A16", "gate": {"weight": 16, "act": 16}},
            "layer_name": {"blocks.1": "W8", "blocks.1.attn.qkv": {"act": 8, "act_range": "p99.99"}}}
    p = resolve_precision(spec, cfg)
    w_a = {k: (v.weight, v.act) for k, v in p.items()}
    assert w_a["blocks.0.attn.qkv"] == (16, 16)      # type linear (W16), then type qkv (A16)
    assert w_a["blocks.0.attn.proj"] == (16, 8)
    assert w_a["blocks.0.norm1"] == (8, 8)
    assert w_a["blocks.1.attn.qkv"] == (8, 8)        # name prefix, then the exact name
    assert p["blocks.1.attn.qkv"].act_range == "p99.99" and p["blocks.0.attn.qkv"].act_range == "max"
    assert w_a["blocks.1.attn.proj"] == (8, 8)
    assert w_a["blocks.1.moe.gate"] == (8, 16)       # blocks.1 prefix beats the type's W16
    assert w_a["blocks.3.moe.gate"] == (16, 16)
    assert w_a["blocks.3.moe.e2.fc1"] == (8, 8)
    for name, (w, a) in {"W8A8": (8, 8), "W8A16": (8, 16), "W16A16": (16, 16)}.items():
        assert {(v.weight, v.act) for v in resolve_precision(name, cfg).values()} == {(w, a)}


def test_overrides_reach_the_graph(tiny):
    model, cal = tiny
    spec = {"precision": "W8A8", "layer_type": {"gate": "W16A16"}, "layer_name": {"blocks.2.mlp": "W16A16"}}
    g = build_qgraph(model, cal.with_spec(model, spec))
    assert g.tensors["blocks.2.mlp.fc1"].bits == 16 and g.tensors["blocks.0.mlp.fc1"].bits == 8
    assert g.tensors["blocks.1.moe.gate"].bits == 16 and g.tensors["blocks.1.moe"].bits == 8
    w16 = np.abs(g.op("blocks.2.mlp.fc2").params["w"]).max()
    w8 = np.abs(g.op("blocks.0.mlp.fc2").params["w"]).max()
    assert 127 < w16 < 1 << 15 and w8 <= 128
    assert np.abs(g.op("blocks.1.moe").params["gate_w"]).max() > 127
    assert np.abs(g.op("blocks.1.moe").params["w1"]).max() <= 128
    golden.run(g, calibration_images(model.cfg.img_size, 1)[0][1], 0, stats=SatCounter())


@pytest.mark.parametrize("spec, message", [
    ("W9A8", "width must be one of 8, 16"),
    ("X8", "must look like W8A16"),
    ({"precision": "W8"}, "must set both widths"),
    ({"precision": "W8A8", "layer_type": {"dense": "W16"}}, "unknown layer_type 'dense'"),
    ({"precision": "W8A8", "layer_name": {"blocks.99": "W16"}}, "matches no layer"),
    ({"precision": "W8A8", "layer_name": {"blocks.1.moe": {"bits": 16}}}, "unknown key"),
    ({"precision": "W8A8", "act_range": "p42"}, "act_range must be one of"),
    ({"precision": "W8A8", "per_channel": "yes"}, "per_channel must be true or false"),
    ({"precison": "W8A8"}, "unknown key"),
])
def test_invalid_precision_is_one_clear_config_error(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_precision(spec, _cfg())
    assert "\n" not in str(info.value)


def test_precision_from_file_and_cli_items(tmp_path):
    f = tmp_path / "prec.yaml"
    f.write_text("precision: W8A8\nlayer_type:\n  gate: W16A16\n")
    spec = load_precision(str(f), ["blocks.1.norm2=A16", "expert=W16"])
    assert spec["layer_type"] == {"expert": {"weight": 16}, "gate": {"weight": 16, "act": 16}}
    assert spec["layer_name"] == {"blocks.1.norm2": {"act": 16}}
    assert load_precision(None) == normalise_spec(DEFAULT_SPEC)
    with pytest.raises(UsageError, match="neither a preset"):
        load_precision(str(tmp_path / "missing.yaml"))
    with pytest.raises(UsageError, match="KEY=W16A16"):
        load_precision("W8A8", ["gate"])


def test_per_channel_weight_fracs():
    w = np.array([[0.5, 0.01, -3.0], [-0.25, 0.02, 1.0]])
    pc = weight_fracs(w, 8, True)
    assert pc.tolist() == [7, 12, 5]        # 0.5*2^7 = 64 ... 3*2^5 = 96, all <= 127
    assert weight_fracs(w, 8, False).tolist() == [5, 5, 5]
    assert weight_fracs(np.zeros((3, 2)), 8, True).tolist() == [7, 7]


def test_range_stats_percentiles():
    rng = np.random.default_rng(0)
    s = RangeStats()
    x = rng.standard_normal(200_000)
    s.update(x[:100_000])
    s.update(x[100_000:])
    assert s.max == np.abs(x).max()
    for p in (99.0, 99.9):
        true = np.percentile(np.abs(x), p)
        assert true <= s.percentile(p) <= true * 2 ** 0.25 * 1.01   # a quarter-octave bin
    assert s.percentile(100.0) == s.max
    z = RangeStats()
    z.update(np.zeros(10))
    assert z.percentile(99.9) == 0.0 and z.max == 0.0


def test_calibration_file_roundtrip(tiny, tmp_path):
    model, cal = tiny
    path = cal.save(tmp_path / "calib.json")
    again = load_calibration(path)
    assert again.to_json() == json.loads(path.read_text())
    assert again.formats == cal.formats and again.spec == cal.spec
    assert qgraph.graphs_equal(build_qgraph(model, again), build_qgraph(model, cal))
    assert cal.save(tmp_path / "again.json").read_bytes() == path.read_bytes()
    # every tensor of the graph and its per-channel weight fractions are in the file
    doc = json.loads(path.read_text())
    assert {"formats", "weights", "ranges", "precision", "config_hash", "weights_hash"} <= set(doc)
    assert len(doc["weights"]["blocks.0.attn.qkv.w"]["frac"]) == 3 * model.cfg.dim
    # a calibration is bound to its model
    other = build_model(_cfg(), seed=5)
    with pytest.raises(ConfigError, match="other weights"):
        build_qgraph(other, again)
    with pytest.raises(ConfigError, match="another model configuration"):
        build_qgraph(build_model(_cfg(top_k=1)), again)


def test_qgraph_save_load_is_byte_deterministic(tiny, tmp_path):
    model, cal = tiny
    g = build_qgraph(model, cal)
    j1, n1 = qgraph.save(g, tmp_path / "a" / "tiny")
    j2, n2 = qgraph.save(build_qgraph(model, cal), tmp_path / "b" / "tiny.json")
    assert j1.read_bytes() == j2.read_bytes() and n1.read_bytes() == n2.read_bytes()
    loaded = qgraph.load(j1).validate()
    assert qgraph.graphs_equal(g, loaded)
    x = calibration_images(model.cfg.img_size, 1)[0][1]
    assert np.array_equal(golden.run(g, x, 1, stats=SatCounter())[0], golden.run(loaded, x, 1, stats=SatCounter())[0])
    with np.load(n1) as z:      # a standard .npz, parameters in narrow integer types
        assert z["blocks.1.moe/w1"].dtype == np.int8 and z["blocks.0.attn.qkv/w"].dtype == np.int16
    blob = bytearray(n1.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    n1.write_bytes(bytes(blob))
    with pytest.raises(UsageError, match="does not match"):
        qgraph.load(j1)


def test_validate_rejects_inconsistent_graphs(tiny):
    model, cal = tiny
    g = build_qgraph(model, cal)

    def broken(name, **params):
        ops = [dataclasses.replace(o, params={**o.params, **params}) if o.name == name else o for o in g.ops]
        return dataclasses.replace(g, ops=ops, bounds={})

    bad_shift = g.op("blocks.0.attn.proj").params["shift"] + 1
    with pytest.raises(ConfigError, match="shift must equal"):
        broken("blocks.0.attn.proj", shift=bad_shift).validate()
    b = g.op("blocks.0.attn.proj").params["b"].copy()
    b[3] = (1 << 47) - 10   # fits the accumulator alone, not with the products added
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.proj: accumulator may reach"):
        broken("blocks.0.attn.proj", b=b).validate()
    with pytest.raises(ConfigError, match="missing"):
        dataclasses.replace(g, ops=[dataclasses.replace(g.ops[0], params={})] + g.ops[1:]).validate()


def test_accumulator_bound_is_proven_or_an_error(images):
    """A bias far larger than its weights needs an accumulator beyond 48 bits: refused."""
    model = build_model(_cfg())
    with torch.no_grad():
        fc = model.blocks[0].mlp.fc2
        fc.weight[0].fill_(1e-7)
        fc.bias[0] = 1000.0
    cal = calibrate(model, images[:1])
    with pytest.raises(ConfigError, match=r"blocks\.0\.mlp\.fc2: .*accumulator"):
        build_qgraph(model, cal)


def test_cli_quant_report_json(capsys, tmp_path):
    assert main(["quant-report", "--preset", "tiny", "--images", "2", "--calib-images", "4", "--json",
                 "--plot", str(tmp_path / "q.png")]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("output_cosine", "routing_agreement", "routing_agreement_isolated", "output_sqnr_db"):
        assert set(rep[key]) == {"semseg", "depth", "min"}
        assert rep[key]["min"] == min(v for k, v in rep[key].items() if k != "min")
    assert rep["output_cosine"]["min"] > 0.99
    assert [m["name"] for m in rep["moe_layers"]] == ["blocks.1.moe", "blocks.3.moe"]
    assert rep["layers"][0]["name"] == "input" and "sqnr_db" in rep["layers"][0]
    assert isinstance(rep["saturation"], dict) and rep["precision"] == normalise_spec(DEFAULT_SPEC)
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_cli_calibrate_then_quantize_and_report(capsys, tmp_path):
    calib = tmp_path / "calib.json"
    assert main(["calibrate", "--preset", "tiny", "--calib-images", "3", "--precision", "W8A8", "--out", str(calib),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "W8A8"
    assert main(["quantize", "--preset", "tiny", "--calib-file", str(calib), "--out", str(tmp_path / "g"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    g = qgraph.load(out["graph"])
    assert g.meta["precision"]["precision"] == "W8A8" and g.tensors["blocks.0.norm1"].bits == 8
    assert main(["quant-report", "--preset", "tiny", "--calib-file", str(calib), "--precision", "W16A16",
                 "--images", "1", "--task", "depth", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["precision"]["precision"] == "W16A16" and set(rep["output_cosine"]) == {"depth", "min"}


@pytest.mark.parametrize("argv, message", [
    (["quant-report", "--preset", "tiny", "--precision", "W9A9"], "width must be one of"),
    (["quant-report", "--preset", "tiny", "--calib-file", "missing.json"], "cannot read calibration file"),
    (["quant-report", "--preset", "tiny", "--calib", "x", "--calib-file", "y"], "not both"),
    (["quant-report", "--preset", "tiny", "--images", "0"], "at least 1"),
    (["quant-report", "--preset", "tiny", "--layer-precision", "gate"], "KEY=W16A16"),
    (["quant-report", "--preset", "tiny", "--plot", "out.svg"], "writes a PNG"),
    (["quant-report", "--preset", "tiny", "--calib", "no-such-dir"], "does not exist"),
    (["calibrate", "--preset", "tiny", "--out", "c.json", "--layer-precision", "blocks.9=W16"], "matches no layer"),
])
def test_cli_errors_are_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_contract_constants_are_the_graph_internals(tiny):
    model, cal = tiny
    g = build_qgraph(model, cal)
    assert g.tensors["blocks.1.moe.score"].fmt == CONTRACT.gate_fmt
    for op in g.ops:
        if op.kind == "attention":
            assert op.attrs["score_bits"] == 16
        if op.kind == "linear" and op.attrs["gelu"]:
            assert op.attrs["mid_bits"] == 16
