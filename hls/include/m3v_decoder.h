// m3v_decoder.h: the Program sequencer (docs/program.md). It reads the header and the 64-byte
// instructions from the program memory, refuses a Program of another format or hardware
// configuration, and runs every instruction on the library units: one GEMM engine (patch
// embedding, qkv, proj, MLP, experts, gate logits), layernorm, attention, moe_gate +
// expert_queues, moe_combine, residual_add, prepend_cls and patchify.
//
// DDR is word memory (ap_uint<AXI_W>) behind four address spaces (wgt, arena, in, out). Every
// on-chip buffer is bounded by hw.json (token_block, buffers.*; see dec_sizes): instructions
// stream blocks of token_block rows from DDR, through one unit and back, the GEMM per staged
// P_OUT column group, attention per head in query and key tiles. The GEMM's weight tiles are
// double-buffered (the next column group is fetched while the current one computes, gemm_step);
// elsewhere transfers and compute do not overlap: not the performance model of the accelerator.
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

// Container bytes of n elements `bits` wide, each in whole bytes.
constexpr long cbytes(long n, int bits) { return n * ((bits + 7) / 8); }

// The on-chip working set, bounded by hw.json (TOKEN_BLOCK and BUF_* in m3v_config.h): every
// instruction streams blocks of TOKEN_BLOCK rows through it. Only the routing tables (T k
// entries of 16 bits) scale with max_tokens; the attention K / V tiles get what
// buffers.activations leaves, capped at one whole head [max_tokens, max_dim].
template <class CFG>
struct dec_sizes {
    static constexpr int TB = CFG::TOKEN_BLOCK;
    static constexpr int PI = CFG::P_IN;
    static constexpr int PO = CFG::P_OUT;
    static constexpr int KT = cdiv(CFG::MAX_IN, PI);
    static constexpr int QT = CFG::ATT_QT;
    static constexpr int DH = CFG::MAX_DH;
    static constexpr int DKT = cdiv(DH, PI);
    // a block row: GEMM / gate input, a patch row (C p p <= MAX_IN) or a token's k expert outputs
    static constexpr int X_N = TB * cmax(CFG::MAX_IN, CFG::MAX_K * CFG::MAX_DIM);
    static constexpr int Y_N = TB * cmax(cmax(CFG::MAX_DIM, PO), CFG::MAX_EXPERTS);
    static constexpr int TK = CFG::MAX_TOKENS * CFG::MAX_K;
    static constexpr int TBK = TB * CFG::MAX_K;
    static constexpr int PAR_N = cmax(cmax(CFG::MAX_DIM, CFG::MAX_EXPERTS), PO);
    static constexpr int AB = (CFG::ACT_BITS + 7) / 8;
    // two MAX_IN x P_OUT weight tiles: the GEMM's ping-pong (op_gemm)
    static constexpr long WEIGHT_BYTES = 2 * cbytes(long(KT) * PI * PO, CFG::WEIGHT_BITS);
    static constexpr long FIXED_ACT_BYTES =
        cbytes(long(X_N) + Y_N + long(DKT) * PI * QT + QT + CFG::MAX_DIM, CFG::ACT_BITS) +
        cbytes(long(QT) * DH, pv_t::width) + cbytes(QT, psum_t::width) + cbytes(PAR_N + 2 * PO, CFG::ACC_BITS) +
        cbytes(PAR_N, shift_t::width) + cbytes(2 * PO, 32) + cbytes(CFG::MAX_DIM, ln_gamma_t::width) +
        cbytes(3L * TK + TBK + TBK + CFG::MAX_EXPERTS + 1 + 2 * TB, 16);
    static constexpr long KV_ROOM = (long(CFG::BUF_ACTIVATIONS) - FIXED_ACT_BYTES) / (2 * AB);
    static constexpr int KV_N = KV_ROOM < long(CFG::MAX_TOKENS) * DH ? int(KV_ROOM) : CFG::MAX_TOKENS * DH;
    static constexpr int SC_N = CFG::BUF_SCORES / AB;
    static constexpr long ACT_BYTES = FIXED_ACT_BYTES + 2 * cbytes(KV_N, CFG::ACT_BITS);
    static constexpr long SCORE_BYTES = cbytes(SC_N, CFG::ACT_BITS);
    static constexpr long BYTES = WEIGHT_BYTES + ACT_BYTES + SCORE_BYTES;
    static_assert(WEIGHT_BYTES <= CFG::BUF_WEIGHTS,
                  "the weight ping-pong (two MAX_IN x P_OUT tiles) exceeds buffers.weights");
    static_assert(X_N >= TB * PO, "the input block stages a fused residual's TOKEN_BLOCK x P_OUT rows");
    static_assert(KV_ROOM >= DH, "buffers.activations leaves no room for one key and one value of a head");
    static_assert(SC_N >= 1, "buffers.scores holds no score");
    static_assert(ACT_BYTES <= CFG::BUF_ACTIVATIONS, "activation buffers exceed buffers.activations");
    static_assert(BYTES <= long(CFG::BUF_WEIGHTS) + CFG::BUF_ACTIVATIONS + CFG::BUF_SCORES,
                  "on-chip buffers exceed the sum of hw.json's buffers");
};

// The buffers without parallel-lane reads (one element per cycle); the partitioned ones (weight
// tile, query tile, scores, tile biases and shifts) are declared in run_program.
template <class CFG>
struct dec_bufs {
    typedef dec_sizes<CFG> S;
    typename CFG::act_t x[S::X_N];      // the input block
    typename CFG::act_t y[S::Y_N];      // the output block, or a second input
    typename CFG::act_t kb[S::KV_N];    // attention: one key tile [keys, dh]
    typename CFG::act_t vb[S::KV_N];    // attention: its values
    pv_t pv[S::QT * S::DH];             // attention: sum p v of the query tile
    psum_t psum[S::QT];                 // attention: sum p
    typename CFG::act_t m[S::QT];       // attention: row maxima
    typename CFG::acc_t bias[S::PAR_N]; // LayerNorm beta
    shift_t shift[S::PAR_N];            // per-channel / per-expert / one tile's shifts
    ln_gamma_t gamma[CFG::MAX_DIM];
    idx_t idx[S::TK];                   // the routing of every token (queues are built from it)
    idx_t idx_blk[S::TBK];
    score_t score_blk[S::TBK];
    idx_t q_tok[S::TK];
    idx_t q_slot[S::TK];
    idx_t q_off[CFG::MAX_EXPERTS + 1];
    idx_t src[S::TB];
    idx_t dst[S::TB];
    typename CFG::acc_t comb[1]; // the engine's combine target, unused by the decoder's GEMMs
    sat_cnt_t sat; // saturations of the whole run (all units)
};

// Instruction fields: f[k] is word k of the record (f[0] = opcode | flags << 8).
typedef ap_uint<32> ifield_t;

#define M3V_DDR_ARGS wgt, arena, in, out, c
#define M3V_DDR_PARAMS const ap_uint<AW> *wgt, ap_uint<AW> *arena, const ap_uint<AW> *in, ap_uint<AW> *out, ddr_ctx &c
#define M3V_TILE_ARGS wt, bias_l, shift_l
#define M3V_TILE_PARAMS                                                                                        \
    typename CFG::wgt_t wt[][CFG::P_IN][CFG::P_OUT], typename CFG::acc_t bias_l[CFG::P_OUT], int shift_l[CFG::P_OUT]

// Expert queue table layout (isa.queue_layout): q_off u16 [N+1], q_tok, q_dst u16 [T k].
inline void queue_layout(int n, int tk, ap_uint<32> &tok_off, ap_uint<32> &dst_off) {
    tok_off = align64(2 * (n + 1));
    dst_off = tok_off + align64(2 * tk);
}

inline int imin(int a, int b) { return a < b ? a : b; }

// Stage output columns o0 .. o0 + ncols - 1 of w [in_dim, w_cols] (element bytes 1 or 2) into
// the weight tile, with their biases and per-channel shifts (lanes past ncols get 0). It touches
// nothing but the tile it fills, so it can run beside a GEMM on the other tile.
template <class CFG, int AW>
void stage_tile(M3V_DDR_PARAMS, M3V_TILE_PARAMS, int in_dim, int w_cols, int o0, int ncols, bool w16,
                ap_uint<32> w_ref, boff_t w_byte_off, bool has_bias, ap_uint<32> bias_ref, boff_t bias_byte_off,
                ap_uint<32> shift_ref, boff_t shift_byte_off) {
    constexpr int PI = CFG::P_IN;
    constexpr int PO = CFG::P_OUT;
    constexpr int MAX_IN = CFG::MAX_IN;
    const int eb = w16 ? 2 : 1;
    for (int i = 0; i < in_dim; i++) {
        M3V_TRIPCOUNT(1, MAX_IN)
        const boff_t at = w_byte_off + (boff_t(i) * w_cols + o0) * eb;
        if (w16)
            ddr_load<AW, 2, true, PO>(M3V_DDR_ARGS, w_ref, at, ncols, wt[i / PI][i % PI]);
        else
            ddr_load<AW, 1, true, PO>(M3V_DDR_ARGS, w_ref, at, ncols, wt[i / PI][i % PI]);
    }
    ddr_load<AW, 1, true, PO>(M3V_DDR_ARGS, shift_ref, shift_byte_off + boff_t(o0), ncols, shift_l);
    for (int j = 0; j < PO; j++) {
        const bool on = j < ncols;
        bias_l[j] = (on && has_bias) ? typename CFG::acc_t(ddr_load64<AW>(M3V_DDR_ARGS, bias_ref,
                                                                            bias_byte_off + boff_t(8 * (o0 + j))))
                                     : typename CFG::acc_t(0);
        shift_l[j] = on ? shift_l[j] : 0;
    }
}

// Rows [0, rows) of B.x (row stride x_ld) through the staged tile into y[dst(r) y_ld + y_off + j],
// j < ncols: the row mapping is applied by the caller's loads and stores.
template <class CFG>
void run_tile(dec_bufs<CFG> &B, M3V_TILE_PARAMS, int rows, int in_dim, int ncols, int x_ld, fmt_t fmt, bool gelu,
              fmt_t gelu_fmt, typename CFG::act_t y[], int y_ld, int y_off, sat_cnt_t &sat, sat_cnt_t &sat_gelu) {
    gemm_args g;
    g.rows = rows;
    g.in_dim = in_dim;
    g.out_dim = ncols;
    g.x_ld = x_ld;
    g.x_off = 0;
    g.w_ld = CFG::P_OUT;
    g.w_off = 0;
    g.y_ld = y_ld;
    g.y_off = y_off;
    g.w_trans = false;
    g.gather = false;
    g.scatter = false;
    g.has_bias = true; // the staged biases are 0 without one
    g.per_channel_shift = true;
    g.fmt = fmt;
    g.gelu = gelu;
    g.gelu_fmt = gelu_fmt;
    g.combine = false;
    g.comb_shift = 0;
    gemm_tile<CFG, typename CFG::wgt_t>(g, 0, B.x, B.src, wt, bias_l, shift_l, B.score_blk, B.dst, y, B.comb, sat,
                                        sat_gelu);
}

template <class CFG>
bool fits_fmt(fmt_t f) {
    return f.bits >= 1 && (f.is_signed ? int(f.bits) <= CFG::ACT_BITS : int(f.bits) < CFG::ACT_BITS);
}

// ---------------------------------------------------------------------------- the opcodes

// Patch rows in blocks: each row gathers C p segments of p contiguous pixels.
template <class CFG, int AW>
int op_patchify(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    constexpr int TB = CFG::TOKEN_BLOCK;
    constexpr int MAX_IN = CFG::MAX_IN;
    const ifield_t lim = CFG::MAX_IN; // C and p each fit one patch row, H / p and W / p the rows
    if (f[isa::F_PATCHIFY_CHANNELS] > lim || f[isa::F_PATCHIFY_PATCH] > lim ||
        f[isa::F_PATCHIFY_HEIGHT] > lim * CFG::MAX_ROWS || f[isa::F_PATCHIFY_WIDTH] > lim * CFG::MAX_ROWS)
        return isa::STATUS_OVER_LIMIT;
    const int ch = f[isa::F_PATCHIFY_CHANNELS], h = f[isa::F_PATCHIFY_HEIGHT];
    const int w = f[isa::F_PATCHIFY_WIDTH], p = f[isa::F_PATCHIFY_PATCH];
    // ordered so that no product can overflow
    if (ch < 1 || p < 1 || h < 1 || w < 1 || h % p || w % p || ch * p > CFG::MAX_IN || ch * p * p > CFG::MAX_IN ||
        h / p > CFG::MAX_ROWS || w / p > CFG::MAX_ROWS || (h / p) * (w / p) > CFG::MAX_ROWS)
        return isa::STATUS_OVER_LIMIT;
    constexpr int RB = cdiv(CFG::MAX_ROWS, TB);
    const int gw = w / p, n = (h / p) * gw, row = ch * p * p;
    const ap_uint<32> src = f[isa::F_PATCHIFY_SRC_REF];
    for (int t0 = 0; t0 < n; t0 += TB) {
        M3V_TRIPCOUNT(1, RB)
        const int nb = imin(TB, n - t0);
        for (int r = 0; r < nb; r++) {
            M3V_TRIPCOUNT(1, TB)
            const int py = (t0 + r) / gw, px = (t0 + r) % gw;
            for (int ci = 0; ci < ch * p; ci++) {
                M3V_TRIPCOUNT(1, MAX_IN)
                const int cc = ci / p, i = ci % p;
                const boff_t at = boff_t(2) * ((boff_t(cc) * h + py * p + i) * w + px * p);
                ddr_load<AW, 2, true, MAX_IN>(M3V_DDR_ARGS, src, at, p, B.x + r * row + ci * p);
            }
        }
        ddr_store16<AW, dec_sizes<CFG>::X_N>(M3V_DDR_ARGS, f[isa::F_PATCHIFY_DST_REF], boff_t(2) * t0 * row, nb * row,
                                             B.x);
    }
    return isa::STATUS_OK;
}

// A GEMM instruction decoded once for all its column groups.
struct gemm_job {
    int xmode, ymode, in_dim, out_dim, x_ld, y_ld, rows, q0, expert;
    bool w16, gelu, has_bias, residual, queued;
    fmt_t fmt, gelu_fmt, res_fmt;
    int res_a, res_b; // the fused add's shifts of the GEMM value and of the residual operand
    ap_uint<32> x_ref, y_ref, w_ref, bias_ref, shift_ref, q_ref, res_ref, tok_off, dst_off;
};

// The weight tile staged ahead by the previous GEMM: valid while nothing else used the halves;
// `half` holds column group 0 of `job`.
struct gemm_prefetch {
    bool valid;
    int half;
    gemm_job job;
};

// Decodes a GEMM's words and checks everything but its rows: isa::STATUS_OK, BAD_OPCODE or
// OVER_LIMIT (the order of the Python executor's checks).
template <class CFG>
int gemm_decode(const ifield_t f[], gemm_job &j) {
    constexpr int MAX_LD = 1 << 16; // keeps row offsets of the 40-bit address arithmetic exact
    const ap_uint<24> flags = f[0] >> 8;
    j.xmode = int(flags >> isa::XMODE_SHIFT) & 3;
    j.ymode = int(flags >> isa::YMODE_SHIFT) & 3;
    j.w16 = flags[isa::FLAG_W16];
    j.gelu = flags[isa::FLAG_GELU];
    j.has_bias = flags[isa::FLAG_BIAS];
    j.residual = flags[isa::FLAG_RESIDUAL];
    j.queued = j.xmode != isa::XMODE_DIRECT || j.ymode != isa::YMODE_DIRECT;
    j.in_dim = f[isa::F_GEMM_IN_DIM];
    j.out_dim = f[isa::F_GEMM_OUT_DIM];
    j.x_ld = f[isa::F_GEMM_X_LD];
    j.y_ld = f[isa::F_GEMM_Y_LD];
    j.rows = f[isa::F_GEMM_ROWS];
    j.expert = f[isa::F_GEMM_EXPERT];
    j.fmt = unpack_fmt(f[isa::F_GEMM_FMT]);
    j.gelu_fmt = unpack_fmt(f[isa::F_GEMM_GELU_FMT]);
    j.x_ref = f[isa::F_GEMM_X_REF];
    j.y_ref = f[isa::F_GEMM_Y_REF];
    j.w_ref = f[isa::F_GEMM_W_REF];
    j.bias_ref = f[isa::F_GEMM_BIAS_REF];
    j.shift_ref = f[isa::F_GEMM_SHIFT_REF];
    j.q_ref = f[isa::F_GEMM_QUEUE_REF];
    j.res_ref = f[isa::F_GEMM_RES_REF];
    j.res_fmt = unpack_fmt(f[isa::F_GEMM_RES_FMT]);
    j.res_a = int(ap_int<16>(f[isa::F_GEMM_RES_SHIFTS].range(15, 0)));
    j.res_b = int(ap_int<16>(f[isa::F_GEMM_RES_SHIFTS].range(31, 16)));
    j.tok_off = 0;
    j.dst_off = 0;
    j.q0 = 0;
    if (j.xmode > int(isa::XMODE_QUEUE) || j.ymode > int(isa::YMODE_SCATTER) || (j.residual && j.queued))
        return isa::STATUS_BAD_OPCODE;
    if (j.in_dim < 1 || j.in_dim > CFG::MAX_IN || j.out_dim < 1 || j.out_dim > CFG::MAX_OUT || j.x_ld < j.in_dim ||
        j.y_ld < j.out_dim || j.x_ld > MAX_LD || j.y_ld > MAX_LD || (j.w16 && CFG::WEIGHT_BITS < 16) ||
        (!j.w16 && CFG::WEIGHT_BITS < 8) || !fits_fmt<CFG>(j.fmt) || (j.gelu && !fits_fmt<CFG>(j.gelu_fmt)) ||
        (j.residual && !fits_fmt<CFG>(j.res_fmt)))
        return isa::STATUS_OVER_LIMIT;
    return isa::STATUS_OK;
}

// The same column group 0: every input of stage_tile for o0 = 0 is equal.
inline bool same_tile(const gemm_job &a, const gemm_job &b) {
    return a.w_ref == b.w_ref && a.bias_ref == b.bias_ref && a.shift_ref == b.shift_ref && a.in_dim == b.in_dim &&
           a.out_dim == b.out_dim && a.w16 == b.w16 && a.has_bias == b.has_bias;
}

// Fetch: the weights, biases and shifts of column group o0 into one half of the ping-pong
// (nothing when `on` is false or o0 is past the last group).
template <class CFG, int AW>
void gemm_fetch(M3V_DDR_PARAMS, M3V_TILE_PARAMS, bool on, const gemm_job &j, int o0) {
    if (!on || o0 >= j.out_dim)
        return;
    stage_tile<CFG, AW>(M3V_DDR_ARGS, M3V_TILE_ARGS, j.in_dim, j.out_dim, o0, imin(CFG::P_OUT, j.out_dim - o0), j.w16,
                        j.w_ref, 0, j.has_bias, j.bias_ref, 0, j.shift_ref, 0);
}

// Compute: column group o0 on the staged half; the rows stream through in blocks of
// TOKEN_BLOCK, gathered at load and scattered at store, the fused residual added on the way out.
template <class CFG, int AW>
void gemm_columns(M3V_DDR_PARAMS, dec_bufs<CFG> &B, M3V_TILE_PARAMS, const gemm_job &j, int o0, sat_cnt_t &sat_gelu) {
    constexpr int PO = CFG::P_OUT;
    constexpr int TB = CFG::TOKEN_BLOCK;
    constexpr int MAX_IN = CFG::MAX_IN;
    constexpr int RB = cdiv(CFG::MAX_ROWS, TB);
    const int nc = imin(PO, j.out_dim - o0);
    for (int r0 = 0; r0 < j.rows; r0 += TB) {
        M3V_TRIPCOUNT(1, RB)
        const int nb = imin(TB, j.rows - r0);
        for (int r = 0; r < nb; r++) {
            M3V_TRIPCOUNT(1, TB)
            B.src[r] = j.xmode == isa::XMODE_QUEUE ? j.q0 + r0 + r : r0 + r;
            B.dst[r] = j.ymode == isa::YMODE_QUEUE ? j.q0 + r0 + r : r0 + r;
        }
        if (j.xmode == isa::XMODE_GATHER)
            ddr_load<AW, 2, false, TB>(M3V_DDR_ARGS, j.q_ref, boff_t(j.tok_off) + 2 * (j.q0 + r0), nb, B.src);
        if (j.ymode == isa::YMODE_SCATTER)
            ddr_load<AW, 2, false, TB>(M3V_DDR_ARGS, j.q_ref, boff_t(j.dst_off) + 2 * (j.q0 + r0), nb, B.dst);
        // Gather at load time: row r of the block is memory row src(r).
        for (int r = 0; r < nb; r++) {
            M3V_TRIPCOUNT(1, TB)
            ddr_load<AW, 2, true, MAX_IN>(M3V_DDR_ARGS, j.x_ref, boff_t(2) * B.src[r] * j.x_ld, j.in_dim,
                                          B.x + r * j.in_dim);
        }
        run_tile<CFG>(B, M3V_TILE_ARGS, nb, j.in_dim, nc, j.in_dim, j.fmt, j.gelu, j.gelu_fmt, B.y, PO, 0, B.sat,
                      sat_gelu);
        if (j.residual) {
            // the input block is spent: it stages the residual operand's rows (direct mode: dst = r0 + r)
            for (int r = 0; r < nb; r++) {
                M3V_TRIPCOUNT(1, TB)
                ddr_load<AW, 2, true, PO>(M3V_DDR_ARGS, j.res_ref, boff_t(2) * (boff_t(B.dst[r]) * j.y_ld + o0), nc,
                                          B.x + r * PO);
            }
            residual_add<CFG>(nb, nc, B.y, PO, B.x, PO, j.res_a, j.res_b, j.res_fmt, B.y, PO, B.sat);
        }
        // Scatter at store time: row r goes to memory row dst(r).
        for (int r = 0; r < nb; r++) {
            M3V_TRIPCOUNT(1, TB)
            ddr_store16<AW, PO>(M3V_DDR_ARGS, j.y_ref, boff_t(2) * (boff_t(B.dst[r]) * j.y_ld + o0), nc,
                                B.y + r * PO);
        }
    }
}

// One step of the weight ping-pong: column group oc of job jc computes on the current half while
// group of of job jf (the next group, or the next GEMM's first) is fetched into the other. The
// two share no buffer and each has its own fault flag (cf for the fetch), so they form a dataflow
// region whose weight traffic hides under the compute.
template <class CFG, int AW>
void gemm_step(const ap_uint<AW> *wgt, ap_uint<AW> *arena, const ap_uint<AW> *in, ap_uint<AW> *out, ddr_ctx &c,
               ddr_ctx &cf, dec_bufs<CFG> &B, M3V_TILE_PARAMS, typename CFG::wgt_t wt_n[][CFG::P_IN][CFG::P_OUT],
               typename CFG::acc_t bias_n[CFG::P_OUT], int shift_n[CFG::P_OUT], bool fetch, const gemm_job &jf,
               int of, const gemm_job &jc, int oc, sat_cnt_t &sat_gelu) {
    M3V_HLS(dataflow)
    gemm_fetch<CFG, AW>(wgt, arena, in, out, cf, wt_n, bias_n, shift_n, fetch, jf, of);
    gemm_columns<CFG, AW>(M3V_DDR_ARGS, B, M3V_TILE_ARGS, jc, oc, sat_gelu);
}

// Word i (32 bits) of the program memory.
template <int AW>
ap_uint<32> prog_word(const ap_uint<AW> *prog, int i) {
    constexpr int PER = AW / 32;
    const ap_uint<AW> w = prog[i / PER];
    const int lo = (i % PER) * 32;
    return w.range(lo + 31, lo);
}

// The next GEMM whose weights may be fetched ahead: the first one after instruction pc that will
// run rows (queued GEMMs of idle experts do nothing and are passed over), its weights, biases and
// shifts in the read-only wgt space (so no instruction in between can change them), before any
// moe_gate (which stages its own tile) or end. Reads only; its faults are its own (a scratch
// context), the instruction itself checks everything again when it runs.
template <class CFG, int AW>
bool next_gemm(const ap_uint<AW> *prog, M3V_DDR_PARAMS, int pc, int n_instr, gemm_job &nj) {
    constexpr int W = isa::WORDS;
    constexpr int LOOKAHEAD = 2 * CFG::MAX_EXPERTS + 4; // an MoE layer's expert GEMMs and its neighbours
    ddr_ctx s = c;
    s.fault = false;
    ifield_t g[W];
    for (int k = pc + 1; k < n_instr && k <= pc + LOOKAHEAD; k++) {
        M3V_TRIPCOUNT(1, LOOKAHEAD)
        for (int i = 0; i < W; i++) {
            M3V_HLS(pipeline II=1)
            g[i] = prog_word<AW>(prog, W * (1 + k) + i);
        }
        const int op = int(g[0] & 0xFF);
        if (op == isa::OP_END || op == isa::OP_MOE_GATE)
            return false;
        if (op != isa::OP_GEMM)
            continue;
        if (gemm_decode<CFG>(g, nj) != isa::STATUS_OK)
            return false;
        if (nj.queued) {
            idx_t off2[2];
            ddr_load<AW, 2, false, 2>(wgt, arena, in, out, s, nj.q_ref, boff_t(2 * nj.expert), 2, off2);
            if (s.fault)
                return false;
            if (off2[1] <= off2[0])
                continue; // an idle expert: it fetches nothing, the next GEMM may
        }
        return ref_space(nj.w_ref) == isa::SPACE_WGT && ref_space(nj.shift_ref) == isa::SPACE_WGT &&
               (!nj.has_bias || ref_space(nj.bias_ref) == isa::SPACE_WGT);
    }
    return false;
}

// Weight-stationary per group of P_OUT output columns, the groups double-buffered: the tile of
// group g + 1 is fetched while group g's rows stream through tile g (gemm_step), and during the
// last group the first tile of the next GEMM (`nj`, when `has_next`: the next expert, or the
// layer after an attention or LayerNorm) goes into the free half; `pf` carries it to that GEMM,
// which starts computing at once when the tile is its own. Each group's weights are read once.
// With flag `residual` (direct modes only) the add that followed the GEMM is applied to each
// output block before it is stored.
template <class CFG, int AW>
int op_gemm(M3V_DDR_PARAMS, dec_bufs<CFG> &B, M3V_TILE_PARAMS, typename CFG::wgt_t wt2[][CFG::P_IN][CFG::P_OUT],
            typename CFG::acc_t bias_l2[CFG::P_OUT], int shift_l2[CFG::P_OUT], const ifield_t f[], gemm_prefetch &pf,
            bool has_next, const gemm_job &nj) {
    typedef dec_sizes<CFG> S;
    constexpr int PO = CFG::P_OUT;
    constexpr int OT = cdiv(CFG::MAX_OUT, PO);
    gemm_job j;
    const int st = gemm_decode<CFG>(f, j);
    if (st != isa::STATUS_OK)
        return st;
    const int rows_max = j.rows;
    if (j.queued) {
        // queue_shape = N | T k << 16 locates q_tok and q_dst; expert e's queue is
        // q_off[e] .. q_off[e+1] - 1, and `rows` bounds its length.
        const int e = j.expert;
        const int n_exp = int(f[isa::F_GEMM_QUEUE_SHAPE] & 0xFFFF), tk = int(f[isa::F_GEMM_QUEUE_SHAPE] >> 16);
        if (n_exp < 1 || n_exp > CFG::MAX_EXPERTS || e >= n_exp || tk < 1 || tk > S::TK)
            return isa::STATUS_OVER_LIMIT;
        queue_layout(n_exp, tk, j.tok_off, j.dst_off);
        if (!ddr_in_range(c, ref_space(j.q_ref), ref_off(j.q_ref), j.dst_off + 2 * tk))
            return isa::STATUS_OVER_LIMIT;
        idx_t off2[2];
        ddr_load<AW, 2, false, 2>(M3V_DDR_ARGS, j.q_ref, boff_t(2 * e), 2, off2);
        j.q0 = off2[0];
        j.rows = int(off2[1]) - int(off2[0]);
        if (j.rows < 0 || j.rows > rows_max || j.q0 + j.rows > tk)
            return isa::STATUS_OVER_LIMIT;
        if (j.rows == 0)
            return isa::STATUS_OK; // an idle expert fetches nothing and writes nothing (a prefetch stays)
    }
    if (j.rows < 1 || j.rows > CFG::MAX_ROWS)
        return isa::STATUS_OVER_LIMIT;
    // the residual operand [rows, out_dim] with row stride y_ld, as the Python executor reads it
    if (j.residual && !ddr_in_range(c, ref_space(j.res_ref), ref_off(j.res_ref), boff_t(2) * j.rows * j.y_ld))
        return isa::STATUS_OVER_LIMIT;
    sat_cnt_t sat_gelu = 0;
    ddr_ctx cf = c; // the fetches' own fault flags: this GEMM's (merged at the end) and the prefetch's
    cf.fault = false;
    ddr_ctx cn = cf;
    // group 0: staged ahead by the previous GEMM, or fetched now
    int h0 = 0;
    if (pf.valid && same_tile(pf.job, j))
        h0 = pf.half;
    else
        gemm_fetch<CFG, AW>(wgt, arena, in, out, cf, M3V_TILE_ARGS, true, j, 0);
    pf.valid = false;
    const int groups = (j.out_dim + PO - 1) / PO;
    for (int g = 0; g < groups; g++) {
        M3V_TRIPCOUNT(1, OT)
        const bool last = g == groups - 1;
        const gemm_job &jf = last ? nj : j;
        ddr_ctx &cx = last ? cn : cf;
        const bool fetch = !last || has_next;
        const int of = last ? 0 : (g + 1) * PO;
        if (((h0 + g) & 1) == 0)
            gemm_step<CFG, AW>(wgt, arena, in, out, c, cx, B, M3V_TILE_ARGS, wt2, bias_l2, shift_l2, fetch, jf, of, j,
                               g * PO, sat_gelu);
        else
            gemm_step<CFG, AW>(wgt, arena, in, out, c, cx, B, wt2, bias_l2, shift_l2, M3V_TILE_ARGS, fetch, jf, of, j,
                               g * PO, sat_gelu);
    }
    c.fault = c.fault || cf.fault;
    if (has_next && !cn.fault) {
        pf.valid = true;
        pf.half = (h0 + groups) & 1;
        pf.job = nj;
    }
    B.sat += sat_gelu;
    return isa::STATUS_OK;
}

// Row blocks: block row r is the CLS row (r = 0) or patch token r - 1, plus position row r.
template <class CFG, int AW>
int op_embed(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    constexpr int TB = CFG::TOKEN_BLOCK;
    constexpr int TBLOCKS = cdiv(CFG::MAX_TOKENS, TB);
    constexpr int MAX_DIM = CFG::MAX_DIM;
    const int np = f[isa::F_EMBED_PATCHES], d = f[isa::F_EMBED_DIM];
    const fmt_t fmt = unpack_fmt(f[isa::F_EMBED_FMT]);
    if (np < 1 || np + 1 > CFG::MAX_TOKENS || d < 1 || d > CFG::MAX_DIM || !fits_fmt<CFG>(fmt))
        return isa::STATUS_OVER_LIMIT;
    for (int r0 = 0; r0 <= np; r0 += TB) {
        M3V_TRIPCOUNT(1, TBLOCKS)
        const int nb = imin(TB, np + 1 - r0);
        for (int r = 0; r < nb; r++) {
            M3V_TRIPCOUNT(1, TB)
            const int g = r0 + r;
            if (g == 0)
                ddr_load<AW, 2, true, MAX_DIM>(M3V_DDR_ARGS, f[isa::F_EMBED_CLS_REF], 0, d, B.x + r * d);
            else
                ddr_load<AW, 2, true, MAX_DIM>(M3V_DDR_ARGS, f[isa::F_EMBED_X_REF], boff_t(2) * (g - 1) * d, d,
                                               B.x + r * d);
        }
        ddr_load<AW, 2, true, dec_sizes<CFG>::Y_N>(M3V_DDR_ARGS, f[isa::F_EMBED_POS_REF], boff_t(2) * r0 * d, nb * d,
                                                   B.y);
        residual_add<CFG>(nb, d, B.x, d, B.y, d, as_signed(f[isa::F_EMBED_A_SHIFT]),
                          as_signed(f[isa::F_EMBED_B_SHIFT]), fmt, B.y, d, B.sat);
        ddr_store16<AW, dec_sizes<CFG>::Y_N>(M3V_DDR_ARGS, f[isa::F_EMBED_Y_REF], boff_t(2) * r0 * d, nb * d, B.y);
    }
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_layernorm(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    constexpr int TB = CFG::TOKEN_BLOCK;
    constexpr int TBLOCKS = cdiv(CFG::MAX_TOKENS, TB);
    constexpr int MAX_DIM = CFG::MAX_DIM;
    const int rows = f[isa::F_LAYERNORM_ROWS], d = f[isa::F_LAYERNORM_DIM];
    const fmt_t fmt = unpack_fmt(f[isa::F_LAYERNORM_FMT]);
    const ap_uint<64> eps = (ap_uint<64>(f[isa::F_LAYERNORM_EPS_HI]) << 32) | ap_uint<64>(f[isa::F_LAYERNORM_EPS_LO]);
    if (rows < 1 || rows > CFG::MAX_TOKENS || d < 1 || d > MAX_DIM || !fits_fmt<CFG>(fmt) || (eps >> 61) != 0)
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, true, MAX_DIM>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_GAMMA_REF], 0, d, B.gamma);
    ddr_load<AW, 1, true, MAX_DIM>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_SHIFT_REF], 0, d, B.shift);
    for (int j = 0; j < d; j++) {
        M3V_TRIPCOUNT(1, MAX_DIM)
        B.bias[j] = typename CFG::acc_t(ddr_load64<AW>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_BETA_REF], boff_t(8 * j)));
    }
    ln_args a;
    a.dim = d;
    a.x_ld = d;
    a.z_ld = d;
    a.eps = ln_eps_t(eps);
    a.beta_shift = as_signed(f[isa::F_LAYERNORM_BETA_SHIFT]);
    a.out_fmt = fmt;
    sat_cnt_t sat_norm = 0;
    for (int r0 = 0; r0 < rows; r0 += TB) {
        M3V_TRIPCOUNT(1, TBLOCKS)
        const int nb = imin(TB, rows - r0);
        a.rows = nb;
        ddr_load<AW, 2, true, S::X_N>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_X_REF], boff_t(2) * r0 * d, nb * d, B.x);
        layernorm<CFG>(a, B.x, B.gamma, B.bias, B.shift, B.y, sat_norm, B.sat);
        ddr_store16<AW, S::Y_N>(M3V_DDR_ARGS, f[isa::F_LAYERNORM_Y_REF], boff_t(2) * r0 * d, nb * d, B.y);
    }
    B.sat += sat_norm;
    return isa::STATUS_OK;
}

// Scores of the nq staged queries against keys [0, nk) of the K tile (row stride dh):
// s[l sld + j] = requant(sum_c q[l, c] k[j, c], shift, fmt); with `first`, m[l] starts at key 0,
// and every score raises m[l] when larger.
template <class CFG>
void tile_scores(const typename CFG::act_t qb[][CFG::P_IN][CFG::ATT_QT], const typename CFG::act_t kb[], int nq,
                 int nk, int dh, int shift, const fmt_t &fmt, typename CFG::act_t s[], int sld, bool track, bool first,
                 typename CFG::act_t m[], sat_cnt_t &sat) {
    typedef typename CFG::act_t act_t;
    typedef typename CFG::acc_t acc_t;
    constexpr int PI = CFG::P_IN;
    constexpr int QT = CFG::ATT_QT;
    constexpr int DKT = cdiv(CFG::MAX_DH, PI);
    constexpr int MAX_KEYS = CFG::MAX_KEYS;
    acc_t acc[QT];
    M3V_HLS(array_partition variable=acc complete)
    act_t kv[PI];
    M3V_HLS(array_partition variable=kv complete)
    for (int j = 0; j < nk; j++) {
        M3V_TRIPCOUNT(1, MAX_KEYS)
        for (int l = 0; l < QT; l++) {
            M3V_HLS(unroll)
            acc[l] = 0;
        }
        for (int kt = 0; kt < cdiv(dh, PI); kt++) {
            M3V_TRIPCOUNT(1, DKT)
            M3V_HLS(pipeline II=1)
            for (int i = 0; i < PI; i++) {
                M3V_HLS(unroll)
                const int cc = kt * PI + i;
                kv[i] = cc < dh ? act_t(kb[j * dh + cc]) : act_t(0);
            }
            for (int l = 0; l < QT; l++) {
                M3V_HLS(unroll)
                acc_t sum = 0;
                for (int i = 0; i < PI; i++) {
                    M3V_HLS(unroll)
                    sum += kv[i] * qb[kt][i][l];
                }
                acc[l] += sum;
            }
        }
        for (int l = 0; l < QT; l++) {
            M3V_HLS(unroll)
            if (l < nq) {
                const act_t v = requant<CFG::ACT_BITS>(acc[l], shift, fmt, sat);
                s[l * sld + j] = v;
                if (track)
                    m[l] = ((first && j == 0) || v > m[l]) ? v : m[l];
            }
        }
    }
}

// Per head and query tile, two passes over key tiles of kt_n keys (K and V of one tile on chip;
// one tile, loaded once per head, when they fit): pass 1 the row maxima, pass 2 the exact sums
// S = sum p and A = sum p v, then one reciprocal per row. Sums and maxima do not depend on the
// key order, so the result is the untiled one bit for bit.
template <class CFG, int AW>
int op_attention(M3V_DDR_PARAMS, dec_bufs<CFG> &B, typename CFG::act_t qb[][CFG::P_IN][CFG::ATT_QT],
                 typename CFG::act_t sc[], const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    constexpr int PI = CFG::P_IN;
    constexpr int QT = CFG::ATT_QT;
    constexpr int MAX_DH = CFG::MAX_DH;
    constexpr int MAX_HEADS = CFG::MAX_HEADS;
    constexpr int MAX_KEYS = CFG::MAX_KEYS;
    constexpr int PASSES = 2 * cdiv(CFG::MAX_TOKENS * MAX_DH, S::KV_N);
    constexpr int QTILES = CFG::MAX_TOKENS;
    constexpr int PV_N = QT * MAX_DH;
    const int t = f[isa::F_ATTENTION_TOKENS], d = f[isa::F_ATTENTION_DIM], heads = f[isa::F_ATTENTION_HEADS];
    const fmt_t fmt = unpack_fmt(f[isa::F_ATTENTION_FMT]), sfmt = unpack_fmt(f[isa::F_ATTENTION_SCORE_FMT]);
    if (t < 1 || t > CFG::MAX_TOKENS || d < 1 || d > CFG::MAX_DIM || heads < 1 || heads > CFG::MAX_HEADS ||
        d % heads || !fits_fmt<CFG>(fmt) || !fits_fmt<CFG>(sfmt))
        return isa::STATUS_OVER_LIMIT;
    const int dh = d / heads;
    const int score_shift = as_signed(f[isa::F_ATTENTION_SCORE_SHIFT]);
    const int out_shift = as_signed(f[isa::F_ATTENTION_OUT_SHIFT]);
    const ap_uint<32> qkv = f[isa::F_ATTENTION_QKV_REF];
    // keys per tile: what the K / V buffers hold, and what leaves room for one score row
    const int kt_n = imin(imin(t, S::KV_N / dh), S::SC_N);
    const int nkt = (t + kt_n - 1) / kt_n;
    // the instruction's query tile, within the lanes and the score buffer
    const int qf = f[isa::F_ATTENTION_Q_TILE] > ap_uint<32>(QT) ? QT : int(f[isa::F_ATTENTION_Q_TILE]);
    const int qt = imin(qf < 1 ? QT : qf, S::SC_N / kt_n);
    const boff_t row_b = boff_t(2) * 3 * d; // bytes per qkv row
    sat_cnt_t sat_score = 0, sat_again = 0;
    for (int h = 0; h < heads; h++) {
        M3V_TRIPCOUNT(1, MAX_HEADS)
        const int col = h * dh;
        int loaded = -1; // the key tile in kb / vb
        for (int q0 = 0; q0 < t; q0 += qt) {
            M3V_TRIPCOUNT(1, QTILES)
            const int nq = imin(qt, t - q0);
            // Stage the query tile. Lanes past nq are never read out, channels past dh meet zero keys.
            for (int l = 0; l < nq; l++) {
                M3V_TRIPCOUNT(1, QT)
                ddr_load<AW, 2, true, MAX_DH>(M3V_DDR_ARGS, qkv, row_b * (q0 + l) + 2 * col, dh, B.y);
                for (int cc = 0; cc < dh; cc++) {
                    M3V_TRIPCOUNT(1, MAX_DH)
                    M3V_HLS(pipeline II=1)
                    qb[cc / PI][cc % PI][l] = B.y[cc];
                }
            }
            for (int l = 0; l < QT; l++) {
                M3V_HLS(unroll)
                B.psum[l] = 0;
            }
            for (int i = 0; i < qt * dh; i++) {
                M3V_TRIPCOUNT(1, PV_N)
                M3V_HLS(pipeline II=1)
                B.pv[i] = 0;
            }
            // pass 1 in key order, pass 2 in reverse: the tile on chip at a pass boundary is reused
            for (int p = 0; p < 2 * nkt; p++) {
                M3V_TRIPCOUNT(2, PASSES)
                const bool pass1 = p < nkt;
                const int kt = pass1 ? p : 2 * nkt - 1 - p;
                const int k0 = kt * kt_n, nk = imin(kt_n, t - k0);
                if (loaded != kt) {
                    for (int j = 0; j < nk; j++) {
                        M3V_TRIPCOUNT(1, MAX_KEYS)
                        ddr_load<AW, 2, true, MAX_DH>(M3V_DDR_ARGS, qkv, row_b * (k0 + j) + 2 * (d + col), dh,
                                                      B.kb + j * dh);
                        ddr_load<AW, 2, true, MAX_DH>(M3V_DDR_ARGS, qkv, row_b * (k0 + j) + 2 * (2 * d + col), dh,
                                                      B.vb + j * dh);
                    }
                    loaded = kt;
                }
                if (pass1)
                    tile_scores<CFG>(qb, B.kb, nq, nk, dh, score_shift, sfmt, sc, kt_n, true, kt == 0, B.m, sat_score);
                else if (nkt > 1) // recomputed scores are the same, their saturations already counted
                    tile_scores<CFG>(qb, B.kb, nq, nk, dh, score_shift, sfmt, sc, kt_n, false, false, B.m, sat_again);
                if (!pass1)
                    softmax_av_partial<CFG>(nq, nk, dh, sc, kt_n, B.vb, dh, B.m, sfmt.frac, B.psum, B.pv);
            }
            for (int l = 0; l < nq; l++) {
                M3V_TRIPCOUNT(1, QT)
                recip_t r;
                int rk;
                recip_int(B.psum[l], r, rk);
                for (int cc = 0; cc < dh; cc++) {
                    M3V_TRIPCOUNT(1, MAX_DH)
                    M3V_HLS(pipeline II=1)
                    B.y[cc] = av_out<CFG>(B.pv[l * dh + cc], r, rk, out_shift, fmt, B.sat);
                }
                ddr_store16<AW, MAX_DH>(M3V_DDR_ARGS, f[isa::F_ATTENTION_Y_REF], boff_t(2) * ((q0 + l) * d + col), dh,
                                        B.y);
            }
        }
    }
    B.sat += sat_score;
    return isa::STATUS_OK;
}

template <class CFG, int AW>
int op_add(M3V_DDR_PARAMS, dec_bufs<CFG> &B, const ifield_t f[]) {
    typedef dec_sizes<CFG> S;
    constexpr int TB = CFG::TOKEN_BLOCK;
    constexpr int TBLOCKS = cdiv(CFG::MAX_TOKENS, TB);
    const int rows = f[isa::F_ADD_ROWS], cols = f[isa::F_ADD_COLS];
    const fmt_t fmt = unpack_fmt(f[isa::F_ADD_FMT]);
    if (rows < 1 || rows > CFG::MAX_TOKENS || cols < 1 || cols > CFG::MAX_DIM || !fits_fmt<CFG>(fmt))
        return isa::STATUS_OVER_LIMIT;
    for (int r0 = 0; r0 < rows; r0 += TB) {
        M3V_TRIPCOUNT(1, TBLOCKS)
        const int nb = imin(TB, rows - r0);
        const boff_t at = boff_t(2) * r0 * cols;
        ddr_load<AW, 2, true, S::X_N>(M3V_DDR_ARGS, f[isa::F_ADD_A_REF], at, nb * cols, B.x);
        ddr_load<AW, 2, true, S::Y_N>(M3V_DDR_ARGS, f[isa::F_ADD_B_REF], at, nb * cols, B.y);
        residual_add<CFG>(nb, cols, B.x, cols, B.y, cols, as_signed(f[isa::F_ADD_A_SHIFT]),
                          as_signed(f[isa::F_ADD_B_SHIFT]), fmt, B.y, cols, B.sat);
        ddr_store16<AW, S::Y_N>(M3V_DDR_ARGS, f[isa::F_ADD_Y_REF], at, nb * cols, B.y);
    }
    return isa::STATUS_OK;
}

// Logits, top-k and scores per token block; the routing of every token stays on chip (T k
// entries) for the queues.
template <class CFG, int AW>
int op_moe_gate(M3V_DDR_PARAMS, dec_bufs<CFG> &B, M3V_TILE_PARAMS, const ifield_t f[], int task) {
    typedef dec_sizes<CFG> S;
    constexpr int PO = CFG::P_OUT;
    constexpr int TB = CFG::TOKEN_BLOCK;
    constexpr int TBK = S::TBK;
    constexpr int TBLOCKS = cdiv(CFG::MAX_TOKENS, TB);
    constexpr int GT = cdiv(CFG::MAX_EXPERTS, PO);
    constexpr int TKM = S::TK;
    const ap_uint<24> flags = f[0] >> 8;
    const bool w16 = flags[isa::FLAG_W16];
    const int t = f[isa::F_MOE_GATE_TOKENS], d = f[isa::F_MOE_GATE_DIM];
    const int n = int(f[isa::F_MOE_GATE_EXPERTS_K] & 0xFFFF), k = int(f[isa::F_MOE_GATE_EXPERTS_K] >> 16);
    const fmt_t fmt = unpack_fmt(f[isa::F_MOE_GATE_FMT]);
    if (t < 1 || t > CFG::MAX_TOKENS || d < 1 || d > CFG::MAX_IN || n < 1 || n > CFG::MAX_EXPERTS || k < 1 ||
        k > n || k > CFG::MAX_K || !fits_fmt<CFG>(fmt) || (w16 && CFG::WEIGHT_BITS < 16) ||
        (!w16 && CFG::WEIGHT_BITS < 8))
        return isa::STATUS_OVER_LIMIT;
    const boff_t wo = boff_t(task) * f[isa::F_MOE_GATE_W_STRIDE];
    const boff_t bo = boff_t(task) * f[isa::F_MOE_GATE_BIAS_STRIDE];
    const boff_t so = boff_t(task) * f[isa::F_MOE_GATE_SHIFT_STRIDE];
    const bool one_tile = n <= PO; // then the gate's tile is staged once for all blocks
    sat_cnt_t sat_gelu = 0;
    for (int r0 = 0; r0 < t; r0 += TB) {
        M3V_TRIPCOUNT(1, TBLOCKS)
        const int nb = imin(TB, t - r0);
        ddr_load<AW, 2, true, S::X_N>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_X_REF], boff_t(2) * r0 * d, nb * d, B.x);
        for (int o0 = 0; o0 < n; o0 += PO) {
            M3V_TRIPCOUNT(1, GT)
            const int nc = imin(PO, n - o0);
            if (!one_tile || r0 == 0)
                stage_tile<CFG, AW>(M3V_DDR_ARGS, M3V_TILE_ARGS, d, n, o0, nc, w16, f[isa::F_MOE_GATE_W_REF], wo,
                                    true, f[isa::F_MOE_GATE_BIAS_REF], bo, f[isa::F_MOE_GATE_SHIFT_REF], so);
            run_tile<CFG>(B, M3V_TILE_ARGS, nb, d, nc, d, fmt, false, fmt, B.y, n, o0, B.sat, sat_gelu);
        }
        ddr_store16<AW, S::Y_N>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_LOGITS_REF], boff_t(2) * r0 * n, nb * n, B.y);
        moe_gate<CFG>(nb, n, k, int(fmt.frac), B.y, n, B.idx_blk, B.score_blk, B.sat);
        for (int i = 0; i < nb * k; i++) {
            M3V_TRIPCOUNT(1, TBK)
            M3V_HLS(pipeline II=1)
            B.idx[r0 * k + i] = B.idx_blk[i];
        }
        ddr_store16<AW, S::TBK>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_IDX_REF], boff_t(2) * r0 * k, nb * k, B.idx_blk);
        ddr_store16<AW, S::TBK>(M3V_DDR_ARGS, f[isa::F_MOE_GATE_SCORE_REF], boff_t(2) * r0 * k, nb * k, B.score_blk);
    }
    expert_queues<CFG>(t, k, n, B.idx, B.q_tok, B.q_slot, B.q_off);
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
    constexpr int TB = CFG::TOKEN_BLOCK;
    constexpr int TBK = S::TBK;
    constexpr int TBLOCKS = cdiv(CFG::MAX_TOKENS, TB);
    const int t = f[isa::F_MOE_COMBINE_TOKENS], k = f[isa::F_MOE_COMBINE_K], d = f[isa::F_MOE_COMBINE_DIM];
    const fmt_t fmt = unpack_fmt(f[isa::F_MOE_COMBINE_FMT]);
    const ap_uint<24> flags = f[0] >> 8;
    const bool residual = flags[isa::FLAG_RESIDUAL];
    const fmt_t res_fmt = unpack_fmt(f[isa::F_MOE_COMBINE_RES_FMT]);
    const int res_a = int(ap_int<16>(f[isa::F_MOE_COMBINE_RES_SHIFTS].range(15, 0)));
    const int res_b = int(ap_int<16>(f[isa::F_MOE_COMBINE_RES_SHIFTS].range(31, 16)));
    if (t < 1 || t > CFG::MAX_TOKENS || k < 1 || k > CFG::MAX_K || d < 1 || d > CFG::MAX_DIM || !fits_fmt<CFG>(fmt) ||
        (residual && !fits_fmt<CFG>(res_fmt)))
        return isa::STATUS_OVER_LIMIT;
    ddr_load<AW, 2, false, S::TK>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_IDX_REF], 0, t * k, B.idx);
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
    for (int r0 = 0; r0 < t; r0 += TB) {
        M3V_TRIPCOUNT(1, TBLOCKS)
        const int nb = imin(TB, t - r0);
        ddr_load<AW, 2, false, S::TBK>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_SCORE_REF], boff_t(2) * r0 * k, nb * k,
                                       B.score_blk);
        ddr_load<AW, 2, true, S::X_N>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_Y_REF], boff_t(2) * r0 * k * d, nb * k * d,
                                      B.x);
        for (int i = 0; i < nb * k; i++) {
            M3V_TRIPCOUNT(1, TBK)
            M3V_HLS(pipeline II=1)
            B.idx_blk[i] = B.idx[r0 * k + i];
        }
        moe_combine<CFG>(nb, k, d, B.score_blk, B.x, B.idx_blk, B.shift, true, fmt, B.y, B.sat);
        if (residual) {
            // the expert outputs are spent: the input block stages the residual operand's rows
            ddr_load<AW, 2, true, S::X_N>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_RES_REF], boff_t(2) * r0 * d, nb * d, B.x);
            residual_add<CFG>(nb, d, B.y, d, B.x, d, res_a, res_b, res_fmt, B.y, d, B.sat);
        }
        ddr_store16<AW, S::Y_N>(M3V_DDR_ARGS, f[isa::F_MOE_COMBINE_OUT_REF], boff_t(2) * r0 * d, nb * d, B.y);
    }
    return isa::STATUS_OK;
}

// ---------------------------------------------------------------------------- the sequencer

// Runs the Program; returns its status (isa::STATUS_*). n_done: instructions completed.
template <class CFG, class BLD>
int run_program(const ap_uint<BLD::AXI_W> *prog, const ap_uint<BLD::AXI_W> *wgt, ap_uint<BLD::AXI_W> *arena,
                const ap_uint<BLD::AXI_W> *in, ap_uint<BLD::AXI_W> *out, int task, ap_uint<32> &n_done,
                sat_cnt_t &sat) {
    constexpr int AW = BLD::AXI_W;
    constexpr int W = isa::WORDS;
    typedef dec_sizes<CFG> S;
    static_assert(S::BYTES == BLD::ONCHIP_BYTES, "the kernel's buffers differ from project.decoder_buffers()");
    static dec_bufs<CFG> B;
    // P_IN x P_OUT weights, P_IN x ATT_QT queries and P_IN scores are read per cycle.
    static typename CFG::wgt_t wt[S::KT][CFG::P_IN][CFG::P_OUT];
    M3V_HLS(array_partition variable=wt complete dim=2)
    M3V_HLS(array_partition variable=wt complete dim=3)
    static typename CFG::acc_t bias_l[CFG::P_OUT];
    M3V_HLS(array_partition variable=bias_l complete)
    static int shift_l[CFG::P_OUT];
    M3V_HLS(array_partition variable=shift_l complete)
    // the other half of the GEMM's weight ping-pong
    static typename CFG::wgt_t wt2[S::KT][CFG::P_IN][CFG::P_OUT];
    M3V_HLS(array_partition variable=wt2 complete dim=2)
    M3V_HLS(array_partition variable=wt2 complete dim=3)
    static typename CFG::acc_t bias_l2[CFG::P_OUT];
    M3V_HLS(array_partition variable=bias_l2 complete)
    static int shift_l2[CFG::P_OUT];
    M3V_HLS(array_partition variable=shift_l2 complete)
    static typename CFG::act_t qb[S::DKT][CFG::P_IN][CFG::ATT_QT];
    M3V_HLS(array_partition variable=qb complete dim=2)
    M3V_HLS(array_partition variable=qb complete dim=3)
    static typename CFG::act_t sc[S::SC_N];
    M3V_HLS(array_partition variable=sc cyclic factor=CFG::P_IN)
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
    gemm_prefetch pf;
    pf.valid = false;
    pf.half = 0;
    gemm_job nj;
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
        else if (op == isa::OP_GEMM) {
            const bool has_next = next_gemm<CFG, AW>(prog, M3V_DDR_ARGS, pc, n_instr, nj);
            st = op_gemm<CFG, AW>(M3V_DDR_ARGS, B, M3V_TILE_ARGS, wt2, bias_l2, shift_l2, f, pf, has_next, nj);
        }
        else if (op == isa::OP_EMBED)
            st = op_embed<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_LAYERNORM)
            st = op_layernorm<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_ATTENTION)
            st = op_attention<CFG, AW>(M3V_DDR_ARGS, B, qb, sc, f);
        else if (op == isa::OP_ADD)
            st = op_add<CFG, AW>(M3V_DDR_ARGS, B, f);
        else if (op == isa::OP_MOE_GATE) {
            pf.valid = false; // the gate stages its tile into the first half
            st = op_moe_gate<CFG, AW>(M3V_DDR_ARGS, B, M3V_TILE_ARGS, f, task);
        }
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
#undef M3V_TILE_ARGS
#undef M3V_TILE_PARAMS

} // namespace m3v

#endif // M3V_DECODER_H
