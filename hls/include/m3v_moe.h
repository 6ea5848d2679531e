// m3v_moe.h: MoE gate, per-expert token queues and the combine (docs/numerics.md section 10).
//
//   gate:    idx[t] = top-k of the integer logits (ties -> lower expert index)
//            p_e = exp_int(max_e l - l_e, f_l) over ALL N experts; (r, kk) = recip_int(sum p)
//            score_e = sat(rshift_round(p_e r, R + kk - F_g), u16.15), kept for the chosen k
//   queues:  per expert, the ascending tokens routed to it and the top-k slot of each
//   combine: out[t, c] = sat(sum_j rshift_round(score[t, j] y[t, j, c], shift_j), out_fmt),
//            every term rounded on its own, one saturation at the end
// The fused path runs the experts through gemm() with gather (queue tokens) and, for fc2, the
// combine epilogue into an accumulator that combine_finish() saturates.
#ifndef M3V_MOE_H
#define M3V_MOE_H

#include "m3v_nonlinear.h"

namespace m3v {

// idx and score are [T, K] row-major; logits [T, N] with row stride l_ld.
// Preconditions: T <= MAX_TOKENS, 1 <= K <= N <= MAX_EXPERTS, K <= MAX_K.
template <class CFG>
void moe_gate(int T, int N, int K, int logit_frac, const typename CFG::act_t logits[], int l_ld, idx_t idx[],
              score_t score[], sat_cnt_t &sat) {
    using namespace contract;
    typedef typename CFG::act_t act_t;
    constexpr int NE = CFG::MAX_EXPERTS;
    constexpr int KM = CFG::MAX_K;
    constexpr int MAX_T = CFG::MAX_TOKENS;
    constexpr int SUMW = EXP_FRAC + 1 + clog2(NE); // sum p <= N 2^P
    const fmt_t gate_fmt = {GATE_BITS, GATE_FRAC, false};

    act_t l[NE];
    M3V_HLS(array_partition variable=l complete)
    bool taken[NE];
    M3V_HLS(array_partition variable=taken complete)
    score_t sc[NE];
    M3V_HLS(array_partition variable=sc complete)
    int pick[KM];
    M3V_HLS(array_partition variable=pick complete)

    for (int t = 0; t < T; t++) {
        M3V_TRIPCOUNT(1, MAX_T)
        M3V_HLS(pipeline II=1)
        for (int e = 0; e < NE; e++) {
            M3V_HLS(unroll)
            l[e] = e < N ? act_t(logits[t * l_ld + e]) : act_t(0);
            taken[e] = e >= N;
        }
        // Top-k by repeated selection; the strict > keeps the lower index on ties.
        act_t top = 0;
        for (int s = 0; s < KM; s++) {
            M3V_HLS(unroll)
            int best = -1;
            act_t bv = 0;
            for (int e = 0; e < NE; e++) {
                M3V_HLS(unroll)
                if (!taken[e] && (best < 0 || l[e] > bv)) {
                    best = e;
                    bv = l[e];
                }
            }
            pick[s] = best;
            if (s < K && best >= 0)
                taken[best] = true;
            if (s == 0)
                top = bv;
        }
        // Softmax over all N experts, one reciprocal per token.
        exp_t p[NE];
        ap_uint<SUMW> psum = 0;
        for (int e = 0; e < NE; e++) {
            M3V_HLS(unroll)
            const ap_int<CFG::ACT_BITS + 1> d = top - l[e]; // >= 0: top is the max
            p[e] = e < N ? exp_int(ap_uint<EXP_ARG_BITS>(d), logit_frac) : exp_t(0);
            psum += p[e];
        }
        recip_t r;
        int kk;
        recip_int(psum, r, kk);
        const int sh = RECIP_FRAC + kk - GATE_FRAC;
        for (int e = 0; e < NE; e++) {
            M3V_HLS(unroll)
            if (e < N)
                sc[e] = score_t(requant<GATE_BITS + 1>(p[e] * r, sh, gate_fmt, sat)); // p r: 34 b
        }
        for (int s = 0; s < KM; s++) {
            M3V_HLS(unroll)
            if (s < K) {
                idx[t * K + s] = pick[s];
                score[t * K + s] = sc[pick[s]];
            }
        }
    }
}

// Per-expert queues from idx [T, K]: expert e owns entries q_off[e] .. q_off[e+1]-1 of q_tok
// (ascending tokens) and q_slot (the top-k slot of each), T K entries in all, nothing dropped.
template <class CFG>
void expert_queues(int T, int K, int N, const idx_t idx[], idx_t q_tok[], idx_t q_slot[], idx_t q_off[]) {
    constexpr int NE = CFG::MAX_EXPERTS;
    constexpr int KM = CFG::MAX_K;
    constexpr int MAX_T = CFG::MAX_TOKENS;
    idx_t cnt[NE];
    M3V_HLS(array_partition variable=cnt complete)
    idx_t wp[NE];
    M3V_HLS(array_partition variable=wp complete)
    for (int e = 0; e < NE; e++) {
        M3V_HLS(unroll)
        cnt[e] = 0;
    }
    for (int t = 0; t < T; t++) {
        M3V_TRIPCOUNT(1, MAX_T)
        for (int s = 0; s < K; s++) {
            M3V_TRIPCOUNT(1, KM)
            M3V_HLS(pipeline II=1)
            cnt[idx[t * K + s]]++;
        }
    }
    idx_t run = 0;
    for (int e = 0; e < NE; e++) {
        M3V_HLS(pipeline II=1)
        if (e < N) {
            q_off[e] = run;
            wp[e] = run;
            run += cnt[e];
        }
    }
    q_off[N] = run;
    // Token-major order keeps every queue ascending.
    for (int t = 0; t < T; t++) {
        M3V_TRIPCOUNT(1, MAX_T)
        for (int s = 0; s < K; s++) {
            M3V_TRIPCOUNT(1, KM)
            M3V_HLS(pipeline II=1)
            const int e = idx[t * K + s];
            q_tok[wp[e]] = t;
            q_slot[wp[e]] = s;
            wp[e]++;
        }
    }
}

// Standalone combine of gathered expert outputs y [T, K, D] (slot-major per token).
// shift: per expert (shift[idx[t, j]]) when per_expert, else shift[0].
// The 48-bit sum holds K <= 8 terms of up to 44 bits (score u16 times y, left shift <= 11).
template <class CFG>
void moe_combine(int T, int K, int D, const score_t score[], const typename CFG::act_t y[], const idx_t idx[],
                 const shift_t shift[], bool per_expert, const fmt_t &fmt, typename CFG::act_t out[],
                 sat_cnt_t &sat) {
    typedef typename CFG::acc_t acc_t;
    constexpr int KM = CFG::MAX_K;
    constexpr int MAX_T = CFG::MAX_TOKENS;
    constexpr int MAX_D = CFG::MAX_DIM;
    for (int t = 0; t < T; t++) {
        M3V_TRIPCOUNT(1, MAX_T)
        for (int c = 0; c < D; c++) {
            M3V_TRIPCOUNT(1, MAX_D)
            M3V_HLS(pipeline II=1)
            acc_t sum = 0;
            for (int j = 0; j < KM; j++) {
                M3V_HLS(unroll)
                if (j < K) {
                    const int n = t * K + j;
                    const int sh = per_expert ? int(shift[idx[n]]) : int(shift[0]);
                    sum += rshift_round<CFG::ACC_BITS>(score[n] * y[n * D + c], sh);
                }
            }
            out[t * D + c] = saturate<CFG::ACT_BITS>(sum, fmt, sat);
        }
    }
}

} // namespace m3v

#endif // M3V_MOE_H
