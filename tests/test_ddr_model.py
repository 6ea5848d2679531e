"""The simulation DDR model (rtl_sim/tb/axi_ddr_model.sv) under cocotb: the memory image and the
dump manifest are files written here before the simulation starts, as the accelerator harness
will write them."""

from __future__ import annotations

import random
from pathlib import Path

from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig

TB_DIR = Path(__file__).parent / "rtl"
BASE = 0x10_0000
WORDS = 4096


def test_ddr_model(tmp_path):
    rng = random.Random(2026)
    image = tmp_path / "image.hex"
    image.write_text("".join(f"{rng.getrandbits(128):032x}\n" for _ in range(WORDS)))
    load = tmp_path / "load.txt"
    load.write_text(f"{BASE:x} {image}\n")
    dump = tmp_path / "dump.hex"
    dump_words = 4 * 8192 // 16
    dump_manifest = tmp_path / "dump.txt"
    dump_manifest.write_text(f"{BASE:x} {dump_words} {dump}\n")
    env = {"M3V_DDR_IMAGE": str(image), "M3V_DDR_BASE": hex(BASE), "M3V_DDR_DUMP": str(dump),
           "M3V_DDR_DUMP_ADDR": hex(BASE), "M3V_DDR_DUMP_WORDS": str(dump_words)}
    result = runner.run("axi_ddr_model", HwConfig(), "cocotb_axi_ddr_model", module_dir=TB_DIR, extra_env=env,
                        plusargs=[f"+ddr_load={load}", f"+ddr_dump={dump_manifest}"])
    assert result.ok and result.tests == 8, \
        f"{result.failed} of {result.tests} DDR model tests failed (log {result.log}):\n{runner.failure_summary(result)}"
