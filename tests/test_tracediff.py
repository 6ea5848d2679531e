"""`m3vit trace-diff`: two executors agree on every traced tensor of a build, and a corrupted
weight shows up as the first differing tensor, named with the instruction that wrote it."""

from __future__ import annotations

import json
import shutil

import pytest

from m3vit.cli import main
from m3vit.model.config import resolve_config

from test_e2e_csim import _export


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-td")
    out = root / "build"
    assert main(["compile", str(_export(resolve_config("tiny"), root / "tiny.onnx")), "--out", str(out),
                 "--calib-images", "2"]) == 0
    return out


def _diff(build, a, b, capsys, *extra):
    capsys.readouterr()
    rc = main(["trace-diff", str(build), a, b, "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_golden_and_program_executor_agree(tiny_build, capsys):
    for task in ("0", "1"):
        rc, r = _diff(tiny_build, "golden", "program", capsys, "--task", task)
        assert rc == 0 and r["identical"] and r["tensors"] > 20 and r["first"] is None, r


def test_a_corrupted_weight_is_located(tiny_build, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_build, bad)
    meta = json.loads((bad / "program.json").read_text())
    weights = bytearray((bad / "weights.bin").read_bytes())
    weights[meta["weights"]["blocks.0.attn.qkv.w"]["offset"]] ^= 0x40
    (bad / "weights.bin").write_bytes(bytes(weights))
    rc, r = _diff(bad, "golden", "program", capsys)
    assert rc == 1 and not r["identical"]
    first = r["first"]
    assert first["tensor"] == "blocks.0.attn.qkv"
    assert meta["instructions"][first["instruction"]]["name"] == "blocks.0.attn.qkv"
    assert first["a"] != first["b"]


def test_unknown_executor_is_a_usage_error(tiny_build, capsys):
    with pytest.raises(SystemExit) as e:
        main(["trace-diff", str(tiny_build), "golden", "verilog"])
    assert e.value.code == 2
