#!/usr/bin/env python3
"""Measure the maximum error of every approximation in the numeric contract.

Each measurement covers the approximation's whole input range (exhaustively, or
through a mantissa argument that is exact for every input; docs/numerics.md gives
the domains). The rows of the doc's error table come from ``--markdown``.

  measure_numerics.py              human-readable report
  measure_numerics.py --json       the same numbers as JSON
  measure_numerics.py --markdown   the doc's error table
  measure_numerics.py --check      exit 1 unless ERROR_BOUNDS equals the measurement
  measure_numerics.py --write-doc docs/numerics.md   refresh the doc's table
  measure_numerics.py --sweep      candidate table sizes (the design comparison in the doc)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from m3vit.compiler import numerics as nx

EXP_FRACS = range(0, 17)       # score / logit fraction bits measured for exp
GELU_FRACS = range(nx.GELU_IN_FRAC[0], nx.GELU_IN_FRAC[1] + 1)  # every supported GELU input frac


def round_up_sig(v: float, digits: int = 3) -> float:
    """v rounded up to ``digits`` significant digits (a bound never below v)."""
    if v <= 0:
        return 0.0
    e = math.floor(math.log10(v)) - (digits - 1)
    return float(f"{math.ceil(v / 10.0 ** e - 1e-9) * 10.0 ** e:.{digits}g}")


def measure_exp(c: nx.Contract = nx.CONTRACT) -> dict:
    P = c.exp_frac
    t = np.arange(1 << 17, dtype=np.int64)
    rel = abs_lsb = rel_big = 0.0
    for f in EXP_FRACS:
        p = nx.exp_int(t, f, c).astype(np.float64)
        e = np.ldexp(np.exp(-np.ldexp(t.astype(np.float64), -f)), P)
        err = np.abs(p - e)
        abs_lsb = max(abs_lsb, err.max())
        pos = e > 0
        with np.errstate(over="ignore"):
            rel = max(rel, ((err[pos] - 1.0) / e[pos]).max())
        big = e >= 2.0 ** (P - 8)
        rel_big = max(rel_big, (err[big] / e[big]).max())
    return dict(exp_rel=max(rel, 0.0), exp_abs_lsb=abs_lsb, exp_rel_above_2m8=rel_big)


def measure_recip(c: nx.Contract = nx.CONTRACT) -> dict:
    M, R = c.recip_mant_frac, c.recip_frac
    mant = np.arange(1 << M, 1 << (M + 1), dtype=np.int64)
    r, k = nx.recip_int(mant, c)
    assert (k == M).all()
    exact = ((1 << (M + R + 1)) + mant) // (2 * mant)   # floor(2^(M+R)/mant + 1/2)
    r1 = nx._recip_newton(mant, c)
    q = np.ldexp(1.0, M + R) / mant
    scale = np.ldexp(r.astype(np.float64), -(M + R))
    # S = (mant + phi) 2^(k-M), phi in [0, 1): the error is extreme at phi = 0 or phi -> 1
    rel = max(np.abs(scale * mant - 1).max(), np.abs(scale * (mant + 1) - 1).max())
    return dict(recip_rel=rel, recip_correctly_rounded=bool((r == exact).all()),
                recip_newton_margin=float(np.abs(r1 - q).max()))


def measure_rsqrt(c: nx.Contract = nx.CONTRACT) -> dict:
    M, R = c.rsqrt_mant_frac, c.rsqrt_frac
    assert M % 2 == 0
    mant = np.arange(1 << M, 1 << (M + 2), dtype=np.int64)
    r, e = nx.rsqrt_int(mant, c)
    assert (e == M // 2).all()
    top = 1 << (2 * R + M + 2)
    ok = ((2 * r - 1) ** 2 * mant <= top) & (top < (2 * r + 1) ** 2 * mant)
    y1 = nx._rsqrt_newton(mant, c)
    q = np.ldexp(1.0, R + M // 2) / np.sqrt(mant.astype(np.float64))
    scale = np.ldexp(r.astype(np.float64), -(R + M // 2))
    rel = max(np.abs(scale * np.sqrt(mant) - 1).max(), np.abs(scale * np.sqrt(mant + 1.0) - 1).max())
    return dict(rsqrt_rel=rel, rsqrt_correctly_rounded=bool(ok.all()),
                rsqrt_newton_margin=float(np.abs(y1 - q).max()))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def gelu_exact(x: np.ndarray) -> np.ndarray:
    return x * 0.5 * _erfc(-x / math.sqrt(2.0)).astype(np.float64)


def measure_gelu(c: nx.Contract = nx.CONTRACT) -> dict:
    G, Fd = c.gelu_grid_frac, c.gelu_frac
    # the table itself: every grid point of [0, T_max]
    tt = np.arange((c.gelu_entries << c.gelu_interp_bits) + 1, dtype=np.int64)
    t = np.ldexp(tt.astype(np.float64), -G)
    d = np.ldexp(nx.gelu_delta(tt, G, c).astype(np.float64), -Fd)
    delta_abs = np.abs(d - (t - gelu_exact(t))).max()
    # end to end, before the output rounding: every 16-bit input at every f_in
    x = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)
    worst = 0.0
    for f in GELU_FRACS:
        K = max(f, Fd)
        g = nx.gelu(x, f, nx.Fmt(56, K), contract=c)
        xf = np.ldexp(x.astype(np.float64), -f)
        worst = max(worst, np.abs(np.ldexp(g.astype(np.float64), -K) - gelu_exact(xf)).max())
    return dict(gelu_abs=worst, gelu_delta_table_abs=delta_abs)


def measure_composites(seed: int = 0) -> dict:
    """Random sweeps of the composed ops (informational; bounds follow from the primitives)."""
    rng = np.random.default_rng(seed)
    c = nx.CONTRACT
    # LayerNorm normalised value n vs d / sqrt(V + E)
    worst_n = 0.0
    for D in (192, 384, 768):
        for _ in range(20):
            x = rng.integers(-(1 << 15), 1 << 15, size=(64, D)) >> rng.integers(0, 15)
            x[0, :] = 0
            x[1, 0] = 1 << 14
            s1 = x.sum(-1, keepdims=True).astype(np.float64)
            v = D * (x.astype(np.float64) ** 2).sum(-1, keepdims=True) - s1 ** 2
            n_exact = (D * x - s1) / np.sqrt(v + 1)
            big = nx.Fmt(48, c.norm_frac)
            n = nx.layernorm(x, np.ones(D, np.int64), np.zeros(D, np.int64), 1, 0, 0, big)
            worst_n = max(worst_n, np.abs(np.ldexp(n.astype(np.float64), -c.norm_frac) - n_exact).max())
    # attention weights p_j * r vs softmax
    worst_w = 0.0
    for _ in range(200):
        T, fs = int(rng.integers(1, 512)), int(rng.integers(4, 13))
        s = rng.integers(-(1 << 15), 1 << 15, size=T) >> int(rng.integers(0, 12))
        m = s.max()
        p = nx.exp_int(m - s, fs)
        r, k = nx.recip_int(np.array([p.sum()]))
        w = np.ldexp((p * r[0]).astype(np.float64), -(c.recip_frac + int(k[0])))
        ex = np.exp(-np.ldexp((m - s).astype(np.float64), -fs))
        worst_w = max(worst_w, np.abs(w - ex / ex.sum()).max())
    return dict(layernorm_norm_abs=worst_n, softmax_weight_abs=worst_w)


def measure_all(c: nx.Contract = nx.CONTRACT) -> dict:
    out = {}
    for fn in (measure_exp, measure_recip, measure_rsqrt, measure_gelu):
        out.update(fn(c))
    return out


ROWS = [  # key, approximation, quantity, domain
    ("exp_rel", "exp_int", "ε in \\|p − 2^P·e^−x\\| ≤ ε·2^P·e^−x + 1 LSB",
     "every t ∈ [0, 2^17), f_s ∈ [0, 16] (exhaustive)"),
    ("exp_abs_lsb", "exp_int", "max \\|p − 2^P·e^−x\\| in LSB of 2^−P",
     "every t ∈ [0, 2^17), f_s ∈ [0, 16] (exhaustive)"),
    ("recip_rel", "recip_int", "max \\|r·2^−(R+k)·S − 1\\|",
     "every integer S ≥ 1 (all 2^M mantissas, φ ∈ {0, 1⁻})"),
    ("rsqrt_rel", "rsqrt_int", "max \\|r·2^−(R+e)·√u − 1\\|",
     "every integer u ≥ 1 (all 3·2^M mantissas, φ ∈ {0, 1⁻})"),
    ("gelu_abs", "gelu", "max \\|g·2^−K − GELU(x)\\| before the output rounding",
     "every 16-bit x, f_in ∈ [−8, 24] (exhaustive)"),
]
DOC_BEGIN = "<!-- error-table:begin (scripts/measure_numerics.py --write-doc) -->"
DOC_END = "<!-- error-table:end -->"


def fmt_num(v: float) -> str:
    return f"{v:.2e}" if v < 0.1 else f"{v:.3g}"


def markdown(values: dict) -> str:
    """The doc's table; ``values`` are the rounded-up bounds (ERROR_BOUNDS)."""
    lines = ["| key | op | quantity | domain | max error |", "| --- | --- | --- | --- | --- |"]
    for key, op, what, dom in ROWS:
        lines.append(f"| `{key}` | `{op}` | {what} | {dom} | {fmt_num(values[key])} |")
    return "\n".join(lines)


CONST_BEGIN = "<!-- constants:begin (scripts/measure_numerics.py --write-doc) -->"
CONST_END = "<!-- constants:end -->"
CONST_ROWS = [  # field, symbol, meaning
    ("acc_bits", "", "GEMM and QKᵀ accumulator width (signed)"),
    ("max_keys", "", "longest attention row / widest LayerNorm the widths are sized for"),
    ("exp_l2e_frac", "C", "fraction bits of L2E"),
    ("exp_lut_bits", "L", "exp2 LUT index bits (2^L entries)"),
    ("exp_frac", "P", "fraction bits of exp values; exp(0) = 2^P"),
    ("recip_mant_frac", "M_r", "fraction bits of the reciprocal's mantissa in [1, 2)"),
    ("recip_lut_bits", "L_r", "reciprocal seed LUT index bits (2^L_r entries)"),
    ("recip_frac", "R_r", "fraction bits of the reciprocal r"),
    ("rsqrt_mant_frac", "M_s", "fraction bits of the rsqrt mantissa in [1, 4)"),
    ("rsqrt_lut_bits", "L_s", "rsqrt seed fraction bits (3·2^L_s entries)"),
    ("rsqrt_frac", "R_s", "fraction bits of the rsqrt r"),
    ("norm_bits", "W_n", "LayerNorm normalised-value container width"),
    ("norm_frac", "F_n", "LayerNorm normalised-value fraction bits"),
    ("gelu_step_bits", "H", "GELU table step 2^−H"),
    ("gelu_range", "T_max", "GELU table range [0, T_max)"),
    ("gelu_interp_bits", "F_i", "interpolation fraction bits (G = H + F_i)"),
    ("gelu_frac", "F_d", "fraction bits of δ table values"),
    ("gate_bits", "W_g", "gate probability width (unsigned)"),
    ("gate_frac", "F_g", "gate probability fraction bits"),
]


def constants_markdown(c: nx.Contract = nx.CONTRACT) -> str:
    lines = ["| field | symbol | value | meaning |", "| --- | --- | --- | --- |"]
    for field, sym, what in CONST_ROWS:
        lines.append(f"| `{field}` | {sym and f'`{sym}`'} | {getattr(c, field)} | {what} |")
    lines.append(f"| `l2e` (derived) | `L2E` | {c.l2e} | round(log2(e)·2^C) |")
    for gen in (nx.exp2_lut, nx.recip_lut, nx.rsqrt_lut, nx.gelu_lut):
        lut, prm = gen(c)
        lines.append(f"| `{gen.__name__}()` | | {prm['entries']} × {prm['value_bits']} b | "
                     f"values {int(lut.min())} … {int(lut.max())}, frac {prm['value_frac']} |")
    return "\n".join(lines)


def _replace_block(text: str, begin: str, end: str, body: str) -> str:
    i, j = text.index(begin) + len(begin), text.index(end)
    return text[:i] + "\n" + body + "\n" + text[j:]


def write_doc(path: str, values: dict) -> None:
    text = open(path, encoding="utf-8").read()
    text = _replace_block(text, DOC_BEGIN, DOC_END, markdown(values))
    text = _replace_block(text, CONST_BEGIN, CONST_END, constants_markdown())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def sweep() -> list[str]:
    base = nx.CONTRACT
    out = ["exp: L (LUT index bits), entries x bits, exp_rel, exp_abs_lsb"]
    for L in (6, 8, 10, 12):
        c = base.replace(exp_lut_bits=L)
        m = measure_exp(c)
        out.append(f"  L={L:2d}  {1 << L:5d} x {c.exp_frac + 1} b  exp_rel={m['exp_rel']:.3g}  "
                   f"abs={m['exp_abs_lsb']:.3g} LSB")
    out.append("recip: Lr (seed bits), newton margin |r1 - q| (< 1.5 needed), correctly rounded, recip_rel")
    for Lr in (6, 7, 8):
        m = measure_recip(base.replace(recip_lut_bits=Lr))
        out.append(f"  Lr={Lr}  {1 << Lr:4d} entries  margin={m['recip_newton_margin']:.3g}  "
                   f"exact={m['recip_correctly_rounded']}  recip_rel={m['recip_rel']:.3g}")
    out.append("rsqrt: Ls (seed fraction bits), newton margin, correctly rounded, rsqrt_rel")
    for Ls in (5, 6, 7):
        m = measure_rsqrt(base.replace(rsqrt_lut_bits=Ls))
        out.append(f"  Ls={Ls}  {3 << Ls:4d} entries  margin={m['rsqrt_newton_margin']:.3g}  "
                   f"exact={m['rsqrt_correctly_rounded']}  rsqrt_rel={m['rsqrt_rel']:.3g}")
    out.append("gelu: step 2^-H, range T, interpolation bits Fi (0 = nearest entry), entries, gelu_abs")
    for H, T, Fi in ((3, 8, 13), (4, 8, 12), (5, 4, 11), (5, 8, 11), (6, 8, 10), (5, 8, 8),
                     (6, 8, 0), (8, 8, 0), (9, 8, 0)):
        c = base.replace(gelu_step_bits=H, gelu_range=T, gelu_interp_bits=Fi)
        m = measure_gelu(c)
        kind = f"interp Fi={Fi}" if Fi else "nearest"
        out.append(f"  h=2^-{H} T={T} {kind:13s} {c.gelu_entries + 1:5d} entries  "
                   f"gelu_abs={m['gelu_abs']:.3g}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print the measurements as JSON")
    g.add_argument("--markdown", action="store_true", help="print the doc's error table")
    g.add_argument("--check", action="store_true", help="fail unless ERROR_BOUNDS matches")
    g.add_argument("--sweep", action="store_true", help="compare candidate table sizes")
    g.add_argument("--write-doc", metavar="MD", help="rewrite the error table between the markers in MD")
    ap.add_argument("--composites", action="store_true", help="also run the random composite sweeps")
    a = ap.parse_args(argv)
    if a.sweep:
        print("\n".join(sweep()))
        return 0
    t0 = time.perf_counter()
    meas = measure_all()
    if a.composites:
        meas.update(measure_composites())
    if a.json:
        print(json.dumps({k: (float(v) if not isinstance(v, bool) else v) for k, v in meas.items()}, indent=2))
        return 0
    measured = {key: round_up_sig(meas[key]) for key, *_ in ROWS}
    if a.markdown:
        print(markdown(measured))
        return 0
    if a.write_doc:
        write_doc(a.write_doc, measured)
        return 0
    bad = []
    for key, *_ in ROWS:
        want = measured[key]
        have = nx.ERROR_BOUNDS[key]
        if have != want:
            bad.append(f"{key}: measured {meas[key]:.6g} (table {want:.3g}), ERROR_BOUNDS has {have:.3g}")
    for key in ("recip_correctly_rounded", "rsqrt_correctly_rounded"):
        if not meas[key]:
            bad.append(f"{key} is false: the Newton step lands too far for the +-1 fix-up")
    if a.check:
        print("\n".join(bad) if bad else "ERROR_BOUNDS matches the measurement")
        return 1 if bad else 0
    for k, v in meas.items():
        print(f"{k:28s} {v if isinstance(v, bool) else f'{v:.6g}'}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    for b in bad:
        print("MISMATCH", b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
