"""`m3vit flow`, the main job, end to end on tiny: profile, export, compile, C-simulation and RTL
simulation (both bit-exact), the task head, the report; and a bad option leaves no output folder."""

from __future__ import annotations

import json

from m3vit.cli import main

from accel_hw import HW


def test_flow_runs_every_stage_bit_exact(tmp_path, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(HW.to_json())
    out = tmp_path / "flow"
    rc = main(["flow", "--out", str(out), "--hw", str(hw), "--images", "1", "--calib-images", "2", "--json"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny"
    assert summary["csim"]["bit_exact"] and summary["rtlsim"]["bit_exact"]
    r = summary["rtlsim"]
    assert r["total_cycles"] > 0 and r["ddr_bytes"] > 0 and 0 < r["utilization"] < 1
    assert set(summary["seconds"]) == {"profile", "export", "compile", "fidelity", "resources", "csim", "rtlsim",
                                       "head"}
    f = summary["fidelity"]
    assert f["images"] == 1 and 0.9 < f["output_cosine_min"] <= 1.0 and 0.0 <= f["routing_agreement_min"] <= 1.0
    res = summary["resources"]
    assert res["method"] == "model" and res["total"]["dsp"] == HW.dsp_datapath
    report = (out / "report.md").read_text()
    for section in ("## Profile", "## Fidelity", "## Resources", "## RTL simulation", "## Task output"):
        assert section in report, section
    assert "bit-exact" in report
    for name in ("profile.png", "fidelity.png", "fidelity.json", "resources.png", "resources.json",
                 "rtlsim_latency.png", "task_output.png", "build/program.bin"):
        assert (out / name).is_file(), name


def test_flow_with_a_bad_hw_file_writes_nothing(tmp_path, capsys):
    out = tmp_path / "flow"
    rc = main(["flow", "--out", str(out), "--hw", str(tmp_path / "missing.json"), "--no-rtlsim"])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "missing.json" in err and len(err.strip().splitlines()) == 1
