// m3v_attention.h: fused, order-independent attention softmax (docs/numerics.md section 8).
//
// Per head and per tile of ATT_QT queries, two passes over the keys on the P_IN x P_OUT array:
//   QK^T:  s[q, j] = requant(sum_c q[q, c] k[j, c], score_shift, score_fmt)
//          m[q]    = max_j s[q, j]                                   (kept while scores arrive)
//          the query tile is the stationary operand (one query per output lane), keys stream.
//   A.V:   p = exp_int(m[q] - s[q, j], f_s)                          (P_IN exp lanes)
//          S[q] = sum_j p,  A[q, c] = sum_j p v[j, c]                 (exact integer sums)
//          (r, k) = recip_int(S[q]);  o = requant(A r, R + k + out_shift, out_fmt)
// S and A are sums of integers and m a maximum, so any key order or key tiling gives the same
// bits: softmax_av_partial adds one key tile's (S, A), softmax_av_finish applies the reciprocal.
#ifndef M3V_ATTENTION_H
#define M3V_ATTENTION_H

#include "m3v_nonlinear.h"

namespace m3v {

// S <= max_keys 2^P (29 b unsigned); A: |p v| <= 2^31, 4096 keys -> 44 b signed.
typedef ap_uint<contract::EXP_FRAC + 1 + clog2(contract::MAX_KEYS)> psum_t;
typedef ap_int<16 + contract::EXP_FRAC + clog2(contract::MAX_KEYS)> pv_t;

struct attn_args {
    int tq, tk;      // queries, keys
    int heads, dh;   // head h owns columns h dh .. h dh + dh - 1
    int q_ld, k_ld, v_ld, o_ld;
    int score_shift; // f_q + f_k - f_s
    fmt_t score_fmt;
    int out_shift;   // f_v - f_o
    fmt_t out_fmt;
};

// Softmax sums of one query row over keys [0, tk), for the P_OUT channels c0 .. c0 + P_OUT - 1
// of v (columns v_off + c): S = sum p and A[lane] = sum p v, both overwritten. Every channel
// tile of a row recomputes the same p, so callers take S from any one tile (the first).
template <class CFG>
void av_tile(const typename CFG::act_t s[], int s_off, int tk, const typename CFG::act_t &m, int frac,
             const typename CFG::act_t v[], int v_ld, int v_off, int c0, int dh, psum_t &S,
             pv_t A[CFG::P_OUT]) {
    M3V_HLS(inline)
    typedef typename CFG::act_t act_t;
    constexpr int PI = CFG::P_IN;
    constexpr int PO = CFG::P_OUT;
    constexpr int KT = cdiv(CFG::MAX_KEYS, PI);
    exp_t p[PI];
    M3V_HLS(array_partition variable=p complete)
    S = 0;
    for (int j = 0; j < PO; j++) {
        M3V_HLS(unroll)
        A[j] = 0;
    }
    for (int kt = 0; kt < cdiv(tk, PI); kt++) {
        M3V_TRIPCOUNT(1, KT)
        M3V_HLS(pipeline II=1)
        psum_t ps = 0; // <= P_IN 2^P
        for (int i = 0; i < PI; i++) {
            M3V_HLS(unroll)
            const int jj = kt * PI + i;
            if (jj < tk) {
                const ap_int<CFG::ACT_BITS + 1> t = m - s[s_off + jj]; // >= 0: m is the row max
                p[i] = exp_int(ap_uint<EXP_ARG_BITS>(t), frac);
            } else {
                p[i] = 0;
            }
            ps += p[i];
        }
        S += ps;
        for (int j = 0; j < PO; j++) {
            M3V_HLS(unroll)
            const int c = c0 + j;
            pv_t sum = 0;
            for (int i = 0; i < PI; i++) {
                M3V_HLS(unroll)
                const int jj = kt * PI + i;
                const act_t vv = (jj < tk && c < dh) ? act_t(v[jj * v_ld + v_off + c]) : act_t(0);
                sum += p[i] * vv; // 32 b signed terms
            }
            A[j] += sum;
        }
    }
}

// o = requant(A r, R + k + out_shift, out_fmt) for one accumulator.
template <class CFG>
typename CFG::act_t av_out(const pv_t &A, const recip_t &r, int k, int out_shift, const fmt_t &fmt,
                           sat_cnt_t &sat) {
    const ap_int<61> ar = A * r; // <= 2^59 in magnitude
    return requant<CFG::ACT_BITS>(ar, contract::RECIP_FRAC + k + out_shift, fmt, sat);
}

// Add the partial sums of the keys [0, tk) of s ([tq, tk], row stride s_ld) and v ([tk, dh]):
// psum[q] += sum_j p, pv[q dh + c] += sum_j p v[j, c], with m[q] the row max over ALL keys.
template <class CFG>
void softmax_av_partial(int tq, int tk, int dh, const typename CFG::act_t s[], int s_ld,
                        const typename CFG::act_t v[], int v_ld, const typename CFG::act_t m[], int frac,
                        psum_t psum[], pv_t pv[]) {
    constexpr int PO = CFG::P_OUT;
    constexpr int MAX_Q = CFG::MAX_TOKENS;
    constexpr int CT = cdiv(CFG::MAX_DH, PO);
    pv_t A[PO];
    M3V_HLS(array_partition variable=A complete)
    for (int q = 0; q < tq; q++) {
        M3V_TRIPCOUNT(1, MAX_Q)
        for (int c0 = 0; c0 < dh; c0 += PO) {
            M3V_TRIPCOUNT(1, CT)
            psum_t S;
            av_tile<CFG>(s, q * s_ld, tk, m[q], frac, v, v_ld, 0, c0, dh, S, A);
            if (c0 == 0)
                psum[q] += S;
            for (int j = 0; j < PO; j++) {
                M3V_HLS(pipeline II=1)
                if (c0 + j < dh)
                    pv[q * dh + c0 + j] += A[j];
            }
        }
    }
}

// o[q, c] = requant(pv[q, c] r_q, R + k_q + out_shift, out_fmt), (r_q, k_q) = recip_int(psum[q]).
template <class CFG>
void softmax_av_finish(int tq, int dh, const psum_t psum[], const pv_t pv[], int out_shift, const fmt_t &fmt,
                       typename CFG::act_t o[], int o_ld, sat_cnt_t &sat) {
    constexpr int MAX_Q = CFG::MAX_TOKENS;
    constexpr int MAX_DH = CFG::MAX_DH;
    for (int q = 0; q < tq; q++) {
        M3V_TRIPCOUNT(1, MAX_Q)
        recip_t r;
        int k;
        recip_int(psum[q], r, k);
        for (int c = 0; c < dh; c++) {
            M3V_TRIPCOUNT(1, MAX_DH)
            M3V_HLS(pipeline II=1)
            o[q * o_ld + c] = av_out<CFG>(pv[q * dh + c], r, k, out_shift, fmt, sat);
        }
    }
}

// Multi-head attention core on [T, heads dh] q, k, v; writes [T, heads dh] o.
// Preconditions: tq <= MAX_TOKENS, tk <= MAX_KEYS, dh <= MAX_DH, dh max|q| max|k| < 2^47.
template <class CFG>
void attention(const attn_args &a, const typename CFG::act_t q[], const typename CFG::act_t k[],
               const typename CFG::act_t v[], typename CFG::act_t o[], sat_cnt_t &sat_score,
               sat_cnt_t &sat_out) {
    typedef typename CFG::act_t act_t;
    typedef typename CFG::acc_t acc_t;
    constexpr int AW = CFG::ACT_BITS;
    constexpr int PI = CFG::P_IN;
    constexpr int PO = CFG::P_OUT;
    constexpr int QT = CFG::ATT_QT;
    constexpr int MAX_KEYS = CFG::MAX_KEYS;
    constexpr int MAX_DH = CFG::MAX_DH;
    constexpr int DKT = cdiv(MAX_DH, PI);
    constexpr int QTILES = cdiv(CFG::MAX_TOKENS, QT);
    constexpr int CT = cdiv(MAX_DH, PO);
    constexpr int MAX_HEADS = CFG::MAX_HEADS;

    act_t qbuf[DKT][PI][QT]; // stationary query tile
    M3V_HLS(array_partition variable=qbuf complete dim=2)
    M3V_HLS(array_partition variable=qbuf complete dim=3)
    act_t sbuf[QT][MAX_KEYS]; // the tile's score rows
    M3V_HLS(array_partition variable=sbuf complete dim=1)
    M3V_HLS(array_partition variable=sbuf cyclic factor=PI dim=2)
    act_t m[QT];
    M3V_HLS(array_partition variable=m complete)
    acc_t acc[QT];
    M3V_HLS(array_partition variable=acc complete)
    act_t kv[PI];
    M3V_HLS(array_partition variable=kv complete)
    pv_t A[PO];
    M3V_HLS(array_partition variable=A complete)

    for (int h = 0; h < a.heads; h++) {
        M3V_TRIPCOUNT(1, MAX_HEADS)
        const int col = h * a.dh;
        for (int q0 = 0; q0 < a.tq; q0 += QT) {
            M3V_TRIPCOUNT(1, QTILES)
            // Stage the query tile, one channel of QT queries per cycle.
            // Lanes past tq hold 0; channels past dh are never multiplied by a nonzero key.
            for (int c = 0; c < a.dh; c++) {
                M3V_TRIPCOUNT(1, MAX_DH)
                M3V_HLS(pipeline II=1)
                for (int l = 0; l < QT; l++) {
                    M3V_HLS(unroll)
                    qbuf[c / PI][c % PI][l] = q0 + l < a.tq ? act_t(q[(q0 + l) * a.q_ld + col + c]) : act_t(0);
                }
            }
            // QK^T: key j streams through the array, every lane owns one query.
            for (int j = 0; j < a.tk; j++) {
                M3V_TRIPCOUNT(1, MAX_KEYS)
                for (int l = 0; l < QT; l++) {
                    M3V_HLS(unroll)
                    acc[l] = 0;
                }
                for (int kt = 0; kt < cdiv(a.dh, PI); kt++) {
                    M3V_TRIPCOUNT(1, DKT)
                    M3V_HLS(pipeline II=1)
                    for (int i = 0; i < PI; i++) {
                        M3V_HLS(unroll)
                        const int c = kt * PI + i;
                        kv[i] = c < a.dh ? act_t(k[j * a.k_ld + col + c]) : act_t(0);
                    }
                    for (int l = 0; l < QT; l++) {
                        M3V_HLS(unroll)
                        acc_t sum = 0;
                        for (int i = 0; i < PI; i++) {
                            M3V_HLS(unroll)
                            sum += kv[i] * qbuf[kt][i][l];
                        }
                        acc[l] += sum;
                    }
                }
                for (int l = 0; l < QT; l++) {
                    M3V_HLS(unroll)
                    if (q0 + l < a.tq) {
                        const act_t s = requant<AW>(acc[l], a.score_shift, a.score_fmt, sat_score);
                        sbuf[l][j] = s;
                        m[l] = (j == 0 || s > m[l]) ? s : m[l];
                    }
                }
            }
            // A.V: per query row, channel tiles of P_OUT, keys in slices of P_IN.
            for (int l = 0; l < QT; l++) {
                if (q0 + l >= a.tq)
                    break;
                recip_t r = 0;
                int rk = 0;
                for (int c0 = 0; c0 < a.dh; c0 += PO) {
                    M3V_TRIPCOUNT(1, CT)
                    psum_t S;
                    av_tile<CFG>(sbuf[l], 0, a.tk, m[l], a.score_fmt.frac, v, a.v_ld, col, c0, a.dh, S, A);
                    if (c0 == 0)
                        recip_int(S, r, rk); // once per row, after its first pass
                    for (int jj = 0; jj < PO; jj++) {
                        M3V_HLS(pipeline II=1)
                        if (c0 + jj < a.dh)
                            o[(q0 + l) * a.o_ld + col + c0 + jj] =
                                av_out<CFG>(A[jj], r, rk, a.out_shift, a.out_fmt, sat_out);
                    }
                }
            }
        }
    }
}

} // namespace m3v

#endif // M3V_ATTENTION_H
