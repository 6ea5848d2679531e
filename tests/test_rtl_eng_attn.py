"""RTL tests of the attention engine (rtl_sim/rtl/eng_attn.sv) inside the accelerator top.

Random `attention` instructions (odd token counts, 1-4 heads, head widths that are no multiple of
P_IN, P_OUT, the softmax lanes or the beat, heads exactly P_IN wide whose QK tiles are built two
keys per cycle, signed and unsigned score and output formats with saturation, query tiles smaller
than T, operands at unaligned head columns in every readable space) run on accel_tb and are compared byte for byte with the Python Program executor, in the
out space and the whole arena; a refused instruction must leave the executor's STATUS and no
store; one run has random DDR stalls.
"""

from __future__ import annotations

import numpy as np
import pytest

from m3vit.compiler import isa
from m3vit.compiler.program_exec import ProgramError, execute
from m3vit.rtl_sim import rtlsim
from m3vit.rtl_sim.hwconfig import Buffers, HwConfig, Limits

HW = HwConfig().replace(p_in=4, p_out=4, token_block=4, softmax_lanes=4,
                        limits=Limits(max_tokens=64)).validated()


def _fmt(rng, bits_hi: int = 16) -> int:
    signed = bool(rng.random() < 0.75)
    bits = int(rng.integers(3, bits_hi + 1 if signed else bits_hi))
    return isa.pack_fmt(bits, int(rng.integers(-3, 13)), signed)


def _case(rng, name: str, *, tokens: int | None = None, heads: int | None = None, dh: int | None = None,
          refuse: str | None = None, hw: HwConfig = HW) -> tuple[rtlsim.Job, bytes, int, dict]:
    """One attention instruction (then END) with its operands; returns the job, the Program, and
    the instruction's fields."""
    t = tokens if tokens is not None else int(rng.integers(0, 20)) * 2 + 1          # odd, 1..39
    h = heads if heads is not None else int(rng.integers(1, 5))
    d_h = dh if dh is not None else int(rng.integers(1, 12))
    d = h * d_h
    amp = int(rng.choice([3, 90, 2500, 32767]))
    qkv = rng.integers(-amp, amp + 1, size=(t, 3 * d)).astype("<i2").tobytes()
    y_bytes = 2 * t * d
    # qkv in `in` (after a random pad) or in `wgt`; y in `out` or in the arena
    pad = 64 * int(rng.integers(0, 3))
    space_in = "wgt" if rng.random() < 0.25 else "in"
    data = bytes(rng.integers(0, 256, size=pad, dtype=np.uint8)) + qkv
    other = bytes(rng.integers(0, 256, size=64, dtype=np.uint8))
    weights, image = (data, other) if space_in == "wgt" else (other, data)
    y_space = "out" if rng.random() < 0.5 else "arena"
    y_off = 64 * int(rng.integers(0, 3))
    arena = isa.align(y_off + y_bytes) + 128
    out = isa.align(y_off + y_bytes) + 64
    q_tile = int(rng.choice([t, 1, int(rng.integers(1, t + 1)), t + 5]))
    fields = dict(qkv_ref=isa.ref(space_in, pad), y_ref=isa.ref(y_space, y_off), tokens=t, dim=d, heads=h,
                  score_fmt=_fmt(rng), score_shift=int(rng.integers(-4, 26)),
                  out_shift=int(rng.integers(-12, 11)), fmt=_fmt(rng), q_tile=q_tile)
    if refuse == "past_end":
        fields["qkv_ref"] = isa.ref(space_in, pad + 64)      # the last row runs past its space
    elif refuse == "store_in":
        fields["y_ref"] = isa.ref("in", 0)                   # a store into a read-only space
    prog = rtlsim.program_bytes([isa.Instr("attention", fields), isa.Instr("end")], hw,
                                weight_bytes=len(weights), arena_bytes=arena, input_bytes=len(image),
                                output_bytes=out, n_tasks=1)
    return rtlsim.Job(name=name, program=prog, weights=weights, image=image, task=0), prog, fields


def _check(results, jobs, hw: HwConfig = HW) -> None:
    for r, job in zip(results, jobs):
        try:
            ref = execute(job.program, job.weights, job.image, job.task, hw_hash=hw.hash())
        except ProgramError as e:
            assert r.status == e.status, f"{job.name}: STATUS {r.status}, the executor refuses with {e.status}"
            assert r.output == bytes(len(r.output)) and r.arena == bytes(len(r.arena)), \
                f"{job.name}: a refused instruction stored something"
            continue
        assert r.ddr_errors == 0, f"{job.name}: {r.ddr_errors} AXI protocol errors"
        assert r.status == 0, f"{job.name}: STATUS {r.status}"
        f = isa.decode_instr(job.program[isa.RECORD_BYTES:2 * isa.RECORD_BYTES]).fields
        attn = {k: v for k, v in r.counters.items() if "attention" in k.lower()}
        print(f"{job.name}: T={f['tokens']} D={f['dim']} heads={f['heads']} q_tile={f['q_tile']}: "
              f"{r.cycles} cycles, {attn}")
        assert r.output == bytes(ref.memories["out"]), f"{job.name}: out space differs"
        assert r.arena == bytes(ref.memories["arena"]), f"{job.name}: arena differs"


def test_attention_random_instructions_bit_exact():
    rng = np.random.default_rng(2024)
    jobs = [_case(rng, f"rand{i}")[0] for i in range(14)]
    # a few fixed geometries: one token, one head wider than every lane count, many key tiles
    jobs += [_case(rng, "t1", tokens=1, heads=3, dh=5)[0],
             _case(rng, "wide", tokens=9, heads=1, dh=21)[0],
             _case(rng, "long", tokens=41, heads=2, dh=7)[0],
             _case(rng, "dual_key", tokens=23, heads=3, dh=HW.p_in)[0]]
    jobs += [_case(rng, "past_end", refuse="past_end")[0], _case(rng, "store_in", refuse="store_in")[0]]
    results = rtlsim.simulate(jobs, HW, seed=1, stall_permille=0)
    _check(results, jobs)


def test_attention_under_ddr_stalls():
    rng = np.random.default_rng(7)
    jobs = [_case(rng, f"stall{i}")[0] for i in range(5)]
    results = rtlsim.simulate(jobs, HW, seed=2, stall_permille=300)
    _check(results, jobs)


@pytest.mark.slow
def test_attention_long_regression():
    rng = np.random.default_rng(99)
    jobs = [_case(rng, f"long{i}", tokens=int(rng.integers(1, 65))) for i in range(30)]
    jobs = [j for j, _, _ in jobs]
    results = rtlsim.simulate(jobs, HW, seed=3, stall_permille=100)
    _check(results, jobs)


@pytest.mark.slow
def test_attention_small_buffers():
    """Buffers so small that a head fills more than half of the Q / K / V buffers (no loading the
    next head during this one: loads and heads take turns) and a group holds fewer than SLOTS
    queries (the score buffer's halves hold only a few rows of T keys)."""
    hw = HW.replace(buffers=Buffers(weights=65536, activations=4096, scores=512)).validated()
    rng = np.random.default_rng(5)
    jobs = [_case(rng, f"small{i}", tokens=int(rng.integers(20, 40)), heads=int(rng.integers(1, 4)),
                  dh=int(rng.integers(14, 26)), hw=hw)[0] for i in range(6)]
    jobs += [_case(rng, "small_fits_half", tokens=17, heads=3, dh=9, hw=hw)[0]]
    results = rtlsim.simulate(jobs, hw, seed=4, stall_permille=100)
    _check(results, jobs, hw)
