"""HLS header library vs the golden model, bit for bit (C-simulation with g++).

Every op of hls/include is run through the op driver (hls/tb/op_driver.cpp, built once per
source hash under build/hls_ops/) and compared with np.array_equal against the same op of
m3vit.compiler.numerics, saturation counters included: on random stimulus (hypothesis,
derandomized) and on corner values. The generated headers are checked against the table
generators, and the kernel headers against the synthesizable-style rules.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3vit.compiler import numerics as nx
from m3vit.compiler.numerics import CONTRACT, Fmt, SatCounter
from m3vit.errors import ConfigError
from m3vit.hls import emit_tables
from m3vit.hls.csim_ops import DEFAULT_BUILD_ROOT, INCLUDE_DIR, OpDriver, OpError

# Test build: a small odd-shaped array (P_IN = 8, P_OUT = 6, neither divides most sizes below),
# max_dim > 1024 so LayerNorm's normalised value can saturate, k up to N = 8.
CFG = dict(p_in=8, p_out=6, act_bits=16, weight_bits=8, acc_bits=48, max_tokens=72, max_dim=1040,
           max_hidden=200, max_experts=8, max_k=8, max_heads=4)
PI, PO, QT = CFG["p_in"], CFG["p_out"], CFG["p_out"]
A16 = Fmt(16, 0)

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MEDIUM = settings(FAST, max_examples=50)

COMPARED: Counter = Counter()   # elements compared bit-exactly, per op


@pytest.fixture(scope="module")
def drv():
    d = OpDriver(CFG)
    yield d
    out = Path(DEFAULT_BUILD_ROOT) / "bitexact_counts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(build_seconds=round(d.build_seconds, 1), driver_calls=d.calls,
                                   compared=dict(sorted(COMPARED.items())),
                                   total=sum(COMPARED.values())), indent=1) + "\n")


def same(op: str, got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape or got.size == want.size, (op, got.shape, want.shape)
    got = got.reshape(want.shape)
    if not np.array_equal(got, want):
        bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        raise AssertionError(f"{op}: {bad.size} of {want.size} differ; first at {bad[:5].tolist()}: "
                             f"hls {got.reshape(-1)[bad[:5]].tolist()} vs golden {want.reshape(-1)[bad[:5]].tolist()}")
    COMPARED[op] += want.size


def fp(prefix: str, f: Fmt) -> dict:
    return {f"{prefix}_bits": f.bits, f"{prefix}_frac": f.frac, f"{prefix}_signed": int(f.signed)}


def vals(rng, fmt: Fmt, shape, corner=0.1):
    """Integers of fmt, with a fraction of its corner values mixed in."""
    a = rng.integers(fmt.min, fmt.max, size=shape, endpoint=True, dtype=np.int64)
    if corner:
        pick = rng.random(shape) < corner
        a[pick] = rng.choice(np.array(sorted({fmt.min, fmt.max, 0, 1, max(fmt.min, -1)}), np.int64), pick.sum())
    return a


seeds = st.integers(0, 2**32 - 1)


# =============================================================================== generated headers


def _lut_from_header(text: str, prefix: str) -> list[int]:
    m = re.search(rf"{prefix}_LUT\[(\d+)\] = \{{(.*?)\}};", text, re.S)
    assert m, prefix
    vals_ = [int(v) for v in m.group(2).replace("\n", " ").split(",") if v.strip()]
    assert len(vals_) == int(m.group(1))
    return vals_


def test_tables_header_is_the_generators_output():
    text = emit_tables.render_tables()
    for gen, prefix in ((nx.exp2_lut, "EXP2"), (nx.recip_lut, "RECIP"), (nx.rsqrt_lut, "RSQRT"),
                        (nx.gelu_lut, "GELU")):
        values, params = gen()
        assert _lut_from_header(text, prefix) == values.tolist()
        assert f"static const ap_uint<{params['value_bits']}> {prefix}_LUT" in text
    for f in ("acc_bits", "max_keys", "exp_frac", "recip_lut_bits", "rsqrt_lut_bits", "norm_frac", "gate_frac",
              "gelu_interp_bits"):
        assert f"static constexpr int {f.upper()} = {getattr(CONTRACT, f)};" in text
    assert f"static constexpr int L2E = {CONTRACT.l2e};" in text
    assert "static constexpr int RSQRT_INDEX_OFFSET = 128;" in text


def test_emit_is_byte_identical_and_rewrites_only_changes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pa, pb = emit_tables.emit(a, CFG), emit_tables.emit(b, dict(CFG))
    for name in pa:
        assert pa[name].read_bytes() == pb[name].read_bytes()
    stamp = {n: p.stat().st_mtime_ns for n, p in pa.items()}
    emit_tables.emit(a, CFG)
    assert {n: p.stat().st_mtime_ns for n, p in pa.items()} == stamp
    # a hw.json-style dict (limits nested, extra fields) gives the same config header
    hwjson = dict(board="zcu104", p_in=8, p_out=6, act_bits=16, weight_bits=8, acc_bits=48,
                  limits={k: CFG[k] for k in CFG if k.startswith("max_")} | {"max_tasks": 8})
    assert emit_tables.render_config(hwjson) == emit_tables.render_config(CFG)
    assert emit_tables.render_config(CFG) != emit_tables.render_config(CFG | {"p_in": 4})


@pytest.mark.parametrize("change, msg", [
    (dict(acc_bits=32), "acc_bits"), (dict(act_bits=18), "act_bits"), (dict(max_k=9, max_experts=16), "max_k"),
    (dict(max_tokens=5000), "max_tokens"), (dict(p_in="8"), "p_in"), (dict(max_k=4, max_experts=2), "max_k"),
])
def test_config_validation(change, msg):
    with pytest.raises(ConfigError, match=msg):
        emit_tables.render_config(CFG | change)
    with pytest.raises(ConfigError, match="missing key 'max_heads'"):
        emit_tables.render_config({k: v for k, v in CFG.items() if k != "max_heads"})


# =============================================================================== synthesizable style

_FORBIDDEN = [
    (r"\bnew\b|\bdelete\b", "dynamic memory"),
    (r"\b(malloc|calloc|realloc|free)\s*\(", "dynamic memory"),
    (r"std::\w+", "standard library in kernel code"),
    (r"\bhls::", "hls:: library calls (hls_math is a float stub here)"),
    (r"hls_math\.h|hls_stream\.h", "hls library headers"),
    (r"\b(throw|try|catch)\b", "exceptions"),
    (r"\b(float|double)\b", "floating point at run time"),
    (r"\b(while|goto)\b", "unbounded control flow"),
    (r"\b(exp|sqrt|log|log2|pow|exp2|erf|erfc|tanh)\s*\(", "math library call"),
    (r"#\s*pragma\b", "bare pragma (use M3V_HLS, which C-sim -Werror builds accept)"),
]
_ALLOWED_INCLUDE = re.compile(r'#include "(ap_int\.h|ap_fixed\.h|m3v_[a-z_]+\.h)"')


def _strip(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)
    code = re.sub(r"//[^\n]*", "", code)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', code)


def _block(code: str, open_at: int) -> str:
    depth = 0
    for i in range(open_at, len(code)):
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            return code[open_at:i + 1]
    raise AssertionError("unbalanced braces")


def lint_kernel_source(name: str, text: str) -> list[str]:
    """Violations of the synthesizable-style rules in one kernel header."""
    errs = []
    for line in text.splitlines():
        if line.lstrip().startswith("#include") and not _ALLOWED_INCLUDE.match(line.strip()):
            errs.append(f"{name}: include outside ap_int/ap_fixed/m3v_*: {line.strip()}")
    code = _strip(text)
    code_no_inc = re.sub(r"#include[^\n]*", "", code)
    for pat, why in _FORBIDDEN:
        for m in re.finditer(pat, code_no_inc):
            errs.append(f"{name}: {why}: '{m.group(0)}'")
    # every for loop: a compile-time bound (digits, UPPER_CASE constants, CFG::X) or a trip count
    for m in re.finditer(r"\bfor\s*\(([^;]*);([^;]*);([^)]*)\)", code):
        cond = m.group(2)
        bound = re.sub(r"\b[a-z_][a-z0-9_]*\s*(<|<=)\s*", "", cond, count=1)
        runtime = re.findall(r"\b(?!CFG\b)[a-z_][a-zA-Z0-9_.]*\b", bound)
        if not runtime:
            continue
        brace = code.find("{", m.end())
        if brace < 0 or code[m.end():brace].strip():
            errs.append(f"{name}: run-time bounded loop without a body block: for({cond})")
            continue
        body = _block(code, brace)
        head = re.split(r"\bfor\s*\(", body[1:], maxsplit=1)[0]
        if "M3V_TRIPCOUNT(" not in head:
            errs.append(f"{name}: run-time bounded loop without M3V_TRIPCOUNT: for({cond.strip()})")
    # no recursion: no function calls itself (the library has no indirect calls)
    for m in re.finditer(r"\b([A-Za-z_]\w*)\s*\([^;{}()]*(?:\([^()]*\)[^;{}()]*)*\)\s*(?:const\s*)?\{", code):
        fn = m.group(1)
        if fn in ("if", "for", "switch", "while", "return", "sizeof"):
            continue
        body = _block(code, code.index("{", m.end() - 1))
        if re.search(rf"\b{re.escape(fn)}\s*(<[^;(){{}}]*>)?\s*\(", body[1:]):
            errs.append(f"{name}: recursive call of {fn}")
    return errs


def test_lint_kernel_headers_and_emitted_code():
    headers = sorted(INCLUDE_DIR.glob("m3v_*.h")) + [INCLUDE_DIR / "m3v.h"]
    assert len(headers) >= 8
    errs = []
    for p in headers:
        errs += lint_kernel_source(p.name, p.read_text())
    errs += lint_kernel_source("m3v_tables.h", emit_tables.render_tables())
    errs += lint_kernel_source("m3v_config.h", emit_tables.render_config(CFG))
    assert not errs, "\n".join(errs)
    # pragmas are there for synthesis: pipelines, partitions and trip counts
    text = "".join(p.read_text() for p in headers)
    assert text.count("M3V_HLS(pipeline II=1)") >= 15
    assert text.count("M3V_HLS(array_partition") >= 15
    assert text.count("M3V_TRIPCOUNT(") >= 30


def test_lint_catches_violations():
    bad = """
#include <cmath>
template <int N> int f(int n, int *v) {
    int *p = new int[4];
    for (int i = 0; i < n; i++) { v[i] = hls::exp(v[i]); }
    for (int i = 0; i < N; i++) { v[i] += 1; }
    for (int i = 0; i < n; i++) {
        M3V_TRIPCOUNT(1, N)
        v[i] += f<N>(i, v);
    }
    double d = 0;
    return p[0];
}
"""
    errs = "\n".join(lint_kernel_source("bad.h", bad))
    for what in ("include outside", "dynamic memory", "hls:: library", "floating point", "without M3V_TRIPCOUNT",
                 "recursive call of f"):
        assert what in errs, what
    assert errs.count("without M3V_TRIPCOUNT") == 1


# =============================================================================== driver and primitives


def test_driver_reports_its_config_and_rejects_bad_requests(drv):
    got = drv.run("config")["config"]
    assert got.tolist() == [CFG[k] for k in emit_tables.CONFIG_KEYS]
    with pytest.raises(OpError, match="unknown op"):
        drv.run("no_such_op")
    with pytest.raises(OpError, match="rows outside"):
        drv.run("gemm", dict(rows=CFG["max_tokens"] + 1, in_dim=1, out_dim=1, **fp("fmt", A16)))
    with pytest.raises(OpError, match="does not fit"):
        drv.run("gelu", dict(in_frac=0, **fp("out", Fmt(16, 0, signed=False))), x=np.zeros(1, np.int64))


def _rshift_cases():
    xs = [0, 1, -1, 2, -2, 3, -3, 5, -5, 7, -7, (1 << 47) - 1, -(1 << 47), (1 << 61) + 3, -(1 << 62)]
    for s in range(-62, 63):
        ok = [x for x in xs if s >= 0 or abs(x) < (1 << 62) >> -s]
        yield s, np.array(ok, np.int64)


def test_rshift_round_all_shifts_corners(drv):
    calls = [("rshift_round", dict(s=s), dict(x=x)) for s, x in _rshift_cases()]
    for (s, x), out in zip(_rshift_cases(), drv.run_many(calls)):
        same("rshift_round", out["y"], nx.rshift_round(x, s))
    # ties go up for both signs: -2.5 -> -2, 2.5 -> 3
    out = drv.run("rshift_round", dict(s=1), x=np.array([-5, 5, -3, 3]))
    assert out["y"].tolist() == [-2, 3, -1, 2]


@FAST
@given(seed=seeds, s=st.integers(-62, 62))
def test_rshift_round_random(drv, seed, s):
    rng = np.random.default_rng(seed)
    lim = (1 << 62) if s >= 0 else (1 << 62) >> -s
    x = rng.integers(-lim + 1, lim, size=64, dtype=np.int64)
    same("rshift_round", drv.run("rshift_round", dict(s=s), x=x)["y"], nx.rshift_round(x, s))


@FAST
@given(seed=seeds, bits=st.integers(1, 63), signed=st.booleans())
def test_saturate(drv, seed, bits, signed):
    f = Fmt(bits, 0, signed)
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.integers(-(1 << 62), 1 << 62, 40, dtype=np.int64),
                        [f.min - 1, f.min, f.min + 1, f.max - 1, f.max, 0, -(1 << 63), (1 << 63) - 1]])
    x = np.clip(x, -(1 << 63), (1 << 63) - 1).astype(np.int64)
    sc = SatCounter()
    out = drv.run("saturate", fp("fmt", f), x=x)
    same("saturate", out["y"], nx.saturate(x, f, sc))
    assert out["sat"][0] == sc["saturate"][0]


@FAST
@given(seed=seeds, s=st.integers(-62, 62), bits=st.sampled_from([1, 2, 8, 16, 17, 32, 48, 63]),
       signed=st.booleans())
def test_requant(drv, seed, s, bits, signed):
    f = Fmt(bits, 0, signed)
    rng = np.random.default_rng(seed)
    lim = (1 << 47) if s >= 0 else min(1 << 47, (1 << 62) >> -s)
    x = np.concatenate([rng.integers(-lim + 1, lim, 48, dtype=np.int64), [0, 1, -1, lim - 1, -lim + 1]])
    sc = SatCounter()
    out = drv.run("requant", dict(s=s, **fp("fmt", f)), x=x)
    same("requant", out["y"], nx.requant(x, s, f, sc))
    assert out["sat"][0] == sc["requant"][0]


def test_requant_left_shift_saturation_corners(drv):
    for f in (Fmt(16, 0), Fmt(8, 0), Fmt(15, 0, False)):
        for s in (-1, -8, -15, -16, -17, -30, -46):
            x = np.array([0, 1, -1, 2, -2, 255, -256, (1 << (62 + s)) - 1, 1 - (1 << (62 + s))], np.int64)
            sc = SatCounter()
            out = drv.run("requant", dict(s=s, **fp("fmt", f)), x=x)
            same("requant", out["y"], nx.requant(x, s, f, sc))
            assert out["sat"][0] == sc["requant"][0]


# =============================================================================== exp, recip, rsqrt, GELU


def test_exp_int_exhaustive(drv):
    t = np.arange(1 << 17, dtype=np.int64)
    fracs = list(range(-10, 25))
    outs = drv.run_many([("exp_int", dict(frac=f), dict(t=t)) for f in fracs])
    for f, out in zip(fracs, outs):
        same("exp_int", out["p"], nx.exp_int(t, f))
    assert outs[fracs.index(10)]["p"][0] == 1 << CONTRACT.exp_frac


def test_recip_int_every_mantissa_and_wide(drv):
    rng = np.random.default_rng(7)
    S = np.concatenate([np.arange(1, 1 << 18), 1 << np.arange(63), rng.integers(1, 1 << 62, 20000),
                        (1 << np.arange(17, 63)) - 1, [(1 << 62) + 12345]]).astype(np.int64)
    out = drv.run("recip_int", S=S)
    r, k = nx.recip_int(S)
    same("recip_int", out["r"], r)
    same("recip_int", out["k"], k)


def test_rsqrt_int_every_mantissa_and_wide(drv):
    rng = np.random.default_rng(8)
    u = np.concatenate([np.arange(1, 1 << 19), 1 << np.arange(63), rng.integers(1, 1 << 62, 20000),
                        (1 << np.arange(17, 63)) - 1]).astype(np.int64)
    out = drv.run("rsqrt_int", u=u)
    r, e = nx.rsqrt_int(u)
    same("rsqrt_int", out["r"], r)
    same("rsqrt_int", out["e"], e)


GELU_OUT = [Fmt(16, 11), Fmt(16, 0), Fmt(8, 3), Fmt(16, 20), Fmt(15, 12, False), Fmt(16, -4)]


def test_gelu_exhaustive(drv):
    x = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)
    cases = [(fi, of) for fi in (-8, -1, 0, 5, 11, 15, 16, 17, 20, 24) for of in GELU_OUT[:3]]
    outs = drv.run_many([("gelu", dict(in_frac=fi, **fp("out", of)), dict(x=x)) for fi, of in cases])
    for (fi, of), out in zip(cases, outs):
        sc = SatCounter()
        same("gelu", out["y"], nx.gelu(x, fi, of, sc))
        assert out["sat"][0] == sc["gelu"][0]


def test_gelu_table_ends_and_beyond(drv):
    # |x| around the table's last interval and T_max = 8, for several input grids
    for fi in (5, 11, 12, 16, 20):
        step = 1 << max(fi - 5, 0)
        edge = 8 << fi if fi <= 11 else (1 << 15) - 1
        base = np.array([0, 1, step - 1, step, step + 1, edge - step, edge - 1, edge, edge + 1, (1 << 15) - 1])
        x = np.unique(np.clip(np.concatenate([base, -base, [-(1 << 15)]]), -(1 << 15), (1 << 15) - 1))
        for of in GELU_OUT:
            sc = SatCounter()
            out = drv.run("gelu", dict(in_frac=fi, **fp("out", of)), x=x)
            same("gelu", out["y"], nx.gelu(x, fi, of, sc))
            assert out["sat"][0] == sc["gelu"][0]


@FAST
@given(seed=seeds, fi=st.integers(-8, 24), ob=st.sampled_from([4, 8, 12, 16]), of=st.integers(-6, 24))
def test_gelu_random(drv, seed, fi, ob, of):
    x = vals(np.random.default_rng(seed), A16, 200)
    f = Fmt(ob, of)
    sc = SatCounter()
    out = drv.run("gelu", dict(in_frac=fi, **fp("out", f)), x=x)
    same("gelu", out["y"], nx.gelu(x, fi, f, sc))
    assert out["sat"][0] == sc["gelu"][0]


# =============================================================================== GEMM engine


def hls_gemm(drv, x, w, b, shift, fmt, *, gelu_fmt=None, gather=None, scatter=None, y0=None, score=None,
             comb=None, comb_shift=0, act_weights=False, **extra):
    rows = len(gather) if gather is not None else x.shape[0]
    in_dim, out_dim = w.shape
    p = dict(rows=rows, in_dim=in_dim, out_dim=out_dim, x_rows=x.shape[0], has_bias=int(b is not None),
             per_channel_shift=int(np.ndim(shift) > 0), act_weights=int(act_weights), **fp("fmt", fmt))
    arrays = dict(x=x, w=w, shift=np.atleast_1d(shift))
    if b is not None:
        arrays["bias"] = b
    if gelu_fmt is not None:
        p.update(gelu=1, **fp("gelu", gelu_fmt))
    if gather is not None:
        p["gather"] = 1
        arrays["gather_idx"] = gather
    if scatter is not None:
        p["scatter"] = 1
        arrays["scatter_idx"] = scatter
    if y0 is not None:
        p["y_rows"] = y0.shape[0]
        arrays["y"] = y0
    if comb is not None:
        p.update(combine=1, comb_shift=comb_shift, y_rows=comb.shape[0])
        arrays.update(comb=comb, score=score)
    p.update(extra)
    out = drv.run("gemm", p, **arrays)
    return out


def golden_gemm(x, w, b, shift, fmt, x_fmt, gelu_fmt=None):
    sc = SatCounter()
    if gelu_fmt is None:
        y = nx.gemm(x, w, b, shift, fmt, x_fmt, sc, "g")
        return y, (sc["g"][0], 0)
    y = nx.gemm_gelu(x, w, b, shift, fmt, gelu_fmt, x_fmt, sc, "g")
    return y, (sc["g.pre"][0], sc["g"][0])


@MEDIUM
@given(seed=seeds, rows=st.integers(1, 13), in_dim=st.integers(1, 41), out_dim=st.integers(1, 20),
       xb=st.sampled_from([8, 16]), mode=st.sampled_from(["plain", "gelu", "gather", "nobias", "scalar"]))
def test_gemm_random(drv, seed, rows, in_dim, out_dim, xb, mode):
    rng = np.random.default_rng(seed)
    x_fmt, w_fmt = Fmt(xb, 0), Fmt(8, 0)
    x = vals(rng, x_fmt, (rows, in_dim))
    w = vals(rng, w_fmt, (in_dim, out_dim))
    b = None if mode == "nobias" else rng.integers(-(1 << 30), 1 << 30, out_dim)
    shift = int(rng.integers(0, 24)) if mode == "scalar" else rng.integers(-2, 26, out_dim)
    fmt = Fmt(int(rng.choice([8, 12, 16])), int(rng.integers(-2, 12)))
    gelu_fmt = Fmt(16, int(rng.integers(4, 14))) if mode == "gelu" else None
    if mode == "gather":
        xr = rows + 5
        xfull = vals(rng, x_fmt, (xr, in_dim))
        gather = rng.integers(0, xr, rows)
        y0 = rng.integers(-99, 99, (rows + 4, out_dim))
        scatter = rng.permutation(rows + 4)[:rows]
        out = hls_gemm(drv, xfull, w, b, shift, fmt, gather=gather, scatter=scatter, y0=y0)
        yg, sat = golden_gemm(xfull[gather], w, b, shift, fmt, x_fmt)
        want = y0.copy()
        want[scatter] = yg
        same("gemm", out["y"], want)
    else:
        out = hls_gemm(drv, x, w, b, shift, fmt, gelu_fmt=gelu_fmt)
        want, sat = golden_gemm(x, w, b, shift, fmt, x_fmt, gelu_fmt)
        same("gemm", out["y"], want)
    assert tuple(out["sat"]) == sat


def test_gemm_corners(drv):
    rng = np.random.default_rng(11)
    x_fmt = A16
    cases = []
    # saturation both ways: extreme inputs and weights, big biases, shift 0
    x = np.array([[32767] * 9, [-32768] * 9, [0] * 9, [1] + [0] * 8])
    w = np.array([[127, -128, 0, 1, -1, 127, -128]] * 9)
    b = np.array([0, 0, (1 << 46) - (1 << 30), -(1 << 46) + (1 << 30), 5, -5, 0])
    cases += [(x, w, b, np.zeros(7, np.int64), Fmt(16, 0)),
              (x, w, b, np.full(7, 62), Fmt(16, 0)),                       # shift 62: everything rounds to 0
              (x, w, b, np.array([30, 31, 40, 46, 47, 0, 1]), Fmt(8, 0)),
              (x, w, b, np.array([-1, -2, -8, -15, -15, -3, -12]), Fmt(16, 0)),  # left shifts saturate
              (x, w, None, np.array([-1, -2, -8, -15, -15, -3, -12]), Fmt(15, 0, False))]
    # left shifts far beyond the container (the golden model takes them while x 2^-s fits 63 bits)
    xs = np.array([[0, 0], [1, 0], [-1, 0], [1, -1], [3, -1], [0, 1]])
    ws = np.array([[1, -1, 1, 0], [1, 1, 0, -1]])
    for sh in ([-16, -17, -40, -60], [-60, -59, -17, -16], [0, -30, 62, -61]):
        cases += [(xs, ws, None, np.array(sh), Fmt(16, 0)), (xs, ws, None, np.array(sh), Fmt(12, 0, False))]
    # sizes at and around the array's tiles, dims not powers of two
    for in_dim, out_dim in [(1, 1), (PI, PO), (PI + 1, PO + 1), (PI - 1, PO - 1), (3 * PI + 5, 4 * PO + 1),
                            (200, 7), (5, 200)]:
        xx = vals(rng, x_fmt, (7, in_dim))
        ww = vals(rng, Fmt(8, 0), (in_dim, out_dim))
        cases.append((xx, ww, rng.integers(-1000, 1000, out_dim), rng.integers(6, 20, out_dim), Fmt(16, 2)))
    xx = vals(rng, x_fmt, (CFG["max_tokens"], 33))       # MAX_ROWS rows
    cases.append((xx, vals(rng, Fmt(8, 0), (33, 13)), None, np.full(13, 9), Fmt(16, 0)))
    for x, w, b, s, f in cases:
        out = hls_gemm(drv, x, w, b, s, f)
        want, sat = golden_gemm(x, w, b, s, f, x_fmt)
        same("gemm", out["y"], want)
        assert tuple(out["sat"]) == sat


def test_gemm_gelu_epilogue_table_ends(drv):
    # identity weights put chosen values on the GELU input: the table's last interval, T_max, beyond
    x = np.array([[v] for v in (0, 1, -1, 255, 256, 257, -256, -257, 511, 32767, -32768, 8 << 5, (8 << 5) - 1)])
    w = np.ones((1, 3), np.int64)
    for shift, mid, out_f in [(0, Fmt(16, 5), Fmt(16, 5)), (-3, Fmt(16, 8), Fmt(8, 2)), (2, Fmt(16, 3), Fmt(16, 11))]:
        out = hls_gemm(drv, x, w, np.array([0, 7, -7]), np.full(3, shift), mid, gelu_fmt=out_f)
        want, sat = golden_gemm(x, w, np.array([0, 7, -7]), np.full(3, shift), mid, A16, out_f)
        same("gemm_gelu", out["y"], want)
        assert tuple(out["sat"]) == sat


@FAST
@given(seed=seeds, tq=st.integers(1, 20), tk=st.integers(1, 30), heads=st.integers(1, 3), dh=st.integers(1, 17))
def test_gemm_computes_attention_scores(drv, seed, tq, tk, heads, dh):
    """QK^T on the GEMM engine: K as output-major 'weights', the head picked by column offsets."""
    rng = np.random.default_rng(seed)
    D = heads * dh
    q, k = vals(rng, A16, (tq, D)), vals(rng, A16, (tk, D))
    sfmt = Fmt(16, 6)
    shift = int(rng.integers(14, 30))
    for h in range(heads):
        sc = SatCounter()
        want = nx.attention_scores(q[:, h * dh:(h + 1) * dh], k[:, h * dh:(h + 1) * dh], shift, sfmt, sc, "s")
        out = drv.run("gemm", dict(rows=tq, in_dim=dh, out_dim=tk, x_ld=D, x_off=h * dh, w_trans=1, w_ld=D,
                                   w_off=h * dh, act_weights=1, has_bias=0, per_channel_shift=0, x_rows=tq,
                                   **fp("fmt", sfmt)),
                      x=q, w=k, shift=np.array([shift]))
        same("gemm_scores", out["y"], want)
        assert out["sat"][0] == sc["s"][0]


def test_patch_embedding(drv):
    rng = np.random.default_rng(3)
    for ch, h, w, p, dim in [(3, 16, 24, 4, 10), (3, 8, 8, 8, 7), (2, 6, 9, 3, 13), (1, 5, 5, 1, 6)]:
        img = vals(rng, Fmt(8, 0), (ch, h, w))
        patches = drv.run("patchify", dict(ch=ch, height=h, width=w, p=p), img=img)["out"]
        want = nx.patchify(img, p)
        same("patchify", patches, want)
        wt = vals(rng, Fmt(8, 0), (ch * p * p, dim))
        b, s = rng.integers(-500, 500, dim), rng.integers(0, 10, dim)
        out = hls_gemm(drv, patches.reshape(want.shape), wt, b, s, Fmt(16, 0))
        same("patch_embed", out["y"], nx.gemm(want, wt, b, s, Fmt(16, 0), Fmt(8, 0), SatCounter()))


# =============================================================================== LayerNorm


def hls_ln(drv, x, gamma, beta, eps, beta_shift, out_shift, out_fmt):
    rows, D = x.shape
    out = drv.run("layernorm", dict(rows=rows, dim=D, eps=eps, beta_shift=beta_shift, **fp("out", out_fmt)),
                  x=x, gamma=gamma, beta=beta, out_shift=np.broadcast_to(out_shift, (D,)))
    return out["z"].reshape(rows, D), out["sat"]


def golden_ln(x, gamma, beta, eps, beta_shift, out_shift, out_fmt):
    sc = SatCounter()
    z = nx.layernorm(x, gamma, beta, eps, beta_shift, out_shift, out_fmt, sc, "ln")
    return z, (sc["ln.norm"][0], sc["ln"][0])


@MEDIUM
@given(seed=seeds, rows=st.integers(1, 5), D=st.sampled_from([1, 2, 3, 7, 13, 48, 50, 97, 192, 385]),
       xb=st.sampled_from([8, 12, 16]))
def test_layernorm_random(drv, seed, rows, D, xb):
    rng = np.random.default_rng(seed)
    f_x = int(rng.integers(0, 12))
    x = vals(rng, Fmt(xb, f_x), (rows, D))
    f_g, f_z = int(rng.integers(8, 14)), int(rng.integers(4, 12))
    gamma = vals(rng, Fmt(16, f_g), D, corner=0.05)
    beta_shift = -int(rng.integers(0, 12))
    beta = rng.integers(-(1 << 15), 1 << 15, D)
    out_shift = np.full(D, CONTRACT.norm_frac + f_g - f_z) + rng.integers(-1, 2, D)
    eps = nx.layernorm_eps_int(float(rng.choice([1e-6, 1e-5, 1e-3])), D, f_x)
    out_fmt = Fmt(int(rng.choice([8, 16])), f_z)
    z, sat = hls_ln(drv, x, gamma, beta, eps, beta_shift, out_shift, out_fmt)
    want, wsat = golden_ln(x, gamma, beta, eps, beta_shift, out_shift, out_fmt)
    same("layernorm", z, want)
    assert tuple(sat) == wsat


def test_layernorm_corners(drv):
    rng = np.random.default_rng(5)
    cases = []
    D = 50
    g = np.full(D, 1 << 12)
    # constant rows: V = 0, only E under the root (and D = 1, where d = 0 as well)
    const = np.array([[0] * D, [32767] * D, [-32768] * D, [5] * D])
    for eps in (1, 7, (1 << 61) - 1):
        cases.append((const, g, np.zeros(D, np.int64), eps, 0, np.full(D, 12), A16))
    cases.append((np.array([[3], [-32768], [32767]]), np.array([1 << 12]), np.array([100]), 1, 0, np.array([12]), A16))
    # maximal variance: alternating extremes; outputs saturate both ways with a big gamma
    alt = np.tile([32767, -32768], (2, D // 2))
    cases.append((alt, np.full(D, 32767), np.zeros(D, np.int64), 1, 0, np.full(D, 0), A16))
    cases.append((alt, np.full(D, -32768), rng.integers(-(1 << 40), 1 << 40, D), 1, 0, np.full(D, 3), Fmt(8, 0)))
    # beta alignment by a right shift (rounding) and by left shifts
    cases.append((vals(rng, A16, (3, D)), vals(rng, A16, D), rng.integers(-(1 << 20), 1 << 20, D), 99, 5,
                  np.full(D, 12), A16))
    cases.append((vals(rng, A16, (3, D)), vals(rng, A16, D), vals(rng, A16, D), 99, -15, np.full(D, 12), A16))
    # D > 1024: one outlier's normalised value exceeds +-32 and saturates s18.12
    big = np.zeros((2, CFG["max_dim"]), np.int64)
    big[0, 17] = 30000
    big[1, 3] = -30000
    big[1, 4] = 1
    Db = big.shape[1]
    cases.append((big, np.full(Db, 1 << 12), np.zeros(Db, np.int64), 1, 0, np.full(Db, 12), A16))
    norm_sat = 0
    for x, gamma, beta, eps, bsh, osh, f in cases:
        z, sat = hls_ln(drv, x, gamma, beta, eps, bsh, osh, f)
        want, wsat = golden_ln(x, gamma, beta, eps, bsh, osh, f)
        same("layernorm", z, want)
        assert tuple(sat) == wsat
        norm_sat += wsat[0]
    assert norm_sat >= 2


# =============================================================================== attention


def hls_attention(drv, q, k, v, heads, score_shift, score_fmt, out_shift, out_fmt):
    out = drv.run("attention", dict(tq=q.shape[0], tk=k.shape[0], heads=heads, dh=q.shape[1] // heads,
                                    score_shift=score_shift, out_shift=out_shift, **fp("score", score_fmt),
                                    **fp("out", out_fmt)), q=q, k=k, v=v)
    return out["o"].reshape(q.shape), out["sat"]


def golden_attention(q, k, v, heads, score_shift, score_fmt, out_shift, out_fmt):
    sc = SatCounter()
    o = nx.attention(q, k, v, heads, score_shift, score_fmt, out_shift, out_fmt, sc, "attn")
    return o, (sc["attn.score"][0], sc["attn.out"][0])


@MEDIUM
@given(seed=seeds, tq=st.integers(1, 20), tk=st.integers(1, 25), heads=st.integers(1, 4),
       dh=st.sampled_from([1, 3, 5, 8, 13, 16]), narrow=st.booleans())
def test_attention_random(drv, seed, tq, tk, heads, dh, narrow):
    rng = np.random.default_rng(seed)
    D = heads * dh
    qf = Fmt(8, 4) if narrow else A16
    q, k, v = vals(rng, qf, (tq, D)), vals(rng, qf, (tk, D)), vals(rng, A16, (tk, D))
    score_fmt = Fmt(int(rng.choice([12, 16])), int(rng.integers(2, 12)))
    score_shift = int(rng.integers(4, 24)) if not narrow else int(rng.integers(-2, 8))
    out_fmt = Fmt(16, int(rng.integers(-2, 4)))
    out_shift = -out_fmt.frac + int(rng.integers(-1, 2))
    o, sat = hls_attention(drv, q, k, v, heads, score_shift, score_fmt, out_shift, out_fmt)
    want, wsat = golden_attention(q, k, v, heads, score_shift, score_fmt, out_shift, out_fmt)
    same("attention", o, want)
    assert tuple(sat) == wsat


def test_attention_corners(drv):
    rng = np.random.default_rng(9)
    cases = []
    # a single key: o = v exactly when f_o = f_v
    v1 = vals(rng, A16, (1, 8))
    cases.append((vals(rng, A16, (5, 8)), vals(rng, A16, (1, 8)), v1, 2, 14, Fmt(16, 8), 0, A16))
    # all-equal scores (q = 0): the plain average of v over the keys
    cases.append((np.zeros((4, 6), np.int64), vals(rng, A16, (9, 6)), vals(rng, A16, (9, 6)), 1, 10, Fmt(16, 8), 0,
                  A16))
    # saturated scores both ways; exp underflow to 0 for every key but the max
    q = np.full((3, 4), 32767)
    q[1] = -32768
    kk = np.concatenate([np.full((2, 4), 32767), np.full((2, 4), -32768), vals(rng, A16, (3, 4))])
    cases.append((q, kk, vals(rng, A16, (7, 4)), 1, -4, Fmt(16, 0), 0, A16))
    cases.append((q, kk, vals(rng, A16, (7, 4)), 1, 20, Fmt(16, 14), 0, A16))
    # many query tiles (tq > ATT_QT, not a multiple), dh > P_OUT and not a multiple of P_IN, max keys
    T = CFG["max_tokens"]
    assert (T - 1) % QT and 23 > PO and 23 % PI
    cases.append((vals(rng, A16, (T - 1, 2 * 23)), vals(rng, A16, (T, 2 * 23)), vals(rng, A16, (T, 2 * 23)), 2, 22,
                  Fmt(16, 9), 0, A16))
    # output saturation: out_shift pushing o beyond the format
    cases.append((vals(rng, A16, (6, 6)), vals(rng, A16, (6, 6)), vals(rng, A16, (6, 6)), 3, 16, Fmt(16, 8), -3,
                  Fmt(8, 0)))
    out_sat = 0
    for q, k, v, heads, ss, sf, osh, of in cases:
        o, sat = hls_attention(drv, q, k, v, heads, ss, sf, osh, of)
        want, wsat = golden_attention(q, k, v, heads, ss, sf, osh, of)
        same("attention", o, want)
        assert tuple(sat) == wsat
        out_sat += wsat[1]
    assert out_sat > 0
    same("attention", hls_attention(drv, *cases[0][:3], 2, 14, Fmt(16, 8), 0, A16)[0], np.tile(v1, (5, 1)))


@FAST
@given(seed=seeds, tq=st.integers(1, 9), tk=st.integers(1, 40), dh=st.integers(1, 15), tiles=st.integers(1, 5))
def test_softmax_partial_tiles_any_order(drv, seed, tq, tk, dh, tiles):
    """Key tiles in any order add up to the golden model's sums; finish applies the reciprocal."""
    rng = np.random.default_rng(seed)
    frac = int(rng.integers(0, 13))
    s = vals(rng, Fmt(16, frac), (tq, tk))
    v = vals(rng, A16, (tk, dh))
    m = s.max(axis=1)
    cuts = np.sort(rng.choice(np.arange(1, tk), size=min(tiles - 1, tk - 1), replace=False)) if tk > 1 else []
    parts = np.split(np.arange(tk), cuts)
    psum, pv = np.zeros(tq, np.int64), np.zeros((tq, dh), np.int64)
    for part in rng.permutation(len(parts)):
        keys = parts[part]
        out = drv.run("softmax_av_partial", dict(tq=tq, tk=keys.size, dh=dh, frac=frac),
                      s=s[:, keys], v=v[keys], m=m, psum=psum, pv=pv)
        psum, pv = out["psum"], out["pv"].reshape(tq, dh)
    wps, wpv = nx.softmax_av_partial(s, v, m, frac)
    same("softmax_av_partial", psum, wps)
    same("softmax_av_partial", pv, wpv)
    of = Fmt(16, int(rng.integers(-2, 3)))
    osh = int(rng.integers(-3, 3))
    sc = SatCounter()
    out = drv.run("softmax_av_finish", dict(tq=tq, dh=dh, out_shift=osh, **fp("out", of)), psum=psum, pv=pv)
    same("softmax_av_finish", out["o"], nx.softmax_av_finish(wps, wpv, osh, of, sc, "o"))
    assert out["sat"][0] == sc["o"][0]


# =============================================================================== MoE


def hls_gate(drv, logits, k, frac):
    T, N = logits.shape
    out = drv.run("moe_gate", dict(T=T, N=N, K=k, frac=frac), logits=logits)
    return out["idx"].reshape(T, k), out["score"].reshape(T, k), out["sat"][0]


def check_gate(drv, logits, k, frac):
    idx, score, sat = hls_gate(drv, logits, k, frac)
    sc = SatCounter()
    widx, wscore = nx.moe_gate(logits, k, frac, sc, "gate")
    same("moe_gate", idx, widx)
    same("moe_gate", score, wscore)
    assert sat == sc["gate"][0]
    return idx, score


@MEDIUM
@given(seed=seeds, T=st.integers(1, 30), N=st.integers(1, 8), kfrac=st.floats(0, 1), frac=st.integers(0, 14),
       spread=st.sampled_from([3, 100, 1 << 15]))
def test_moe_gate_random(drv, seed, T, N, kfrac, frac, spread):
    rng = np.random.default_rng(seed)
    k = 1 + int(kfrac * (N - 1))
    logits = rng.integers(-spread, spread, (T, N)).clip(-(1 << 15), (1 << 15) - 1)   # small spread: ties
    check_gate(drv, logits, k, frac)


def test_moe_gate_corners(drv):
    T = 6
    for N in (1, 2, 5, 8):
        for k in sorted({1, N}):
            check_gate(drv, np.zeros((T, N), np.int64), k, 8)                              # all equal
            lg = np.tile(np.arange(N), (T, 1)) % 2                                       # pairwise ties
            idx, _ = check_gate(drv, lg, k, 4)
            check_gate(drv, np.full((T, N), -32768) + np.eye(T, N, dtype=np.int64) * 65535, k, 0)  # one hot
            rng = np.random.default_rng(N * 10 + k)
            check_gate(drv, vals(rng, A16, (T, N), corner=0.5), k, 15)
    idx, _ = check_gate(drv, np.array([[5, 9, 9, 2, 9]]), 3, 0)
    assert idx.tolist() == [[1, 2, 4]]


@FAST
@given(seed=seeds, T=st.integers(1, 40), N=st.integers(1, 8), kfrac=st.floats(0, 1))
def test_expert_queues(drv, seed, T, N, kfrac):
    rng = np.random.default_rng(seed)
    k = 1 + int(kfrac * (N - 1))
    idx = np.stack([rng.permutation(N)[:k] for _ in range(T)])
    out = drv.run("expert_queues", dict(T=T, K=k, N=N), idx=idx)
    off = out["off"]
    assert off[0] == 0 and off[-1] == T * k
    for e, q in enumerate(nx.expert_queues(idx, N)):
        same("expert_queues", out["tok"][off[e]:off[e + 1]], q.tokens)
        same("expert_queues", out["slot"][off[e]:off[e + 1]], q.slots)


@FAST
@given(seed=seeds, T=st.integers(1, 12), k=st.integers(1, 8), D=st.integers(1, 30), per_expert=st.booleans())
def test_moe_combine_random(drv, seed, T, k, D, per_expert):
    rng = np.random.default_rng(seed)
    N = 8
    idx = np.stack([rng.permutation(N)[:k] for _ in range(T)])
    score = rng.integers(0, 1 << 16, (T, k))
    score[rng.random((T, k)) < 0.2] = 1 << 15
    y = vals(rng, A16, (T, k, D))
    shift = rng.integers(-2, 22, N) if per_expert else int(rng.integers(-2, 22))
    f = Fmt(int(rng.choice([8, 16])), 0)
    out = drv.run("moe_combine", dict(T=T, K=k, D=D, per_expert=int(per_expert), **fp("fmt", f)),
                  score=score, y=y, idx=idx, shift=np.atleast_1d(shift))
    sc = SatCounter()
    same("moe_combine", out["out"], nx.moe_combine(score, y, shift, f, idx, sc, "c"))
    assert out["sat"][0] == sc["c"][0]


def test_moe_layer_fused_path(drv):
    """gate -> queues -> experts on the GEMM engine (gather, GELU; combine epilogue with scatter)
    -> one saturation, against the golden model's composition (compiler/golden.py's _moe)."""
    rng = np.random.default_rng(21)
    T, D, H, N, k = 23, 20, 13, 5, 2
    x_fmt, mid, f1, f2, fo = A16, Fmt(16, 10), Fmt(16, 9), Fmt(16, 8), Fmt(16, 8)
    x = vals(rng, x_fmt, (T, D))
    gw, gb, gs = vals(rng, Fmt(8, 0), (D, N)), rng.integers(-999, 999, N), np.full(N, 12)
    lfmt = Fmt(16, 6)
    w1 = vals(rng, Fmt(8, 0), (N, D, H), corner=0)
    b1, s1 = rng.integers(-9999, 9999, (N, H)), rng.integers(8, 12, (N, H))
    w2 = vals(rng, Fmt(8, 0), (N, H, D), corner=0)
    b2, s2 = rng.integers(-9999, 9999, (N, D)), rng.integers(8, 12, (N, D))
    comb_shift = rng.integers(14, 17, N)

    # golden
    sc = SatCounter()
    logits = nx.gemm(x, gw, gb, gs, lfmt, x_fmt, sc, "gate")
    widx, wscore = nx.moe_gate(logits, k, lfmt.frac, sc, "score")
    y = np.zeros((T, k, D), np.int64)
    for e, q in enumerate(nx.expert_queues(widx, N)):
        if q.tokens.size:
            h = nx.gemm_gelu(x[q.tokens], w1[e], b1[e], s1[e], mid, f1, x_fmt, sc, f"e{e}.fc1")
            y[q.tokens, q.slots] = nx.gemm(h, w2[e], b2[e], s2[e], f2, f1, sc, f"e{e}.fc2")
    want = nx.moe_combine(wscore, y, comb_shift, fo, widx, sc, "combine")

    # HLS
    hl = hls_gemm(drv, x, gw, gb, gs, lfmt)["y"].reshape(T, N)
    same("moe_layer", hl, logits)
    idx, score, _ = hls_gate(drv, hl, k, lfmt.frac)
    same("moe_layer", idx, widx)
    qs = drv.run("expert_queues", dict(T=T, K=k, N=N), idx=idx)
    comb = np.zeros((T, D), np.int64)
    for e in range(N):
        lo, hi = qs["off"][e], qs["off"][e + 1]
        if lo == hi:
            continue
        tok, slot = qs["tok"][lo:hi], qs["slot"][lo:hi]
        h = hls_gemm(drv, x, w1[e], b1[e], s1[e], mid, gelu_fmt=f1, gather=tok)
        same("moe_layer", tuple(h["sat"]), (sc[f"e{e}.fc1.pre"][0], sc[f"e{e}.fc1"][0]))
        h = h["y"].reshape(hi - lo, H)
        r = hls_gemm(drv, h, w2[e], b2[e], s2[e], f2, scatter=tok, score=score[tok, slot], comb=comb,
                     comb_shift=int(comb_shift[e]))
        comb = r["comb"].reshape(T, D)
    out = drv.run("combine_finish", dict(rows=T, dim=D, **fp("fmt", fo)), comb=comb)
    same("moe_layer", out["out"], want)
    assert out["sat"][0] == sc["combine"][0]


# =============================================================================== residual, CLS, position


@MEDIUM
@given(seed=seeds, rows=st.integers(1, 9), dim=st.integers(1, 40), sa=st.integers(-46, 20), sb=st.integers(-46, 20),
       bits=st.sampled_from([8, 16]))
def test_residual_add_random(drv, seed, rows, dim, sa, sb, bits):
    rng = np.random.default_rng(seed)
    a, b = vals(rng, A16, (rows, dim)), vals(rng, A16, (rows, dim))
    if rng.random() < 0.3:   # cancelling terms
        b = np.minimum(-a, A16.max)
        sb = sa
    f = Fmt(bits, 0)
    out = drv.run("residual_add", dict(rows=rows, dim=dim, a_shift=sa, b_shift=sb, **fp("fmt", f)), a=a, b=b)
    sc = SatCounter()
    same("residual_add", out["z"], nx.residual_add(a, b, sa, sb, f, sc, "add"))
    assert out["sat"][0] == sc["add"][0]


def test_residual_add_alignment_corners(drv):
    a = np.array([[1, -1, 1, 32767, -32768, 3, 0, 1, -1, 5, 1]])
    b = np.array([[-1, 1, -2, -32768, 32767, -5, 0, 0, 1, -3, -1]])
    f = A16
    for sa, sb in [(-40, -39), (-39, -40), (-40, -40), (-17, -16), (-62 + 16, -62 + 16), (-20, 3), (3, -20),
                   (0, 0), (17, 17), (62, -1), (-1, 62), (-15, -14), (-16, -18), (-30, -13)]:
        sc = SatCounter()
        out = drv.run("residual_add", dict(rows=1, dim=a.shape[1], a_shift=sa, b_shift=sb, **fp("fmt", f)), a=a, b=b)
        same("residual_add", out["z"], nx.residual_add(a, b, sa, sb, f, sc, "add"))
        assert out["sat"][0] == sc["add"][0]


def test_embedding_cls_and_position(drv):
    rng = np.random.default_rng(4)
    n, dim = 12, 10
    tokens, cls = vals(rng, A16, (n, dim)), vals(rng, A16, dim)
    t = drv.run("prepend_cls", dict(n=n, dim=dim), tokens=tokens, cls=cls)["out"]
    want = nx.prepend_cls(tokens, cls)
    same("prepend_cls", t, want)
    pos = vals(rng, A16, (n + 1, dim))
    sc = SatCounter()
    out = drv.run("residual_add", dict(rows=n + 1, dim=dim, a_shift=0, b_shift=2, **fp("fmt", A16)), a=t, b=pos)
    same("embed", out["z"], nx.residual_add(want, pos, 0, 2, A16, sc, "embed"))
    # one shared row broadcast with b_ld = 0
    out = drv.run("residual_add", dict(rows=n + 1, dim=dim, a_shift=1, b_shift=-1, b_ld=0, **fp("fmt", A16)),
                  a=t, b=pos[0])
    same("embed", out["z"], nx.residual_add(want, pos[:1], 1, -1, A16, SatCounter(), "embed"))
