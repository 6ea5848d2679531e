"""The PATCHIFY engine (rtl_sim/rtl/eng_patchify.sv) in the RTL accelerator, byte for byte against
program_exec.execute: random images (1 to 3 channels, patches 1 to 16, odd numbers of patches per
row, rows of pixels that start anywhere in a beat), sources in `in` or `wgt`, results in `out` or
the arena and patchified again from there, the same under random DDR stalls, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from m3vit.compiler import isa
from m3vit.rtl_sim import rtlsim
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

from rtl_programs import Layout, check_jobs

HW = HwConfig().replace(p_in=4, p_out=4, token_block=4, softmax_lanes=4,
                        limits=Limits(max_tokens=64)).validated()
OVER = isa.STATUS["over_limit"]


def patchify(rng, lay: Layout, c: int, h: int, w: int, p: int, src_space: str = "in",
             dst_space: str = "out", src_ref: int | None = None) -> isa.Instr:
    if src_ref is None:
        src_ref = lay.put(src_space, rng.integers(-32768, 32768, (c, h, w)).astype("<i2").tobytes())
    dst_ref = lay.reserve(dst_space, 2 * c * h * w)
    return isa.Instr("patchify", dict(src_ref=src_ref, dst_ref=dst_ref, channels=c, height=h, width=w, patch=p))


def random_shape(rng, p_max: int = 8):
    p = int(rng.integers(1, p_max + 1))
    return int(rng.integers(1, 4)), p * int(rng.integers(1, 5)), p * (2 * int(rng.integers(0, 5)) + 1), p


def random_job(rng, name: str):
    """1 to 3 patchify instructions; a later one may take an earlier result (in the arena) as its
    image, reshaped: the same bytes as [C', H', W']."""
    lay = Layout(rng, HW)
    instrs = []
    for _ in range(int(rng.integers(1, 4))):
        prev = instrs[-1].fields if instrs else None
        if prev is not None and isa.split_ref(prev["dst_ref"])[0] == "arena" and rng.random() < 0.6:
            # the previous result, read as one channel of h' = n_patches rows of C p p pixels
            n = prev["channels"] * prev["height"] * prev["width"]
            row = prev["channels"] * prev["patch"] ** 2
            p = int(rng.choice([d for d in range(1, 9) if row % d == 0 and (n // row) % d == 0]))
            ins = patchify(rng, lay, 1, n // row, row, p, dst_space=str(rng.choice(["out", "arena"])),
                           src_ref=prev["dst_ref"])
        else:
            c, h, w, p = random_shape(rng)
            ins = patchify(rng, lay, c, h, w, p, src_space=str(rng.choice(["in", "wgt"])),
                           dst_space=str(rng.choice(["out", "arena"])))
        instrs.append(ins)
    return lay.job(name, instrs)


def test_patchify_random():
    rng = np.random.default_rng(31)
    jobs = [random_job(rng, f"pf{i}") for i in range(12)]
    lay = Layout(rng, HW)    # patches of 16, wider than a beat
    jobs.append(lay.job("pf-p16", [patchify(rng, lay, 3, 32, 48, 16)]))
    check_jobs(jobs, HW)


def test_patchify_stalls():
    rng = np.random.default_rng(32)
    check_jobs([random_job(rng, f"pf-stall{i}") for i in range(5)], HW, stall_permille=300)


def _one(rng, name, c=1, h=4, w=6, p=2, change=None, dst_space="out"):
    lay = Layout(rng, HW)
    ins = patchify(rng, lay, c, h, w, p, dst_space=dst_space)
    if change:
        change(ins.fields)
    return lay.job(name, [ins])


def test_patchify_refusals():
    rng = np.random.default_rng(33)
    # refused by the executor too (over_limit), or run by both (an empty image)
    check_jobs([_one(rng, "dst-in-wgt", dst_space="wgt"),
                _one(rng, "src-past-end", change=lambda f: f.update(height=f["height"] + 64)),
                _one(rng, "dst-past-end", change=lambda f: f.update(dst_ref=f["dst_ref"] + (1 << 20))),
                _one(rng, "no-channels", change=lambda f: f.update(channels=0))], HW)
    # numerics.patchify raises (no patch, H or W not a multiple of p), or the band does not fit a
    # buffer half (HW.patch_band_beats > HW.patch_band_capacity): over_limit, nothing stored
    assert HW.patch_band_beats(2, 40, 520) > HW.patch_band_capacity
    hw_only = [_one(rng, "p-0", change=lambda f: f.update(patch=0)),
               _one(rng, "h-not-multiple", h=6, w=8, p=4),
               _one(rng, "w-not-multiple", h=8, w=6, p=4),
               _one(rng, "band-too-big", c=2, h=40, w=520, p=40)]
    for job, r in zip(hw_only, rtlsim.simulate(hw_only, HW, seed=1, stall_permille=0)):
        assert r.status == OVER, f"{job.name}: STATUS {r.status}"
        assert not any(r.output), f"{job.name}: a refused instruction stored"


@pytest.mark.slow
def test_patchify_regression():
    for seed in (41, 42, 43):
        rng = np.random.default_rng(seed)
        check_jobs([random_job(rng, f"pf-s{seed}-{i}") for i in range(20)], HW, stall_permille=150 * (seed - 41),
                   seed=seed - 39)
    rng = np.random.default_rng(44)
    lay = Layout(rng, HW)
    check_jobs([lay.job("pf-224", [patchify(rng, lay, 3, 224, 224, 16)])], HW)
