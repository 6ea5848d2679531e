// m3v_decoder.h: the Program sequencer (docs/program.md). It reads the header and the 64-byte
// instructions from the program memory, refuses a Program of another format or hardware
// configuration, and runs every instruction on the library units: one GEMM engine (patch
// embedding, qkv, proj, MLP, experts, gate logits), layernorm, attention, moe_gate +
// expert_queues, moe_combine, residual_add, prepend_cls and patchify.
//
// DDR is word memory (ap_uint<AXI_W>) behind four address spaces (wgt, arena, in, out). Each
// instruction loads its operands into static on-chip buffers sized from the CFG maxima, runs one
// unit and stores its result: a correctness-first access pattern (element-wise unpacking, no
// overlap of transfer and compute), not the performance model of the accelerator.
//
// Template parameters: CFG is the generated m3v::config; BLD carries the build's AXI width, the
// hardware hash and the instruction / task limits (generated m3v_build.h). The ISA constants come
// from the generated m3v_isa.h (namespace m3v::isa).
#ifndef M3V_DECODER_H
#define M3V_DECODER_H

#include "m3v_attention.h"
#include "m3v_elementwise.h"
#include "m3v_gemm.h"
#include "m3v_isa.h"
#include "m3v_layernorm.h"
#include "m3v_moe.h"

namespace m3v {

// Byte size of each address space (from the header) and a sticky fault flag: an access past a
// space's end, or a store into a read-only space, ends the Program with STATUS_OVER_LIMIT.
struct ddr_ctx {
    ap_uint<32> lim[4];
    bool fault;
};

// The four address spaces are separate m_axi pointers; a read selects among them by space id
// (a multiplexer of reads, never a multiplexed pointer).
template <int AW>
ap_uint<AW> ddr_word_rd(const ap_uint<AW> *wgt, const ap_uint<AW> *arena, const ap_uint<AW> *in,
                        const ap_uint<AW> *out, int sp, unsigned wi) {
    M3V_HLS(inline)
    if (sp == isa::SPACE_WGT)
        return wgt[wi];
    if (sp == isa::SPACE_ARENA)
        return arena[wi];
    if (sp == isa::SPACE_IN)
        return in[wi];
    return out[wi];
}

template <int AW>
void ddr_word_wr(ap_uint<AW> *arena, ap_uint<AW> *out, int sp, unsigned wi, const ap_uint<AW> &w) {
    M3V_HLS(inline)
    if (sp == isa::SPACE_ARENA)
        arena[wi] = w;
    else
        out[wi] = w;
}

inline int ref_space(ap_uint<32> r) { return int(r >> isa::OFFSET_BITS); }

inline ap_uint<32> ref_off(ap_uint<32> r) { return r & ((ap_uint<32>(1) << isa::OFFSET_BITS) - 1); }

// Byte offsets are computed in 40 bits, so a corrupt size or stride cannot wrap into a space:
// the range check sees the true end.
typedef ap_uint<40> boff_t;

// Range check of [off, off + bytes) in space sp; sets the fault flag.
inline bool ddr_in_range(ddr_ctx &c, int sp, boff_t off, boff_t bytes) {
    const ap_uint<41> end = ap_uint<41>(off) + bytes;
    if (end > c.lim[sp]) {
        c.fault = true;
        return false;
    }
    return true;
}

// n little-endian elements of EB bytes (1 or 2, sign-extended when SIGNED) from byte address
// `off` of the ref's space into dst[0 .. n), one AXI word read per AXI_W / 8 bytes.
template <int AW, int EB, bool SIGNED, int MAX_N, class T>
void ddr_load(const ap_uint<AW> *wgt, const ap_uint<AW> *arena, const ap_uint<AW> *in, const ap_uint<AW> *out,
              ddr_ctx &c, ap_uint<32> r, boff_t byte_off, int n, T dst[]) {
    constexpr int WB = AW / 8;
    static_assert(EB == 1 || EB == 2, "activation, weight and index elements are 1 or 2 bytes");
    static_assert(WB >= 4, "AXI words are at least 32 bits");
    const int sp = ref_space(r);
    const boff_t base = boff_t(ref_off(r)) + byte_off;
    if (n <= 0 || !ddr_in_range(c, sp, base, boff_t(n) * EB))
        return;
    unsigned cur = 0;
    bool have = false;
    ap_uint<AW> w = 0;
    for (int i = 0; i < n; i++) {
        M3V_TRIPCOUNT(1, MAX_N)
        M3V_HLS(pipeline II=1)
        const boff_t a = base + boff_t(i * EB);
        const unsigned wi = unsigned(a / WB);
        if (!have || wi != cur) {
            w = ddr_word_rd<AW>(wgt, arena, in, out, sp, wi);
            cur = wi;
            have = true;
        }
        const int lo = int(a % WB) * 8;
        const ap_uint<8 * EB> e = w.range(lo + 8 * EB - 1, lo);
        if (SIGNED)
            dst[i] = T(ap_int<8 * EB>(e));
        else
            dst[i] = T(e);
    }
}

// One little-endian 64-bit element (biases, LayerNorm beta), assembled from the AXI word(s).
template <int AW>
ap_int<64> ddr_load64(const ap_uint<AW> *wgt, const ap_uint<AW> *arena, const ap_uint<AW> *in,
                      const ap_uint<AW> *out, ddr_ctx &c, ap_uint<32> r, boff_t byte_off) {
    constexpr int WB = AW / 8;
    constexpr int NW = cdiv(8, WB);
    const int sp = ref_space(r);
    const boff_t a = boff_t(ref_off(r)) + byte_off;
    if (!ddr_in_range(c, sp, a, 8))
        return 0;
    ap_uint<64> v = 0;
    if (NW == 1) {
        const ap_uint<AW> w = ddr_word_rd<AW>(wgt, arena, in, out, sp, unsigned(a / WB));
        const int lo = int(a % WB) * 8;
        v = w.range(lo + 63, lo);
    } else {
        // 8-byte elements are 8-byte aligned, so they start a word here
        for (int k = 0; k < NW; k++) {
            M3V_HLS(unroll)
            const ap_uint<AW> w = ddr_word_rd<AW>(wgt, arena, in, out, sp, unsigned(a / WB) + k);
            v.range(k * AW + AW - 1, k * AW) = w;
        }
    }
    return ap_int<64>(v);
}

// n 16-bit elements from src into byte address `off` of the ref's space (arena or out):
// read-modify-write per AXI word, so neighbours in a shared word are kept.
template <int AW, int MAX_N, class T>
void ddr_store16(const ap_uint<AW> *wgt, ap_uint<AW> *arena, const ap_uint<AW> *in, ap_uint<AW> *out,
                 ddr_ctx &c, ap_uint<32> r, boff_t byte_off, int n, const T src[]) {
    constexpr int WB = AW / 8;
    const int sp = ref_space(r);
    const boff_t base = boff_t(ref_off(r)) + byte_off;
    if (sp != isa::SPACE_ARENA && sp != isa::SPACE_OUT) {
        c.fault = true;
        return;
    }
    if (n <= 0 || !ddr_in_range(c, sp, base, boff_t(n) * 2))
        return;
    unsigned cur = 0;
    bool have = false;
    ap_uint<AW> w = 0;
    for (int i = 0; i < n; i++) {
        M3V_TRIPCOUNT(1, MAX_N)
        M3V_HLS(pipeline II=1)
        const boff_t a = base + boff_t(i * 2);
        const unsigned wi = unsigned(a / WB);
        if (!have || wi != cur) {
            if (have)
                ddr_word_wr<AW>(arena, out, sp, cur, w);
            w = ddr_word_rd<AW>(wgt, arena, in, out, sp, wi);
            cur = wi;
            have = true;
        }
        const int lo = int(a % WB) * 8;
        w.range(lo + 15, lo) = ap_uint<16>(src[i] & 0xFFFF);
    }
    if (have)
        ddr_word_wr<AW>(arena, out, sp, cur, w);
}

// A packed format word (isa.pack_fmt): width bits 5:0, fraction (int8) bits 15:8, signed bit 16.
inline fmt_t unpack_fmt(ap_uint<32> f) {
    fmt_t r;
    r.bits = f.range(5, 0);
    r.frac = ap_int<8>(ap_uint<8>(f.range(15, 8)));
    r.is_signed = f[16] == 1;
    return r;
}

inline int as_signed(ap_uint<32> v) { return int(ap_int<32>(v)); }

inline ap_uint<32> align64(ap_uint<32> n) { return (n + isa::ALIGN - 1) / isa::ALIGN * isa::ALIGN; }

// The on-chip working set: operand A, operand B / result, the GEMM weight slice, per-channel
// parameters and the routing tables. Sizes from the CFG maxima.
template <class CFG>
struct dec_sizes {
    static constexpr int A_COLS = cmax(cmax(CFG::MAX_IN, 3 * CFG::MAX_DIM), CFG::MAX_K * CFG::MAX_DIM);
    static constexpr int B_COLS = cmax(cmax(CFG::MAX_IN, CFG::MAX_DIM), cmax(CFG::P_OUT, CFG::MAX_EXPERTS));
    static constexpr int A_N = CFG::MAX_TOKENS * A_COLS;
    static constexpr int B_N = CFG::MAX_TOKENS * B_COLS;
    static constexpr int W_N = CFG::MAX_IN * CFG::P_OUT;
    static constexpr int TK = CFG::MAX_TOKENS * CFG::MAX_K;
    static constexpr int PAR_N = cmax(CFG::MAX_DIM, CFG::MAX_EXPERTS);
};

template <class CFG>
struct dec_bufs {
    typedef dec_sizes<CFG> S;
    typename CFG::act_t a[S::A_N];
    typename CFG::act_t b[S::B_N];
    typename CFG::act_t y[CFG::MAX_ROWS * CFG::P_OUT];
    typename CFG::wgt_t w[S::W_N];
    typename CFG::acc_t bias[cmax(CFG::P_OUT, CFG::MAX_DIM)];
    shift_t shift[cmax(S::PAR_N, CFG::P_OUT)];
    ln_gamma_t gamma[CFG::MAX_DIM];
    typename CFG::act_t vec[CFG::MAX_DIM];
    idx_t idx[S::TK];
    score_t score[S::TK];
    idx_t q_tok[S::TK];
    idx_t q_slot[S::TK];
    idx_t q_off[CFG::MAX_EXPERTS + 1];
    idx_t src[CFG::MAX_ROWS];
    idx_t dst[CFG::MAX_ROWS];
    typename CFG::acc_t comb[1]; // the engine's combine target, unused by the decoder's GEMMs
    sat_cnt_t sat; // saturations of the whole run (all units)
};

// Instruction fields: f[k] is word k of the record (f[0] = opcode | flags << 8).
typedef ap_uint<32> ifield_t;

#define M3V_DDR_ARGS wgt, arena, in, out, c
#define M3V_DDR_PARAMS const ap_uint<AW> *wgt, ap_uint<AW> *arena, const ap_uint<AW> *in, ap_uint<AW> *out, ddr_ctx &c

// Expert queue table layout (isa.queue_layout): q_off u16 [N+1], q_tok, q_dst u16 [T k].
inline void queue_layout(int n, int tk, ap_uint<32> &tok_off, ap_uint<32> &dst_off) {
    tok_off = align64(2 * (n + 1));
    dst_off = tok_off + align64(2 * tk);
}

// Shared GEMM slice: y[r, y_off + o] for o in [o0, o0 + ncols) of w [in_dim, w_cols] (element
// bytes 1 or 2), with bias / per-channel shift slices, on x = bufs.a (rows x in_dim, ld x_ld).
template <class CFG, int AW>
void gemm_slice(M3V_DDR_PARAMS, dec_bufs<CFG> &B, int rows, int in_dim, int w_cols, int o0, int ncols,
                bool w16, ap_uint<32> w_ref, boff_t w_byte_off, bool has_bias, ap_uint<32> bias_ref,
                boff_t bias_byte_off, ap_uint<32> shift_ref, boff_t shift_byte_off, fmt_t fmt, bool gelu,
                fmt_t gelu_fmt, int x_ld, typename CFG::act_t y[], int y_ld, int y_off, sat_cnt_t &sat,
                sat_cnt_t &sat_gelu) {
    constexpr int PO = CFG::P_OUT;
    constexpr int MAX_IN = CFG::MAX_IN;
    const int eb = w16 ? 2 : 1;
    for (int i = 0; i < in_dim; i++) {
        M3V_TRIPCOUNT(1, MAX_IN)
        const boff_t at = w_byte_off + (boff_t(i) * w_cols + o0) * eb;
        if (w16)
            ddr_load<AW, 2, true, PO>(wgt, arena, in, out, c, w_ref, at, ncols, B.w + i * PO);
        else
            ddr_load<AW, 1, true, PO>(wgt, arena, in, out, c, w_ref, at, ncols, B.w + i * PO);
    }
    for (int j = 0; j < ncols; j++) {
        M3V_TRIPCOUNT(1, PO)
        B.bias[j] = has_bias ? typename CFG::acc_t(ddr_load64<AW>(M3V_DDR_ARGS, bias_ref,
                                                                   bias_byte_off + boff_t(8 * (o0 + j))))
                             : typename CFG::acc_t(0);
    }
    ddr_load<AW, 1, true, PO>(M3V_DDR_ARGS, shift_ref, shift_byte_off + boff_t(o0), ncols, B.shift);
    gemm_args g;
    g.rows = rows;
    g.in_dim = in_dim;
    g.out_dim = ncols;
    g.x_ld = x_ld;
    g.x_off = 0;
    g.w_ld = PO;
    g.w_off = 0;
    g.y_ld = y_ld;
    g.y_off = y_off;
    g.w_trans = false;
    g.gather = false;
    g.scatter = false;
    g.has_bias = has_bias;
    g.per_channel_shift = true;
    g.fmt = fmt;
    g.gelu = gelu;
    g.gelu_fmt = gelu_fmt;
    g.combine = false;
    g.comb_shift = 0;
    gemm<CFG, typename CFG::wgt_t>(g, B.a, B.src, B.w, B.bias, B.shift, B.score, B.dst, y, B.comb, sat, sat_gelu);
}

template <class CFG>
bool fits_fmt(fmt_t f) {
    return f.bits >= 1 && (f.is_signed ? int(f.bits) <= CFG::ACT_BITS : int(f.bits) < CFG::ACT_BITS);
}

// ---------------------------------------------------------------------------- the opcodes

template <class CFG, int AW>
int op_patchify(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    const ifield_t lim = CFG::MAX_IN; // C and p each fit one patch row, H / p and W / p the rows
    if (f[isa::F_PATCHIFY_CHANNELS] > lim || f[isa::F_PATCHIFY_PATCH] > lim ||
        f[isa::F_PATCHIFY_HEIGHT] > lim * CFG::MAX_ROWS || f[isa::F_PATCHIFY_WIDTH] > lim * CFG::MAX_ROWS)
        return isa::STATUS_OVER_LIMIT;
    const int ch = f[isa::F_PATCHIFY_CHANNELS], h = f[isa::F_PATCHIFY_HEIGHT];
    const int w = f[isa::F_PATCHIFY_WIDTH], p = f[isa::F_PATCHIFY_PATCH];
    // ordered so that no product can overflow; C H W = (C p p)(H / p)(W / p) then fits A and B
    if (ch < 1 || p < 1 || h < 1 || w < 1 || h % p || w % p || ch * p > CFG::MAX_IN || ch * p * p > CFG::MAX_IN ||
        h / p > CFG::MAX_ROWS || w / p > CFG::MAX_ROWS || (h / p) * (w / p) > CFG::MAX_ROWS)
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_PATCHIFY_SRC_REF], 0, ch * h * w, B.a);
    patchify<CFG>(ch, h, w, p, B.a, B.b);
    ddr_store16<AW, S::B_N>(M3V_DDR_ARGS, f[isa::F_PATCHIFY_DST_REF], 0, ch * h * w, B.b);
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_gemm(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    constexpr int PO = CFG::P_OUT;
    constexpr int MAX_ROWS = CFG::MAX_ROWS;
    constexpr int OT = cdiv(CFG::MAX_OUT, PO);
    constexpr int MAX_LD = 1 << 16; // keeps row offsets of the 40-bit address arithmetic exact
    const ap_uint<24> flags = f[0] >> 8;
    const int xmode = int(flags >> isa::XMODE_SHIFT) & 3, ymode = int(flags >> isa::YMODE_SHIFT) & 3;
    const bool w16 = flags[isa::FLAG_W16], gelu = flags[isa::FLAG_GELU], has_bias = flags[isa::FLAG_BIAS];
    const int in_dim = f[isa::F_GEMM_IN_DIM], out_dim = f[isa::F_GEMM_OUT_DIM];
    const int x_ld = f[isa::F_GEMM_X_LD], y_ld = f[isa::F_GEMM_Y_LD];
    const fmt_t fmt = unpack_fmt(f[isa::F_GEMM_FMT]), gelu_fmt = unpack_fmt(f[isa::F_GEMM_GELU_FMT]);
    if (xmode > int(isa::XMODE_QUEUE) || ymode > int(isa::YMODE_SCATTER))
        return isa::STATUS_BAD_OPCODE;
    if (in_dim < 1 || in_dim > CFG::MAX_IN || out_dim < 1 || out_dim > CFG::MAX_OUT || x_ld < in_dim ||
        y_ld < out_dim || x_ld > MAX_LD || y_ld > MAX_LD || (w16 && CFG::WEIGHT_BITS < 16) ||
        (!w16 && CFG::WEIGHT_BITS < 8) || !fits_fmt<CFG>(fmt) || (gelu && !fits_fmt<CFG>(gelu_fmt)))
        return isa::STATUS_OVER_LIMIT;
    const int rows_max = f[isa::F_GEMM_ROWS];
    int rows = rows_max;
    int q0 = 0;
    const ap_uint<32> qref = f[isa::F_GEMM_QUEUE_REF];
    const bool queued = xmode != isa::XMODE_DIRECT || ymode != isa::YMODE_DIRECT;
    ap_uint<32> tok_off = 0, dst_off = 0;
    if (queued) {
        // queue_shape = N | T k << 16 locates q_tok and q_dst; expert e's queue is
        // q_off[e] .. q_off[e+1] - 1, and `rows` bounds its length.
        const int e = f[isa::F_GEMM_EXPERT];
        const int n_exp = int(f[isa::F_GEMM_QUEUE_SHAPE] & 0xFFFF), tk = int(f[isa::F_GEMM_QUEUE_SHAPE] >> 16);
        if (n_exp < 1 || n_exp > CFG::MAX_EXPERTS || e >= n_exp || tk < 1 || tk > S::TK)
            return isa::STATUS_OVER_LIMIT;
        queue_layout(n_exp, tk, tok_off, dst_off);
        if (!ddr_in_range(c, ref_space(qref), ref_off(qref), dst_off + 2 * tk))
            return isa::STATUS_OVER_LIMIT;
        idx_t off2[2];
        ddr_load<AW, 2, false, 2>(M3V_DDR_ARGS, qref, boff_t(2 * e), 2, off2);
        q0 = off2[0];
        rows = int(off2[1]) - int(off2[0]);
        if (rows < 0 || rows > rows_max || q0 + rows > tk)
            return isa::STATUS_OVER_LIMIT;
        if (rows == 0)
            return isa::STATUS_OK; // an idle expert fetches nothing and writes nothing
    }
    if (rows < 1 || rows > MAX_ROWS || rows * in_dim > S::A_N)
        return isa::STATUS_OVER_LIMIT;
    for (int r = 0; r < rows; r++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        B.src[r] = xmode == isa::XMODE_QUEUE ? q0 + r : r;
        B.dst[r] = ymode == isa::YMODE_QUEUE ? q0 + r : r;
    }
    if (xmode == isa::XMODE_GATHER)
        ddr_load<AW, 2, false, MAX_ROWS>(M3V_DDR_ARGS, qref, boff_t(tok_off) + 2 * q0, rows, B.src);
    if (ymode == isa::YMODE_SCATTER)
        ddr_load<AW, 2, false, MAX_ROWS>(M3V_DDR_ARGS, qref, boff_t(dst_off) + 2 * q0, rows, B.dst);
    // Gather at load time: row r of the on-chip x is memory row src(r).
    for (int r = 0; r < rows; r++) {
        M3V_TRIPCOUNT(1, MAX_ROWS)
        ddr_load<AW, 2, true, CFG::MAX_IN>(M3V_DDR_ARGS, f[isa::F_GEMM_X_REF], boff_t(2) * B.src[r] * x_ld,
                                           in_dim, B.a + r * in_dim);
    }
    sat_cnt_t sat_gelu = 0;
    for (int o0 = 0; o0 < out_dim; o0 += PO) {
        M3V_TRIPCOUNT(1, OT)
        const int nc = out_dim - o0 < PO ? out_dim - o0 : PO;
        gemm_slice<CFG, AW>(M3V_DDR_ARGS, B, rows, in_dim, out_dim, o0, nc, w16, f[isa::F_GEMM_W_REF], 0, has_bias,
                            f[isa::F_GEMM_BIAS_REF], 0, f[isa::F_GEMM_SHIFT_REF], 0, fmt, gelu, gelu_fmt, in_dim,
                            B.y, PO, 0, B.sat, sat_gelu);
        // Scatter at store time: row r goes to memory row dst(r).
        for (int r = 0; r < rows; r++) {
            M3V_TRIPCOUNT(1, MAX_ROWS)
            ddr_store16<AW, PO>(M3V_DDR_ARGS, f[isa::F_GEMM_Y_REF], boff_t(2) * (boff_t(B.dst[r]) * y_ld + o0), nc,
                                B.y + r * PO);
        }
    }
    B.sat += sat_gelu;
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_embed(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    const int np = f[isa::F_EMBED_PATCHES], d = f[isa::F_EMBED_DIM];
    const fmt_t fmt = unpack_fmt(f[isa::F_EMBED_FMT]);
    if (np < 1 || np + 1 > CFG::MAX_TOKENS || d < 1 || d > CFG::MAX_DIM || !fits_fmt<CFG>(fmt))
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_EMBED_X_REF], 0, np * d, B.a);
    ddr_load<AW, 2, true, CFG::MAX_DIM>(M3V_DDR_ARGS, f[isa::F_EMBED_CLS_REF], 0, d, B.vec);
    prepend_cls<CFG>(np, d, B.a, B.vec, B.b);
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_EMBED_POS_REF], 0, (np + 1) * d, B.a);
    residual_add<CFG>(np + 1, d, B.b, d, B.a, d, as_signed(f[isa::F_EMBED_A_SHIFT]),
                      as_signed(f[isa::F_EMBED_B_SHIFT]), fmt, B.b, d, B.sat);
    ddr_store16<AW, S::B_N>(M3V_DDR_ARGS, f[isa::F_EMBED_Y_REF], 0, (np + 1) * d, B.b);
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_layernorm(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    constexpr int MAX_DIM = CFG::MAX_DIM;
    const int rows = f[isa::F_LAYERNORM_ROWS], d = f[isa::F_LAYERNORM_DIM];
    const fmt_t fmt = unpack_fmt(f[isa::F_LAYERNORM_FMT]);
    const ap_uint<64> eps = (ap_uint<64>(f[isa::F_LAYERNORM_EPS_HI]) << 32) | ap_uint<64>(f[isa::F_LAYERNORM_EPS_LO]);
    if (rows < 1 || rows > CFG::MAX_TOKENS || d < 1 || d > MAX_DIM || !fits_fmt<CFG>(fmt) || (eps >> 61) != 0)
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_X_REF], 0, rows * d, B.a);
    ddr_load<AW, 2, true, MAX_DIM>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_GAMMA_REF], 0, d, B.gamma);
    ddr_load<AW, 1, true, MAX_DIM>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_SHIFT_REF], 0, d, B.shift);
    for (int j = 0; j < d; j++) {
        M3V_TRIPCOUNT(1, MAX_DIM)
        B.bias[j] = typename CFG::acc_t(ddr_load64<AW>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_BETA_REF], boff_t(8 * j)));
    }
    ln_args a;
    a.rows = rows;
    a.dim = d;
    a.x_ld = d;
    a.z_ld = d;
    a.eps = ln_eps_t(eps);
    a.beta_shift = as_signed(f[isa::F_LAYERNORM_BETA_SHIFT]);
    a.out_fmt = fmt;
    sat_cnt_t sat_norm = 0;
    layernorm<CFG>(a, B.a, B.gamma, B.bias, B.shift, B.b, sat_norm, B.sat);
    B.sat += sat_norm;
    ddr_store16<AW, S::B_N>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_Y_REF], 0, rows * d, B.b);
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_attention(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    const int t = f[isa::F_ATTENTION_TOKENS], d = f[isa::F_ATTENTION_DIM], heads = f[isa::F_ATTENTION_HEADS];
    const fmt_t fmt = unpack_fmt(f[isa::F_ATTENTION_FMT]), sfmt = unpack_fmt(f[isa::F_ATTENTION_SCORE_FMT]);
    if (t < 1 || t > CFG::MAX_TOKENS || d < 1 || d > CFG::MAX_DIM || heads < 1 || heads > CFG::MAX_HEADS ||
        d % heads || !fits_fmt<CFG>(fmt) || !fits_fmt<CFG>(sfmt))
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_ATTENTION_QKV_REF], 0, t * 3 * d, B.a);
    attn_args a;
    a.tq = t;
    a.tk = t;
    a.heads = heads;
    a.dh = d / heads;
    a.q_ld = 3 * d;
    a.k_ld = 3 * d;
    a.v_ld = 3 * d;
    a.o_ld = d;
    a.score_shift = as_signed(f[isa::F_ATTENTION_SCORE_SHIFT]);
    a.score_fmt = sfmt;
    a.out_shift = as_signed(f[isa::F_ATTENTION_OUT_SHIFT]);
    a.out_fmt = fmt;
    sat_cnt_t sat_score = 0;
    attention<CFG>(a, B.a, B.a + d, B.a + 2 * d, B.b, sat_score, B.sat);
    B.sat += sat_score;
    ddr_store16<AW, S::B_N>(M3V_DDR_ARGS, f[isa::F_ATTENTION_Y_REF], 0, t * d, B.b);
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_add(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    const int rows = f[isa::F_ADD_ROWS], cols = f[isa::F_ADD_COLS];
    const fmt_t fmt = unpack_fmt(f[isa::F_ADD_FMT]);
    if (rows < 1 || rows > CFG::MAX_TOKENS || cols < 1 || cols > CFG::MAX_DIM || !fits_fmt<CFG>(fmt))
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_ADD_A_REF], 0, rows * cols, B.a);
    ddr_load<AW, 2, true, S::B_N>(M3V_DDR_ARGS, f[isa::F_ADD_B_REF], 0, rows * cols, B.b);
    residual_add<CFG>(rows, cols, B.a, cols, B.b, cols, as_signed(f[isa::F_ADD_A_SHIFT]),
                      as_signed(f[isa::F_ADD_B_SHIFT]), fmt, B.b, cols, B.sat);
    ddr_store16<AW, S::B_N>(M3V_DDR_ARGS, f[isa::F_ADD_Y_REF], 0, rows * cols, B.b);
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_moe_gate(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[], int task) {
    typedef dec_sizes<CFG> S;
    constexpr int PO = CFG::P_OUT;
    constexpr int MAX_T = CFG::MAX_TOKENS;
    constexpr int GT = cdiv(CFG::MAX_EXPERTS, PO);
    constexpr int TKM = S::TK;
    const ap_uint<24> flags = f[0] >> 8;
    const bool w16 = flags[isa::FLAG_W16];
    const int t = f[isa::F_MOE_GATE_TOKENS], d = f[isa::F_MOE_GATE_DIM];
    const int n = int(f[isa::F_MOE_GATE_EXPERTS_K] & 0xFFFF), k = int(f[isa::F_MOE_GATE_EXPERTS_K] >> 16);
    const fmt_t fmt = unpack_fmt(f[isa::F_MOE_GATE_FMT]);
    if (t < 1 || t > MAX_T || d < 1 || d > CFG::MAX_IN || n < 1 || n > CFG::MAX_EXPERTS || k < 1 || k > n ||
        k > CFG::MAX_K || !fits_fmt<CFG>(fmt) || (w16 && CFG::WEIGHT_BITS < 16) || (!w16 && CFG::WEIGHT_BITS < 8))
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_X_REF], 0, t * d, B.a);
    const boff_t wo = boff_t(task) * f[isa::F_MOE_GATE_W_STRIDE];
    const boff_t bo = boff_t(task) * f[isa::F_MOE_GATE_BIAS_STRIDE];
    const boff_t so = boff_t(task) * f[isa::F_MOE_GATE_SHIFT_STRIDE];
    sat_cnt_t sat_gelu = 0;
    for (int o0 = 0; o0 < n; o0 += PO) {
        M3V_TRIPCOUNT(1, GT)
        const int nc = n - o0 < PO ? n - o0 : PO;
        gemm_slice<CFG, AW>(M3V_DDR_ARGS, B, t, d, n, o0, nc, w16, f[isa::F_MOE_GATE_W_REF], wo, true,
                            f[isa::F_MOE_GATE_BIAS_REF], bo, f[isa::F_MOE_GATE_SHIFT_REF], so, fmt, false, fmt, d,
                            B.b, n, o0, B.sat, sat_gelu);
    }
    ddr_store16<AW, S::B_N>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_LOGITS_REF], 0, t * n, B.b);
    moe_gate<CFG>(t, n, k, int(fmt.frac), B.b, n, B.idx, B.score, B.sat);
    expert_queues<CFG>(t, k, n, B.idx, B.q_tok, B.q_slot, B.q_off);
    ddr_store16<AW, S::TK>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_IDX_REF], 0, t * k, B.idx);
    ddr_store16<AW, S::TK>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_SCORE_REF], 0, t * k, B.score);
    // q_dst = token k + slot: the row of the expert-output buffer the combine reads
    for (int i = 0; i < t * k; i++) {
        M3V_TRIPCOUNT(1, TKM)
        B.q_slot[i] = B.q_tok[i] * k + B.q_slot[i];
    }
    ap_uint<32> tok_off, dst_off;
    queue_layout(n, t * k, tok_off, dst_off);
    const ap_uint<32> q = f[isa::F_MOE_GATE_QUEUE_REF];
    ddr_store16<AW, CFG::MAX_EXPERTS + 1>(M3V_DDR_ARGS, q, 0, n + 1, B.q_off);
    ddr_store16<AW, S::TK>(M3V_DDR_ARGS, q, tok_off, t * k, B.q_tok);
    ddr_store16<AW, S::TK>(M3V_DDR_ARGS, q, dst_off, t * k, B.q_slot);
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_moe_combine(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    const int t = f[isa::F_MOE_COMBINE_TOKENS], k = f[isa::F_MOE_COMBINE_K], d = f[isa::F_MOE_COMBINE_DIM];
    const fmt_t fmt = unpack_fmt(f[isa::F_MOE_COMBINE_FMT]);
    if (t < 1 || t > CFG::MAX_TOKENS || k < 1 || k > CFG::MAX_K || d < 1 || d > CFG::MAX_DIM || !fits_fmt<CFG>(fmt))
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, false, S::TK>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_SCORE_REF], 0, t * k, B.score);
    ddr_load<AW, 2, false, S::TK>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_IDX_REF], 0, t * k, B.idx);
    ddr_load<AW, 2, true, S::A_N>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_Y_REF], 0, t * k * d, B.a);
    // the combine shifts are per expert: load as many as the highest routed index needs
    constexpr int TKM = S::TK;
    int ne = 0;
    for (int i = 0; i < t * k; i++) {
        M3V_TRIPCOUNT(1, TKM)
        ne = int(B.idx[i]) + 1 > ne ? int(B.idx[i]) + 1 : ne;
    }
    if (ne > CFG::MAX_EXPERTS)
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 1, true, CFG::MAX_EXPERTS>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_SHIFT_REF], 0, ne, B.shift);
    moe_combine<CFG>(t, k, d, B.score, B.a, B.idx, B.shift, true, fmt, B.b, B.sat);
    ddr_store16<AW, S::B_N>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_OUT_REF], 0, t * d, B.b);
    return isa::STATUS_OK;
}

// ---------------------------------------------------------------------------- the sequencer

// Word i (32 bits) of the program memory.
template <int AW>
ap_uint<32> prog_word(const ap_uint<AW> *prog, int i) {
    constexpr int PER = AW / 32;
    const ap_uint<AW> w = prog[i / PER];
    const int lo = (i % PER) * 32;
    return w.range(lo + 31, lo);
}

// Runs the Program; returns its status (isa::STATUS_*). n_done: instructions completed.
template <class CFG, class BLD>
int run_program(const ap_uint<BLD::AXI_W> *prog, const ap_uint<BLD::AXI_W> *wgt, ap_uint<BLD::AXI_W> *arena,
                const ap_uint<BLD::AXI_W> *in, ap_uint<BLD::AXI_W> *out, int task, ap_uint<32> &n_done,
                sat_cnt_t &sat) {
    constexpr int AW = BLD::AXI_W;
    constexpr int W = isa::WORDS;
    static dec_bufs<CFG> B;
    n_done = 0;
    sat = 0;
    ifield_t hdr[W];
    for (int i = 0; i < W; i++) {
        M3V_HLS(pipeline II=1)
        hdr[i] = prog_word<AW>(prog, i);
    }
    if (hdr[0] != ap_uint<32>(isa::MAGIC))
        return isa::STATUS_BAD_MAGIC;
    if (hdr[1] != ap_uint<32>(isa::VERSION))
        return isa::STATUS_BAD_VERSION;
    bool same = true;
    for (int i = 0; i < 8; i++) {
        M3V_HLS(unroll)
        same = same && hdr[2 + i] == ap_uint<32>(BLD::hw_hash(i));
    }
    if (!same)
        return isa::STATUS_HW_MISMATCH;
    const int n_instr = hdr[10];
    const int n_tasks = hdr[13];
    if (task < 0 || task >= n_tasks || task >= BLD::MAX_TASKS)
        return isa::STATUS_BAD_TASK;
    if (n_instr > BLD::MAX_INSTR)
        return isa::STATUS_OVER_LIMIT;
    ddr_ctx c;
    c.lim[isa::SPACE_WGT] = hdr[11];
    c.lim[isa::SPACE_ARENA] = hdr[12];
    c.lim[isa::SPACE_IN] = hdr[14];
    c.lim[isa::SPACE_OUT] = hdr[15];
    c.fault = false;
    B.sat = 0;
    int status = isa::STATUS_OK;
    ifield_t f[W];
    M3V_HLS(array_partition variable=f complete)
    constexpr int MAX_INSTR = BLD::MAX_INSTR;
    for (int pc = 0; pc < n_instr; pc++) {
        M3V_TRIPCOUNT(1, MAX_INSTR)
        for (int i = 0; i < W; i++) {
            M3V_HLS(pipeline II=1)
            f[i] = prog_word<AW>(prog, W * (1 + pc) + i);
        }
        const int op = int(f[0] & 0xFF);
        int st = isa::STATUS_OK;
        if (op == isa::OP_END)
            break;
        else if (op == isa::OP_PATCHIFY)
            st = op_patchify<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_GEMM)
            st = op_gemm<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_EMBED)
            st = op_embed<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_LAYERNORM)
            st = op_layernorm<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_ATTENTION)
            st = op_attention<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_ADD)
            st = op_add<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_MOE_GATE)
            st = op_moe_gate<CFG, AW>(M3V_DDR_ARGS, B, f, task);
        else if (op == isa::OP_MOE_COMBINE)
            st = op_moe_combine<CFG, AW>(M3V_DDR_ARGS, B, f);
        else
            st = isa::STATUS_BAD_OPCODE;
        if (st == isa::STATUS_OK && c.fault)
            st = isa::STATUS_OVER_LIMIT;
        if (st != isa::STATUS_OK) {
            status = st;
            break;
        }
        n_done = pc + 1;
    }
    sat = B.sat;
    return status;
}

#undef M3V_DDR_ARGS
#undef M3V_DDR_PARAMS

} // namespace m3v

#endif // M3V_DECODER_H
