"""rtl_sim/rtlsim.py: Programs assembled from instructions run on the RTL accelerator through the
host Driver, several per simulation, each cold; results byte-identical with the Python Program
executor, refusals with its status code, the testbench's counts reported."""

from __future__ import annotations

import numpy as np

from m3vit.compiler import isa
from m3vit.compiler.program_exec import ProgramError, execute
from m3vit.rtl_sim import rtlsim
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

HW = HwConfig().replace(p_in=4, p_out=4, token_block=4, softmax_lanes=4, limits=Limits(max_tokens=64)).validated()


def _add_job(rng: np.random.Generator, name: str, rows: int, cols: int, over: bool = False) -> rtlsim.Job:
    n = rows * cols
    image = rng.integers(-32768, 32768, 2 * n).astype("<i2").tobytes()
    add = isa.Instr("add", {"a_ref": isa.ref("in", 0), "b_ref": isa.ref("in", isa.align(2 * n)),
                            "y_ref": isa.ref("arena", 0), "rows": rows + (1 if over else 0), "cols": cols,
                            "a_shift": int(rng.integers(-3, 6)), "b_shift": int(rng.integers(-3, 6)),
                            "fmt": isa.pack_fmt(int(rng.integers(4, 17)), 2)})
    copy = isa.Instr("add", {"a_ref": isa.ref("arena", 0), "b_ref": isa.ref("arena", 0), "y_ref": isa.ref("out", 0),
                             "rows": rows, "cols": cols, "a_shift": 1, "b_shift": 62, "fmt": isa.pack_fmt(16, 0)})
    image = image + bytes(isa.align(2 * n) + 2 * n - len(image))
    prog = rtlsim.program_bytes([add, copy, isa.Instr("end")], HW, weight_bytes=64, arena_bytes=isa.align(2 * n),
                                input_bytes=len(image), output_bytes=2 * n)
    return rtlsim.Job(name, prog, bytes(64), image)


def test_jobs_match_the_program_executor():
    rng = np.random.default_rng(7)
    jobs = [_add_job(rng, "a", 3, 37), _add_job(rng, "b", 1, 5), _add_job(rng, "refused", 2, 9, over=True)]
    results = rtlsim.simulate(jobs, HW, run_name="test-rtlsim")
    assert [r.name for r in results] == ["a", "b", "refused"]
    for job, res in zip(jobs, results):
        try:
            ref = execute(job.program, job.weights, job.image, job.task, hw_hash=HW.hash())
        except ProgramError as e:
            assert res.status == e.status, (job.name, res.status_name, e.status_name)
            continue
        assert res.status == 0, (job.name, res.status_name)
        assert res.output == bytes(ref.memories["out"]), job.name
        assert res.arena == bytes(ref.memories["arena"]), job.name
        assert res.tb_cycles > 0 and res.ddr_errors == 0
        assert res.rd_bytes == res.counters["ddr_rd_bytes"] and res.wr_bytes == res.counters["ddr_wr_bytes"]
    assert results[2].status == isa.STATUS["over_limit"]
