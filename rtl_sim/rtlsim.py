"""Run Programs on the RTL accelerator: rtl_sim/tb/accel_tb.sv (m3v_accel on the DDR model),
built with Verilator for one hardware configuration and driven by the host Driver under cocotb.

    jobs = [Job("case0", program, weights, image_bytes, task=0)]
    results = simulate(jobs, hw)        # one simulator start for all jobs
    results[0].status, .output, .arena, .cycles, .tb_cycles, .rd_bytes, .wr_bytes, .counters

Every job runs cold from zeroed buffers: the driver writes the Program, the weights and the input
into the simulated DDR and starts the accelerator; the output and the arena are read back through
the DDR model. ``program_bytes`` assembles a Program from instructions for tests and tools.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m3vit.compiler import isa
from m3vit.errors import M3ViTError
from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig

TB = "accel_tb"
MEM_BYTES = (1 << 18) * 16      # the testbench's DDR (MEM_WORDS beats of 128 bits)


@dataclass
class Job:
    name: str
    program: bytes
    weights: bytes
    image: bytes                # the `in` space: int16 little-endian
    task: int = 0
    meta: dict | None = None    # program.json, when the Program came from a build
    arena: bool = True          # read the arena back


@dataclass
class JobResult:
    name: str
    status: int
    status_name: str
    output: bytes
    arena: bytes
    counters: dict[str, int] = field(default_factory=dict)
    tb: dict[str, int] = field(default_factory=dict)
    ddr_errors: int = 0

    @property
    def cycles(self) -> int:
        return self.counters.get("cycles", 0)

    @property
    def tb_cycles(self) -> int:
        return self.tb.get("cycles", 0)

    @property
    def rd_bytes(self) -> int:
        return self.tb.get("rd_bytes", 0)

    @property
    def wr_bytes(self) -> int:
        return self.tb.get("wr_bytes", 0)


def program_bytes(instrs: Sequence[isa.Instr], hw: HwConfig, *, weight_bytes: int, arena_bytes: int,
                  input_bytes: int, output_bytes: int, n_tasks: int = 1) -> bytes:
    """A Program (header + instructions) for hw from a list of instructions."""
    header = isa.Header(bytes.fromhex(hw.hash()), len(instrs), weight_bytes, arena_bytes, n_tasks, input_bytes,
                        output_bytes)
    return header.encode() + b"".join(i.encode() for i in instrs)


def simulate(jobs: Sequence[Job], hw: HwConfig, *, seed: int = 1, stall_permille: int = 0,
             build_root: str | Path | None = None, run_name: str = "rtlsim", poll_cycles: int = 64) -> list[JobResult]:
    """Build accel_tb for hw (cached) and run the jobs, in order, in one simulation."""
    if not jobs:
        return []
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise M3ViTError(f"job names must be unique: {names}")
    run_dir = runner.build_dir_for(TB, hw, build_root) / f"{run_name}-jobs"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_jobs = []
    for j in jobs:
        files = {"program": f"{j.name}.program.bin", "weights": f"{j.name}.weights.bin", "image": f"{j.name}.in.bin"}
        (run_dir / files["program"]).write_bytes(j.program)
        (run_dir / files["weights"]).write_bytes(j.weights)
        (run_dir / files["image"]).write_bytes(j.image)
        if j.meta is not None:
            files["meta"] = f"{j.name}.meta.json"
            (run_dir / files["meta"]).write_text(json.dumps(j.meta))
        spec_jobs.append({"name": j.name, "task": int(j.task), "arena": j.arena, **files})
    (run_dir / "jobs.json").write_text(json.dumps(
        {"hw": hw.to_dict(), "mem_bytes": MEM_BYTES, "stall_permille": stall_permille, "poll_cycles": poll_cycles,
         "jobs": spec_jobs}))
    from m3vit.rtl_sim.cocotb_device import plusargs   # needs cocotb: imported only when simulating

    test_dir = runner.build_dir_for(TB, hw, build_root) / run_name
    result = runner.run(TB, hw, "m3vit.rtl_sim.cocotb_program", seed=seed, build_root=build_root, name=run_name,
                        plusargs=plusargs(test_dir), extra_env={"M3V_RUN_DIR": str(run_dir)})
    out = []
    for j in jobs:
        rep = run_dir / f"{j.name}.json"
        if not rep.is_file():
            raise M3ViTError(f"the RTL simulation stopped before job {j.name!r} finished "
                             f"(log {result.log}):\n{runner.failure_summary(result)}")
        r = json.loads(rep.read_text())
        out.append(JobResult(j.name, r["status"], r["status_name"], (run_dir / f"{j.name}.out.bin").read_bytes(),
                             (run_dir / f"{j.name}.arena.bin").read_bytes(), r["registers"], r["tb"],
                             r["ddr_errors"]))
    if not result.ok:
        raise M3ViTError(f"the RTL simulation failed (log {result.log}):\n{runner.failure_summary(result)}")
    return out
