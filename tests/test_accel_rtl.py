"""The accelerator top in RTL (rtl_sim/rtl/m3v_accel.sv) driven by the host Driver: ADD and EMBED
Programs bit-exact with the Python Program executor, refusals, counters against the testbench,
for two Verilator seeds with randomised power-up state (tests/rtl/cocotb_accel.py).

Lint and yosys parse of the new modules run in tests/test_rtl_units.py, which covers every .sv file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

TB_DIR = Path(__file__).parent / "rtl"
sys.path.insert(0, str(TB_DIR))
from m3vit.rtl_sim.cocotb_device import plusargs  # noqa: E402

HW = HwConfig().replace(p_in=4, p_out=4, token_block=4, limits=Limits(max_tokens=64))
SEEDS = (1, 2)
COCOTB_TESTS = 4


def _simulate(seed: int, scale: int = 1) -> tuple[dict[str, str], str]:
    name = f"run-accel-seed{seed}-x{scale}"
    test_dir = runner.build_dir_for("accel_tb", HW) / name
    result = runner.run("accel_tb", HW, "cocotb_accel", seed=seed, module_dir=TB_DIR, name=name,
                        plusargs=plusargs(test_dir), extra_env={"M3V_TB_SCALE": str(scale)})
    assert result.ok and result.tests == COCOTB_TESTS, (
        f"accel_tb seed {seed}: {result.failed} of {result.tests} cocotb tests failed "
        f"(log {result.log}):\n{runner.failure_summary(result)}")
    digests = {p.stem: p.read_text() for p in sorted(result.test_dir.glob("*.digest"))}
    assert len(digests) == COCOTB_TESTS, f"digests written: {sorted(digests)}"
    return digests, (result.test_dir / "power_up.txt").read_text()


def test_accel_runs_programs_bit_exact_for_two_seeds():
    runs = [_simulate(seed) for seed in SEEDS]
    assert runs[0][1] != runs[1][1], "Verilator seeds gave the same power-up state"
    assert runs[0][0] == runs[1][0], "results or counters differ between Verilator seeds"


@pytest.mark.slow
def test_accel_long_regression():
    """Five times the random Programs (longer ones), two other seeds."""
    runs = [_simulate(seed, scale=5) for seed in (3, 4)]
    assert runs[0][1] != runs[1][1], "Verilator seeds gave the same power-up state"
    assert runs[0][0] == runs[1][0], "results or counters differ between Verilator seeds"


def test_accel_headers_reach_the_include_dir(tmp_path):
    inc = runner.include_dir(HW, tmp_path)
    for name in ("m3v_isa.svh", "m3v_regmap.svh", "m3v_accel_cfg.svh"):
        assert (inc / name).is_file(), name
    assert f"{int.from_bytes(bytes.fromhex(HW.hash()), 'little'):064X}" in (inc / "m3v_accel_cfg.svh").read_text()
