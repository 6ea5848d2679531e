"""One cocotb module run once per Verilator seed: the shared driver of the RTL unit tests.

Each run randomises power-up state differently (X-randomisation), so equal digests across seeds
show that no result depends on it, and differing power-up records show the seeds really differ.
"""

from __future__ import annotations

from pathlib import Path

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig

TB_DIR = Path(__file__).parent / "rtl"


def simulate_seeds(unit: str, hw: HwConfig, module: str, n_tests: int, seeds=(1, 2), extra_env=None,
                   digests_per_run: int | None = None) -> dict[int, dict[str, str]]:
    """The output digests per seed; asserts that every cocotb test passed on every seed."""
    digests, power_ups = {}, []
    for seed in seeds:
        result = runner.run(unit, hw, module, seed=seed, module_dir=TB_DIR, extra_env=extra_env)
        assert result.ok and result.tests == n_tests, (
            f"{unit} seed {seed}: {result.failed} of {result.tests} cocotb tests failed "
            f"(log {result.log}):\n{runner.failure_summary(result)}")
        digests[seed] = {p.stem: p.read_text() for p in sorted(result.test_dir.glob("*.digest"))}
        assert digests[seed], "no digests written"
        if digests_per_run is not None:
            assert len(digests[seed]) == digests_per_run
        power_ups.append((result.test_dir / "power_up.txt").read_text())
    assert len(set(power_ups)) == len(power_ups), "Verilator seeds gave the same power-up state"
    return digests
