"""The cocotb side of ``rtlsim.simulate``: runs a list of Programs on the RTL accelerator
(rtl_sim/tb/accel_tb.sv) through the host Driver, cold: Program, weights and input go into the
simulated DDR through the driver, nothing is loaded into the accelerator by backdoor.

The jobs come from ``$M3V_RUN_DIR/jobs.json`` (written by rtlsim.py); each job's results go to
``<name>.out.bin``, ``<name>.arena.bin`` and ``<name>.json`` (status, registers, and the
testbench's own counts) in the same directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

import cocotb
from m3vit.compiler import isa
from m3vit.rtl_sim.cocotb_device import CocotbDevice
from m3vit.rtl_sim.driver import REG, Driver
from m3vit.rtl_sim.hwconfig import HwConfig

RUN_DIR = Path(os.environ.get("M3V_RUN_DIR", "."))


@cocotb.test()
async def run_jobs(dut):
    spec = json.loads((RUN_DIR / "jobs.json").read_text())
    hw = HwConfig.from_dict(spec["hw"], "jobs.json")
    dev = CocotbDevice(dut, Path(os.environ.get("M3V_TEST_DIR", RUN_DIR)), mem_bytes=spec["mem_bytes"],
                       beat=hw.axi_width_bits // 8, wait_cycles=spec.get("poll_cycles", 64))
    await dev.reset(spec.get("stall_permille", 0))
    drv = Driver(dev, hw)
    await drv.check_bitstream()
    for job in spec["jobs"]:
        dev.next_free = 0   # every job starts from freshly zeroed buffers
        program = (RUN_DIR / job["program"]).read_bytes()
        weights = (RUN_DIR / job["weights"]).read_bytes()
        image = np.frombuffer((RUN_DIR / job["image"]).read_bytes(), "<i2")
        meta = json.loads((RUN_DIR / job["meta"]).read_text()) if job.get("meta") else {}
        prog = await drv.load((program, weights, meta))
        if job.get("arena_init"):   # a slice of a Program starts from the arena its prefix left
            await dev.write_mem(prog.addr["ARENA"], (RUN_DIR / job["arena_init"]).read_bytes())
        # input, start to done, output: the simulator's speed, in wall time and in the CPU time of
        # this process (the model and cocotb), which other load on the machine does not inflate
        t0, c0 = time.perf_counter(), time.process_time()
        res = await drv.run(prog, image, task=job["task"], max_polls=spec.get("max_polls", 10_000_000))
        run_seconds, run_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        # the testbench's counts restart with each start write
        tb = (int(dut.tb_cycles.value), int(dut.tb_rd_bytes.value), int(dut.tb_wr_bytes.value))
        arena = await dev.read_mem(prog.addr["ARENA"], prog.header.arena_bytes) if job.get("arena", True) else b""
        out = await dev.read_mem(prog.addr["OUT"], prog.header.output_bytes)
        (RUN_DIR / f"{job['name']}.out.bin").write_bytes(out)
        (RUN_DIR / f"{job['name']}.arena.bin").write_bytes(arena)
        regs = {"status": await dev.read32(REG["STATUS"]), "instr_count": res.instructions, **res.counters}
        (RUN_DIR / f"{job['name']}.json").write_text(json.dumps(
            {"status": regs["status"], "status_name": res.status, "registers": regs,
             "tb": {"cycles": tb[0], "rd_bytes": tb[1], "wr_bytes": tb[2]},
             "ddr_errors": int(dut.ddr_errors.value), "isa_version": isa.VERSION,
             "run_seconds": run_seconds, "run_cpu_seconds": run_cpu_seconds}, sort_keys=True))
