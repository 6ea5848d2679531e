"""The gate engine (rtl_sim/rtl/eng_gate.sv) in the accelerator top: moe_gate instructions, bit-exact
with the Python Program executor in every byte of the arena and the output space.

Random instructions (tokens 1..64, odd dims, 1..16 experts, k 1..min(N, 4), int8 and int16 gates,
signed and unsigned logit formats, saturating shifts, tied logits from repeated gate columns, task
slices at odd strides, x at an unaligned address, a second gate on the first one's logits) run with
task 0 and task 1 of the same Program; refusals (over_limit) leave both spaces untouched; one run
under random DDR stalls.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from m3vit.compiler import isa
from m3vit.compiler.program_exec import ProgramError, execute
from m3vit.rtl_sim import rtlsim
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

HW = HwConfig().replace(p_in=4, p_out=4, token_block=4, softmax_lanes=4,
                        limits=Limits(max_tokens=64)).validated()
TASKS = 2


def _gate(rng: random.Random, wgt: bytearray, used: dict, x_ref: int, t: int, d: int, f: dict, xmag: int) -> isa.Instr:
    """One moe_gate instruction reading x [t, d] at x_ref; its per-task parameters are appended to
    wgt, its four stores to the arena / out space (``used``: bytes taken so far)."""
    n = f.get("N", rng.randint(1, 16))
    k = f.get("K", rng.randint(1, min(n, 4)))
    w16 = f.get("w16", rng.random() < 0.5)
    signed = f.get("signed", rng.random() < 0.8)
    bits = f.get("bits", rng.randint(4, 16) if signed else rng.randint(3, 15))
    frac = f.get("frac", rng.randint(-6, 12))
    nrng = np.random.default_rng(rng.getrandbits(32))
    wmax = 32767 if w16 else 127
    wmag = rng.choice([wmax, wmax // 4 + 1, 3])
    wsz = d * n * (2 if w16 else 1)
    # per-task strides: unaligned ones put task 1's slices at odd byte addresses
    w_stride = isa.align(wsz) if rng.random() < 0.5 else wsz + rng.randint(0, 5)
    b_stride = isa.align(8 * n) if rng.random() < 0.5 else 8 * n + rng.randint(0, 9)
    s_stride = isa.align(n) if rng.random() < 0.5 else n + rng.randint(0, 3)
    w_off = len(wgt)
    b_off = w_off + isa.align(w_stride * (TASKS - 1) + wsz)
    s_off = b_off + isa.align(b_stride * (TASKS - 1) + 8 * n)
    wgt += bytes(s_off + isa.align(s_stride * (TASKS - 1) + n) - w_off)
    acc_typ = max(1.0, xmag * wmag * np.sqrt(d) / 2)
    for task in range(TASKS):
        w = nrng.integers(-wmag, wmag + 1, size=(d, n)).astype(np.int16 if w16 else np.int8)
        ties = f.get("ties", n > 1 and rng.random() < 0.4)
        if ties:     # repeated gate columns with equal bias and shift: tied logits
            for _ in range(rng.randint(1, n)):
                w[:, rng.randrange(n)] = w[:, rng.randrange(n)]
        bmag = int(acc_typ) * rng.choice([0, 1, 4])
        bias = nrng.integers(-bmag, bmag + 1, size=n).astype("<i8")
        base_shift = int(np.log2(acc_typ)) - (bits - 3)
        shift = np.array([base_shift + rng.randint(-3, 3) for _ in range(n)])
        if f.get("saturate", rng.random() < 0.3):
            shift[:] = base_shift - rng.randint(2, 6)
        if ties or rng.random() < 0.3:
            bias[:] = bias[0]
            shift[:] = shift[0]
        shift = np.clip(shift, -62, 62).astype(np.int8)
        for off, blob in ((w_off + task * w_stride, w.tobytes()), (b_off + task * b_stride, bias.tobytes()),
                          (s_off + task * s_stride, shift.tobytes())):
            wgt[off:off + len(blob)] = blob
    # the four stores, spread over arena and out with gaps between them
    refs = {}
    for name, nbytes in (("logits", 2 * t * n), ("idx", 2 * t * k), ("score", 2 * t * k),
                         ("queue", isa.queue_layout(n, t, k)[2])):
        space = f.get(name, rng.choice(["arena", "out"]))
        used[space] += 64 * rng.randint(0, 2)
        refs[name] = isa.ref(space, used[space])
        used[space] += isa.align(nbytes)
    fields = dict(x_ref=x_ref, logits_ref=refs["logits"], idx_ref=refs["idx"], score_ref=refs["score"],
                  queue_ref=refs["queue"], w_ref=isa.ref("wgt", w_off), bias_ref=isa.ref("wgt", b_off),
                  shift_ref=isa.ref("wgt", s_off), w_stride=w_stride, bias_stride=b_stride, shift_stride=s_stride,
                  tokens=t, dim=d, experts_k=n | (k << 16), fmt=isa.pack_fmt(bits, frac, signed))
    fields.update(f.get("fields", {}))
    return isa.Instr("moe_gate", fields, isa.make_flags(w16=w16),
                     name=f"T={t} D={d} N={n} k={k} w16={w16} fmt=({bits},{frac},{'s' if signed else 'u'})")


def make_case(rng: random.Random, *, max_t: int = 64, max_d: int = 80, force: dict | None = None,
              chain: bool = False) -> dict:
    """A Program of one moe_gate (``force`` pins any choice) or, with ``chain``, of two: the second
    gates the first one's logits. Returns the Program, its wgt and in spaces."""
    f = dict(force or {})
    t = f.get("T", rng.randint(1, max_t))
    d = f.get("D", rng.randint(1, max_d))
    xmag = f.get("xmag", rng.choice([100, 3000, 32767]))
    x = np.random.default_rng(rng.getrandbits(32)).integers(-xmag, xmag + 1, size=(t, d)).astype(np.int16)
    skip = f.get("x_skip", 0)      # x at an unaligned offset of the in space
    image = bytes(skip) + x.tobytes()
    image += bytes(isa.align(len(image)) - len(image))
    wgt = bytearray()
    used = {"arena": 0, "out": 0}
    instrs = [_gate(rng, wgt, used, isa.ref("in", 0) + skip, t, d, f, xmag)]
    if chain:
        first = instrs[0].fields
        instrs.append(_gate(rng, wgt, used, first["logits_ref"], t, first["experts_k"] & 0xFFFF, {}, 1 << 15))
    prog = rtlsim.program_bytes(instrs + [isa.Instr("end")], HW, weight_bytes=len(wgt),
                                arena_bytes=max(64, used["arena"]), input_bytes=len(image),
                                output_bytes=max(64, used["out"]), n_tasks=TASKS)
    return dict(prog=prog, wgt=bytes(wgt), image=image, desc=" then ".join(i.name for i in instrs))


def run_and_compare(cases: list[tuple[dict, int]], *, seed: int = 1, stall_permille: int = 0) -> list:
    """Simulate every (case, task) in one simulation; compare with execute byte for byte."""
    jobs = [rtlsim.Job(name=f"case{i}-task{task}", program=c["prog"], weights=c["wgt"], image=c["image"], task=task)
            for i, (c, task) in enumerate(cases)]
    results = rtlsim.simulate(jobs, HW, seed=seed, stall_permille=stall_permille)
    assert len(results) == len(jobs)
    refs = []
    for (c, task), job, r in zip(cases, jobs, results):
        where = f"{job.name} ({c['desc']})"
        try:
            ref = execute(c["prog"], c["wgt"], c["image"], task, hw_hash=HW.hash())
        except ProgramError as e:
            assert r.status == e.status, f"{where}: STATUS {r.status}, the executor refuses with {e.status}"
            # a refused instruction stores nothing: both spaces keep their zeroed start
            assert not any(r.output) and not any(r.arena), f"{where}: a refused moe_gate stored data"
            refs.append(None)
            continue
        assert r.status == isa.STATUS["ok"], f"{where}: STATUS {r.status}"
        for space, got in (("out", r.output), ("arena", r.arena)):
            exp = bytes(ref.memories[space])
            if bytes(got) != exp:
                g = np.frombuffer(bytes(got)[:len(exp) // 2 * 2], "<u2")
                e = np.frombuffer(exp[:len(exp) // 2 * 2], "<u2")
                bad = np.nonzero(g != e)[0]
                pytest.fail(f"{where}: {space} differs in {bad.size} uint16 words, first at {bad[:6]}: "
                            f"got {g[bad[:6]]}, expected {e[bad[:6]]}")
        refs.append(ref)
    return refs


# Pinned cases: the extremes of every size, each format kind, saturation and ties.
PINNED = [
    dict(T=64, D=77, N=16, K=4, w16=True, signed=True, bits=16),
    dict(T=1, D=1, N=1, K=1, w16=False),
    dict(T=33, D=20, N=5, K=4, signed=False, bits=8),
    dict(T=17, D=9, N=13, K=3, saturate=True, w16=False, bits=6),
    dict(T=29, D=4, N=16, K=4, ties=True),
    dict(T=40, D=31, N=7, K=2, signed=False, bits=15, saturate=True),
    dict(T=21, D=13, N=6, K=3, x_skip=38),
]


def test_gate_random_and_pinned_bit_exact():
    rng = random.Random(2026)
    cases = [make_case(rng, force=f) for f in PINNED] + [make_case(rng) for _ in range(3)]
    cases.append(make_case(rng, max_t=40, max_d=40, chain=True))
    runs = [(c, task) for c in cases for task in range(TASKS)]
    refs = run_and_compare(runs)
    # the set really covers saturation and ties
    assert sum(r.stats.saturated for r in refs if r is not None) > 0
    ties = 0
    for (c, task), ref in zip(runs, refs):
        for ins in isa.decode_program(c["prog"])[1][:-1]:
            t, n = ins.fields["tokens"], ins.fields["experts_k"] & 0xFFFF
            space, off = isa.split_ref(ins.fields["logits_ref"])
            lg = np.frombuffer(ref.memories[space], np.int16, t * n, off).reshape(t, n)
            ties += int(np.sum([len(set(row.tolist())) < n for row in lg]))
    assert ties > 0


def test_gate_refusals_store_nothing():
    rng = random.Random(7)
    bad = [
        dict(fields=dict(logits_ref=isa.ref("wgt", 0))),        # a store into the read-only wgt space
        dict(fields=dict(idx_ref=isa.ref("in", 0))),            # ... and into in
        dict(fields=dict(queue_ref=isa.ref("out", 1 << 16)), queue="out"),   # the queue table past out
        dict(fields=dict(x_ref=isa.ref("in", 64))),             # x past the in space
        dict(fields=dict(w_stride=1 << 20)),                    # task 1's gate past wgt (task 0 runs)
        dict(fields=dict(shift_stride=1 << 16)),                # task 1's shifts past wgt
    ]
    runs = [(make_case(rng, max_t=8, max_d=8, force=f), task) for f in bad for task in range(TASKS)]
    refs = run_and_compare(runs)
    assert sum(r is None for r in refs) == len(bad) * TASKS - 2


def test_gate_under_ddr_stalls():
    rng = random.Random(99)
    cases = [make_case(rng, force=f) for f in (dict(T=64, D=45, N=16, K=4, w16=True), dict(T=23, D=18, N=9, K=2))]
    run_and_compare([(c, task) for c in cases for task in range(TASKS)], seed=2, stall_permille=300)


@pytest.mark.slow
def test_gate_long_regression():
    rng = random.Random(4242)
    cases = [make_case(rng, max_d=200) for _ in range(22)]
    cases += [make_case(rng, force=dict(T=6, D=768, N=16, K=4, w16=True)),     # D = max_dim
              make_case(rng, force=dict(T=3, D=768, N=3, K=3, x_skip=2))]
    run_and_compare([(c, i % TASKS) for i, c in enumerate(cases)], seed=3)
    run_and_compare([(c, (i + 1) % TASKS) for i, c in enumerate(cases[:8])], seed=4, stall_permille=500)
