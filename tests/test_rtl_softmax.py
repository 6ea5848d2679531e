"""RTL tests of the attention softmax unit (softmax_unit.sv with exp_unit.sv and recip_unit.sv):
cocotb simulation bit-exact against the golden attention of m3vit.compiler.numerics, for two
parameter sets and two Verilator seeds; lint per parameter set; the emitted tables; synthesis.

Every .sv file is also linted and yosys-parsed by tests/test_rtl_units.py.
"""

from __future__ import annotations


import pytest

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

from rtl_seeds import simulate_seeds


# The parameter sets of tests/test_rtl_nonlinear.py with as many softmax lanes as output lanes:
# four 16-bit lanes, five 8-bit lanes.
PARAM_SETS = {
    "4x4-a16w8": HwConfig().replace(p_in=4, p_out=4, softmax_lanes=4, token_block=4, limits=Limits(max_tokens=64)),
    "3x5-a8w6": HwConfig().replace(p_in=3, p_out=5, softmax_lanes=5, act_bits=8, weight_bits=6, token_block=8,
                                   limits=Limits(max_tokens=256)),
}
SEEDS = (1, 2)
UNIT, MODULE, N_TESTS = "softmax_unit", "cocotb_softmax_unit", 4
UNITS = ("exp_unit", "recip_unit", "softmax_unit")


def _simulate(hw: HwConfig, seeds=SEEDS, extra_env=None) -> dict[int, dict[str, str]]:
    return simulate_seeds(UNIT, hw, MODULE, N_TESTS, seeds, extra_env)


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_softmax_matches_golden_attention_for_two_seeds(name):
    """Bit-exact against numerics.attention; identical outputs and timing whatever the power-up state."""
    digests = _simulate(PARAM_SETS[name])
    assert digests[SEEDS[0]] == digests[SEEDS[1]], "results differ between Verilator seeds"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_softmax_long_regression(name):
    digests = _simulate(PARAM_SETS[name], seeds=(3, 4), extra_env={"M3V_TB_SCALE": "10"})
    assert digests[3] == digests[4]


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
@pytest.mark.parametrize("unit", UNITS)
def test_lint_per_parameter_set(unit, name):
    result = runner.lint(unit, PARAM_SETS[name])
    assert result.ok, f"verilator --lint-only -Wall {unit} ({name}):\n{result.tail()}"


def test_softmax_tables_and_constants_come_from_the_contract():
    """The emitted .mem files and header constants are the contract's (never typed by hand)."""
    from m3vit.compiler import numerics
    from m3vit.rtl_sim.emit import contract_params, mem_tables

    tables = mem_tables()
    assert tables["m3v_exp2_lut.mem"] == ([int(v) for v in numerics.exp2_lut()[0]], 17)
    assert tables["m3v_recip_lut.mem"] == ([int(v) for v in numerics.recip_lut()[0]], 16)
    c, params = numerics.CONTRACT, contract_params()
    assert (params["EXP_L2E"], params["EXP_C"], params["EXP_L"], params["EXP_P"]) == (
        c.l2e, c.exp_l2e_frac, c.exp_lut_bits, c.exp_frac)
    assert (params["RECIP_M"], params["RECIP_R"], params["RECIP_LR"], params["MAX_KEYS"]) == (
        c.recip_mant_frac, c.recip_frac, c.recip_lut_bits, c.max_keys)


@pytest.mark.slow
def test_synth_softmax_small():
    """Synthesis on its own (small parameter set): no latches, DSPs for the multipliers."""
    if runner.yosys_path() is None:
        pytest.skip("yosys is not installed (scripts/setup.sh --test installs it)")
    from m3vit.rtl_sim.synth import synth_report

    rep = synth_report(PARAM_SETS["4x4-a16w8"], units=[UNIT], method="full")
    r = rep["units"][UNIT]
    # 4 lanes x (p·v + two A·r products) + three in the reciprocal (t·L2E is shift-and-add)
    assert r["dsp"] == 4 * 3 + 3 and r["lut"] > 0 and r["ff"] > 0
