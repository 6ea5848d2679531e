// m3v_gemm.h: the unified GEMM engine (docs/numerics.md section 4) shared by patch embedding,
// qkv, proj, MLP, the MoE gate and experts, and usable for the attention matmuls:
//
//   acc[r, o] = b[o] + sum_i x[src(r), i] w[i, o]                      48-bit, bias-initialised
//   v         = requant(acc, s[o], fmt)                                  per-channel run-time shift
//   v         = gelu(v, fmt.frac, gelu_fmt)                              optional fused epilogue
//   y[dst(r), o] = v,   or with combine:
//   comb[dst(r), o] += rshift_round(score[r] v, comb_shift)              MoE combine term
//
// src(r) is a gather through a token index list (an expert's queue), dst(r) a scatter. The MAC
// array is P_IN x P_OUT: per output tile of P_OUT channels the weight columns are staged once
// (weight-stationary), then every row streams its input in P_IN-wide slices, one per cycle.
#ifndef M3V_GEMM_H
#define M3V_GEMM_H

#include "m3v_nonlinear.h"

namespace m3v {

// Run-time arguments of one GEMM call (the fields of one instruction).
struct gemm_args {
    int rows;               // rows processed (tokens, or the length of a queue)
    int in_dim;             // reduction length
    int out_dim;            // output channels
    int x_ld, x_off;        // x(r, i) = x[src(r) * x_ld + x_off + i]
    int w_ld, w_off;        // w(i, o) = w[i * w_ld + w_off + o], or w[o * w_ld + w_off + i] (w_trans)
    int y_ld, y_off;        // y(r, o) = y[dst(r) * y_ld + y_off + o]; comb uses the same layout
    bool w_trans;           // weights stored output-major (K of QK^T is [keys, dh])
    bool gather;            // src(r) = gather_idx[r], else r
    bool scatter;           // dst(r) = scatter_idx[r], else r
    bool has_bias;          // else the accumulators start at 0
    bool per_channel_shift; // shift[o], else shift[0] for every channel
    fmt_t fmt;              // requant target: y, or the GELU input format with gelu
    bool gelu;              // fused GELU epilogue
    fmt_t gelu_fmt;         // GELU output format
    bool combine;           // accumulate score-weighted terms into comb instead of writing y
    int comb_shift;         // F_g + f_y - f_out of the combine term
};

// Round, saturate, and optionally GELU / combine one accumulator.
template <class CFG>
void gemm_epilogue(const gemm_args &a, const typename CFG::acc_t &acc, int shift, const score_t &sc,
                   int at, typename CFG::act_t y[], typename CFG::acc_t comb[], sat_cnt_t &sat,
                   sat_cnt_t &sat_gelu) {
    constexpr int AW = CFG::ACT_BITS;
    ap_int<AW> v = requant<AW>(acc, shift, a.fmt, sat);
    if (a.gelu)
        v = gelu<AW>(v, a.fmt.frac, a.gelu_fmt, sat_gelu);
    if (a.combine)
        comb[at] += rshift_round<CFG::ACC_BITS>(sc * v, a.comb_shift);
    else
        y[at] = v;
}

// One output tile of the engine: rows [0, a.rows) against the staged weight columns
// o0 .. o0 + P_OUT - 1 (wbuf[i / P_IN][i % P_IN][j] = w(i, o0 + j)) with the tile's biases and
// shifts. The decoder stages a tile once and streams row blocks through it.
template <class CFG, class WT>
void gemm_tile(const gemm_args &a, int o0, const typename CFG::act_t x[], const idx_t gather_idx[],
               const WT wbuf[][CFG::P_IN][CFG::P_OUT], const typename CFG::acc_t bias_l[CFG::P_OUT],
               const int shift_l[CFG::P_OUT], const score_t score[], const idx_t scatter_idx[],
               typename CFG::act_t y[], typename CFG::acc_t comb[], sat_cnt_t &sat, sat_cnt_t &sat_gelu) {
    typedef typename CFG::act_t act_t;
    typedef typename CFG::acc_t acc_t;
    constexpr int PI = CFG::P_IN;
    constexpr int PO = CFG::P_OUT;
    constexpr int KT = cdiv(CFG::MAX_IN, PI);
    constexpr int MAX_ROWS = CFG::MAX_ROWS;
    acc_t acc[PO];
    M3V_HLS(array_partition variable=acc complete)
    act_t xv[PI];
    M3V_HLS(array_partition variable=xv complete)
    for (int r = 0; r < a.rows; r++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        const int src = a.gather ? int(gather_idx[r]) : r;
        const int dst = a.scatter ? int(scatter_idx[r]) : r;
        for (int j = 0; j < PO; j++) {
            M3V_HLS(unroll)
            acc[j] = bias_l[j];
        }
        for (int kt = 0; kt < cdiv(a.in_dim, PI); kt++) {
            M3V_TRIPCOUNT(1, KT)
            M3V_HLS(pipeline II=1)
            for (int i = 0; i < PI; i++) {
                M3V_HLS(unroll)
                const int ii = kt * PI + i;
                // the ragged end of the last slice reads 0, whatever wbuf holds there
                xv[i] = ii < a.in_dim ? act_t(x[src * a.x_ld + a.x_off + ii]) : act_t(0);
            }
            for (int j = 0; j < PO; j++) {
                M3V_HLS(unroll)
                // exact: every partial sum is bounded by the layer's accumulator bound
                acc_t sum = 0;
                for (int i = 0; i < PI; i++) {
                    M3V_HLS(unroll)
                    sum += xv[i] * wbuf[kt][i][j];
                }
                acc[j] += sum;
            }
        }
        const score_t sc = a.combine ? score[r] : score_t(0);
        for (int j = 0; j < PO; j++) {
            M3V_HLS(pipeline II=1)
            const int o = o0 + j;
            if (o < a.out_dim)
                gemm_epilogue<CFG>(a, acc[j], shift_l[j], sc, dst * a.y_ld + a.y_off + o, y, comb, sat, sat_gelu);
        }
    }
}

// The engine. WT is the weight element type: CFG::wgt_t for layers, CFG::act_t when the
// "weights" are activations (K for QK^T, V for A.V).
// Preconditions: rows <= MAX_ROWS, in_dim <= MAX_IN, out_dim <= MAX_OUT, and the compile-time
// bound of the golden model's check_gemm_acc (|acc| < 2^47) holds for the layer.
template <class CFG, class WT>
void gemm(const gemm_args &a, const typename CFG::act_t x[], const idx_t gather_idx[], const WT w[],
          const typename CFG::acc_t bias[], const shift_t shift[], const score_t score[],
          const idx_t scatter_idx[], typename CFG::act_t y[], typename CFG::acc_t comb[], sat_cnt_t &sat,
          sat_cnt_t &sat_gelu) {
    typedef typename CFG::acc_t acc_t;
    constexpr int PI = CFG::P_IN;
    constexpr int PO = CFG::P_OUT;
    constexpr int KT = cdiv(CFG::MAX_IN, PI);
    constexpr int OT = cdiv(CFG::MAX_OUT, PO);
    constexpr int MAX_IN = CFG::MAX_IN;

    // Weight tile: P_IN x P_OUT words readable per cycle.
    WT wbuf[KT][PI][PO];
    M3V_HLS(array_partition variable=wbuf complete dim=2)
    M3V_HLS(array_partition variable=wbuf complete dim=3)
    acc_t bias_l[PO];
    M3V_HLS(array_partition variable=bias_l complete)
    int shift_l[PO];
    M3V_HLS(array_partition variable=shift_l complete)

    for (int o0 = 0; o0 < a.out_dim; o0 += PO) {
        M3V_TRIPCOUNT(1, OT)
        for (int j = 0; j < PO; j++) {
            M3V_HLS(unroll)
            const int o = o0 + j;
            bias_l[j] = (a.has_bias && o < a.out_dim) ? acc_t(bias[o]) : acc_t(0);
            shift_l[j] = (a.per_channel_shift && o < a.out_dim) ? int(shift[o]) : int(shift[0]);
        }
        // Stage the tile's weight columns, one input row of P_OUT weights per cycle.
        for (int i = 0; i < a.in_dim; i++) {
            M3V_TRIPCOUNT(1, MAX_IN)
            M3V_HLS(pipeline II=1)
            for (int j = 0; j < PO; j++) {
                M3V_HLS(unroll)
                const int o = o0 + j;
                const int at = a.w_trans ? o * a.w_ld + a.w_off + i : i * a.w_ld + a.w_off + o;
                wbuf[i / PI][i % PI][j] = o < a.out_dim ? WT(w[at]) : WT(0);
            }
        }
        gemm_tile<CFG, WT>(a, o0, x, gather_idx, wbuf, bias_l, shift_l, score, scatter_idx, y, comb, sat, sat_gelu);
    }
}

// The combine accumulator's final, single saturation: out = sat(comb, fmt).
template <class CFG>
void combine_finish(int rows, int dim, const typename CFG::acc_t comb[], int comb_ld, const fmt_t &fmt,
                    typename CFG::act_t out[], int out_ld, sat_cnt_t &sat) {
    constexpr int MAX_ROWS = CFG::MAX_ROWS;
    constexpr int MAX_DIM = CFG::MAX_DIM;
    for (int r = 0; r < rows; r++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        for (int c = 0; c < dim; c++) {
            M3V_TRIPCOUNT(1, MAX_DIM)
            M3V_HLS(pipeline II=1)
            out[r * out_ld + c] = saturate<CFG::ACT_BITS>(comb[r * comb_ld + c], fmt, sat);
        }
    }
}

} // namespace m3v

#endif // M3V_GEMM_H
