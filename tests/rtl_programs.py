"""Random Programs for the RTL engine tests: tensors laid out in the four address spaces, and a
check of every simulated run against program_exec.execute, byte for byte."""

from __future__ import annotations

from m3vit.compiler import isa
from m3vit.compiler.program_exec import ProgramError, execute
from m3vit.rtl_sim import rtlsim


class Layout:
    """Tensors placed in the four spaces at 64-byte offsets, with random gaps between them."""

    def __init__(self, rng, hw):
        self.rng, self.hw = rng, hw
        self.mem = {s: bytearray() for s in isa.SPACES}

    def put(self, space: str, data: bytes) -> int:
        m = self.mem[space]
        m += bytes(isa.align(len(m)) - len(m) + 64 * int(self.rng.integers(0, 3)))
        off = len(m)
        m += data
        return isa.ref(space, off)

    def reserve(self, space: str, n: int) -> int:
        return self.put(space, bytes(n))

    def job(self, name: str, instrs: list[isa.Instr]):
        for m in self.mem.values():
            m += bytes(isa.align(len(m)) - len(m))
        prog = rtlsim.program_bytes(instrs + [isa.Instr("end")], self.hw, weight_bytes=len(self.mem["wgt"]),
                                    arena_bytes=len(self.mem["arena"]), input_bytes=len(self.mem["in"]),
                                    output_bytes=len(self.mem["out"]), n_tasks=1)
        return rtlsim.Job(name=name, program=prog, weights=bytes(self.mem["wgt"]),
                          image=bytes(self.mem["in"]), task=0)


def check_jobs(jobs, hw, stall_permille: int = 0, seed: int = 1):
    """Simulate the jobs in one run; each must end with the executor's STATUS and, when it runs,
    leave the executor's `out` and arena bytes."""
    results = rtlsim.simulate(jobs, hw, seed=seed, stall_permille=stall_permille)
    assert len(results) == len(jobs)
    for job, r in zip(jobs, results):
        assert r.ddr_errors == 0, f"{job.name}: {r.ddr_errors} AXI protocol errors at the DDR model"
        try:
            ref = execute(job.program, job.weights, job.image, job.task, hw_hash=hw.hash())
        except ProgramError as e:
            assert r.status == e.status, f"{job.name}: STATUS {r.status}, the executor refuses with {e.status}"
            continue
        assert r.status == 0, f"{job.name}: STATUS {r.status}"
        assert r.output == bytes(ref.memories["out"]), f"{job.name}: out differs"
        assert r.arena == bytes(ref.memories["arena"]), f"{job.name}: arena differs"
    return results
