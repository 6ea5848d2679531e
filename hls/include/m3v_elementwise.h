// m3v_elementwise.h: residual add with alignment, CLS prepend / position add, and the patch
// gather that turns an image into patch-embedding GEMM rows (docs/numerics.md sections 4, 11).
#ifndef M3V_ELEMENTWISE_H
#define M3V_ELEMENTWISE_H

#include "m3v_prim.h"

namespace m3v {

// z = sat(rshift_round(a, a_shift) + rshift_round(b, b_shift), out_fmt), exact for any shifts in
// [-62, 62] (add_aligned). a_shift = f_a - f_z, b_shift = f_b - f_z. Also the position-embedding
// add (b = pos, b_ld = 0 would broadcast one row).
template <class CFG>
void residual_add(int rows, int dim, const typename CFG::act_t a[], int a_ld, const typename CFG::act_t b[],
                  int b_ld, int a_shift, int b_shift, const fmt_t &fmt, typename CFG::act_t z[], int z_ld,
                  sat_cnt_t &sat) {
    constexpr int AW = CFG::ACT_BITS;
    constexpr int MAX_ROWS = CFG::MAX_TOKENS;
    constexpr int MAX_DIM = CFG::MAX_DIM;
    for (int r = 0; r < rows; r++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        for (int c = 0; c < dim; c++) {
            M3V_TRIPCOUNT(1, MAX_DIM)
            M3V_HLS(pipeline II=1)
            z[r * z_ld + c] = add_aligned<AW>(a[r * a_ld + c], a_shift, b[r * b_ld + c], b_shift, fmt, sat);
        }
    }
}

// [N, D] patch tokens -> [N + 1, D] with the CLS row (already in the tokens' format) first.
template <class CFG>
void prepend_cls(int n, int dim, const typename CFG::act_t tokens[], const typename CFG::act_t cls[],
                 typename CFG::act_t out[]) {
    constexpr int MAX_ROWS = CFG::MAX_TOKENS;
    constexpr int MAX_DIM = CFG::MAX_DIM;
    for (int r = 0; r <= n; r++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        for (int c = 0; c < dim; c++) {
            M3V_TRIPCOUNT(1, MAX_DIM)
            M3V_HLS(pipeline II=1)
            out[r * dim + c] = r == 0 ? cls[c] : tokens[(r - 1) * dim + c];
        }
    }
}

// patchify: [C, H, W] image -> [(H/p)(W/p), C p p] rows, patches in raster order, columns in
// (c, i, j) order (a Conv2d(kernel = stride = p) weight reshaped to [C p p, D] is then the GEMM's w).
// Preconditions: p divides H and W; C p p <= MAX_IN; (H/p)(W/p) <= MAX_ROWS.
template <class CFG>
void patchify(int ch, int height, int width, int p, const typename CFG::act_t img[], typename CFG::act_t out[]) {
    constexpr int MAX_ROWS = CFG::MAX_ROWS;
    constexpr int MAX_IN = CFG::MAX_IN;
    const int gw = width / p;
    const int n = (height / p) * gw;
    const int row = ch * p * p;
    for (int t = 0; t < n; t++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        const int py = t / gw;
        const int px = t % gw;
        for (int col = 0; col < row; col++) {
            M3V_TRIPCOUNT(1, MAX_IN)
            M3V_HLS(pipeline II=1)
            const int c = col / (p * p);
            const int i = (col / p) % p;
            const int j = col % p;
            out[t * row + col] = img[(c * height + py * p + i) * width + px * p + j];
        }
    }
}

} // namespace m3v

#endif // M3V_ELEMENTWISE_H
