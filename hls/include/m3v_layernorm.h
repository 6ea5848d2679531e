// m3v_layernorm.h: integer LayerNorm (docs/numerics.md section 7), two passes per token:
//
//   pass 1:  S1 = sum x,  S2 = sum x^2                         (row kept in a local buffer)
//            V = D S2 - S1^2,  (r, e) = rsqrt_int(V + E)       (once per token)
//   pass 2:  d = D x - S1
//            n = sat(rshift_round(d r, R + e - F_n), s18.12)
//            z = requant(n gamma + rshift_round(beta, beta_shift), out_shift[c], out_fmt)
//
// Widths are the document's for 16-bit x and D <= 4096 (max_keys).
#ifndef M3V_LAYERNORM_H
#define M3V_LAYERNORM_H

#include "m3v_nonlinear.h"

namespace m3v {

typedef ap_int<16> ln_gamma_t; // gamma, 16-bit container, own fraction
typedef ap_uint<61> ln_eps_t; // E = max(1, round(eps D^2 2^(2 f_x))) < 2^61

struct ln_args {
    int rows;
    int dim;        // D
    int x_ld, z_ld; // row strides
    ln_eps_t eps;   // E, compile-time integer (layernorm_eps_int)
    int beta_shift; // f_beta - (F_n + f_gamma), one per layer
    fmt_t out_fmt;
};

// gamma, out_shift: one per channel; beta: per channel, any width up to the accumulator.
// Preconditions: dim <= MAX_DIM; |gamma| 2^17 + |aligned beta| < 2^47 (golden model's check).
template <class CFG>
void layernorm(const ln_args &a, const typename CFG::act_t x[], const ln_gamma_t gamma[],
               const typename CFG::acc_t beta[], const shift_t out_shift[], typename CFG::act_t z[],
               sat_cnt_t &sat_norm, sat_cnt_t &sat_out) {
    using namespace contract;
    typedef typename CFG::act_t act_t;
    constexpr int AW = CFG::ACT_BITS;
    constexpr int DB = clog2(MAX_KEYS); // 12
    static_assert(AW <= 16, "LayerNorm widths are sized for 16-bit inputs");
    static_assert(CFG::MAX_DIM <= MAX_KEYS, "LayerNorm widths are sized for D <= max_keys");
    constexpr int MAX_DIM = CFG::MAX_DIM;
    constexpr int MAX_ROWS = CFG::MAX_TOKENS;
    const fmt_t norm_fmt = {NORM_BITS, NORM_FRAC, true};

    act_t xb[MAX_DIM];
    for (int t = 0; t < a.rows; t++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        ap_int<16 + DB> s1 = 0; // 28 b signed
        ap_uint<31 + DB> s2 = 0; // x^2 31 b, S2 43 b unsigned
        for (int c = 0; c < a.dim; c++) {
            M3V_TRIPCOUNT(1, MAX_DIM)
            M3V_HLS(pipeline II=1)
            const act_t v = x[t * a.x_ld + c];
            xb[c] = v;
            s1 += v;
            s2 += ap_uint<31>(v * v);
        }
        const ap_uint<DB + 1> D = a.dim;
        const ap_uint<55> ds2 = D * s2; // <= 2^54
        const ap_uint<55> s1sq = s1 * s1; // <= 2^54
        const ap_uint<55> V = ds2 - s1sq; // D^2 var 2^(2 f_x), exact, >= 0
        const ap_uint<62> VE = V + a.eps; // < 2^62
        rsqrt_t r;
        int e;
        rsqrt_int(VE, r, e);
        const int nshift = RSQRT_FRAC + e - NORM_FRAC; // 4 .. 34
        for (int c = 0; c < a.dim; c++) {
            M3V_TRIPCOUNT(1, MAX_DIM)
            M3V_HLS(pipeline II=1)
            const ap_int<17 + DB> d = D * xb[c] - s1; // 29 b signed
            const ap_int<46> dr = d * r; // |d r| < 2^44
            const ap_int<NORM_BITS> n = requant<NORM_BITS>(dr, nshift, norm_fmt, sat_norm);
            const ap_int<NORM_BITS + 16> ng = n * gamma[c]; // 34 b
            const ap_int<ACC_BITS> bal = rshift_round<ACC_BITS>(beta[c], a.beta_shift);
            const ap_int<ACC_BITS> aff = ng + bal; // < 2^47, checked
            z[t * a.z_ld + c] = requant<AW>(aff, out_shift[c], a.out_fmt, sat_out);
        }
    }
}

} // namespace m3v

#endif // M3V_LAYERNORM_H
