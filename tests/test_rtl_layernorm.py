"""RTL tests of the LayerNorm unit (layernorm_unit.sv with rsqrt_unit.sv): cocotb simulation,
bit-exact against numerics.layernorm, for two parameter sets and two Verilator seeds; synthesis.

Lint and yosys parse of every .sv file run in tests/test_rtl_units.py; here they also run per
parameter set. The cocotb tests are tests/rtl/cocotb_layernorm_unit.py.
"""

from __future__ import annotations


import numpy as np
import pytest

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

from rtl_seeds import simulate_seeds


# The two parameter sets of the other RTL tests (shared include directories): P = 4 lanes of
# 16-bit values with 8-bit γ, and P = 5 lanes of 8-bit values with 6-bit γ (rows of 3P - 1, 37 and
# 100 channels end in a partial beat).
PARAM_SETS = {
    "4x4-a16w8": HwConfig().replace(p_in=4, p_out=4, token_block=4, limits=Limits(max_tokens=64)),
    "3x5-a8w6": HwConfig().replace(p_in=3, p_out=5, act_bits=8, weight_bits=6, token_block=8,
                                   limits=Limits(max_tokens=256)),
}
SEEDS = (1, 2)
# unit -> (cocotb test module in tests/rtl/, number of cocotb tests in it)
SIMS = {"layernorm_unit": ("cocotb_layernorm_unit", 5), "rsqrt_unit": ("cocotb_rsqrt_unit", 3)}


def _simulate(unit: str, hw: HwConfig, seeds=SEEDS, extra_env=None) -> dict[int, dict[str, str]]:
    module, n_tests = SIMS[unit]
    return simulate_seeds(unit, hw, module, n_tests, seeds, extra_env)


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_layernorm_matches_golden_model_for_two_seeds(name):
    """Bit-exact against numerics.layernorm; identical outputs and timing whatever the power-up state."""
    digests = _simulate("layernorm_unit", PARAM_SETS[name])
    assert digests[SEEDS[0]] == digests[SEEDS[1]], "results differ between Verilator seeds"


def test_rsqrt_matches_golden_model_for_two_seeds():
    """rsqrt_unit on its own against numerics.rsqrt_int (it has no parameters of its own)."""
    digests = _simulate("rsqrt_unit", PARAM_SETS["4x4-a16w8"])
    assert digests[SEEDS[0]] == digests[SEEDS[1]], "results differ between Verilator seeds"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_layernorm_long_regression(name):
    digests = _simulate("layernorm_unit", PARAM_SETS[name], seeds=(3, 4), extra_env={"M3V_TB_SCALE": "10"})
    assert digests[3] == digests[4]


@pytest.mark.slow
def test_rsqrt_every_mantissa():
    digests = _simulate("rsqrt_unit", PARAM_SETS["4x4-a16w8"], seeds=(3, 4), extra_env={"M3V_TB_SCALE": "10"})
    assert digests[3] == digests[4] and "rsqrt_every_mantissa" in digests[3]


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
@pytest.mark.parametrize("unit", ["layernorm_unit", "rsqrt_unit"])
def test_lint_per_parameter_set(unit, name):
    result = runner.lint(unit, PARAM_SETS[name])
    assert result.ok, f"verilator --lint-only -Wall {unit} ({name}):\n{result.tail()}"


def test_rsqrt_table_is_the_contracts():
    """The emitted rsqrt .mem file holds exactly rsqrt_lut() (never typed by hand)."""
    from m3vit.compiler import numerics
    from m3vit.rtl_sim.emit import mem_tables

    values, width = mem_tables()["m3v_rsqrt_lut.mem"]
    lut, params = numerics.rsqrt_lut()
    assert values == [int(v) for v in lut] and width == params["value_bits"]
    assert len(values) == 3 << numerics.CONTRACT.rsqrt_lut_bits


def test_header_carries_the_layernorm_constants():
    from m3vit.compiler.numerics import CONTRACT as c
    from m3vit.rtl_sim.emit import contract_params, render_svh

    assert contract_params() | {"RSQRT_M": c.rsqrt_mant_frac, "RSQRT_R": c.rsqrt_frac, "RSQRT_LS": c.rsqrt_lut_bits,
                                "NORM_W": c.norm_bits, "NORM_F": c.norm_frac} == contract_params()
    hw = HwConfig().replace(limits=Limits(max_dim=333))
    assert "`define M3V_MAX_DIM 333\n" in render_svh(hw)


def test_newton_error_term_fits_the_rtl_width():
    """rsqrt_unit keeps 2^(M+2R) - mant·y0² in M + 2R + 2 signed bits: true for every mantissa."""
    from m3vit.compiler import numerics as nx

    c = nx.CONTRACT
    M, R, Ls = c.rsqrt_mant_frac, c.rsqrt_frac, c.rsqrt_lut_bits
    mant = np.arange(1 << M, 1 << (M + 2), dtype=np.int64)
    y0 = nx.rsqrt_lut()[0][(mant >> (M - Ls)) - (1 << Ls)]
    err = (np.int64(1) << (M + 2 * R)) - mant * y0 * y0
    assert np.abs(err).max() < 1 << (M + 2 * R + 1)


@pytest.mark.slow
def test_synth_layernorm_small():
    """Synthesis on its own (4 lanes): no latches; lanes map their three products to DSPs."""
    if runner.yosys_path() is None:
        pytest.skip("yosys is not installed (scripts/setup.sh --test installs it)")
    from m3vit.rtl_sim.synth import synth_unit

    r = synth_unit("layernorm_unit", PARAM_SETS["4x4-a16w8"], method="full")
    assert r["dsp"] >= 3 * 4 and r["lut"] > 0 and r["ff"] > 0
