"""Reference model of the GEMM path of the numeric contract, in plain Python integers.

Written from the contract's formulas, independently of the RTL and of compiler/numerics.py, so
that the cocotb tests compare the hardware against the formulas themselves:

    rshift_round(x, s) = (x + 2^(s-1)) >> s  (s > 0, floor),  x  (s = 0),  x << -s  (s < 0)
    saturate(x, w)     = clamp(x, -2^(w-1), 2^(w-1) - 1)
    GEMM               acc = b[o] + sum_i x[i] * w[i][o] (48-bit), y = saturate(rshift_round(acc, s[o]), W)
    combine            acc = b[o] + sum_e rshift_round(score[e] * y_e[o], s_c), then as above
                       (the contract's combine is b = 0, s = 0)
"""

from __future__ import annotations

from collections.abc import Sequence


def rshift_round(x: int, s: int) -> int:
    if s > 0:
        return (x + (1 << (s - 1))) >> s
    if s == 0:
        return x
    return x << -s


def saturate(x: int, bits: int) -> int:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return lo if x < lo else hi if x > hi else x


def wrap(x: int, bits: int) -> int:
    """Two's complement wrap-around to `bits` bits (the accumulator register)."""
    x &= (1 << bits) - 1
    return x - (1 << bits) if x >> (bits - 1) else x


def requant(acc: int, shift: int, out_bits: int) -> int:
    return saturate(rshift_round(acc, shift), out_bits)


def gemm_row(x: Sequence[int], w: Sequence[Sequence[int]], bias: Sequence[int], shift: Sequence[int],
             out_bits: int, acc_bits: int = 48) -> list[int]:
    """One token: x[K], w[K][N], bias[N], shift[N] -> y[N]."""
    out = []
    for o in range(len(bias)):
        acc = bias[o]
        for i, xi in enumerate(x):
            acc = wrap(acc + xi * w[i][o], acc_bits)
        out.append(requant(acc, shift[o], out_bits))
    return out


def gemm_acc_row(x: Sequence[int], w: Sequence[Sequence[int]], bias: Sequence[int], acc_bits: int = 48) -> list[int]:
    """One token's exact accumulators (a raw row): bias[o] + sum_i x[i] * w[i][o], acc_bits wrap."""
    out = []
    for o in range(len(bias)):
        acc = bias[o]
        for i, xi in enumerate(x):
            acc = wrap(acc + xi * w[i][o], acc_bits)
        out.append(acc)
    return out


def combine_row(ys: Sequence[Sequence[int]], scores: Sequence[int], comb_shift: int, bias: Sequence[int],
                shift: Sequence[int], out_bits: int, acc_bits: int = 48) -> list[int]:
    """One token: ys[E][N] expert outputs, scores[E] (unsigned) -> y[N]."""
    out = []
    for o in range(len(bias)):
        acc = bias[o]
        for y, score in zip(ys, scores):
            acc = wrap(acc + rshift_round(score * y[o], comb_shift), acc_bits)
        out.append(requant(acc, shift[o], out_bits))
    return out
