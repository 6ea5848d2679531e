"""The LAYERNORM engine (rtl_sim/rtl/eng_ln.sv) in the RTL accelerator, byte for byte against
program_exec.execute: random Programs of LayerNorm instructions (odd dims, dims that are not a
multiple of the unit's lanes or of a beat, every beta_shift sign, signed and unsigned formats of
every width, saturation, eps from 1 to 2^61 - 1, constant rows, chained through the arena), the
same under random DDR stalls, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from m3vit.compiler import isa
from m3vit.compiler import numerics as nx
from m3vit.rtl_sim import rtlsim
from m3vit.rtl_sim.hwconfig import HwConfig, Limits

from rtl_programs import Layout, check_jobs

HW = HwConfig().replace(p_in=4, p_out=4, token_block=4, softmax_lanes=4,
                        limits=Limits(max_tokens=64)).validated()
MAX_DIM = HW.limits.max_dim
OVER = isa.STATUS["over_limit"]


def x_rows(rng, rows: int, dim: int) -> np.ndarray:
    out = np.empty((rows, dim), np.int64)
    for r in range(rows):
        kind = rng.random()
        if kind < 0.4:              # activations around a mean
            mean, sd = int(rng.integers(-8000, 8000)), float(rng.choice([1, 4, 100, 4000]))
            out[r] = np.clip(np.rint(rng.normal(mean, sd, dim)), -32768, 32767)
        elif kind < 0.7:            # the whole int16 range
            out[r] = rng.integers(-32768, 32768, dim)
        elif kind < 0.85:           # outliers on a flat row
            out[r] = int(rng.integers(-32768, 32768))
            for _ in range(int(rng.integers(1, 4))):
                out[r, rng.integers(dim)] = rng.choice([-32768, 32767, int(rng.integers(-32768, 32768))])
        else:                       # a constant row: V = 0, eps alone sets the scale
            out[r] = int(rng.integers(-32768, 32768))
    return out


def layernorm(rng, lay: Layout, x_ref: int, rows: int, dim: int, y_space: str) -> isa.Instr:
    """A random LayerNorm of rows x dim at x_ref, with parameters the contract accepts:
    |n·γ + β'| < 2^47 and β << -beta_shift within 63 bits."""
    bs = int(rng.choice([0, int(rng.integers(1, 41)), -int(rng.integers(1, 9)), 62, -62]))
    lim = 44 + bs                  # |β| < 2^lim keeps |β'| < 2^44
    if lim <= 0:
        beta = np.zeros(dim, np.int64)
    elif lim >= 62:
        beta = rng.integers(-(1 << 62), 1 << 62, dim)
    else:
        beta = rng.integers(-(1 << lim), (1 << lim) + 1, dim)
    gamma = rng.integers(-32768, 32768, dim)
    # mostly shifts that keep the output in range, else anything from left 14 to right 62
    shift = rng.integers(8, 26, dim) if rng.random() < 0.5 else rng.integers(-14, 63, dim)
    eps = int(rng.choice([1, nx.layernorm_eps_int(1e-6, dim, int(rng.integers(4, 13))),
                          int(rng.integers(1, (1 << 61) - 1)), (1 << 61) - 1]))
    if rng.random() < 0.7:
        fmt = isa.pack_fmt(int(rng.integers(1, 17)), int(rng.integers(-8, 16)), True)
    else:
        fmt = isa.pack_fmt(int(rng.integers(1, 16)), int(rng.integers(-8, 16)), False)
    g_ref = lay.put(str(rng.choice(["wgt", "in"])), gamma.astype("<i2").tobytes())
    b_ref = lay.put("wgt", beta.astype("<i8").tobytes())
    s_ref = lay.put("wgt", shift.astype("i1").tobytes())
    y_ref = lay.reserve(y_space, rows * dim * 2)
    return isa.Instr("layernorm", dict(x_ref=x_ref, y_ref=y_ref, gamma_ref=g_ref, beta_ref=b_ref, shift_ref=s_ref,
                                       rows=rows, dim=dim, eps_lo=eps & 0xFFFFFFFF, eps_hi=eps >> 32,
                                       beta_shift=bs, fmt=fmt))


def random_dim(rng) -> int:
    return int(rng.choice([1, 2, 3, 5, 7, 9, 13, 31, int(rng.integers(1, 200)), MAX_DIM - 1, MAX_DIM]))


def random_job(rng, name: str):
    """1 to 3 LayerNorms; a later one may read an earlier one's result from the arena."""
    lay = Layout(rng, HW)
    instrs = []
    prev = None
    for _ in range(int(rng.integers(1, 4))):
        if prev is not None and rng.random() < 0.5:
            x_ref, rows, dim = prev
        else:
            rows, dim = int(rng.integers(1, 9)), random_dim(rng)
            x_ref = lay.put(str(rng.choice(["in", "wgt"])), x_rows(rng, rows, dim).astype("<i2").tobytes())
        ins = layernorm(rng, lay, x_ref, rows, dim, str(rng.choice(["out", "arena"])))
        instrs.append(ins)
        prev = (ins.fields["y_ref"], rows, dim) if isa.split_ref(ins.fields["y_ref"])[0] == "arena" else None
    return lay.job(name, instrs)


def check(jobs, stall_permille=0, seed=1):
    return check_jobs(jobs, HW, stall_permille, seed)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_layernorm_random():
    rng = np.random.default_rng(11)
    check([random_job(rng, f"ln{i}") for i in range(10)])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_layernorm_stalls():
    rng = np.random.default_rng(12)
    check([random_job(rng, f"ln-stall{i}") for i in range(5)], stall_permille=300)


def _one(rng, name, change=None, rows=3, dim=10, y_space="out"):
    lay = Layout(rng, HW)
    x_ref = lay.put("in", x_rows(rng, rows, dim).astype("<i2").tobytes())
    ins = layernorm(rng, lay, x_ref, rows, dim, y_space)
    if change:
        change(ins.fields)
    return lay.job(name, [ins])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_layernorm_refusals():
    rng = np.random.default_rng(13)
    # refused by the executor too (over_limit), or run by both (empty instructions)
    same = [_one(rng, "y-in-input", y_space="in"),
            _one(rng, "x-past-end", lambda f: f.update(rows=f["rows"] + 40)),
            _one(rng, "gamma-past-end", lambda f: f.update(gamma_ref=f["gamma_ref"] + (1 << 20))),
            _one(rng, "beta-past-end", lambda f: f.update(beta_ref=f["beta_ref"] + (1 << 20))),
            _one(rng, "no-rows", lambda f: f.update(rows=0)),
            _one(rng, "no-dim", lambda f: f.update(dim=0))]
    # what the contract refuses (numerics raises) or this hardware cannot hold: over_limit, no stores
    hw_only = [_one(rng, "eps-0", lambda f: f.update(eps_lo=0, eps_hi=0)),
               _one(rng, "eps-2^61", lambda f: f.update(eps_lo=0, eps_hi=1 << 29)),
               _one(rng, "beta-shift-63", lambda f: f.update(beta_shift=63)),
               _one(rng, "beta-shift--63", lambda f: f.update(beta_shift=-63)),
               _one(rng, "fmt-17-bits", lambda f: f.update(fmt=isa.pack_fmt(17, 0))),
               _one(rng, "fmt-u16", lambda f: f.update(fmt=isa.pack_fmt(16, 0, False))),
               _one(rng, "dim-over-max", rows=1, dim=MAX_DIM + 1)]
    check(same)
    results = rtlsim.simulate(hw_only, HW, seed=1, stall_permille=0)
    for job, r in zip(hw_only, results):
        assert r.status == OVER, f"{job.name}: STATUS {r.status}"
        assert not any(r.output), f"{job.name}: a refused instruction stored"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_layernorm_regression():
    for seed in (21, 22, 23):
        rng = np.random.default_rng(seed)
        check([random_job(rng, f"ln-s{seed}-{i}") for i in range(20)], stall_permille=150 * (seed - 21),
              seed=seed - 19)
    rng = np.random.default_rng(24)
    lay = Layout(rng, HW)
    x_ref = lay.put("in", x_rows(rng, 64, MAX_DIM).astype("<i2").tobytes())
    check([lay.job("ln-64x768", [layernorm(rng, lay, x_ref, 64, MAX_DIM, "out")])])
