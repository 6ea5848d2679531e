"""ONNX -> `m3vit compile` -> `m3vit rtlsim`: the RTL accelerator (Verilator, driven by the host
Driver over the DDR model) agrees bit for bit with the golden model on every task of the tiny
preset, every intermediate tensor included, and on a randomly drawn small configuration. The
builds use a 4x4 array (rtl_sim's test configuration), so one Verilator build serves every model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from m3vit.cli import main
from m3vit.model.config import resolve_config

from test_e2e_csim import _export, configs

from accel_hw import HW  # noqa: E402


def _compile(onnx: Path, out: Path, capsys) -> None:
    hw = out.parent / "hw.json"
    hw.write_text(HW.to_json())
    assert main(["compile", str(onnx), "--out", str(out), "--hw", str(hw), "--calib-images", "2", "--json"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()


def _rtlsim(build: Path, capsys, *extra: str) -> tuple[int, dict]:
    rc = main(["rtlsim", str(build), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-rtl")
    onnx = _export(resolve_config("tiny"), root / "tiny.onnx")
    hw = root / "hw.json"
    hw.write_text(HW.to_json())
    out = root / "build"
    assert main(["compile", str(onnx), "--out", str(out), "--hw", str(hw), "--calib-images", "2"]) == 0
    return out


def test_tiny_every_task_traced_bit_exact(tiny_build, capsys):
    capsys.readouterr()
    rc, r = _rtlsim(tiny_build, capsys, "--trace", "--csim")
    assert rc == 0 and r["bit_exact"] is True and r["mismatches"] == 0, r
    assert len(r["tasks"]) == 2
    for e in r["tasks"]:
        assert e["tensors_compared"] > 20 and e["tensor_mismatches"] == 0 and e["csim_mismatches"] == 0
        # every instruction retired and is accounted for, and the DDR model saw no protocol error
        assert len(e["instructions"]) == json.loads((tiny_build / "program.json").read_text())["header"]["n_instr"]
        assert e["ddr_errors"] == 0 and e["total_cycles"] > 0 and e["ddr_bytes"] > 0
        assert 0 < e["utilization"] < 1
    assert Path(r["plot"]).is_file()


def test_rtlsim_detects_a_corrupted_weight(tiny_build, tmp_path, capsys):
    """The comparison can fail: flip one weight byte of a copy and the mismatch is reported."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_build, bad)
    prog = json.loads((bad / "program.json").read_text())
    weights = bytearray((bad / "weights.bin").read_bytes())
    weights[prog["weights"]["blocks.0.attn.qkv.w"]["offset"]] ^= 0x40
    (bad / "weights.bin").write_bytes(bytes(weights))
    capsys.readouterr()
    rc, r = _rtlsim(bad, capsys, "--task", "0", "--trace")
    assert rc == 1 and r["bit_exact"] is False and r["mismatches"] > 0
    # the first difference is named down to the instruction that wrote it
    fm = r["first_mismatch"]
    writer = next(e for e in prog["instructions"] if e["operands"].get("w_ref") == "blocks.0.attn.qkv.w")
    assert (fm["instruction"], fm["op"], fm["layer"]) == (writer["index"], "gemm", writer["name"])
    assert fm["tensor"] == writer["operands"]["y_ref"] and fm["got"] != fm["expected"]
    # a slice holding only that instruction, started from the executor's arena, finds it too, and
    # the waves of that instruction are written (VCD: text, so its contents can be checked here)
    w = writer["index"]
    vcd = tmp_path / "first.vcd"
    rc, r = _rtlsim(bad, capsys, "--task", "0", "--instrs", f"{w}:{w + 1}", "--waves", str(vcd),
                    "--wave-cycles", "400")
    assert rc == 1 and r["instructions_run"] == [w, w + 1] and r["first_mismatch"]["instruction"] == w
    assert r["waves"] == {"file": str(vcd), "task": "semseg", "instruction": w, "op": "gemm", "layer": writer["name"]}
    text = vcd.read_text()
    head, _, body = text.partition("$enddefinitions")
    assert "$scope module u_accel $end" in head and "$scope module u_gemm $end" in head
    unit = {"1ps": 1e-3, "1ns": 1.0}[head.split("$timescale")[1].split("$end")[0].strip()]   # ns per tick
    stamps = [int(line[1:]) * unit for line in body.splitlines() if line.startswith("#")]
    # that instruction only: at most 400 cycles of the harness's 10 ns clock from where dumping began
    assert len(stamps) > 10 and stamps[-1] - stamps[0] <= 401 * 10
    assert not list(tmp_path.glob("*.part"))


def test_rtlsim_runs_a_slice_of_the_program(tiny_build, capsys):
    """One block of the Program, from the arena the executor leaves before it: bit-exact, and
    only its instructions are timed and estimated."""
    prog = json.loads((tiny_build / "program.json").read_text())
    idx = [e["index"] for e in prog["instructions"] if e["name"].startswith("blocks.1.")]
    a, b = min(idx), max(idx) + 1
    capsys.readouterr()
    rc, r = _rtlsim(tiny_build, capsys, "--task", "1", "--instrs", f"{a}:{b}")
    assert rc == 0 and r["bit_exact"] and r["instructions_run"] == [a, b]
    e = r["tasks"][0]
    assert e["task"] == "depth" and e["arena_bytes_differing"] == 0 and e["tensors_compared"] >= len(idx) // 2
    assert [i["index"] for i in e["instructions"]] == list(range(a, b))
    assert all(i["name"] == prog["instructions"][i["index"]]["name"] for i in e["instructions"])
    assert e["total_cycles"] >= sum(i["cycles"] for i in e["instructions"]) > 0
    assert e["schedule_estimate_cycles"] == sum(i["estimate_cycles"] for i in e["instructions"])
    assert main(["rtlsim", str(tiny_build), "--instrs", f"{b}:{a}"]) == 2
    assert f"--instrs {b}:{a}" in capsys.readouterr().err


@settings(max_examples=1, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(c=configs)
def test_random_configuration_bit_exact(c, tmp_path_factory, capsys):
    print(f"hypothesis derandomized (seed fixed by derandomize=True); drawn configuration: {c}", file=sys.stderr)
    n = c["num_experts"]
    k = 1 + int(c["k_frac"] * (n - 1))
    tasks = ",".join(f"t{i}:{2 + i}" for i in range(c["tasks"]))
    gh, gw = c["grid"]
    over = {"dim": c["heads"] * c["head_dim"], "heads": c["heads"], "depth": c["depth"], "patch": c["patch"],
            "img_size": (gh * c["patch"], gw * c["patch"]), "mlp_hidden": c["mlp_hidden"], "num_experts": n,
            "expert_hidden": c["expert_hidden"], "top_k": k, "routing": c["routing"]}
    cfg = resolve_config("tiny", overrides=[f"{key}={val if not isinstance(val, tuple) else 'x'.join(map(str, val))}"
                                            for key, val in over.items()] + [f"tasks={tasks}"])
    root = tmp_path_factory.mktemp("cfg-rtl")
    build = root / "build"
    _compile(_export(cfg, root / "m.onnx"), build, capsys)
    rc, r = _rtlsim(build, capsys, "--stall-permille", "100")
    assert rc == 0 and r["bit_exact"] and r["mismatches"] == 0, (c, r)
