"""The RTL GEMM engine (rtl_sim/rtl/eng_gemm.sv) inside the accelerator top, byte for byte against
the Python Program executor.

Random `gemm` instructions over every pair of row modes (direct, gather, queue x direct, queue,
scatter), int8 and int16 weights, with and without bias, GELU, odd sizes against P_IN, P_OUT,
the token block and the 16-byte beat, row strides beyond the row, unaligned rows, saturating
shifts, idle experts; `moe_combine` with k = 1..3; the residual flag on both (and its refusals);
refusals (over_limit, bad_opcode) that must store nothing. Every job is one instruction and END;
out and arena must equal program_exec.execute's bytes, the status its ProgramError status.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from gemm_cases import X_MODES, Y_MODES, Case, Space, combine_case, gemm_case
from m3vit.compiler import isa
from m3vit.compiler.program_exec import ProgramError, execute
from m3vit.rtl_sim import rtlsim

from accel_hw import HW  # noqa: E402
OK = isa.STATUS["ok"]


def program(case: Case, hw=HW) -> bytes:
    return rtlsim.program_bytes(case.instrs + [isa.Instr("end")], hw, weight_bytes=len(case.weights),
                                arena_bytes=case.arena_bytes, input_bytes=len(case.image),
                                output_bytes=case.output_bytes)


def run_and_compare(cases: list[Case], seed: int = 1, stall_permille: int = 0, hw=HW) -> list[rtlsim.JobResult]:
    """One simulation for all cases; each must match the executor to the byte (or its refusal)."""
    progs = [program(c, hw) for c in cases]
    jobs = [rtlsim.Job(c.name, p, c.weights, c.image) for c, p in zip(cases, progs)]
    results = rtlsim.simulate(jobs, hw, seed=seed, stall_permille=stall_permille)
    bad = []
    for c, p, r in zip(cases, progs, results):
        desc = f"{c.name}: {c.instrs[0].op} flags {c.instrs[0].flags:#x} {c.instrs[0].fields}"
        try:
            ref = execute(p, c.weights, c.image, 0, hw_hash=hw.hash())
        except ProgramError as e:
            if r.status != e.status:
                bad.append(f"{desc}: STATUS {r.status_name}, the executor refuses with {e.status_name}")
            elif any(r.output) or any(r.arena):
                bad.append(f"{desc}: refused ({r.status_name}) but stored")
            continue
        if r.status != OK:
            bad.append(f"{desc}: STATUS {r.status_name}, the executor runs it")
        elif r.output != bytes(ref.memories["out"]) or r.arena != bytes(ref.memories["arena"]):
            bad.append(f"{desc}: out / arena differ from the executor's")
        if r.ddr_errors:
            bad.append(f"{desc}: {r.ddr_errors} AXI protocol errors at the DDR model")
    assert not bad, "\n".join(bad)
    return results


def refusals(rng: random.Random) -> list[Case]:
    """Instructions the executor refuses: the engine must refuse them alike, storing nothing."""
    out = []

    def variant(name, case, **changes):
        f = dict(case.instrs[0].fields)
        flags = changes.pop("flags", case.instrs[0].flags)
        f.update(changes)
        out.append(Case(name, [isa.Instr(case.instrs[0].op, f, flags)], case.weights, case.image,
                        case.arena_bytes, case.output_bytes))

    g = gemm_case(rng, HW, "r", "direct", "direct", residual=False)
    # the spaces are 64-byte multiples: a ref at the end has no byte left
    variant("x_past_in", g, x_ref=isa.ref("in", len(g.image)))
    variant("w_past_wgt", g, w_ref=isa.ref("wgt", len(g.weights)))
    variant("y_into_wgt", g, y_ref=isa.ref("wgt", 0))
    variant("y_past_out", g, y_ref=isa.ref("out", 0), rows=1 + g.output_bytes // 2)
    variant("bad_xmode", g, flags=g.instrs[0].flags | (3 << isa.XMODE_SHIFT))
    q = gemm_case(rng, HW, "q", "gather", "scatter", residual=False)
    qf = q.instrs[0].fields
    variant("expert_past_table", q, expert=qf["queue_shape"] & 0xFFFF)
    variant("queue_past_bound", q, rows=0)
    variant("bad_ymode", q, flags=q.instrs[0].flags | (3 << isa.YMODE_SHIFT))
    c = combine_case(rng, HW, "c", residual=False)
    variant("combine_out_past", c, out_ref=isa.ref("out", 0), dim=c.instrs[0].fields["dim"] + 64)
    variant("combine_shift_past", c, shift_ref=isa.ref("wgt", len(c.weights)))
    return out


def mixed_cases(rng: random.Random, per_pair: int, residual: bool) -> list[Case]:
    cases = []
    for xm in X_MODES:
        for ym in Y_MODES:
            for i in range(per_pair):
                cases.append(gemm_case(rng, HW, f"g_{xm}_{ym}_{i}", xm, ym, residual=False))
    for k in (1, 2, 3):
        cases.append(combine_case(rng, HW, f"c_k{k}", k=k, residual=False))
    if residual:
        for i in range(3):
            cases.append(gemm_case(rng, HW, f"g_res_{i}", "direct", "direct", residual=True))
        for k in (1, 2, 3):
            cases.append(combine_case(rng, HW, f"c_res_k{k}", k=k, residual=True))
    return cases


def test_gemm_and_combine_all_modes_bit_exact():
    rng = random.Random(11)
    cases = mixed_cases(rng, 2, False)
    cases.append(gemm_case(rng, HW, "g_big", "direct", "direct", residual=False, big=True))
    cases.append(gemm_case(rng, HW, "g_big_q", "gather", "scatter", residual=False, big=True))
    cases.append(combine_case(rng, HW, "c_big", k=2, residual=False, big=True))
    cases += refusals(rng)
    run_and_compare(cases, seed=1)


def test_residual_fusion_bit_exact():
    rng = random.Random(12)
    cases = [gemm_case(rng, HW, f"g_res_{i}", "direct", "direct", residual=True) for i in range(6)]
    cases += [combine_case(rng, HW, f"c_res_{i}", k=1 + i % 3, residual=True) for i in range(6)]
    q = gemm_case(rng, HW, "g_res_queued", "gather", "queue", residual=False)
    f = dict(q.instrs[0].fields)
    cases.append(Case("g_res_queued", [isa.Instr("gemm", f, q.instrs[0].flags | 1 << isa.FLAGS["residual"])],
                      q.weights, q.image, q.arena_bytes, q.output_bytes))
    # a residual format wider than the 16-bit activations: over_limit, nothing stored
    for c in (cases[0], cases[6]):
        f = dict(c.instrs[0].fields)
        f["res_fmt"] = isa.pack_fmt(16, 0, signed=False)
        cases.append(Case(c.name + "_wide_res_fmt", [isa.Instr(c.instrs[0].op, f, c.instrs[0].flags)], c.weights,
                          c.image, c.arena_bytes, c.output_bytes))
    run_and_compare(cases, seed=2)


def test_random_ddr_stalls():
    rng = random.Random(13)
    cases = [gemm_case(rng, HW, f"g{i}", residual=None) for i in range(8)]
    cases += [combine_case(rng, HW, f"c{i}", residual=None) for i in range(3)]
    run_and_compare(cases, seed=3, stall_permille=300)


def pinned_cases(rng: random.Random, hw=HW) -> list[Case]:
    """Shapes against the engine's structure: several weight groups (GT = 4 tiles of P_OUT) with a
    partial last one, row blocks, one weight tile spanning the matrix (out_dim <= P_OUT), in_dim 1
    and 2 (ports without weight rows), output rows on beat boundaries (y_ld a multiple of the beat:
    two write ports) and not, residual block buffers."""
    p_in, p_out, slots = hw.p_in, hw.p_out, hw.token_block
    beat = hw.axi_width_bits // 16
    n3 = 2 * 4 * p_out + p_out // 2 + 1          # three groups, the last partial
    shapes = [
        ("groups_res_dual", "direct", "direct", True, (2 * slots + 3, 3 * p_in + 1, n3, beat * (-(-n3 // beat)))),
        ("groups_res_single", "direct", "direct", True, (2 * slots + 1, 3 * p_in + 2, n3, n3)),
        ("groups_plain_dual", "direct", "direct", False, (slots + 2, 2 * p_in + 3, n3, beat * (-(-n3 // beat)))),
        ("group_exact", "direct", "direct", True, (slots, p_in + 1, 4 * p_out, 4 * p_out)),
        ("k1", "direct", "direct", False, (slots + 1, 1, 5 * p_out, 5 * p_out)),
        ("k2", "direct", "direct", True, (3, 2, 5 * p_out + 1, 6 * p_out)),
        ("whole", "direct", "direct", False, (2 * slots + 1, 3 * p_in + 3, p_out - 1, p_out - 1)),
        ("gather_scatter", "gather", "scatter", False, (2 * slots + 3, 3 * p_in + 1, n3, beat * (-(-n3 // beat)))),
        ("queue_queue", "queue", "queue", False, (slots + 3, p_in + 1, 4 * p_out + 2, 5 * p_out)),
        ("direct_queue", "direct", "queue", False, (slots + 3, 2 * p_in, n3, n3 + 1)),
    ]
    cases = []
    for name, xm, ym, res, shape in shapes:
        for w16 in (False, True):
            cases.append(gemm_case(rng, hw, f"{name}_{'w16' if w16 else 'w8'}", xm, ym, residual=res, shape=shape,
                                   w16=w16))
    return cases


def test_weight_groups_and_write_ports_bit_exact():
    rng = random.Random(14)
    cases = pinned_cases(rng)
    # a refusal found after the weights started loading during the queue pre-pass
    q = gemm_case(rng, HW, "q_late_refusal", "gather", "queue", residual=False, shape=(9, 13, 37, 40))
    variant = dict(q.instrs[0].fields, rows=0)
    cases.append(Case("q_late_refusal", [isa.Instr("gemm", variant, q.instrs[0].flags)], q.weights, q.image,
                      q.arena_bytes, q.output_bytes))
    run_and_compare(cases, seed=4)
    run_and_compare(pinned_cases(random.Random(15))[::3], seed=5, stall_permille=300)


@pytest.mark.slow
def test_x_not_resident_bit_exact():
    """A configuration whose activation buffer holds few rows: x is read again for every weight
    group, a block of rows at a time (its own Verilator build)."""
    small = HW.replace(buffers=dataclasses.replace(HW.buffers, activations=256))
    rng = random.Random(16)
    cases = pinned_cases(rng, small)
    cases += [gemm_case(rng, small, f"g_big{i}", big=True) for i in range(4)]
    run_and_compare(cases, seed=4, hw=small)
    run_and_compare(cases[::4], seed=5, stall_permille=300, hw=small)


@pytest.mark.slow
def test_weight_store_depth_bit_exact():
    """A weight store sized by buffers.weights (20 entries per half, above the 16 a whole-K tile of
    max_hidden = 64 needs): groups of 1, 2 and 3 int16 tiles (K = 64, 25, 24) and 2 and 4 int8
    ones (its own build)."""
    hw = HW.replace(limits=dataclasses.replace(HW.limits, max_dim=64, max_hidden=64),
                    buffers=dataclasses.replace(HW.buffers, weights=20 * 2 * HW.p_in * HW.p_out * 2)).validated()
    rng = random.Random(17)
    n = 4 * 4 * hw.p_out + 3                     # more than one group at every group size
    cases = [gemm_case(rng, hw, f"depth_k{k}_{'w16' if w16 else 'w8'}", "direct", "direct", residual=res,
                       shape=(hw.token_block + 3, k, n, n), w16=w16)
             for k, res in ((25, True), (64, False), (24, True)) for w16 in (False, True)]
    run_and_compare(cases, seed=6, hw=hw)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4, 5])
def test_long_regression(seed):
    rng = random.Random(100 + seed)
    cases = mixed_cases(rng, 4, True)
    cases += [gemm_case(rng, HW, f"g_big{i}", big=True) for i in range(6)]
    cases += [combine_case(rng, HW, f"c_big{i}", big=True) for i in range(3)]
    cases += refusals(rng)
    run_and_compare(cases, seed=seed, stall_permille=150 if seed % 2 else 0)


def test_space_helper_aligns():
    s = Space("wgt")
    assert s.put(b"x") == isa.ref("wgt", 0) and s.put(b"y") == isa.ref("wgt", 64)
