"""The numeric contract: vectorised golden model == scalar reference, bit for bit,
and the documented error bounds hold (and are the measured values)."""

from __future__ import annotations

import importlib.util
import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from m3vit.compiler import numerics as nx
from m3vit.compiler.numerics import CONTRACT, ERROR_BOUNDS, Fmt, SatCounter
from m3vit.errors import ConfigError

import numerics_ref as ref

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=40, deadline=None, derandomize=True)
MEDIUM = settings(max_examples=80, deadline=None, derandomize=True)
P, Rr, Rs, Fn = CONTRACT.exp_frac, CONTRACT.recip_frac, CONTRACT.rsqrt_frac, CONTRACT.norm_frac


def _load_measure():
    spec = importlib.util.spec_from_file_location("measure_numerics", ROOT / "scripts" / "measure_numerics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


measure = _load_measure()


# ----------------------------------------------------------------- strategies


def fmts(bits=(8, 16), frac=(-4, 20), signed=True):
    return st.builds(Fmt, st.sampled_from(bits), st.integers(*frac), st.just(signed))


def ints_in(fmt: Fmt, shape):
    """Arrays in a format, often hitting its corners."""
    corners = st.sampled_from(sorted({fmt.min, fmt.max, 0, 1, max(fmt.min, -1)}))
    return hnp.arrays(np.int64, shape, elements=st.one_of(corners, st.integers(fmt.min, fmt.max)))


def as_lists(a):
    return np.asarray(a).tolist()


# ----------------------------------------------------------------- formats and primitives


def test_fmt_ranges_and_types():
    assert (Fmt(8, 4).min, Fmt(8, 4).max) == (-128, 127)
    assert (Fmt(16, 15, False).min, Fmt(16, 15, False).max) == (0, 65535)
    assert Fmt(16, 10).ap_type() == "ap_fixed<16,6>"
    assert Fmt(8, -2).ap_type() == "ap_fixed<8,10>"
    assert Fmt(8, 12).ap_type() == "ap_fixed<8,-4>"
    assert Fmt(16, 15, False).ap_type(rnd_sat=True) == "ap_ufixed<16,1,AP_RND,AP_SAT>"
    assert CONTRACT.gate_fmt.dequantize(1 << 15) == 1.0


@FAST
@given(fmt=fmts(), data=st.data())
def test_quantize_matches_reference(fmt, data):
    step = 2.0 ** -fmt.frac
    # half-way values exercise the round-half-up ties, large ones the saturation
    ties = st.integers(fmt.min - 3, fmt.max + 3).map(lambda k: (k + 0.5) * step)
    xs = data.draw(st.lists(st.one_of(ties, st.floats(-1e6, 1e6), st.sampled_from([math.inf, -math.inf, 0.0])),
                            min_size=1, max_size=20))
    stats, sat = SatCounter(), ref.Sat()
    got = nx.quantize(np.array(xs), fmt, stats, "q")
    want = [ref.quantize(x, fmt, sat) for x in xs]
    assert as_lists(got) == want
    assert stats["q"] == (sat.n, len(xs))
    inside = np.abs(fmt.dequantize(got) - np.array(xs)) <= step / 2
    assert inside[(got > fmt.min) & (got < fmt.max)].all()


def test_quantize_rejects_nan():
    with pytest.raises(ValueError):
        Fmt(8, 4).quantize([0.5, math.nan])


@MEDIUM
@given(x=st.lists(st.integers(-(1 << 40), 1 << 40), min_size=1, max_size=12), data=st.data())
def test_rshift_round_is_floor_of_half_up(x, data):
    s = data.draw(st.one_of(st.integers(-20, 45), st.lists(st.integers(-20, 45), min_size=len(x), max_size=len(x))))
    got = as_lists(nx.rshift_round(np.array(x), np.array(s)))
    ss = s if isinstance(s, list) else [s] * len(x)
    assert got == [ref.rsr(a, b) for a, b in zip(x, ss)]
    assert got == [math.floor(Fraction(a, 1) / Fraction(2) ** b + Fraction(1, 2)) for a, b in zip(x, ss)]


def test_rshift_round_ties_and_limits():
    assert as_lists(nx.rshift_round(np.array([-5, -3, -1, 1, 3, 5]), 1)) == [-2, -1, 0, 1, 2, 3]
    assert as_lists(nx.rshift_round(np.array([7, -7]), 0)) == [7, -7]
    assert as_lists(nx.rshift_round(np.array([3, -3]), -4)) == [48, -48]
    with pytest.raises(ConfigError):
        nx.rshift_round(np.array([1 << 40]), -30)
    with pytest.raises(ConfigError):
        nx.rshift_round(np.array([1]), 63)


@FAST
@given(fmt=fmts(), data=st.data())
def test_saturate_and_requant_count_every_clamp(fmt, data):
    x = data.draw(hnp.arrays(np.int64, st.integers(1, 30), elements=st.integers(-(1 << 30), 1 << 30)))
    s = data.draw(st.integers(-2, 20))
    stats, sat = SatCounter(), ref.Sat()
    got = nx.requant(x, s, fmt, stats, "t")
    assert as_lists(got) == [sat(ref.rsr(int(v), s), fmt) for v in x]
    assert stats["t"] == (sat.n, x.size)
    assert as_lists(nx.requantize(x, fmt.frac + s, fmt, stats, "t2")) == as_lists(got)


def test_saturation_without_counter_warns():
    with pytest.warns(nx.SaturationWarning, match="3 of 4"):
        nx.saturate(np.array([1000, -1000, 5, 300]), Fmt(8, 0), name="t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nx.saturate(np.array([1, 2]), Fmt(8, 0))
    c = SatCounter()
    nx.saturate(np.array([1000, 5]), Fmt(8, 0), c, "a")
    nx.saturate(np.array([5]), Fmt(8, 0), c, "b")
    assert c.events() == {"a": (1, 2)} and c["b"] == (0, 1) and c.saturated == 1


@MEDIUM
@given(maxabs=st.one_of(st.just(0.0), st.floats(1e-9, 1e9), st.integers(1, 1 << 20).map(float)),
       bits=st.sampled_from([4, 8, 16]), signed=st.booleans())
def test_frac_for_range(maxabs, bits, signed):
    f = nx.frac_for_range(maxabs, bits, signed)
    assert f == ref.frac_for_range(maxabs, bits, signed)
    if maxabs:
        fmt = Fmt(bits, f, signed)
        c = SatCounter()
        fmt.quantize(np.array([maxabs, -maxabs if signed else 0.0]), c, "in")
        Fmt(bits, f + 1, signed).quantize(np.array([maxabs]), c, "over")
        assert c["in"][0] == 0 and c["over"][0] == 1


@MEDIUM
@given(hnp.arrays(np.int64, st.integers(1, 20), elements=st.integers(0, (1 << 63) - 1)))
def test_bit_length(x):
    assert as_lists(nx.bit_length(x)) == [int(v).bit_length() for v in x]


# ----------------------------------------------------------------- GEMM


@FAST
@given(data=st.data())
def test_exact_matmul_both_paths(data):
    big = data.draw(st.booleans())
    hi = (1 << 29) if big else (1 << 15)  # bound 2^60 takes the int64 path, 2^32 the float one
    a = data.draw(hnp.arrays(np.int64, (3, 4), elements=st.integers(-hi, hi)))
    b = data.draw(hnp.arrays(np.int64, (4, 2), elements=st.integers(-hi, hi)))
    bound = 4 * hi * hi
    want = [[sum(int(a[i, k]) * int(b[k, j]) for k in range(4)) for j in range(2)] for i in range(3)]
    assert as_lists(nx.exact_matmul(a, b, bound)) == want


@FAST
@given(x_fmt=fmts(), w_bits=st.sampled_from([8, 16]), out_fmt=fmts(), data=st.data())
def test_gemm_matches_reference(x_fmt, w_bits, out_fmt, data):
    T, I, O = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    x = data.draw(ints_in(x_fmt, (T, I)))
    w = data.draw(ints_in(Fmt(w_bits, 0), (I, O)))
    b = data.draw(hnp.arrays(np.int64, O, elements=st.integers(-(1 << 38), 1 << 38)))
    shift = data.draw(st.one_of(st.integers(-4, 30), hnp.arrays(np.int64, O, elements=st.integers(-4, 30))))
    stats, sat = SatCounter(), ref.Sat()
    got = nx.gemm(x, w, b, shift, out_fmt, x_fmt, stats, "fc")
    sh = as_lists(np.broadcast_to(shift, (O,)))
    assert as_lists(got) == ref.gemm_ref(as_lists(x), as_lists(w), as_lists(b), sh, out_fmt, sat)
    assert stats["fc"] == (sat.n, T * O)


@FAST
@given(x_fmt=fmts(), data=st.data())
def test_gemm_acc_bound_is_a_tight_bound(x_fmt, data):
    I = data.draw(st.integers(1, 8))
    w = data.draw(ints_in(Fmt(16, 0), (I, 3)))
    b = data.draw(hnp.arrays(np.int64, 3, elements=st.integers(-(1 << 20), 1 << 20)))
    bound = nx.gemm_acc_bound(x_fmt, w, b)
    # the inputs that push each column furthest from zero, both ways
    worst = 0
    for o in range(3):
        for sign in (1, -1):
            x = np.where(sign * w[:, o] >= 0, x_fmt.max, x_fmt.min)
            acc = int(x @ w[:, o]) + int(b[o])
            worst = max(worst, abs(acc))
            assert abs(acc) <= bound
    assert bound - worst <= int(np.abs(w).sum(axis=0).max())


def test_gemm_accumulator_limit_is_exact():
    x_fmt = Fmt(16, 8)
    w = np.full((4, 1), -(1 << 15), np.int64)
    room = (1 << 47) - 1 - 4 * (1 << 15) * (1 << 15)
    nx.check_gemm_acc(x_fmt, w, np.array([room]))
    with pytest.raises(ConfigError, match="48-bit"):
        nx.check_gemm_acc(x_fmt, w, np.array([room + 1]))
    with pytest.raises(ConfigError):
        nx.gemm(np.zeros((1, 4), np.int64), w, np.array([-room - 1]), 0, Fmt(16, 0), x_fmt)


@FAST
@given(mid=fmts(bits=(16,), frac=(4, 14)), out=fmts(frac=(0, 14)), data=st.data())
def test_gemm_gelu_is_gemm_then_gelu(mid, out, data):
    x_fmt = Fmt(8, 4)
    x = data.draw(ints_in(x_fmt, (3, 5)))
    w = data.draw(ints_in(Fmt(8, 0), (5, 4)))
    shift = data.draw(st.integers(-2, 8))
    stats, sat = SatCounter(), ref.Sat()
    got = nx.gemm_gelu(x, w, None, shift, mid, out, x_fmt, stats, "ffn")
    pre = ref.gemm_ref(as_lists(x), as_lists(w), None, [shift] * 4, mid, sat)
    assert as_lists(got) == [[ref.gelu_ref(v, mid.frac, out, sat) for v in row] for row in pre]
    assert stats["ffn.pre"][0] + stats["ffn"][0] == sat.n


def test_patchify_matches_reference():
    img = np.arange(3 * 8 * 12, dtype=np.int64).reshape(3, 8, 12) - 100
    assert as_lists(nx.patchify(img, 4)) == ref.patchify_ref(as_lists(img), 4)


# ----------------------------------------------------------------- exp / recip / rsqrt


@MEDIUM
@given(t=hnp.arrays(np.int64, st.integers(1, 40), elements=st.one_of(
    st.integers(0, 1 << 17), st.sampled_from([0, 1, (1 << 16) - 1, 1 << 40]))),
       f=st.integers(-4, 24))
def test_exp_matches_reference(t, f):
    assert as_lists(nx.exp_int(t, f)) == [ref.exp_ref(int(v), f) for v in t]


def test_exp_exhaustive_16bit_and_shape():
    t = np.arange(1 << 16, dtype=np.int64)
    p = nx.exp_int(t, 10)
    assert as_lists(p) == [ref.exp_ref(v, 10) for v in range(1 << 16)]
    assert p[0] == 1 << P and (np.diff(p) <= 0).all() and p[-1] == 0
    for f in (-4, 0, 8, 16, 24):
        assert nx.exp_int(np.array([0]), f)[0] == 1 << P


@MEDIUM
@given(S=hnp.arrays(np.int64, st.integers(1, 30), elements=st.one_of(
    st.integers(1, (1 << 62) - 1), st.integers(1, 1 << 20),
    st.integers(0, 61).map(lambda k: 1 << k), st.integers(1, 61).map(lambda k: (1 << k) - 1))))
def test_recip_matches_reference(S):
    r, k = nx.recip_int(S)
    assert list(zip(as_lists(r), as_lists(k))) == [ref.recip_ref(int(v)) for v in S]
    pow2 = (S & (S - 1)) == 0
    assert (r[pow2] == 1 << Rr).all()


def test_recip_is_correctly_rounded_for_every_mantissa():
    M = CONTRACT.recip_mant_frac
    mant = np.arange(1 << M, 1 << (M + 1), dtype=np.int64)
    r, _ = nx.recip_int(mant)
    assert (r == ((1 << (M + Rr + 1)) + mant) // (2 * mant)).all()


@MEDIUM
@given(u=hnp.arrays(np.int64, st.integers(1, 30), elements=st.one_of(
    st.integers(1, (1 << 62) - 1), st.integers(1, 1 << 20),
    st.integers(0, 61).map(lambda k: 1 << k), st.integers(1, 61).map(lambda k: (1 << k) - 1))))
def test_rsqrt_matches_reference(u):
    r, e = nx.rsqrt_int(u)
    assert list(zip(as_lists(r), as_lists(e))) == [ref.rsqrt_ref(int(v)) for v in u]
    pow4 = ((u & (u - 1)) == 0) & (nx.bit_length(u) % 2 == 1)
    assert (r[pow4] == 1 << Rs).all()


def test_rsqrt_is_correctly_rounded_for_every_mantissa():
    M = CONTRACT.rsqrt_mant_frac
    mant = np.arange(1 << M, 1 << (M + 2), dtype=np.int64)
    r, _ = nx.rsqrt_int(mant)
    # round-half-up of q = 2^(R+M/2)/sqrt(mant): (2r-1)^2 mant <= 4*2^(2R+M) < (2r+1)^2 mant
    top = 1 << (2 * Rs + M + 2)
    assert (((2 * r - 1) ** 2 * mant <= top) & (top < (2 * r + 1) ** 2 * mant)).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        nx.exp_int(np.array([-1]), 4)
    with pytest.raises(ValueError):
        nx.recip_int(np.array([0]))
    with pytest.raises(ValueError):
        nx.rsqrt_int(np.array([0]))


# ----------------------------------------------------------------- LayerNorm


@FAST
@given(x_fmt=fmts(frac=(0, 14)), out_fmt=fmts(), data=st.data())
def test_layernorm_matches_reference(x_fmt, out_fmt, data):
    T, D = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    x = data.draw(ints_in(x_fmt, (T, D)))
    if data.draw(st.booleans()):
        x[0, :] = x[0, 0]  # a constant row: V = 0
    g = data.draw(ints_in(Fmt(16, 0), D))
    b = data.draw(ints_in(Fmt(16, 0), D))
    E = nx.layernorm_eps_int(data.draw(st.sampled_from([1e-6, 1e-5, 1e-3])), D, x_fmt.frac)
    beta_shift = data.draw(st.one_of(st.integers(-20, 4), st.lists(st.integers(-20, 4), min_size=D, max_size=D)))
    out_shift = data.draw(st.integers(0, 24))
    stats, sat = SatCounter(), ref.Sat()
    got = nx.layernorm(x, g, b, E, np.array(beta_shift), out_shift, out_fmt, stats, "ln")
    want = ref.layernorm_ref(as_lists(x), as_lists(g), as_lists(b), E, beta_shift, out_shift, out_fmt, sat)
    assert as_lists(got) == want
    assert stats["ln"][0] + stats["ln.norm"][0] == sat.n


def test_layernorm_eps_int():
    assert nx.layernorm_eps_int(1e-6, 192, 12) == math.floor(1e-6 * 192 ** 2 * 2 ** 24 + 0.5)
    assert nx.layernorm_eps_int(1e-12, 4, 0) == 1


@FAST
@given(D=st.integers(2, 300), data=st.data())
def test_layernorm_normalised_error_bound(D, data):
    x = data.draw(ints_in(Fmt(16, 0), (2, D)))
    E = data.draw(st.integers(1, 1 << 20))
    wide = Fmt(40, Fn)
    n = nx.layernorm(x, np.ones(D, np.int64), np.zeros(D, np.int64), E, 0, 0, wide)
    for row, nrow in zip(as_lists(x), as_lists(n)):
        s1 = sum(row)
        V = D * sum(v * v for v in row) - s1 * s1
        exact = [(D * v - s1) / math.sqrt(V + E) for v in row]
        for e, got in zip(exact, nrow):
            bound = abs(e) * ERROR_BOUNDS["rsqrt_rel"] + 2.0 ** -(Fn + 1)
            assert abs(got * 2.0 ** -Fn - e) <= bound * (1 + 1e-9) + 1e-12


# ----------------------------------------------------------------- attention


def attn_case(data):
    heads, dh = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    T, Tk = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    io = data.draw(fmts(frac=(0, 12)))
    q = data.draw(ints_in(io, (T, heads * dh)))
    k = data.draw(ints_in(io, (Tk, heads * dh)))
    v = data.draw(ints_in(io, (Tk, heads * dh)))
    if data.draw(st.booleans()):
        k[:] = k[0]  # every score of a row equal
    score_fmt = data.draw(fmts(frac=(0, 14)))
    score_shift = data.draw(st.integers(0, 24))
    out_shift = data.draw(st.integers(-3, 3))
    out_fmt = data.draw(fmts())
    return q, k, v, heads, score_shift, score_fmt, out_shift, out_fmt


@MEDIUM
@given(data=st.data())
def test_attention_matches_reference(data):
    q, k, v, heads, ss, sf, os_, of = attn_case(data)
    stats, sat = SatCounter(), ref.Sat()
    got = nx.attention(q, k, v, heads, ss, sf, os_, of, stats, "a")
    want = ref.attention_ref(as_lists(q), as_lists(k), as_lists(v), heads, ss, sf, os_, of, sat)
    assert as_lists(got) == want
    assert stats["a.score"][0] + stats["a.out"][0] == sat.n


@FAST
@given(data=st.data())
def test_attention_is_independent_of_key_order_and_tiling(data):
    q, k, v, heads, ss, sf, os_, of = attn_case(data)
    Tk, D = k.shape
    stats = SatCounter()
    whole = nx.attention(q, k, v, heads, ss, sf, os_, of, stats)
    perm = np.array(data.draw(st.permutations(range(Tk))))
    assert (nx.attention(q, k[perm], v[perm], heads, ss, sf, os_, of, stats) == whole).all()
    # tiles of a permuted key order, accumulated in a random order
    cuts = sorted(data.draw(st.sets(st.integers(1, Tk - 1), max_size=3))) if Tk > 1 else []
    tiles = np.split(perm, cuts)
    order = data.draw(st.permutations(range(len(tiles))))
    dh = D // heads
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        s_all = nx.attention_scores(q[:, cols], k[:, cols], ss, sf, stats)
        m = s_all.max(axis=-1)
        psum, pv = 0, 0
        for ti in order:
            sel = tiles[ti]
            ps, pvv = nx.softmax_av_partial(s_all[:, sel], v[sel][:, cols], m, sf.frac)
            psum, pv = psum + ps, pv + pvv
        o = nx.softmax_av_finish(psum, pv, os_, of, stats)
        assert (o == whole[:, cols]).all()


def test_attention_single_key_returns_v_exactly():
    v = np.array([[-(1 << 15), (1 << 15) - 1, 0, -1]], np.int64)
    q = np.array([[3, -2, 7, 1]], np.int64)
    out = nx.attention(q, q, v, 2, 4, Fmt(16, 8), 0, Fmt(16, 0), SatCounter())
    assert (out == v).all()


def test_attention_very_negative_scores_vanish():
    # key 1 scores 2^15 LSB below key 0 at f_s = 8: e^-128 is 0, so o = v[0]
    q = np.array([[1]], np.int64)
    k = np.array([[(1 << 15) - 1], [-(1 << 15)]], np.int64)
    v = np.array([[1234], [-777]], np.int64)
    out = nx.attention(q, k, v, 1, 0, Fmt(16, 8), 0, Fmt(16, 0), SatCounter())
    assert out[0, 0] == 1234


@FAST
@given(N=st.integers(1, 200), fs=st.integers(2, 12), data=st.data())
def test_softmax_error_bound(N, fs, data):
    s = data.draw(ints_in(Fmt(16, fs), (1, N)))
    v = data.draw(ints_in(Fmt(16, 0), (N, 2)))
    m = s.max(axis=-1)
    psum, pv = nx.softmax_av_partial(s, v, m, fs)
    o = nx.softmax_av_finish(psum, pv, 0, Fmt(32, 0), SatCounter())
    e = [math.exp(-(int(m[0]) - int(x)) * 2.0 ** -fs) for x in s[0]]
    vmax = int(np.abs(v).max())
    S = int(psum[0])
    bound = vmax * (2 * (ERROR_BOUNDS["exp_rel"] * 2 ** P * sum(e) + N) / S + ERROR_BOUNDS["recip_rel"]) + 0.5
    for c in range(2):
        exact = sum(ei * int(vi) for ei, vi in zip(e, v[:, c])) / sum(e)
        assert abs(int(o[0, c]) - exact) <= bound + 1e-9


# ----------------------------------------------------------------- GELU


@MEDIUM
@given(x=ints_in(Fmt(16, 0), st.integers(1, 40)), f_in=st.integers(*nx.GELU_IN_FRAC),
       out_fmt=fmts(frac=(-2, 20)))
def test_gelu_matches_reference(x, f_in, out_fmt):
    stats, sat = SatCounter(), ref.Sat()
    got = nx.gelu(x, f_in, out_fmt, stats, "g")
    assert as_lists(got) == [ref.gelu_ref(int(v), f_in, out_fmt, sat) for v in x]
    assert stats["g"] == (sat.n, x.size)


def test_gelu_exhaustive_16bit():
    x = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)
    out = Fmt(16, 12)
    got = nx.gelu(x, 11, out, SatCounter())
    assert as_lists(got) == [ref.gelu_ref(v, 11, out) for v in range(-(1 << 15), 1 << 15)]


def test_gelu_frac_range_enforced():
    with pytest.raises(ConfigError):
        nx.gelu(np.array([1]), nx.GELU_IN_FRAC[1] + 1, Fmt(16, 8))


# ----------------------------------------------------------------- MoE


@MEDIUM
@given(data=st.data())
def test_moe_gate_matches_reference(data):
    T, N = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 16))
    k = data.draw(st.integers(1, N))
    narrow = data.draw(st.booleans())  # small logit ranges produce ties
    el = st.integers(-3, 3) if narrow else st.one_of(st.sampled_from([-(1 << 15), (1 << 15) - 1]),
                                                     st.integers(-(1 << 15), (1 << 15) - 1))
    logits = data.draw(hnp.arrays(np.int64, (T, N), elements=el))
    f_l = data.draw(st.integers(0, 14))
    stats, sat = SatCounter(), ref.Sat()
    idx, score = nx.moe_gate(logits, k, f_l, stats, "gate")
    ridx, rscore = ref.gate_ref(as_lists(logits), k, f_l, sat)
    assert as_lists(idx) == ridx and as_lists(score) == rscore
    assert stats["gate"][0] == sat.n == 0


def test_moe_gate_ties_and_equal_logits():
    idx, score = nx.moe_gate(np.zeros((2, 8), np.int64), 3, 8)
    assert as_lists(idx) == [[0, 1, 2]] * 2
    assert (score == 1 << 12).all()  # 1/8 in 15 fraction bits, exact
    idx, score = nx.moe_gate(np.array([[5, 9, 9, 1, 9]]), 2, 0)
    assert as_lists(idx) == [[1, 2]] and score[0, 0] == score[0, 1]
    idx, score = nx.moe_gate(np.array([[0, 1 << 14]]), 1, 0)  # one expert takes all
    assert as_lists(idx) == [[1]] and score[0, 0] == 1 << 15


@MEDIUM
@given(data=st.data())
def test_expert_queues(data):
    T, N = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 8))
    k = data.draw(st.integers(1, N))
    idx = np.array([data.draw(st.permutations(range(N)))[:k] for _ in range(T)], np.int64)
    qs = nx.expert_queues(idx, N)
    assert [(as_lists(q.tokens), as_lists(q.slots)) for q in qs] == ref.queues_ref(as_lists(idx), N)
    assert sum(len(q.tokens) for q in qs) == T * k
    for e, q in enumerate(qs):
        assert (np.diff(q.tokens) > 0).all() and (idx[q.tokens, q.slots] == e).all()


@MEDIUM
@given(out_fmt=fmts(), data=st.data())
def test_moe_combine_matches_reference_in_any_slot_order(out_fmt, data):
    T, N, D = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    k = data.draw(st.integers(1, N))
    idx = np.array([data.draw(st.permutations(range(N)))[:k] for _ in range(T)], np.int64)
    score = data.draw(ints_in(CONTRACT.gate_fmt, (T, k)))
    y = data.draw(ints_in(Fmt(16, 0), (T, k, D)))
    per_expert = data.draw(st.booleans())
    shift = np.array(data.draw(st.lists(st.integers(0, 30), min_size=N, max_size=N))) if per_expert \
        else data.draw(st.integers(0, 30))
    stats, sat = SatCounter(), ref.Sat()
    got = nx.moe_combine(score, y, shift, out_fmt, idx, stats, "c")
    shifts = as_lists(shift) if per_expert else [shift] * N
    assert as_lists(got) == ref.combine_ref(as_lists(score), as_lists(y), shifts, as_lists(idx), out_fmt, sat)
    assert stats["c"] == (sat.n, T * D)
    perm = np.array(data.draw(st.permutations(range(k))))
    again = nx.moe_combine(score[:, perm], y[:, perm], shift, out_fmt, idx[:, perm], SatCounter())
    assert (again == got).all()


# ----------------------------------------------------------------- residual / embedding


@MEDIUM
@given(fa=fmts(), fb=fmts(), fz=fmts(), data=st.data())
def test_residual_add_matches_reference(fa, fb, fz, data):
    n = data.draw(st.integers(1, 20))
    a, b = data.draw(ints_in(fa, n)), data.draw(ints_in(fb, n))
    sa, sb = fa.frac - fz.frac, fb.frac - fz.frac
    stats, sat = SatCounter(), ref.Sat()
    got = nx.residual_add(a, b, sa, sb, fz, stats, "res")
    assert as_lists(got) == [ref.add_ref(int(x), int(y), sa, sb, fz, sat) for x, y in zip(a, b)]
    assert stats["res"] == (sat.n, n)


def test_prepend_cls():
    tok = np.arange(6, dtype=np.int64).reshape(3, 2)
    assert as_lists(nx.prepend_cls(tok, np.array([9, 8]))) == [[9, 8], [0, 1], [2, 3], [4, 5]]


# ----------------------------------------------------------------- error bounds


def _tight(measured, key):
    """The bound holds, and is the measurement (rounded up to 3 digits), not a slack figure."""
    bound = ERROR_BOUNDS[key]
    assert measured <= bound, f"{key}: measured {measured:.6g} exceeds the documented {bound:.3g}"
    assert measured >= bound * 0.99, f"{key}: documented {bound:.3g} is looser than measured {measured:.6g}"


def test_exp_error_bound_over_whole_range():
    t = np.arange(1 << 17, dtype=np.int64)
    x = t.astype(np.float64)
    rel = worst = 0.0
    for f in range(0, 17):
        e = np.exp(-x / 2.0 ** f) * 2.0 ** P
        err = np.abs(nx.exp_int(t, f) - e)
        worst = max(worst, err.max())
        ok = e > 1e-300
        rel = max(rel, ((err[ok] - 1) / e[ok]).max())
    _tight(rel, "exp_rel")
    _tight(worst, "exp_abs_lsb")


def test_recip_error_bound_over_every_integer():
    M = CONTRACT.recip_mant_frac
    mant = np.arange(1 << M, 1 << (M + 1), dtype=np.int64)
    r, k = nx.recip_int(mant)
    scale = r.astype(np.float64) * 2.0 ** -(Rr + M)
    _tight(max(np.abs(scale * mant - 1).max(), np.abs(scale * (mant + 1) - 1).max()), "recip_rel")
    S = np.random.default_rng(1).integers(1, 1 << 62, 20000)
    r, k = nx.recip_int(S)
    rel = np.abs(r * np.ldexp(1.0, -(Rr + k)) * S.astype(np.float64) - 1)
    assert rel.max() <= ERROR_BOUNDS["recip_rel"]


def test_rsqrt_error_bound_over_every_integer():
    M = CONTRACT.rsqrt_mant_frac
    mant = np.arange(1 << M, 1 << (M + 2), dtype=np.int64)
    r, _ = nx.rsqrt_int(mant)
    scale = r.astype(np.float64) * 2.0 ** -(Rs + M // 2)
    _tight(max(np.abs(scale * np.sqrt(mant) - 1).max(), np.abs(scale * np.sqrt(mant + 1.0) - 1).max()),
           "rsqrt_rel")
    u = np.random.default_rng(2).integers(1, 1 << 62, 20000)
    r, e = nx.rsqrt_int(u)
    rel = np.abs(r * np.ldexp(1.0, -(Rs + e)) * np.sqrt(u.astype(np.float64)) - 1)
    assert rel.max() <= ERROR_BOUNDS["rsqrt_rel"] * (1 + 1e-9)


def test_gelu_error_bound_over_whole_range():
    x = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)
    erfc = np.frompyfunc(math.erfc, 1, 1)
    worst = 0.0
    for f in range(nx.GELU_IN_FRAC[0], nx.GELU_IN_FRAC[1] + 1):
        K = max(f, CONTRACT.gelu_frac)
        g = nx.gelu(x, f, Fmt(56, K))  # K fraction bits: no output rounding
        xf = x * 2.0 ** -f
        exact = xf * 0.5 * erfc(-xf / math.sqrt(2.0)).astype(np.float64)
        worst = max(worst, np.abs(g * 2.0 ** -K - exact).max())
    _tight(worst, "gelu_abs")


# ----------------------------------------------------------------- tables and the doc


def test_tables_follow_their_definitions():
    lut, prm = nx.exp2_lut()
    L = prm["index_bits"]
    assert lut[0] == 1 << P and len(lut) == 1 << L and prm["l2e"] == round(math.log2(math.e) * 2 ** 16)
    j = np.arange(1 << L)
    assert np.abs(lut - 2.0 ** P * 2.0 ** (-j / 2 ** L)).max() <= 0.5
    g, gp = nx.gelu_lut()
    assert g[-1] == 0 and gp["entries"] == CONTRACT.gelu_range * 2 ** CONTRACT.gelu_step_bits + 1
    for gen in (nx.exp2_lut, nx.recip_lut, nx.rsqrt_lut, nx.gelu_lut):
        vals, params = gen()
        assert int(vals.max()).bit_length() <= params["value_bits"] and len(vals) == params["entries"]
        assert not vals.flags.writeable


def test_doc_tables_match_the_code():
    doc = (ROOT / "docs" / "numerics.md").read_text(encoding="utf-8")
    assert measure.markdown(ERROR_BOUNDS) in doc, "run scripts/measure_numerics.py --write-doc docs/numerics.md"
    assert measure.constants_markdown() in doc, "run scripts/measure_numerics.py --write-doc docs/numerics.md"
    assert {k for k, *_ in measure.ROWS} == set(ERROR_BOUNDS)
