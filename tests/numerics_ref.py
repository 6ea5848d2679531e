"""Slow scalar reference of the numeric contract, written from docs/numerics.md.

Plain Python ints and loops, one element at a time. It shares nothing with
compiler/numerics.py except the contract constants and the table generators, so an
agreement between the two is evidence that the vectorised code follows the doc.
Formats are read only through their ``bits``, ``frac`` and ``signed`` fields.
"""

from __future__ import annotations

import math

from m3vit.compiler.numerics import CONTRACT, exp2_lut, gelu_lut, recip_lut, rsqrt_lut

C = CONTRACT


def lo_hi(fmt) -> tuple[int, int]:
    if fmt.signed:
        return -2 ** (fmt.bits - 1), 2 ** (fmt.bits - 1) - 1
    return 0, 2 ** fmt.bits - 1


def rsr(x: int, s: int) -> int:
    """rshift_round: s > 0 -> floor((x + 2^(s-1)) / 2^s); s == 0 -> x; s < 0 -> x * 2^-s."""
    if s > 0:
        return (x + 2 ** (s - 1)) // 2 ** s
    return x * 2 ** (-s)


class Sat:
    """Clamp with a count of clamped values."""

    def __init__(self):
        self.n = 0
        self.total = 0

    def __call__(self, x: int, fmt) -> int:
        lo, hi = lo_hi(fmt)
        self.total += 1
        if x < lo:
            self.n += 1
            return lo
        if x > hi:
            self.n += 1
            return hi
        return x


def quantize(x: float, fmt, sat: Sat | None = None) -> int:
    sat = sat or Sat()
    lo, hi = lo_hi(fmt)
    v = math.floor(x * 2.0 ** fmt.frac + 0.5) if math.isfinite(x) else (hi + 1 if x > 0 else lo - 1)
    return sat(int(v), fmt)


def frac_for_range(maxabs: float, bits: int, signed: bool = True) -> int:
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    if maxabs == 0:
        return bits - 1 if signed else bits
    for f in range(200, -400, -1):
        if math.floor(maxabs * 2.0 ** f + 0.5) <= top:
            return f
    raise AssertionError("no frac found")


def bitlen(x: int) -> int:
    n = 0
    while x >= 2 ** n:
        n += 1
    return n


# ------------------------------------------------------------------ exp / recip / rsqrt


def exp_ref(t: int, f: int) -> int:
    lut, prm = exp2_lut()
    L, P, Cc = C.exp_lut_bits, C.exp_frac, C.exp_l2e_frac
    assert prm["l2e"] == math.floor(math.log2(math.e) * 2 ** Cc + 0.5)
    v = rsr(t * prm["l2e"], f + Cc - L)
    n, j = v // 2 ** L, v % 2 ** L
    if n >= P + 2:
        return 0
    return rsr(int(lut[j]), n)


def recip_ref(S: int) -> tuple[int, int]:
    lut, _ = recip_lut()
    M, R, Lr = C.recip_mant_frac, C.recip_frac, C.recip_lut_bits
    k = bitlen(S) - 1
    mant = S // 2 ** (k - M) if k >= M else S * 2 ** (M - k)
    r0 = int(lut[mant // 2 ** (M - Lr) - 2 ** Lr])
    r1 = r0 + rsr(r0 * (2 ** (M + R) - mant * r0), M + R)
    # the nearest integer to 2^(M+R)/mant, ties up, found by walking from r1
    r = r1
    while mant * (2 * r + 1) <= 2 ** (M + R + 1):
        r += 1
    while mant * (2 * r - 1) > 2 ** (M + R + 1):
        r -= 1
    assert abs(r - r1) <= 1, "Newton step too far for the one-step fix-up"
    return r, k


def rsqrt_ref(u: int) -> tuple[int, int]:
    lut, _ = rsqrt_lut()
    M, R, Ls = C.rsqrt_mant_frac, C.rsqrt_frac, C.rsqrt_lut_bits
    e = (bitlen(u) - 1) // 2
    mant = u // 2 ** (2 * e - M) if 2 * e >= M else u * 2 ** (M - 2 * e)
    y0 = int(lut[mant // 2 ** (M - Ls) - 2 ** Ls])
    y1 = y0 + rsr(y0 * (2 ** (M + 2 * R) - mant * y0 * y0), M + 2 * R + 1)
    top = 2 ** (M + 2 * R + 2)
    r = y1
    while (2 * r + 1) ** 2 * mant <= top:
        r += 1
    while (2 * r - 1) ** 2 * mant > top:
        r -= 1
    assert abs(r - y1) <= 1, "Newton step too far for the one-step fix-up"
    return r, e


# ------------------------------------------------------------------ ops


def gemm_ref(x, w, b, shifts, out_fmt, sat: Sat | None = None):
    sat = sat or Sat()
    T, I, O = len(x), len(w), len(w[0])
    out = []
    for t in range(T):
        row = []
        for o in range(O):
            acc = (b[o] if b is not None else 0)
            for i in range(I):
                acc += x[t][i] * w[i][o]
            assert abs(acc) < 2 ** 47
            row.append(sat(rsr(acc, shifts[o]), out_fmt))
        out.append(row)
    return out


def layernorm_ref(x, gamma, beta, E, beta_shift, out_shift, out_fmt, sat: Sat | None = None):
    sat = sat or Sat()
    R, Fn = C.rsqrt_frac, C.norm_frac
    nfmt = C.norm_fmt
    out = []
    for row in x:
        D = len(row)
        S1 = sum(row)
        S2 = sum(v * v for v in row)
        V = D * S2 - S1 * S1
        assert V >= 0
        r, e = rsqrt_ref(V + E)
        z = []
        for i, xi in enumerate(row):
            d = D * xi - S1
            n = sat(rsr(d * r, R + e - Fn), nfmt)
            bs = beta_shift[i] if isinstance(beta_shift, (list, tuple)) else beta_shift
            os_ = out_shift[i] if isinstance(out_shift, (list, tuple)) else out_shift
            z.append(sat(rsr(n * gamma[i] + rsr(beta[i], bs), os_), out_fmt))
        out.append(z)
    return out


def attention_ref(q, k, v, heads, score_shift, score_fmt, out_shift, out_fmt, sat: Sat | None = None):
    """q: T x D, k, v: Tk x D lists; head h owns columns h*dh .. h*dh+dh-1."""
    sat = sat or Sat()
    T, D, Tk = len(q), len(q[0]), len(k)
    dh = D // heads
    R = C.recip_frac
    out = [[0] * D for _ in range(T)]
    for h in range(heads):
        cols = range(h * dh, (h + 1) * dh)
        for i in range(T):
            s = [sat(rsr(sum(q[i][c] * k[j][c] for c in cols), score_shift), score_fmt) for j in range(Tk)]
            m = max(s)
            p = [exp_ref(m - sj, score_fmt.frac) for sj in s]
            S = sum(p)
            r, kk = recip_ref(S)
            for c in cols:
                A = sum(p[j] * v[j][c] for j in range(Tk))
                out[i][c] = sat(rsr(A * r, R + kk + out_shift), out_fmt)
    return out


def gelu_ref(x: int, f_in: int, out_fmt, sat: Sat | None = None) -> int:
    sat = sat or Sat()
    lut, _ = gelu_lut()
    H, Fi, Fd, T = C.gelu_step_bits, C.gelu_interp_bits, C.gelu_frac, C.gelu_range
    N = T * 2 ** H
    a = abs(x)
    tt = rsr(a, f_in - (H + Fi))
    i, f = tt // 2 ** Fi, tt % 2 ** Fi
    if i >= N:
        delta = 0
    else:
        delta = int(lut[i]) + rsr((int(lut[i + 1]) - int(lut[i])) * f, Fi)
    K = max(f_in, Fd)
    g = max(x, 0) * 2 ** (K - f_in) - delta * 2 ** (K - Fd)
    return sat(rsr(g, K - out_fmt.frac), out_fmt)


def gate_ref(logits, k, f_l, sat: Sat | None = None):
    sat = sat or Sat()
    R, gfmt = C.recip_frac, C.gate_fmt
    idx, scores = [], []
    for row in logits:
        N = len(row)
        order = sorted(range(N), key=lambda e: (-row[e], e))[:k]
        m = max(row)
        p = [exp_ref(m - l, f_l) for l in row]
        r, kk = recip_ref(sum(p))
        sc = [sat(rsr(pe * r, R + kk - gfmt.frac), gfmt) for pe in p]
        idx.append(order)
        scores.append([sc[e] for e in order])
    return idx, scores


def queues_ref(idx, n_experts):
    qs = []
    for e in range(n_experts):
        toks, slots = [], []
        for t, row in enumerate(idx):
            for j, ee in enumerate(row):
                if ee == e:
                    toks.append(t)
                    slots.append(j)
        qs.append((toks, slots))
    return qs


def combine_ref(score, y, shifts, idx, out_fmt, sat: Sat | None = None):
    """shifts: a per-expert list (use the same value everywhere for a scalar shift)."""
    sat = sat or Sat()
    out = []
    for t in range(len(score)):
        D = len(y[t][0])
        row = []
        for c in range(D):
            acc = 0
            for j in range(len(score[t])):
                acc += rsr(score[t][j] * y[t][j][c], shifts[idx[t][j]])
            row.append(sat(acc, out_fmt))
        out.append(row)
    return out


def add_ref(a: int, b: int, sa: int, sb: int, out_fmt, sat: Sat | None = None) -> int:
    sat = sat or Sat()
    return sat(rsr(a, sa) + rsr(b, sb), out_fmt)


def patchify_ref(img, p):
    Cc, H, W = len(img), len(img[0]), len(img[0][0])
    rows = []
    for gy in range(H // p):
        for gx in range(W // p):
            rows.append([img[c][gy * p + i][gx * p + j] for c in range(Cc) for i in range(p) for j in range(p)])
    return rows
