// m3v_nonlinear.h: the contract's table-based nonlinear functions, in integer arithmetic only:
// exp_int (section 5), recip_int and rsqrt_int (section 6), gelu (section 9). Tables and
// constants come from the generated m3v_tables.h; widths are the ones docs/numerics.md gives.
#ifndef M3V_NONLINEAR_H
#define M3V_NONLINEAR_H

#include "m3v_prim.h"

namespace m3v {

namespace contract {
// The intermediate widths below are the document's for these constants; a different contract
// needs its widths re-derived (and the exhaustive mantissa tests re-run).
static_assert(EXP_FRAC == 16 && EXP_LUT_BITS == 10 && EXP_L2E_FRAC == 16, "exp widths are for P = C = 16, L = 10");
static_assert(RECIP_MANT_FRAC == 16 && RECIP_FRAC == 16 && RECIP_LUT_BITS == 7, "recip widths are for M = R = 16, L_r = 7");
static_assert(RSQRT_MANT_FRAC == 16 && RSQRT_FRAC == 16 && RSQRT_LUT_BITS == 7, "rsqrt widths are for M = R = 16, L_s = 7");
static_assert(GELU_STEP_BITS == 5 && GELU_INTERP_BITS == 11 && GELU_FRAC == 16 && GELU_RANGE == 8,
              "GELU widths are for H = 5, F_i = 11, F_d = 16, T_max = 8");
static_assert(L2E > (1 << EXP_L2E_FRAC), "exp_int's left-shift shortcut needs L2E > 2^C");
} // namespace contract

typedef ap_uint<contract::EXP_FRAC + 1> exp_t; // p in [0, 2^P]
typedef ap_uint<contract::RECIP_FRAC + 1> recip_t; // r in [2^(R-1), 2^R]
typedef ap_uint<contract::RSQRT_FRAC + 1> rsqrt_t; // r in [2^(R-1), 2^R]

// Width of the exp argument t = max - s: scores and logits are at most 16 bits, so t < 2^17.
constexpr int EXP_ARG_BITS = 17;

// exp_int(t, f) ~= 2^P e^(-t 2^-f) for t >= 0:
// u = t L2E; v = rshift_round(u, f + C - L); n = v >> L; j = v mod 2^L;
// p = rshift_round(LUT[j], min(n, P + 2)) (a shift of P + 2 or more gives 0: LUT[j] <= 2^P).
template <int TW>
exp_t exp_int(const ap_uint<TW> &t, int frac) {
    using namespace contract;
    const int sh = frac + EXP_L2E_FRAC - EXP_LUT_BITS;
    // A left shift (f < L - C) moves every t >= 1 to v >= 2L2E > 2^(C+1), i.e. n >= 2^(C+1-L)
    // >= P + 2, where p = 0; only t = 0 gives exp(0) = 2^P.
    if (sh < 0)
        return t == 0 ? exp_t(1 << EXP_FRAC) : exp_t(0);
    const ap_uint<TW + L2E_BITS> u = t * ap_uint<L2E_BITS>(L2E);
    // v <= u: a rounded right shift never grows a value
    const ap_uint<TW + L2E_BITS> v = rshift_round<TW + L2E_BITS + 1>(u, sh);
    const ap_uint<TW + L2E_BITS> nfull = v >> EXP_LUT_BITS;
    const int n = nfull > EXP_FRAC + 2 ? EXP_FRAC + 2 : int(nfull);
    const ap_uint<EXP_LUT_BITS> j = v(EXP_LUT_BITS - 1, 0);
    return exp_t(rshift_round<EXP_FRAC + 2>(tables::EXP2_LUT[j], n));
}

// recip_int(S) = (r, k), 1/S ~= r 2^-(R+k), for S >= 1: mantissa, seed, one Newton step, then
// the +-1 correction that makes r = floor(2^(M+R)/mant + 1/2).
template <int SW>
void recip_int(const ap_uint<SW> &S, recip_t &r, int &k) {
    using namespace contract;
    constexpr int M = RECIP_MANT_FRAC, R = RECIP_FRAC, LR = RECIP_LUT_BITS;
    k = bit_length(S) - 1;
    ap_uint<M + 1> mant; // [2^M, 2^(M+1))
    if (k >= M) {
        mant = S >> (k - M);
    } else {
        mant = S; // S < 2^M fits; the shift then stays within M + 1 bits
        mant <<= (M - k);
    }
    // (mant >> (M - L_r)) - 2^L_r: the L_r bits below the leading one
    const ap_uint<LR> j = mant(M - 1, M - LR);
    const ap_uint<R> r0 = tables::RECIP_LUT[j];
    const ap_uint<M + 1 + R> mr0 = mant * r0; // 33 b
    const ap_int<25> err = (ap_int<M + R + 2>(1) << (M + R)) - mr0; // 2^(M+R) - mant r0
    const ap_int<41> corr = r0 * err; // 41 b signed
    const ap_uint<R + 1> r1 = r0 + rshift_round<R + 1>(corr, M + R);
    const ap_uint<M + R + 2> m2r = mant * (ap_uint<R + 2>(r1) * 2 + 1); // mant (2 r1 + 1), 34 b
    const ap_int<19> d = (ap_int<M + R + 3>(1) << (M + R + 1)) - m2r; // computed in 35 b
    if (d >= 0)
        r = r1 + 1;
    else if (d + 2 * mant >= 0)
        r = r1;
    else
        r = r1 - 1;
}

// rsqrt_int(u) = (r, e), 1/sqrt(u) ~= r 2^-(R+e), for u >= 1; r = floor(2^(R+M/2)/sqrt(mant) + 1/2).
template <int UW>
void rsqrt_int(const ap_uint<UW> &u, rsqrt_t &r, int &e) {
    using namespace contract;
    constexpr int M = RSQRT_MANT_FRAC, R = RSQRT_FRAC, LS = RSQRT_LUT_BITS;
    e = (bit_length(u) - 1) >> 1;
    const int sh = 2 * e - M;
    ap_uint<M + 2> mant; // [2^M, 2^(M+2))
    if (sh >= 0) {
        mant = u >> sh;
    } else {
        mant = u; // u < 2^(M+1) fits
        mant <<= -sh;
    }
    // (mant >> (M - L_s)) - 2^L_s: index into the 3 * 2^L_s seeds of [1, 4)
    const ap_uint<LS + 2> j = ap_uint<LS + 2>(mant >> (M - LS)) - tables::RSQRT_INDEX_OFFSET;
    const ap_uint<R> y0 = tables::RSQRT_LUT[j];
    const ap_uint<2 * R> y0sq = y0 * y0; // 32 b
    const ap_uint<49> my0sq = mant * y0sq; // 49 b
    const ap_int<41> err = (ap_int<M + 2 * R + 2>(1) << (M + 2 * R)) - my0sq;
    const ap_int<57> corr = y0 * err; // 57 b signed
    const ap_uint<R + 1> y1 = y0 + rshift_round<R + 1>(corr, M + 2 * R + 1);
    const ap_uint<R + 2> up = ap_uint<R + 2>(y1) * 2 + 1;
    const ap_uint<R + 2> dn = ap_uint<R + 2>(y1) * 2 - 1;
    const ap_uint<51> up2m = up * up * mant; // (2 y1 + 1)^2 mant, 51 b
    const ap_uint<51> dn2m = dn * dn * mant;
    const ap_uint<M + 2 * R + 3> T = ap_uint<M + 2 * R + 3>(1) << (M + 2 * R + 2); // 2^50
    if (up2m <= T)
        r = y1 + 1;
    else if (dn2m <= T)
        r = y1;
    else
        r = y1 - 1;
}

// gelu(x) = ReLU(x) - delta(|x|) for a 16-bit x with f_in in [-8, 24] fraction bits:
// tt = min(rshift_round(|x|, f_in - G), N 2^F_i); i = tt >> F_i; f = tt mod 2^F_i;
// delta = i >= N ? 0 : LUT[i] + rshift_round((LUT[i+1] - LUT[i]) f, F_i);
// K = max(f_in, F_d); g = (max(x, 0) << (K - f_in)) - (delta << (K - F_d));
// y = requant(g, K - f_out, out_fmt).
template <int WO, int WI>
ap_int<WO> gelu(const ap_int<WI> &x, int in_frac, const fmt_t &out, sat_cnt_t &cnt) {
    using namespace contract;
    static_assert(WI <= 16, "GELU inputs are 16-bit containers");
    constexpr int G = GELU_GRID_FRAC, FI = GELU_INTERP_BITS, N = GELU_ENTRIES;
    constexpr int LMAX = G - GELU_IN_FRAC_MIN; // largest left shift onto the 2^-G grid
    constexpr int TT_SAT = N << FI; // 2^19: any tt at or beyond gives delta = 0
    const ap_uint<WI> a = x < 0 ? ap_uint<WI>(-x) : ap_uint<WI>(x);
    const int sh = in_frac - G;
    ap_uint<WI + LMAX> ttw = a;
    if (sh > 0)
        ttw = rshift_round<WI + 1>(a, sh);
    else
        ttw <<= -sh;
    const ap_uint<20> tt = ttw > TT_SAT ? ap_uint<WI + LMAX>(TT_SAT) : ttw;
    const ap_uint<9> i = tt >> FI;
    const ap_uint<FI> f = tt(FI - 1, 0);
    ap_uint<14> delta = 0;
    if (i < N) {
        const ap_uint<14> lo = tables::GELU_LUT[i];
        const ap_uint<14> hi = tables::GELU_LUT[i + 1];
        const ap_int<15> diff = ap_int<15>(hi) - ap_int<15>(lo); // [-264, 998]
        const ap_int<22> prod = diff * f; // 22 b signed
        delta = lo + rshift_round<15>(prod, FI);
    }
    const int K = in_frac > GELU_FRAC ? in_frac : GELU_FRAC;
    const ap_int<40> relu = x > 0 ? ap_int<40>(x) : ap_int<40>(0);
    const ap_int<40> g = (relu << (K - in_frac)) - (ap_int<40>(delta) << (K - GELU_FRAC)); // 40 b
    return requant<WO>(g, K - out.frac, out, cnt);
}

} // namespace m3v

#endif // M3V_NONLINEAR_H
