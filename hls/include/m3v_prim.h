// m3v_prim.h: the contract's three integer primitives (docs/numerics.md section 2):
// rshift_round, saturate and requant, plus the leading-one detector and the exact aligned add.
//
// Widths: every primitive takes its operand as ap_int_base<WI, SI> (signed or unsigned, any
// width, including the ap_int_base results of ap_int arithmetic) and returns ap_int<WO>, the
// width the caller sizes for the result. No intermediate ever shifts by its own width or more
// (ap_int's C model is not defined there).
#ifndef M3V_PRIM_H
#define M3V_PRIM_H

#include "m3v_types.h"

namespace m3v {

// Signed width that holds every value of an ap_int_base<W, S>.
template <int W, bool S>
struct signed_width {
    static constexpr int value = S ? W : W + 1;
};

// Number of significant bits of x (0 for 0): a priority encoder, unrolled.
template <int W>
int bit_length(const ap_uint<W> &x) {
    int n = 0;
    for (int i = 0; i < W; i++) {
        M3V_HLS(unroll)
        if (x[i])
            n = i + 1;
    }
    return n;
}

// rshift_round(x, s): s > 0: (x + 2^(s-1)) >> s, round half up; s = 0: x; s < 0: x << -s.
// A right shift by the operand's signed width or more gives 0 (x + 2^(s-1) lies in [0, 2^s)),
// so the shifter clamps s there. A left shift must fit WO bits, as the golden model requires.
template <int WO, int WI, bool SI>
ap_int<WO> rshift_round(const ap_int_base<WI, SI> &x, int s) {
    constexpr int WS = signed_width<WI, SI>::value;
    if (s > 0) {
        const int r = s > WS ? WS : s;
        ap_int<WS + 1> t = x; // one bit more: x + 2^(s-1) may carry
        t += ap_int<WS + 1>(1) << (r - 1);
        return ap_int<WO>(t >> r);
    }
    const int l = -s > WO - 1 ? WO - 1 : -s;
    ap_int<WO> t = x;
    return t << l;
}

// Largest and smallest value of a run-time format held in WO signed bits (signed formats up to
// WO bits, unsigned ones up to WO - 1).
template <int WO>
ap_int<WO + 1> fmt_max(const fmt_t &f) {
    const int b = f.bits;
    const ap_int<WO + 1> one = 1;
    return f.is_signed ? ap_int<WO + 1>((one << (b - 1)) - 1) : ap_int<WO + 1>((one << b) - 1);
}

template <int WO>
ap_int<WO + 1> fmt_min(const fmt_t &f) {
    const int b = f.bits;
    const ap_int<WO + 1> one = 1;
    return f.is_signed ? ap_int<WO + 1>(-(one << (b - 1))) : ap_int<WO + 1>(0);
}

// saturate(x, fmt) = min(max(x, qmin), qmax); every clamped value increments cnt.
template <int WO, int WI, bool SI>
ap_int<WO> saturate(const ap_int_base<WI, SI> &x, const fmt_t &f, sat_cnt_t &cnt) {
    const ap_int<WO + 1> hi = fmt_max<WO>(f);
    const ap_int<WO + 1> lo = fmt_min<WO>(f);
    if (x > hi) {
        ++cnt;
        return ap_int<WO>(hi);
    }
    if (x < lo) {
        ++cnt;
        return ap_int<WO>(lo);
    }
    return ap_int<WO>(x);
}

// requant(x, s, fmt) = saturate(rshift_round(x, s), fmt), for any s in [-62, 62].
// A right-shifted value fits the operand's width. A left shift is exact in WS + WO + 1 bits
// when clamped to WO + 1: any x != 0 shifted that far already lies outside every WO-bit format
// and saturates to the same side as the exact value would.
template <int WO, int WI, bool SI>
ap_int<WO> requant(const ap_int_base<WI, SI> &x, int s, const fmt_t &f, sat_cnt_t &cnt) {
    constexpr int WS = signed_width<WI, SI>::value;
    if (s >= 0)
        return saturate<WO>(rshift_round<WS>(x, s), f, cnt);
    const int l = -s > WO + 1 ? WO + 1 : -s;
    ap_int<WS + WO + 2> t = x;
    t <<= l;
    return saturate<WO>(t, f, cnt);
}

// sat(rshift_round(a, sa) + rshift_round(b, sb), fmt) for W-bit a, b and any sa, sb in
// [-62, 62], exactly, without a 62-bit-wide shifter. With la, lb the left parts of the shifts
// and lmin = min(la, lb), the sum is 2^lmin * (ta 2^(la-lmin) + tb 2^(lb-lmin)); one of the two
// relative shifts is 0. A relative shift beyond C = max(W, WO) + 1 makes that term dominate
// (|term| >= 2^(C+1) against |other| <= 2^(W-1)) and the sum saturate to its sign, which the
// clamped shift reproduces; the common shift lmin clamps at WO for the same reason.
template <int WO, int W>
ap_int<WO> add_aligned(const ap_int<W> &a, int sa, const ap_int<W> &b, int sb, const fmt_t &f,
                       sat_cnt_t &cnt) {
    constexpr int C = cmax(W, WO) + 1;
    const ap_int<W> ta = rshift_round<W>(a, sa > 0 ? sa : 0);
    const ap_int<W> tb = rshift_round<W>(b, sb > 0 ? sb : 0);
    const int la = sa < 0 ? -sa : 0;
    const int lb = sb < 0 ? -sb : 0;
    const int lmin = la < lb ? la : lb;
    const int da = la - lmin > C ? C : la - lmin;
    const int db = lb - lmin > C ? C : lb - lmin;
    const ap_int<W + C + 1> inner = (ap_int<W + C + 1>(ta) << da) + (ap_int<W + C + 1>(tb) << db);
    ap_int<W + C + 1 + WO> z = inner;
    z <<= (lmin > WO ? WO : lmin);
    return saturate<WO>(z, f, cnt);
}

} // namespace m3v

#endif // M3V_PRIM_H
