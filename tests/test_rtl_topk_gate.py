"""RTL tests of the MoE top-k gate (topk_gate.sv): cocotb simulation, bit-exact against
numerics.moe_gate and numerics.expert_queues, for two parameter sets and two Verilator seeds;
lint per parameter set; synthesis.

Lint and yosys parse with the default configuration run in tests/test_rtl_units.py (every .sv file).
"""

from __future__ import annotations


import pytest

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

from rtl_seeds import simulate_seeds

UNIT, MODULE, N_TESTS = "topk_gate", "cocotb_topk_gate", 6
UNITS = ("topk_gate",)

# 16 experts, top-4, 16-bit logits; 7 experts, top-3, 8-bit logits and a token limit that is not a
# power of two (queue RAM depth 111). The runtime N and k vary inside the cocotb tests.
PARAM_SETS = {
    "e16k4-a16": HwConfig().replace(limits=Limits(max_tokens=48)),
    "e7k3-a8": HwConfig().replace(act_bits=8, limits=Limits(max_tokens=37, max_experts=7, max_k=3)),
}
SEEDS = (1, 2)


def _simulate(hw: HwConfig, seeds=SEEDS, extra_env=None) -> dict[int, dict[str, str]]:
    return simulate_seeds(UNIT, hw, MODULE, N_TESTS, seeds, extra_env)


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_topk_gate_matches_golden_model_for_two_seeds(name):
    """Bit-exact against numerics.py; identical outputs and timing whatever the power-up state."""
    digests = _simulate(PARAM_SETS[name])
    assert digests[SEEDS[0]] == digests[SEEDS[1]], "results differ between Verilator seeds"


# Longer runs: up to 400 tokens per run and other stimulus (another base seed).
SLOW_SETS = {**PARAM_SETS, "e16k4-a16-t600": HwConfig().replace(limits=Limits(max_tokens=600))}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_SETS))
def test_topk_gate_long_regression(name):
    digests = _simulate(SLOW_SETS[name], seeds=(3, 4), extra_env={"M3V_TB_SCALE": "10", "M3V_GATE_SEED": "1"})
    assert digests[3] == digests[4]


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
@pytest.mark.parametrize("unit", UNITS)
def test_lint_per_parameter_set(unit, name):
    result = runner.lint(unit, PARAM_SETS[name])
    assert result.ok, f"verilator --lint-only -Wall {unit} ({name}):\n{result.tail()}"


def test_svh_carries_the_gate_limits(tmp_path):
    from m3vit.rtl_sim.emit import emit_svh

    text = emit_svh(PARAM_SETS["e7k3-a8"], tmp_path).read_text()
    for line in ("`define M3V_MAX_EXPERTS 7", "`define M3V_MAX_K 3", "`define M3V_MAX_TOKENS 37",
                 "`define M3V_GATE_BITS 16", "`define M3V_GATE_FRAC 15"):
        assert line in text.splitlines()


@pytest.mark.slow
def test_synth_topk_gate_default():
    """The default configuration on its own: no latches, BRAM for the queue memories."""
    if runner.yosys_path() is None:
        pytest.skip("yosys is not installed (scripts/setup.sh --test installs it)")
    from m3vit.rtl_sim.synth import synth_unit

    r = synth_unit(UNIT, HwConfig.default(), method="full")
    assert r["dsp"] >= 1 and r["bram36"] >= 1 and r["lut"] > 0 and r["ff"] > 0


def test_synth_all_target_sums_every_unit(monkeypatch):
    """`--unit all`: one row per datapath unit present in rtl/ and their total (yosys replaced by
    distinct per-unit counts, so the test is about the bookkeeping only)."""
    from m3vit.rtl_sim import synth

    present = [u for u in synth.ALL_UNITS if u in runner.units()]
    assert "compute_unit" in present and UNIT in present
    fake = {u: {k: float(10 ** i + j) for j, k in enumerate(synth.RESOURCES)} for i, u in enumerate(present)}
    for r in fake.values():
        r.update(method="full", seconds=0.0)
    monkeypatch.setattr(synth, "synth_unit", lambda u, hw, method, wd: fake[u])
    rep = synth.synth_report(HwConfig.default(), units=["all"], workdir="unused")
    assert list(rep["units"]) == present
    for k in synth.RESOURCES:
        assert rep["total"][k] == sum(fake[u][k] for u in present)
    assert "compute_unit" in synth.format_report(rep) and UNIT in synth.format_report(rep)


def test_synth_lanes_of_the_scaled_method():
    from m3vit.rtl_sim import synth

    hw = HwConfig.default()
    assert synth._lanes("compute_unit", hw) == hw.p_out
    assert synth._lanes("softmax_unit", hw) == hw.softmax_lanes == synth._unit_params("softmax_unit", hw)["P"]
    assert synth._lanes("layernorm_unit", hw) == synth._unit_params("layernorm_unit", hw)["P"]
    assert synth._lanes(UNIT, hw) is None    # no lanes: always synthesised in full
