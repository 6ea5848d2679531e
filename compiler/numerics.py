"""The integer numeric contract shared by the golden model, the HLS library and the RTL.

Every accelerator op is defined here once, in integer arithmetic on int64 arrays.
docs/numerics.md states the same formulas in prose, with every intermediate width;
the HLS and RTL executors must reproduce these results bit for bit.

Conventions
-----------
* A format ``Fmt(bits, frac, signed)`` holds integers q with value q * 2**-frac.
* Rounding is always ``rshift_round`` (round half up, = ap_fixed AP_RND) and
  saturation is always a clamp to the format range (= AP_SAT).
* Shifts are run-time parameters: one hardware build serves every model.
* Lookup tables come from the ``*_lut()`` generators only; emitters call them too.
* Every saturation is reported: ops take ``stats`` (a ``SatCounter``); without one a
  saturation emits a ``SaturationWarning``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from m3vit.errors import ConfigError

__all__ = [
    "Contract", "CONTRACT", "ERROR_BOUNDS", "GELU_IN_FRAC", "Fmt", "SatCounter", "SaturationWarning",
    "Queue", "rshift_round", "saturate", "requant", "quantize", "requantize",
    "frac_for_range", "bit_length", "exact_matmul", "gemm_acc_bound", "check_gemm_acc",
    "gemm", "gemm_gelu", "patchify", "exp2_lut", "rsqrt_lut", "recip_lut", "gelu_lut",
    "exp_int", "recip_int", "rsqrt_int", "layernorm_eps_int", "layernorm",
    "attention_scores", "softmax_av_partial", "softmax_av_finish", "attention",
    "gelu_delta", "gelu", "moe_gate", "expert_queues", "moe_combine", "residual_add",
    "prepend_cls",
]


# --------------------------------------------------------------------------- contract


@dataclass(frozen=True)
class Contract:
    """Fixed internals of the one hardware build. Only the measurement script builds
    variants of this (to compare table sizes); every executor uses ``CONTRACT``."""

    acc_bits: int = 48              # GEMM / QK^T accumulator (DSP48E2 P register)
    max_keys: int = 4096            # longest attention row the widths are sized for
    # exp(-x) = 2^(-x*log2 e): u = t*L2E, L2E with exp_l2e_frac fraction bits
    exp_l2e_frac: int = 16          # C
    exp_lut_bits: int = 10          # L: index = top L fraction bits of u (rounded)
    exp_frac: int = 16              # P: exp values are p * 2^-P, exp(0) = 2^P exactly
    # reciprocal 1/S, S >= 1: mantissa in [1,2), LUT seed, one Newton step, +-1 fix-up
    recip_mant_frac: int = 16       # M
    recip_lut_bits: int = 7         # Lr
    recip_frac: int = 16            # R
    # reciprocal square root 1/sqrt(u), u >= 1: mantissa in [1,4), same scheme
    rsqrt_mant_frac: int = 16
    rsqrt_lut_bits: int = 7         # fraction bits indexed; table has 3*2^Ls entries
    rsqrt_frac: int = 16
    # LayerNorm normalised value container
    norm_bits: int = 18
    norm_frac: int = 12
    # GELU(x) = relu(x) - delta(|x|), delta tabulated on [0, gelu_range)
    gelu_step_bits: int = 5         # H: table step 2^-H
    gelu_range: int = 8             # T_max (power of two keeps the range test a bit test)
    gelu_interp_bits: int = 11      # Fi: fraction of a step kept for interpolation
    gelu_frac: int = 16             # Fd: table values delta * 2^Fd
    # MoE gate probabilities
    gate_bits: int = 16
    gate_frac: int = 15

    def __post_init__(self):
        if self.rsqrt_mant_frac % 2:
            raise ConfigError("rsqrt_mant_frac must be even (the mantissa keeps an even exponent)")
        if self.recip_lut_bits > self.recip_mant_frac or self.rsqrt_lut_bits > self.rsqrt_mant_frac:
            raise ConfigError("a seed LUT cannot index more bits than the mantissa has")

    @property
    def l2e(self) -> int:
        return _round_half_up(math.log2(math.e) * 2.0 ** self.exp_l2e_frac)

    @property
    def norm_fmt(self) -> "Fmt":
        return Fmt(self.norm_bits, self.norm_frac)

    @property
    def gate_fmt(self) -> "Fmt":
        return Fmt(self.gate_bits, self.gate_frac, signed=False)

    @property
    def gelu_grid_frac(self) -> int:
        return self.gelu_step_bits + self.gelu_interp_bits

    @property
    def gelu_entries(self) -> int:
        return self.gelu_range << self.gelu_step_bits

    def replace(self, **kw) -> "Contract":
        return dataclasses.replace(self, **kw)


CONTRACT = Contract()

# Maximum errors measured by scripts/measure_numerics.py over each approximation's whole
# input range (docs/numerics.md defines each quantity and domain); the tests recompute
# them and the doc's table is checked against these numbers.
ERROR_BOUNDS = {
    # |p - 2^P e^-x| <= exp_rel * 2^P e^-x + 1 LSB, for every t >= 0 and f_s in [0, 16]
    "exp_rel": 3.32e-04,
    # max |p - 2^P e^-x| in LSB (2^-P) over the same domain
    "exp_abs_lsb": 22.5,
    # max |r * 2^-(R+k) * S - 1| over every integer S >= 1
    "recip_rel": 2.29e-05,
    # max |r * 2^-(R+e) * sqrt(u) - 1| over every integer u >= 1
    "rsqrt_rel": 1.72e-05,
    # max |GELU_int(x) - GELU(x)| before the output rounding, every 16-bit x, f_in in [-8, 24]
    "gelu_abs": 1.12e-04,
}


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Fmt:
    """Fixed-point format: integer q of ``bits`` bits, value q * 2**-frac."""

    bits: int
    frac: int
    signed: bool = True

    def __post_init__(self):
        if not 1 <= self.bits <= 63:
            raise ConfigError(f"format width must be 1..63 bits, got {self.bits}")

    @property
    def min(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def maxabs(self) -> int:
        """Largest |q| the format holds (sizes accumulators)."""
        return max(-self.min, self.max)

    def ap_type(self, rnd_sat: bool = False) -> str:
        """Vitis HLS type of the container; ``rnd_sat`` adds AP_RND,AP_SAT, under which
        assigning a wider value performs exactly ``requant``."""
        base = "ap_fixed" if self.signed else "ap_ufixed"
        tail = ",AP_RND,AP_SAT" if rnd_sat else ""
        return f"{base}<{self.bits},{self.bits - self.frac}{tail}>"

    def contains(self, q) -> bool:
        q = np.asarray(q)
        return bool(q.size == 0 or (q.min() >= self.min and q.max() <= self.max))

    def quantize(self, x, stats: "SatCounter | None" = None, name: str = "quantize") -> np.ndarray:
        """sat(floor(x * 2^frac + 0.5)), evaluated in float64."""
        x = np.asarray(x, dtype=np.float64)
        if np.isnan(x).any():
            raise ValueError(f"{name}: cannot quantize NaN")
        v = np.floor(np.ldexp(x, self.frac) + 0.5)
        n_sat = int(np.count_nonzero((v < self.min) | (v > self.max)))
        _record(stats, name, n_sat, v.size, self)
        # clamp again as integers: above 2^53 the float bounds themselves are rounded
        return np.clip(np.clip(v, self.min, self.max).astype(np.int64), self.min, self.max)

    def dequantize(self, q) -> np.ndarray:
        return np.ldexp(np.asarray(q, dtype=np.float64), -self.frac)

    def __str__(self) -> str:
        return f"{'s' if self.signed else 'u'}{self.bits}.{self.frac}"


# --------------------------------------------------------------------------- saturation


class SaturationWarning(UserWarning):
    """A value was clamped and no SatCounter was given to record it."""


class SatCounter:
    """Saturation events per tensor name: name -> [n_saturated, n_total]."""

    def __init__(self):
        self._counts: dict[str, list[int]] = {}

    def add(self, name: str, n_saturated: int, n_total: int) -> None:
        c = self._counts.setdefault(name, [0, 0])
        c[0] += int(n_saturated)
        c[1] += int(n_total)

    def __getitem__(self, name: str) -> tuple[int, int]:
        return tuple(self._counts.get(name, (0, 0)))

    def __contains__(self, name: str) -> bool:
        return name in self._counts

    def items(self):
        return ((k, tuple(v)) for k, v in self._counts.items())

    @property
    def saturated(self) -> int:
        return sum(c[0] for c in self._counts.values())

    def events(self) -> dict[str, tuple[int, int]]:
        """Only the tensors that saturated at least once."""
        return {k: tuple(v) for k, v in self._counts.items() if v[0]}

    def report(self) -> str:
        ev = self.events()
        if not ev:
            return "no saturation"
        return "\n".join(f"{k}: {n} of {t} saturated ({n / t:.3%})" for k, (n, t) in ev.items())


def _record(stats, name, n_sat, n_total, fmt) -> None:
    if stats is not None:
        stats.add(name, n_sat, n_total)
    elif n_sat:
        warnings.warn(f"{name}: {n_sat} of {n_total} values saturated to {fmt}",
                      SaturationWarning, stacklevel=3)


# --------------------------------------------------------------------------- primitives


def _i64(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iub":
        raise TypeError(f"integer array expected, got {a.dtype}")
    return a.astype(np.int64, copy=False)


def rshift_round(x, s) -> np.ndarray:
    """s>0: (x + 2^(s-1)) >> s (floor shift: round half up); s==0: x; s<0: x << -s.
    ``s`` is a scalar or broadcasts against x (per-channel shifts)."""
    x = _i64(x)
    s = _i64(s)
    if s.size and (s.max() > 62 or s.min() < -62):
        raise ConfigError(f"shift out of range [-62, 62]: {s.min()}..{s.max()}")
    right = np.maximum(s, 0)
    left = np.maximum(-s, 0)
    if left.any():
        # the contract value is the exact x * 2^-s; refuse what int64 cannot hold
        over = np.abs(x) >= np.right_shift(np.int64(1) << 62, left)
        if over.any():
            raise ConfigError(f"left shift by up to {left.max()} overflows 63 bits")
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    return np.right_shift(np.left_shift(x, left) + half, right)


def saturate(x, fmt: Fmt, stats: SatCounter | None = None, name: str = "saturate") -> np.ndarray:
    x = _i64(x)
    n_sat = int(np.count_nonzero((x < fmt.min) | (x > fmt.max)))
    _record(stats, name, n_sat, x.size, fmt)
    return np.clip(x, fmt.min, fmt.max)


def requant(x, s, fmt: Fmt, stats: SatCounter | None = None, name: str = "requant") -> np.ndarray:
    """saturate(rshift_round(x, s), fmt)."""
    return saturate(rshift_round(x, s), fmt, stats, name)


def quantize(x, fmt: Fmt, stats: SatCounter | None = None, name: str = "quantize") -> np.ndarray:
    return fmt.quantize(x, stats, name)


def requantize(q, frac_from: int, fmt: Fmt, stats: SatCounter | None = None,
               name: str = "requantize") -> np.ndarray:
    """Move integers with ``frac_from`` fraction bits into ``fmt``."""
    return requant(q, frac_from - fmt.frac, fmt, stats, name)


def frac_for_range(maxabs: float, bits: int, signed: bool = True) -> int:
    """Largest frac F such that quantizing +-maxabs to (bits, F) does not saturate,
    i.e. floor(maxabs * 2^F + 0.5) <= format max. maxabs == 0 gives the range +-1."""
    maxabs = float(maxabs)
    if not math.isfinite(maxabs) or maxabs < 0:
        raise ValueError(f"maxabs must be finite and >= 0, got {maxabs}")
    top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if maxabs == 0.0:
        return bits - 1 if signed else bits
    if top < 1:
        raise ValueError(f"a {bits}-bit {'signed' if signed else 'unsigned'} format holds no magnitude")

    def fits(f):
        return math.floor(math.ldexp(maxabs, f) + 0.5) <= top

    f = math.floor(math.log2(top / maxabs))
    while not fits(f):
        f -= 1
    while fits(f + 1):
        f += 1
    return f


def bit_length(x) -> np.ndarray:
    """Number of significant bits of each x >= 0 (0 for 0): a leading-zero count."""
    y = _i64(x).copy()
    if y.size and y.min() < 0:
        raise ValueError("bit_length needs x >= 0")
    n = np.zeros_like(y)
    for s in (32, 16, 8, 4, 2, 1):
        big = y >= (np.int64(1) << s)
        n += np.where(big, s, 0)
        y = np.where(big, y >> s, y)
    return n + (y > 0)


def exact_matmul(a, b, bound: int) -> np.ndarray:
    """Integer matmul. ``bound`` must bound |every partial sum|; below 2^53 every
    partial sum is an exactly representable float64, so BLAS is exact in any order."""
    a = _i64(a)
    b = _i64(b)
    if bound < (1 << 53):
        return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    if bound >= (1 << 63):
        raise ConfigError(f"matmul bound {bound} does not fit int64")
    return a @ b


# --------------------------------------------------------------------------- GEMM


def gemm_acc_bound(x_fmt: Fmt, w, b=None) -> int:
    """Proven max |acc| over every input in x_fmt: max_o(maxabs(x) * sum_i |w[i,o]| + |b[o]|)."""
    w = _i64(w)
    col = np.abs(w).sum(axis=0)
    bb = np.abs(_i64(b)) if b is not None else np.zeros(w.shape[1], np.int64)
    amax = x_fmt.maxabs
    if float(col.max(initial=0)) * amax + float(bb.max(initial=0)) < 2.0 ** 60:
        return int((col * amax + bb).max(initial=0))
    return max(amax * int(c) + int(v) for c, v in zip(col.tolist(), bb.tolist()))


def check_gemm_acc(x_fmt: Fmt, w, b=None, name: str = "gemm", contract: Contract = CONTRACT) -> int:
    bound = gemm_acc_bound(x_fmt, w, b)
    lim = 1 << (contract.acc_bits - 1)
    if bound >= lim:
        raise ConfigError(
            f"{name}: accumulator may reach {bound} (~2^{math.log2(bound):.2f}), "
            f"beyond the {contract.acc_bits}-bit accumulator (|acc| < 2^{contract.acc_bits - 1}); "
            f"reduce the weight or input width")
    return bound


def gemm(x, w, b, shift, out_fmt: Fmt, x_fmt: Fmt, stats: SatCounter | None = None,
         name: str = "gemm", contract: Contract = CONTRACT, bound: int | None = None) -> np.ndarray:
    """y[t,o] = requant(sum_i x[t,i] w[i,o] + b[o], shift[o], out_fmt).
    b is in the accumulator format (frac f_x + f_w[o]); shift[o] = f_x + f_w[o] - f_y.
    ``bound``: the value check_gemm_acc(x_fmt, w, b) returned for these very parameters, when
    the caller proved it once (a graph's validation) and runs the GEMM many times."""
    x = _i64(x)
    w = _i64(w)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[-1]} inputs, w has {w.shape[0]}")
    if not x_fmt.contains(x):
        raise ValueError(f"{name}: input outside its format {x_fmt}")
    if bound is None or bound >= 1 << (contract.acc_bits - 1):
        bound = check_gemm_acc(x_fmt, w, b, name, contract)
    acc = exact_matmul(x.reshape(-1, x.shape[-1]), w, bound)
    if b is not None:
        acc = acc + _i64(b)
    y = requant(acc, shift, out_fmt, stats, name)
    return y.reshape(x.shape[:-1] + (w.shape[1],))


def gemm_gelu(x, w, b, shift, mid_fmt: Fmt, out_fmt: Fmt, x_fmt: Fmt,
              stats: SatCounter | None = None, name: str = "gemm_gelu",
              contract: Contract = CONTRACT, bound: int | None = None) -> np.ndarray:
    """GEMM whose accumulator is requantized to the GELU input format ``mid_fmt``
    (shift[o] = f_x + f_w[o] - mid_fmt.frac), followed by ``gelu``."""
    h = gemm(x, w, b, shift, mid_fmt, x_fmt, stats, name + ".pre", contract, bound)
    return gelu(h, mid_fmt.frac, out_fmt, stats, name, contract)


def patchify(img, patch: int) -> np.ndarray:
    """[C, H, W] -> [(H/p)*(W/p), C*p*p], rows in raster order, columns (c, i, j):
    the Conv2d(kernel=stride=p) weight reshaped to [C*p*p, D] makes this a GEMM."""
    img = _i64(img)
    c, h, w = img.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of patch {patch}")
    g = img.reshape(c, h // patch, patch, w // patch, patch)
    return g.transpose(1, 3, 0, 2, 4).reshape((h // patch) * (w // patch), c * patch * patch)


# --------------------------------------------------------------------------- tables


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=None)
def exp2_lut(contract: Contract = CONTRACT):
    """LUT[j] = round(2^P * 2^(-j / 2^L)), j in [0, 2^L); LUT[0] = 2^P exactly."""
    L, P = contract.exp_lut_bits, contract.exp_frac
    lut = np.array([_round_half_up(2.0 ** P * 2.0 ** (-j / (1 << L))) for j in range(1 << L)],
                   dtype=np.int64)
    assert lut[0] == 1 << P
    params = dict(name="exp2", entries=1 << L, index_bits=L, value_bits=P + 1, value_frac=P,
                  signed=False, l2e=contract.l2e, l2e_frac=contract.exp_l2e_frac)
    return _frozen(lut), params


@functools.lru_cache(maxsize=None)
def recip_lut(contract: Contract = CONTRACT):
    """Seed for 1/m, m in [1,2): LUT[j] = round(2^R / (1 + (j + 1/2) 2^-Lr))."""
    Lr, R = contract.recip_lut_bits, contract.recip_frac
    n = 1 << Lr
    lut = np.array([_round_half_up(2.0 ** R / (1.0 + (j + 0.5) / n)) for j in range(n)],
                   dtype=np.int64)
    params = dict(name="recip", entries=n, index_bits=Lr, value_bits=R, value_frac=R,
                  signed=False, mant_frac=contract.recip_mant_frac)
    return _frozen(lut), params


@functools.lru_cache(maxsize=None)
def rsqrt_lut(contract: Contract = CONTRACT):
    """Seed for 1/sqrt(m), m in [1,4), interval j = [a, a + 2^-Ls), a = 1 + j 2^-Ls:
    LUT[j] = round(2^R * 2 / (sqrt(a) + sqrt(a + 2^-Ls))) (balances the relative error)."""
    Ls, R = contract.rsqrt_lut_bits, contract.rsqrt_frac
    h = 2.0 ** -Ls
    lut = np.array([_round_half_up(2.0 ** R * 2.0 / (math.sqrt(1 + j * h) + math.sqrt(1 + (j + 1) * h)))
                    for j in range(3 << Ls)], dtype=np.int64)
    params = dict(name="rsqrt", entries=3 << Ls, index_bits=Ls + 2, value_bits=R, value_frac=R,
                  signed=False, mant_frac=contract.rsqrt_mant_frac, index_offset=1 << Ls)
    return _frozen(lut), params


def _gelu_delta_exact(t: float) -> float:
    # t * Phi(-t)
    return t * 0.5 * math.erfc(t / math.sqrt(2.0))


@functools.lru_cache(maxsize=None)
def gelu_lut(contract: Contract = CONTRACT):
    """LUT[i] = round(2^Fd * delta(i 2^-H)), i in [0, N], delta(t) = t Phi(-t), N = T_max 2^H.
    The last entry closes the final interpolation interval."""
    H, Fd, N = contract.gelu_step_bits, contract.gelu_frac, contract.gelu_entries
    lut = np.array([_round_half_up(2.0 ** Fd * _gelu_delta_exact(i / (1 << H))) for i in range(N + 1)],
                   dtype=np.int64)
    params = dict(name="gelu_delta", entries=N + 1, index_bits=int(N - 1).bit_length(),
                  value_bits=int(lut.max()).bit_length(), value_frac=Fd, signed=False,
                  step_bits=H, range=contract.gelu_range, interp_bits=contract.gelu_interp_bits)
    return _frozen(lut), params


# --------------------------------------------------------------------------- exp / recip / rsqrt


def exp_int(t, frac: int, contract: Contract = CONTRACT) -> np.ndarray:
    """p ~= 2^P exp(-t 2^-frac) for integer t >= 0.

    u = t*L2E (frac + C fraction bits); v = rshift_round(u, frac + C - L);
    n = v >> L, j = v & (2^L - 1); p = rshift_round(LUT[j], min(n, P + 2))."""
    t = _i64(t)
    if t.size and t.min() < 0:
        raise ValueError("exp_int needs t >= 0 (t = max - s)")
    if t.size >= _EXP_TABLE_MIN_USE:
        table = _exp_table(frac, contract)
        if table is not None:
            # p is 0 from len(table) - 1 on (v is monotone in t), so clamping t is exact
            return np.take(table, t, mode="clip")
    return _exp_direct(t, frac, contract)


# Attention calls exp_int on every score (12.6 M per block on m3vit-small), so large calls read
# p from a per-frac table of every t up to the first one with p = 0, built by the formula itself.
_EXP_TABLE_MAX = 1 << 20    # entries (8 MB); larger fracs use the formula
_EXP_TABLE_MIN_USE = 1 << 12


def _exp_direct(t: np.ndarray, frac: int, contract: Contract) -> np.ndarray:
    lut, _ = exp2_lut(contract)
    L, P = contract.exp_lut_bits, contract.exp_frac
    v = rshift_round(t * contract.l2e, frac + contract.exp_l2e_frac - L)
    n = np.minimum(v >> L, P + 2)
    # rshift_round(lut[j], n) for n >= 0 (v >= 0), without its general-shift checks
    return (lut[v & ((1 << L) - 1)] + (np.left_shift(np.int64(1), n) >> 1)) >> n


@functools.lru_cache(maxsize=None)
def _exp_table(frac: int, contract: Contract) -> np.ndarray | None:
    L, P, C = contract.exp_lut_bits, contract.exp_frac, contract.exp_l2e_frac
    sh, l2e, v_zero = frac + C - L, contract.l2e, (P + 2) << L
    # smallest t with v >= v_zero, i.e. n at its cap P + 2, where every LUT entry rounds to 0
    if sh > 0:
        t_zero = -(-((v_zero << sh) - (1 << (sh - 1))) // l2e)
    else:
        t_zero = -(-v_zero // (l2e << -sh))
    t_zero = max(t_zero, 0)
    if t_zero + 1 > _EXP_TABLE_MAX:
        return None
    table = _exp_direct(np.arange(t_zero + 1, dtype=np.int64), frac, contract)
    lut, _ = exp2_lut(contract)
    if table[-1] != 0 or (rshift_round(lut, P + 2) != 0).any():
        raise AssertionError("exp_int table: p does not vanish where the contract says it does")
    return _frozen(table)


def recip_int(S, contract: Contract = CONTRACT):
    """(r, k) with 1/S ~= r 2^-(R+k) for integer S >= 1; r in [2^(R-1), 2^R].

    k = bit_length(S) - 1; mant = S >> (k - M) (floor; a left shift when k < M);
    r0 = LUT[(mant >> (M - Lr)) - 2^Lr];
    r1 = r0 + rshift_round(r0 (2^(M+R) - mant r0), M + R);
    r  = round(2^(M+R) / mant) exactly, by one +-1 correction of r1."""
    S = _i64(S)
    if S.size and S.min() < 1:
        raise ValueError("recip_int needs S >= 1")
    M, R = contract.recip_mant_frac, contract.recip_frac
    k = bit_length(S) - 1
    mant = _normalise(S, k - M)
    r1 = _recip_newton(mant, contract)
    # r1 is within 3/2 of q = 2^(M+R)/mant (checked exhaustively), so comparing mant*(2 r1 +- 1)
    # with 2^(M+R+1) decides which of r1-1, r1, r1+1 is floor(q + 1/2)
    d = (np.int64(1) << (M + R + 1)) - mant * (2 * r1 + 1)
    r = r1 + np.where(d >= 0, 1, np.where(d + 2 * mant >= 0, 0, -1))
    return r, k


def _recip_newton(mant, contract: Contract = CONTRACT):
    M, R, Lr = contract.recip_mant_frac, contract.recip_frac, contract.recip_lut_bits
    lut, _ = recip_lut(contract)
    r0 = lut[(mant >> (M - Lr)) - (1 << Lr)]
    return r0 + rshift_round(r0 * ((np.int64(1) << (M + R)) - mant * r0), M + R)


def _normalise(x, sh):
    """x >> sh (floor) for sh >= 0, x << -sh otherwise: mantissa extraction."""
    sh = _i64(sh)
    return np.right_shift(np.left_shift(x, np.maximum(-sh, 0)), np.maximum(sh, 0))


def rsqrt_int(u, contract: Contract = CONTRACT):
    """(r, e) with 1/sqrt(u) ~= r 2^-(R+e) for integer u >= 1; r in [2^(R-1), 2^R].

    e = (bit_length(u) - 1) >> 1; mant = u >> (2e - M) (floor), in [2^M, 2^(M+2));
    y0 = LUT[(mant >> (M - Ls)) - 2^Ls];
    y1 = y0 + rshift_round(y0 (2^(M+2R) - mant y0^2), M + 2R + 1);
    r  = round(2^(R + M/2) / sqrt(mant)) exactly, by one +-1 correction of y1."""
    u = _i64(u)
    if u.size and u.min() < 1:
        raise ValueError("rsqrt_int needs u >= 1")
    M, R = contract.rsqrt_mant_frac, contract.rsqrt_frac
    e = (bit_length(u) - 1) >> 1
    mant = _normalise(u, 2 * e - M)
    y1 = _rsqrt_newton(mant, contract)
    # as in recip_int: y1 is within 3/2 of the exact value, squares decide the rounding
    top = np.int64(1) << (M + 2 * R + 2)
    up = top - (2 * y1 + 1) ** 2 * mant
    same = top - (2 * y1 - 1) ** 2 * mant
    r = y1 + np.where(up >= 0, 1, np.where(same >= 0, 0, -1))
    return r, e


def _rsqrt_newton(mant, contract: Contract = CONTRACT):
    M, R, Ls = contract.rsqrt_mant_frac, contract.rsqrt_frac, contract.rsqrt_lut_bits
    lut, _ = rsqrt_lut(contract)
    y0 = lut[(mant >> (M - Ls)) - (1 << Ls)]
    err = (np.int64(1) << (M + 2 * R)) - mant * (y0 * y0)
    return y0 + rshift_round(y0 * err, M + 2 * R + 1)


# --------------------------------------------------------------------------- LayerNorm


def layernorm_eps_int(eps: float, dim: int, x_frac: int) -> int:
    """E = max(1, round(eps * D^2 * 2^(2 f_x))): eps in the units of V = D*S2 - S1^2."""
    v = eps * float(dim) ** 2 * 2.0 ** (2 * x_frac)
    if not v < 2.0 ** 61:
        raise ConfigError(f"LayerNorm eps term {v:.3g} does not fit 61 bits")
    return max(1, _round_half_up(v))


def layernorm(x, gamma, beta, eps_int: int, beta_shift, out_shift, out_fmt: Fmt,
              stats: SatCounter | None = None, name: str = "layernorm",
              contract: Contract = CONTRACT) -> np.ndarray:
    """LayerNorm over the last axis of integer x (any frac; E carries the scale).

    S1 = sum x, S2 = sum x^2, d = D x - S1, V = D S2 - S1^2, (r, e) = rsqrt_int(V + E);
    n = sat(rshift_round(d r, R + e - Fn), norm_fmt);
    z = requant(n gamma + rshift_round(beta, beta_shift), out_shift, out_fmt)
    with beta_shift = f_b - (Fn + f_g) and out_shift = Fn + f_g - f_z."""
    x = _i64(x)
    D = x.shape[-1]
    if D > contract.max_keys:
        raise ConfigError(f"{name}: {D} channels, the contract sizes LayerNorm for <= {contract.max_keys}")
    if not 1 <= eps_int < (1 << 61):
        raise ConfigError(f"{name}: eps_int must be in [1, 2^61)")
    _check_16bit(x, name)
    s1 = x.sum(axis=-1, keepdims=True)
    s2 = (x * x).sum(axis=-1, keepdims=True)
    d = D * x - s1
    v = D * s2 - s1 * s1
    r, e = rsqrt_int(v + eps_int, contract)
    nfmt = contract.norm_fmt
    n = saturate(rshift_round(d * r, contract.rsqrt_frac + e - nfmt.frac), nfmt, stats, name + ".norm")
    g = _i64(gamma)
    bal = rshift_round(beta, beta_shift)
    if float(np.abs(g).max(initial=0)) * nfmt.maxabs + float(np.abs(bal).max(initial=0)) >= 2.0 ** 47:
        raise ConfigError(f"{name}: affine accumulator exceeds 48 bits")
    return requant(n * g + bal, out_shift, out_fmt, stats, name)


# --------------------------------------------------------------------------- attention


def attention_scores(q, k, score_shift: int, score_fmt: Fmt, stats: SatCounter | None = None,
                     name: str = "attn.score", contract: Contract = CONTRACT) -> np.ndarray:
    """s[..., i, j] = requant(sum_c q[..., i, c] k[..., j, c], score_shift, score_fmt),
    score_shift = f_q + f_k - f_s (1/sqrt(dh) is folded into W_q, b_q)."""
    q = _i64(q)
    k = _i64(k)
    dh = q.shape[-1]
    bound = dh * int(np.abs(q).max(initial=0)) * int(np.abs(k).max(initial=0))
    if bound >= 1 << (contract.acc_bits - 1):
        raise ConfigError(f"{name}: QK^T accumulator may exceed {contract.acc_bits} bits")
    acc = exact_matmul(q, np.swapaxes(k, -1, -2), bound)
    return requant(acc, score_shift, score_fmt, stats, name)


def softmax_av_partial(s, v, m, score_frac: int, contract: Contract = CONTRACT):
    """Exact partial sums over any subset of keys: (sum_j p_j, sum_j p_j v[j, :]),
    p_j = exp_int(m - s_j, score_frac), m = the row max over ALL keys.
    s: [..., Tq, Tk], v: [..., Tk, dh], m: [..., Tq]."""
    s = _i64(s)
    v = _i64(v)
    p = exp_int(_i64(m)[..., None] - s, score_frac, contract)
    psum = p.sum(axis=-1)
    bound = p.shape[-1] * (1 << contract.exp_frac) * int(np.abs(v).max(initial=0))
    return psum, exact_matmul(p, v, bound)


def softmax_av_finish(psum, pv, out_shift: int, out_fmt: Fmt, stats: SatCounter | None = None,
                      name: str = "attn.out", contract: Contract = CONTRACT) -> np.ndarray:
    """o = requant(pv * r, R + k + out_shift, out_fmt), (r, k) = recip_int(psum);
    out_shift = f_v - f_o."""
    r, k = recip_int(psum, contract)
    shift = contract.recip_frac + k + out_shift
    return requant(_i64(pv) * r[..., None], shift[..., None], out_fmt, stats, name)


def attention(q, k, v, heads: int, score_shift: int, score_fmt: Fmt, out_shift: int,
              out_fmt: Fmt, stats: SatCounter | None = None, name: str = "attn",
              contract: Contract = CONTRACT) -> np.ndarray:
    """Multi-head attention core on [T, heads*dh] integer q, k, v (head h owns columns
    h*dh..(h+1)*dh-1). Returns [T, heads*dh] in out_fmt."""
    q, k, v = _i64(q), _i64(k), _i64(v)
    T, D = q.shape
    Tk = k.shape[0]
    if D % heads:
        raise ValueError(f"{name}: {D} channels do not split into {heads} heads")
    if Tk > contract.max_keys:
        raise ConfigError(f"{name}: {Tk} keys, the contract is sized for <= {contract.max_keys}")
    dh = D // heads
    qh = q.reshape(T, heads, dh).transpose(1, 0, 2)
    kh = k.reshape(Tk, heads, dh).transpose(1, 0, 2)
    vh = v.reshape(Tk, heads, dh).transpose(1, 0, 2)
    s = attention_scores(qh, kh, score_shift, score_fmt, stats, name + ".score", contract)
    m = s.max(axis=-1)
    psum, pv = softmax_av_partial(s, vh, m, score_fmt.frac, contract)
    o = softmax_av_finish(psum, pv, out_shift, out_fmt, stats, name + ".out", contract)
    return o.transpose(1, 0, 2).reshape(T, D)


# --------------------------------------------------------------------------- GELU


GELU_IN_FRAC = (-8, 24)   # supported input fraction bits: keeps g within 40 bits


def _check_16bit(x, name):
    if x.size and (x.min() < -(1 << 15) or x.max() >= 1 << 15):
        raise ValueError(f"{name}: input must fit a 16-bit signed container")


def gelu_delta(a, in_frac: int, contract: Contract = CONTRACT) -> np.ndarray:
    """delta(|x|) in Fd fraction bits for a = |x| >= 0 with in_frac fraction bits.

    tt = rshift_round(a, in_frac - G), G = H + Fi; i = tt >> Fi, f = tt & (2^Fi - 1);
    delta = 0 if i >= N else LUT[i] + rshift_round((LUT[i+1] - LUT[i]) f, Fi)."""
    a = _i64(a)
    lut, _ = gelu_lut(contract)
    Fi, N = contract.gelu_interp_bits, contract.gelu_entries
    tt = np.minimum(rshift_round(a, in_frac - contract.gelu_grid_frac), N << Fi)
    i = tt >> Fi
    f = tt & ((1 << Fi) - 1)
    ic = np.minimum(i, N - 1)
    lo = lut[ic]
    d = lo + rshift_round((lut[ic + 1] - lo) * f, Fi)
    return np.where(i >= N, 0, d)


def gelu(x, in_frac: int, out_fmt: Fmt, stats: SatCounter | None = None, name: str = "gelu",
         contract: Contract = CONTRACT) -> np.ndarray:
    """GELU(x) = relu(x) - delta(|x|), evaluated at K = max(f_in, Fd) fraction bits:
    g = (relu(x) << (K - f_in)) - (delta << (K - Fd)); y = requant(g, K - f_out, out_fmt)."""
    x = _i64(x)
    _check_16bit(x, name)
    if not GELU_IN_FRAC[0] <= in_frac <= GELU_IN_FRAC[1]:
        raise ConfigError(f"{name}: GELU input frac {in_frac} outside {list(GELU_IN_FRAC)}")
    Fd = contract.gelu_frac
    K = max(in_frac, Fd)
    delta = gelu_delta(np.abs(x), in_frac, contract)
    g = (np.maximum(x, 0) << (K - in_frac)) - (delta << (K - Fd))
    return requant(g, K - out_fmt.frac, out_fmt, stats, name)


# --------------------------------------------------------------------------- MoE gate


class Queue(NamedTuple):
    """Tokens routed to one expert, ascending, and the top-k slot each occupies (so the
    expert's outputs scatter into y[tokens, slots])."""

    tokens: np.ndarray
    slots: np.ndarray


def moe_gate(logits, k: int, logit_frac: int, stats: SatCounter | None = None,
             name: str = "gate", contract: Contract = CONTRACT):
    """Top-k experts on the integer logits [T, N] (ties -> lower expert index) and their
    softmax-over-all-N probabilities in gate_fmt (u16, 15 frac), not renormalised.

    p_e = exp_int(max_e l - l_e, f_l); (r, kk) = recip_int(sum_e p_e);
    score_e = sat(rshift_round(p_e r, R + kk - Fg), gate_fmt). Returns (idx, score), [T, k]."""
    lg = _i64(logits)
    T, N = lg.shape
    if not 1 <= k <= N:
        raise ValueError(f"{name}: k={k} with {N} experts")
    idx = np.argsort(-lg, axis=1, kind="stable")[:, :k]
    p = exp_int(lg.max(axis=1, keepdims=True) - lg, logit_frac, contract)
    r, kk = recip_int(p.sum(axis=1), contract)
    gfmt = contract.gate_fmt
    sc = requant(p * r[:, None], (contract.recip_frac + kk - gfmt.frac)[:, None], gfmt, stats, name)
    return idx, np.take_along_axis(sc, idx, axis=1)


def expert_queues(idx, n_experts: int) -> list[Queue]:
    """Per expert, the ascending tokens routed to it and their slots; never drops."""
    idx = _i64(idx)
    T, K = idx.shape
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")  # token-major input keeps tokens ascending
    bounds = np.searchsorted(flat[order], np.arange(n_experts + 1))
    tok, slot = np.divmod(order, K)
    return [Queue(tok[bounds[e]:bounds[e + 1]], slot[bounds[e]:bounds[e + 1]])
            for e in range(n_experts)]


def moe_combine(score, y, shift, out_fmt: Fmt, idx=None, stats: SatCounter | None = None,
                name: str = "moe.combine") -> np.ndarray:
    """out[t] = sat(sum_j rshift_round(score[t,j] y[t,j,:], shift), out_fmt).
    score: [T, k] gate_fmt; y: [T, k, D] expert outputs; shift = Fg + f_y - f_out, a
    scalar or one per expert (indexed through idx). Each term is rounded on its own and
    the sum saturates once, so slot order does not matter."""
    score = _i64(score)
    y = _i64(y)
    sh = _i64(shift)
    if sh.ndim:
        if idx is None:
            raise ValueError(f"{name}: a per-expert shift needs idx")
        sh = sh[_i64(idx)][..., None]
    terms = rshift_round(score[..., None] * y, sh)
    return saturate(terms.sum(axis=1), out_fmt, stats, name)


# --------------------------------------------------------------------------- residual / embedding


def residual_add(a, b, a_shift, b_shift, out_fmt: Fmt, stats: SatCounter | None = None,
                 name: str = "add") -> np.ndarray:
    """z = sat(rshift_round(a, f_a - f_z) + rshift_round(b, f_b - f_z), out_fmt)."""
    return saturate(rshift_round(a, a_shift) + rshift_round(b, b_shift), out_fmt, stats, name)


def prepend_cls(tokens, cls) -> np.ndarray:
    """[N, D] patch tokens -> [N+1, D] with the CLS row (already in the tokens' format) first."""
    tokens = _i64(tokens)
    return np.concatenate([_i64(cls).reshape(1, tokens.shape[1]), tokens], axis=0)
