"""RTL tests: lint, yosys parse, cocotb simulation against the reference model, synthesis.

The cocotb test modules and the reference model live in tests/rtl/; the RTL in rtl_sim/rtl/.
Verilator builds are cached per parameter set under build/rtl/ (see m3vit.rtl_sim.runner).
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

from rtl_seeds import simulate_seeds

TB_DIR = Path(__file__).parent / "rtl"
sys.path.insert(0, str(TB_DIR))
import refmodel  # noqa: E402

# Two parameter sets in the default suite: a power-of-two array with the default formats, and an
# odd-sized array (padded adder tree) with narrower containers and more accumulator slots.
PARAM_SETS = {
    "4x4-a16w8": HwConfig().replace(p_in=4, p_out=4, token_block=4, limits=Limits(max_tokens=64)),
    "3x5-a8w6": HwConfig().replace(p_in=3, p_out=5, act_bits=8, weight_bits=6, token_block=8,
                                   limits=Limits(max_tokens=256)),
}
SLOW_SETS = {
    "1x2-a12w18": HwConfig().replace(p_in=1, p_out=2, act_bits=12, weight_bits=18, token_block=2,
                                     limits=Limits(max_tokens=16)),
    "8x6-a16w8": HwConfig().replace(p_in=8, p_out=6, token_block=16, limits=Limits(max_tokens=2048)),
}
SEEDS = (1, 2)
COCOTB_TESTS = 7


def _need_yosys():
    if runner.yosys_path() is None:
        pytest.skip("yosys is not installed (scripts/setup.sh --test installs it)")


# ---------------------------------------------------------------------------- reference model

@settings(max_examples=300, deadline=None)
@given(st.integers(-(1 << 60), 1 << 60), st.integers(-70, 70))
def test_refmodel_rshift_round_is_round_half_up(x, s):
    exact = Fraction(x) / (Fraction(2) ** s)
    assert refmodel.rshift_round(x, s) == (exact + Fraction(1, 2)).__floor__()


@settings(max_examples=200, deadline=None)
@given(st.integers(-(1 << 70), 1 << 70), st.integers(1, 48))
def test_refmodel_saturate_and_wrap(x, bits):
    y = refmodel.saturate(x, bits)
    assert -(1 << (bits - 1)) <= y <= (1 << (bits - 1)) - 1
    assert y == x or abs(y) <= abs(x)
    w = refmodel.wrap(x, bits)
    assert -(1 << (bits - 1)) <= w < (1 << (bits - 1)) and (w - x) % (1 << bits) == 0


def test_refmodel_gemm_and_combine_by_hand():
    # 3*2 + (-4)*5 + bias 100 = 86; >>> 2 with rounding = 22 (86/4 = 21.5 rounds up)
    assert refmodel.gemm_row([3, -4], [[2], [5]], [100], [2], 8) == [22]
    assert refmodel.gemm_row([127], [[127]], [0], [0], 8) == [127]        # saturates high
    assert refmodel.gemm_row([-128], [[127]], [0], [-2], 16) == [-32768]  # x4 then saturates low
    # score 0.5 (32768 / 2^16) x 7 = 3.5 -> 4 per term, two terms -> 8
    assert refmodel.combine_row([[7], [7]], [32768, 32768], 16, [0], [0], 8) == [8]


def test_refmodel_agrees_with_compiler_numerics():
    """The RTL's reference and the compiler's golden model implement the same contract."""
    numerics = pytest.importorskip("m3vit.compiler.numerics", reason="compiler/numerics.py is not available")
    if not all(hasattr(numerics, f) for f in ("gemm", "moe_combine", "Fmt")):
        pytest.skip("compiler/numerics.py has no gemm/moe_combine/Fmt yet")
    import random

    import numpy as np

    rng = random.Random(5)
    for _ in range(20):
        T, K, N, ab, wb, ob = rng.randint(1, 4), rng.randint(1, 40), rng.randint(1, 6), 16, 8, rng.randint(2, 16)
        x = [[rng.randint(-(1 << (ab - 1)), (1 << (ab - 1)) - 1) for _ in range(K)] for _ in range(T)]
        w = [[rng.randint(-(1 << (wb - 1)), (1 << (wb - 1)) - 1) for _ in range(N)] for _ in range(K)]
        b = [rng.randint(-(1 << 30), 1 << 30) for _ in range(N)]
        s = [rng.randint(-8, 40) for _ in range(N)]
        gold = numerics.gemm(np.array(x), np.array(w), np.array(b), np.array(s), numerics.Fmt(ob, 0),
                             numerics.Fmt(ab, 0), stats=numerics.SatCounter())
        assert [refmodel.gemm_row(row, w, b, s, ob) for row in x] == gold.tolist()
        E = rng.randint(1, 4)
        ys = [[[rng.randint(-32768, 32767) for _ in range(N)] for _ in range(E)] for _ in range(T)]
        sc = [[rng.randrange(1 << 16) for _ in range(E)] for _ in range(T)]
        cs = rng.randint(0, 40)
        gold = numerics.moe_combine(np.array(sc), np.array(ys), cs, numerics.Fmt(ob, 0), stats=numerics.SatCounter())
        mine = [refmodel.combine_row(ys[t], sc[t], cs, [0] * N, [0] * N, ob) for t in range(T)]
        assert mine == gold.tolist()


# ---------------------------------------------------------------------------- lint and parse

@pytest.mark.parametrize("unit", runner.units())
def test_lint_every_module(unit):
    result = runner.lint(unit)
    assert result.ok, f"verilator --lint-only -Wall {unit}:\n{result.tail()}"


@pytest.mark.parametrize("name", sorted(PARAM_SETS) + sorted(SLOW_SETS))
def test_lint_compute_unit_per_parameter_set(name):
    hw = {**PARAM_SETS, **SLOW_SETS}[name]
    result = runner.lint("compute_unit", hw)
    assert result.ok, f"verilator --lint-only -Wall compute_unit ({name}):\n{result.tail()}"


@pytest.mark.parametrize("unit", runner.units())
def test_yosys_parses_every_module(unit):
    _need_yosys()
    # A small configuration: parsing is about the language subset (elaborating the default
    # array takes yosys half a minute; the synthesis tests cover it).
    result = runner.yosys_parse(unit, PARAM_SETS["4x4-a16w8"])
    assert result.ok, f"yosys read_verilog -sv {unit}:\n{result.tail()}"


# ---------------------------------------------------------------------------- simulation

def _simulate(hw: HwConfig, seeds=SEEDS, extra_env=None) -> dict[int, dict[str, str]]:
    """Run every cocotb test once per Verilator seed; returns the output digests per seed."""
    return simulate_seeds("compute_unit", hw, "cocotb_compute_unit", COCOTB_TESTS, seeds, extra_env,
                          digests_per_run=COCOTB_TESTS)


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_compute_unit_matches_reference_for_two_seeds(name):
    """Bit-exact against refmodel.py; identical outputs and timing whatever the power-up state."""
    digests = _simulate(PARAM_SETS[name])
    first, *others = digests.values()
    for seed, d in zip(SEEDS[1:], others):
        assert d == first, f"results differ between Verilator seeds {SEEDS[0]} and {seed}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_SETS) + sorted(PARAM_SETS))
def test_compute_unit_long_regression(name):
    hw = {**PARAM_SETS, **SLOW_SETS}[name]
    digests = _simulate(hw, seeds=(3, 4), extra_env={"M3V_TB_SCALE": "8"})
    assert digests[3] == digests[4]


# ---------------------------------------------------------------------------- synthesis

def test_synth_small_array():
    """A 2x2 array through synth_xilinx: the DSP count is exact, no latches, sane depth."""
    _need_yosys()
    from m3vit.rtl_sim.synth import synth_report

    hw = HwConfig().replace(p_in=2, p_out=2, token_block=2, limits=Limits(max_tokens=16))
    rep = synth_report(hw, method="full")
    unit = rep["units"]["compute_unit"]
    assert unit["dsp"] == hw.p_in * hw.p_out + hw.p_out          # one per MAC, one per combine lane
    assert unit["lut"] > 0 and unit["ff"] > 0 and unit["bram36"] == 0 and unit["uram"] == 0
    assert 0 < unit["ff_dsp_packable"] < unit["ff"]
    assert 1 <= unit["lut_levels"] <= 8
    assert rep["fits"] and rep["macs_per_cycle"] == 4 and rep["peak_gmacs"] == 1.2


@pytest.mark.slow
def test_synth_whole_accelerator_dsp():
    """The whole top (engines, controller, every unit) on a small array, multipliers mapped: at
    least the datapath units' DSP48E2 (the engines add their address arithmetic), within budget."""
    _need_yosys()
    from m3vit.rtl_sim.synth import format_report, synth_report

    hw = HwConfig().replace(p_in=2, p_out=2, softmax_lanes=2, token_block=2,
                            limits=Limits(max_tokens=16, max_dim=32, max_hidden=64, max_experts=4, max_k=2))
    rep = synth_report(hw, ["m3v_accel"])
    top = rep["units"]["m3v_accel"]
    assert top["method"].startswith("dsp") and top["lut"] == 0
    assert hw.dsp_datapath <= top["dsp"] <= rep["budget"]["dsp"]
    assert sum(top["dsp_by_instance"].values()) == top["dsp"] and "compute_unit" in top["dsp_by_instance"]
    assert f"DSP {top['dsp']}/" in format_report(rep)


def test_dsp_by_instance_multiplies_along_the_hierarchy():
    """A hierarchical stat: a module's own DSPs count once per instance on every path to it, grouped
    under the top's child they sit in."""
    from m3vit.rtl_sim.synth import dsp_by_instance

    def section(name, dsp):
        return f"=== {name} ===\n\n   Number of cells:  9\n     DSP48E2  {dsp}\n     LUT2  3\n\n"
    stat = (section("top", 1) + section("$paramod$ab\\eng_a", 2) + section("$paramod\\leaf\\W=s32'1", 5)
            + section("plain", 0)
            + "=== design hierarchy ===\n\n   top  1\n     $paramod$ab\\eng_a  2\n"
              "       $paramod\\leaf\\W=s32'1  3\n     plain  1\n       $paramod\\leaf\\W=s32'1  1\n\n"
              "   Number of wires:  10\n     DSP48E2  40\n")
    got = dsp_by_instance(stat, "top")
    assert got == {"top": 1, "eng_a": 2 * 2 + 2 * 3 * 5, "plain": 5}


def test_synth_cli_arguments():
    """The `m3vit synth` parser (wired into cli.py by add_synth_args) and its usage errors."""
    import argparse

    from m3vit.errors import ConfigError, UsageError
    from m3vit.rtl_sim.synth import add_synth_args, cli_synth

    parser = argparse.ArgumentParser()
    add_synth_args(parser)
    args = parser.parse_args(["--parallel", "8x8", "--unit", "requant", "--json"])
    assert (args.parallel, args.unit, args.json, args.method) == ("8x8", ["requant"], True, "auto")
    with pytest.raises(UsageError, match="unknown unit 'nope'"):
        cli_synth(parser.parse_args(["--unit", "nope"]))
    with pytest.raises(ConfigError, match=r"needs 4277 DSP48E2 \(compute_unit 4160"):
        cli_synth(parser.parse_args(["--parallel", "64x64"]))


@pytest.mark.slow
def test_synth_default_array_scaled():
    """The shipped hw.json, scaled from P_OUT = 1, 2, 3 (scripts/synth_full.sh runs it unscaled)."""
    _need_yosys()
    from m3vit.rtl_sim.synth import synth_report

    hw = HwConfig.default()
    rep = synth_report(hw, method="scaled")
    assert rep["total"]["dsp"] == hw.dsp_estimate
    assert rep["fits"], rep["utilisation_pct"]
