"""RTL tests of the nonlinear units (GELU, ...): cocotb simulation, bit-exact against the golden
model m3vit.compiler.numerics, for two parameter sets and two Verilator seeds; per-unit synthesis.

Lint and yosys parse of these units run in tests/test_rtl_units.py, which covers every .sv file.
The cocotb test modules live in tests/rtl/ (cocotb_<unit>.py, sharing streams.py).
"""

from __future__ import annotations


import pytest

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

from rtl_seeds import simulate_seeds


# Two parameter sets, the same as tests/test_rtl_units.py's (so compute_unit builds are shared):
# four 16-bit lanes, and five 8-bit lanes (narrow containers, odd lane count).
PARAM_SETS = {
    "4x4-a16w8": HwConfig().replace(p_in=4, p_out=4, token_block=4, limits=Limits(max_tokens=64)),
    "3x5-a8w6": HwConfig().replace(p_in=3, p_out=5, act_bits=8, weight_bits=6, token_block=8,
                                   limits=Limits(max_tokens=256)),
}
SEEDS = (1, 2)
# simulation -> (top unit, cocotb test module in tests/rtl/, number of cocotb tests in it)
SIMS = {
    "gelu_unit": ("gelu_unit", "cocotb_gelu_unit", 4),
    "compute_unit_gelu": ("compute_unit", "cocotb_compute_unit_gelu", 2),
}
UNITS = sorted({unit for unit, _, _ in SIMS.values()} - {"compute_unit"})   # the new units


def _need_yosys():
    if runner.yosys_path() is None:
        pytest.skip("yosys is not installed (scripts/setup.sh --test installs it)")


def _simulate(sim: str, hw: HwConfig, seeds=SEEDS, extra_env=None) -> dict[int, dict[str, str]]:
    """Run a simulation's cocotb tests once per Verilator seed; returns the output digests per seed."""
    unit, module, n_tests = SIMS[sim]
    return simulate_seeds(unit, hw, module, n_tests, seeds, extra_env)


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
@pytest.mark.parametrize("sim", sorted(SIMS))
def test_unit_matches_golden_model_for_two_seeds(sim, name):
    """Bit-exact against numerics.py; identical outputs and timing whatever the power-up state."""
    digests = _simulate(sim, PARAM_SETS[name])
    first, *others = digests.values()
    for seed, d in zip(SEEDS[1:], others):
        assert d == first, f"{sim}: results differ between Verilator seeds {SEEDS[0]} and {seed}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAM_SETS))
@pytest.mark.parametrize("sim", sorted(SIMS))
def test_unit_long_regression(sim, name):
    digests = _simulate(sim, PARAM_SETS[name], seeds=(3, 4), extra_env={"M3V_TB_SCALE": "10"})
    assert digests[3] == digests[4]


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
@pytest.mark.parametrize("unit", UNITS)
def test_lint_per_parameter_set(unit, name):
    result = runner.lint(unit, PARAM_SETS[name])
    assert result.ok, f"verilator --lint-only -Wall {unit} ({name}):\n{result.tail()}"


def test_mem_tables_match_the_golden_model():
    """The emitted .mem files hold exactly the contract's tables (never typed by hand)."""
    from m3vit.compiler import numerics
    from m3vit.rtl_sim.emit import mem_tables

    tables = mem_tables()
    assert tables["m3v_gelu_lut.mem"][0] == [int(v) for v in numerics.gelu_lut()[0]]


@pytest.mark.parametrize("unit", UNITS)
def test_synth_unit_small(unit):
    """Synthesis of each unit on its own (small parameter set): no latches, no DSP-free surprises."""
    _need_yosys()
    from m3vit.rtl_sim.synth import synth_report

    rep = synth_report(PARAM_SETS["4x4-a16w8"], units=[unit], method="full")
    r = rep["units"][unit]
    assert r["lut"] > 0 and r["ff"] > 0 and r["bram36"] == 0 and r["uram"] == 0
