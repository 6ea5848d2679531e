// eng_gemm: the GEMM engine of the accelerator: `gemm` (every row mode; flags gelu, w16, bias,
// residual) and `moe_combine` (with residual), on the shared compute unit, bit-exact with
// compiler/program_exec.py (numerics.gemm, gemm_gelu, moe_combine, residual_add).
//
// GEMM dataflow:
//   x: when the instruction's rows fit the resident store (rows * ceil(K / P_IN) entries of P_IN
//   activations, half of buffers.activations), every row src(r) is read once (port 0, one
//   segment of K elements each) and stays on chip; otherwise each pass over the rows reloads
//   them a block of SLOTS rows at a time into two banks.
//   weights: groups of up to GT output tiles (as many as fit one half of the weight store, two
//   halves: the next group loads while this one computes; int8 weights two chunks an entry). Per group, port 1 reads the biases
//   and shifts, then the weight rows k (one segment over the group's columns each, a chunk per
//   tile) are dealt to ports 1, 2, 3 (3 only without residual) by k mod NW; a K chunk of a tile
//   may go to the compute unit as soon as its rows are in.
//   for each group: for each block of up to SLOTS rows: for each tile of the group: for each K
//     chunk kc: one parameter tile, then one beat per row of the block (slot = row in the block).
//   The outputs come back in that order; each becomes one write segment of the tile's channels
//   at row dst(r), after residual_add with the matching residual row (flag residual: port 3
//   reads a block's residual rows over the group's columns into one of two block buffers;
//   add_unit with b = 0 and shifts 0 is the identity otherwise). Output rows go to the write
//   channels of ports 2, 0, 3 by dst(r) mod 3 when rows start on beat boundaries.
// moe_combine: blocks of up to SLOTS tokens in two buffers (the next block loads while this one
// computes): port 1 reads the block's scores and indices, ports 0 and 1 its expert outputs (rows
// t·k + j, contiguous: one full-row segment each, even rows on port 0, odd on port 1); then per
// token, output tile and top-k slot j one beat, each with its own parameter tile, whose combine
// shift is the expert's; a block computes while it still loads (a token once its rows are in).
// The residual (port 3) is one segment per row.
//
// Ports: 0 reads x rows / even expert-output rows and the queue table; 1 reads biases, shifts,
// weight rows, scores, indices and odd expert-output rows; 2 reads weight rows; 3 reads the
// residual, or without it weight rows. Outputs: port 2, or ports 2, 0, 3 by row mod 3 (PORTS >= 4).
// Operand checks follow program_exec.py (over_limit before any store; undefined row modes and
// residual with a non-direct row mode: bad_opcode). Refused as over_limit where the datapath has
// no room, as the HLS kernel does: a format that is not signed of 1..ACT_W bits (fmt, gelu_fmt,
// the combine's fmt), in_dim outside 1..max(max_dim, max_hidden), out_dim 0, x_ld < in_dim,
// y_ld < out_dim, w16 with weight_bits < 16, a queue longer than max_tokens or past the table,
// a combine with tokens, k or dim 0, k > max_k, dim > max_dim, an expert index >= max_experts,
// or a negative combine shift among the experts 0..max(idx).
`include "m3v_isa.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"
`include "m3v_mem.svh"

module eng_gemm #(
    parameter int DW        = `M3V_AXI_W,
    parameter int PORTS     = `M3V_AXI_PORTS,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 8,
    parameter int MAX_BURST = 16,
    parameter int SLOT_W    = $clog2(`M3V_SLOTS)
) (
    input  logic                    clk,
    input  logic                    rst_n,
    input  logic                    start,
    input  logic [511:0]            rec,
    input  logic [31:0]             task_idx,
    input  logic [63:0]             base_wgt, base_arena, base_in, base_out,
    input  logic [31:0]             sz_wgt, sz_arena, sz_in, sz_out,
    output logic                    done,
    output logic [3:0]              status,
    output logic                    active,
    output logic [PORTS-1:0]        m_arvalid,
    input  logic [PORTS-1:0]        m_arready,
    output logic [PORTS*ADDR_W-1:0] m_araddr,
    output logic [PORTS*8-1:0]      m_arlen,
    output logic [PORTS*3-1:0]      m_arsize,
    output logic [PORTS*2-1:0]      m_arburst,
    output logic [PORTS*ID_W-1:0]   m_arid,
    input  logic [PORTS-1:0]        m_rvalid,
    output logic [PORTS-1:0]        m_rready,
    input  logic [PORTS*DW-1:0]     m_rdata,
    input  logic [PORTS*ID_W-1:0]   m_rid,
    input  logic [PORTS-1:0]        m_rlast,
    input  logic [PORTS*2-1:0]      m_rresp,
    output logic [PORTS-1:0]        m_awvalid,
    input  logic [PORTS-1:0]        m_awready,
    output logic [PORTS*ADDR_W-1:0] m_awaddr,
    output logic [PORTS*8-1:0]      m_awlen,
    output logic [PORTS*3-1:0]      m_awsize,
    output logic [PORTS*2-1:0]      m_awburst,
    output logic [PORTS*ID_W-1:0]   m_awid,
    output logic [PORTS-1:0]        m_wvalid,
    input  logic [PORTS-1:0]        m_wready,
    output logic [PORTS*DW-1:0]     m_wdata,
    output logic [PORTS*DW/8-1:0]   m_wstrb,
    output logic [PORTS-1:0]        m_wlast,
    input  logic [PORTS-1:0]        m_bvalid,
    output logic [PORTS-1:0]        m_bready,
    input  logic [PORTS*ID_W-1:0]   m_bid,
    input  logic [PORTS*2-1:0]      m_bresp,
    output logic                                     cu_w_valid,
    input  logic                                     cu_w_ready,
    output logic [`M3V_P_IN*`M3V_P_OUT*`M3V_W_W-1:0] cu_w_weights,
    output logic [`M3V_P_OUT*`M3V_ACC_W-1:0]         cu_w_bias,
    output logic [`M3V_P_OUT*`M3V_SHIFT_W-1:0]       cu_w_shift,
    output logic [`M3V_OB_W-1:0]                     cu_w_out_bits,
    output logic [`M3V_CSH_W-1:0]                    cu_w_comb_shift,
    output logic                                     cu_w_combine,
    output logic                                     cu_w_gelu,
    output logic [6:0]                               cu_w_gelu_in_frac,
    output logic [6:0]                               cu_w_gelu_out_frac,
    output logic [`M3V_OB_W-1:0]                     cu_w_gelu_out_bits,
    output logic                                     cu_x_valid,
    input  logic                                     cu_x_ready,
    output logic                                     cu_x_wnext,
    output logic [`M3V_P_IN*`M3V_X_W-1:0]            cu_x_act,
    output logic [`M3V_P_OUT*`M3V_ACT_W-1:0]         cu_x_eout,
    output logic [`M3V_SCORE_W-1:0]                  cu_x_score,
    output logic [SLOT_W-1:0]                        cu_x_slot,
    output logic                                     cu_x_first,
    output logic                                     cu_x_last,
    output logic [`M3V_TAG_W-1:0]                    cu_x_tag,
    input  logic                                     cu_o_valid,
    output logic                                     cu_o_ready,
    input  logic [`M3V_P_OUT*`M3V_ACT_W-1:0]         cu_o_data,
    input  logic [`M3V_TAG_W-1:0]                    cu_o_tag,
    output logic                                     cu_w_raw,
    input  logic                                     cu_o_raw_valid,
    output logic                                     cu_o_raw_ready,
    input  logic [`M3V_P_OUT*`M3V_ACC_W-1:0]         cu_o_raw_acc,
    input  logic [`M3V_TAG_W-1:0]                    cu_o_raw_tag
);
    // raw compute-unit rows (w_raw) belong to the attention engine; this engine makes none
    assign cu_w_raw       = 1'b0;
    assign cu_o_raw_ready = 1'b0;
    logic unused_raw;
    assign unused_raw = &{1'b0, cu_o_raw_valid, cu_o_raw_acc, cu_o_raw_tag};
    localparam int P_IN    = `M3V_P_IN;
    localparam int P_OUT   = `M3V_P_OUT;
    localparam int ACT_W   = `M3V_ACT_W;
    localparam int W_W     = `M3V_W_W;
    localparam int ACC_W   = `M3V_ACC_W;
    localparam int SHIFT_W = `M3V_SHIFT_W;
    localparam int CSH_W   = `M3V_CSH_W;
    localparam int OB_W    = `M3V_OB_W;
    localparam int SCORE_W = `M3V_SCORE_W;
    localparam int SLOTS   = `M3V_SLOTS;
    localparam int K_MAX   = (`M3V_MAX_DIM > `M3V_MAX_HIDDEN) ? `M3V_MAX_DIM : `M3V_MAX_HIDDEN;
    localparam int KS_MAX  = (K_MAX + P_IN - 1) / P_IN;
    // weight store entries per half: what half of buffers.weights holds, at least one whole-K tile
    localparam int WS_FIT  = `M3V_BUF_WEIGHTS / (2 * P_IN * P_OUT * ((W_W + 7) / 8));
    localparam int WS_HALF = WS_FIT > KS_MAX ? WS_FIT : KS_MAX;
    localparam int MAX_T   = `M3V_MAX_TOKENS;
    localparam int MAX_E   = `M3V_MAX_EXPERTS;
    localparam int MAX_K   = `M3V_MAX_K;
    localparam int CH0     = 2 * ((P_IN > P_OUT) ? P_IN : P_OUT);   // x chunk, expert-output row
    localparam int CH1     = (2 * P_OUT > 8) ? 2 * P_OUT : 8;       // weight row, one bias
    localparam int CH3     = 2 * P_OUT;                             // residual row
    localparam int CW0     = $clog2(CH0 + 1);
    localparam int CW1     = $clog2(CH1 + 1);
    localparam int CW3     = $clog2(CH3 + 1);
    localparam int CWW     = $clog2(CH3 + 1);
    localparam int XBB     = 2 * SLOTS * KS_MAX;                    // x banks: 2 blocks of SLOTS rows
    // resident x rows: half of buffers.activations, in entries of P_IN activations
    localparam int XRES    = `M3V_BUF_ACTIVATIONS / 2 / (2 * P_IN);
    localparam int XBD     = XRES > XBB ? XRES : XBB;
    localparam int XAW     = $clog2(XBD);
    localparam int XRW     = $clog2(XRES + 1);
    localparam int KAW     = $clog2(KS_MAX);
    localparam int WKW     = $clog2(2 * WS_HALF);
    localparam int TAW     = $clog2(MAX_T);
    localparam int SBD     = SLOTS * MAX_K;
    localparam int OT_MAX  = (`M3V_MAX_DIM + P_OUT - 1) / P_OUT;
    localparam int SAW     = $clog2(2 * SBD);
    localparam int EAW     = $clog2(MAX_E);
    // widths of the operands the checks bound (narrow multiplier operands)
    localparam int KBW     = $clog2(K_MAX + 1);
    localparam int KSW     = $clog2(KS_MAX + 1);
    localparam int MKW     = $clog2(MAX_K + 1);
    localparam int DMW     = $clog2(`M3V_MAX_DIM + 1);
    // x rows, weight rows and combine rows are long contiguous segments: bursts up to 64 beats
    // (the 4 KB rule still cuts them) keep a port streaming with the DDR's outstanding-read limit
    localparam int RD_BURST = MAX_BURST > 64 ? MAX_BURST : 64;

    // ================================================================ decode (rec is stable until done)
    function automatic logic [31:0] word(input int k);
        word = rec[32*k +: 32];
    endfunction

    function automatic logic [63:0] addr_of(input logic [31:0] r);
        addr_of = m3v_addr(r, base_wgt, base_arena, base_in, base_out);
    endfunction

    function automatic logic fits(input logic [31:0] r, input logic [65:0] nb);
        fits = !nb[65] && m3v_fits(r, nb[64:0], sz_wgt, sz_arena, sz_in, sz_out);
    endfunction

    // a format the compute unit produces: signed, 1..ACT_W bits
    function automatic logic fmt_ok(input logic is_signed, input logic [5:0] bits);
        fmt_ok = is_signed && bits != 0 && 32'(bits) <= 32'(ACT_W);
    endfunction

    // a residual format the executor accepts: it fits the 16-bit activations
    function automatic logic res_fmt_ok(input logic is_signed, input logic [5:0] bits);
        res_fmt_ok = bits != 0 && (is_signed ? bits <= 6'd16 : bits <= 6'd15);
    endfunction

    // a fraction that fits the GELU's 7-bit signed format fields
    function automatic logic frac_ok(input logic [1:0] top);
        frac_ok = top == 2'b00 || top == 2'b11;
    endfunction

    // The engine's products are control arithmetic (checks once per instruction, addresses) and
    // are shift-and-add over the narrow operand, without a multiplier cell: synthesis would give
    // each a DSP slice, and the DSPs are the MAC array's. Callers narrow b to the bits its bound
    // leaves (the contract's limits, checked before the product is used); the unused terms are
    // constant zero and drop out.
    function automatic logic [63:0] mul_sa(input logic [63:0] a, input logic [31:0] b);
        mul_sa = '0;
        for (int i = 0; i < 32; i++) mul_sa = mul_sa + ((a << i) & {64{b[i]}});
    endfunction

    // the low 32 bits of a * b (an address offset the checks bound below 2^32)
    function automatic logic [31:0] mul_lo32(input logic [31:0] a, input logic [31:0] b);
        mul_lo32 = '0;
        for (int i = 0; i < 32; i++) mul_lo32 = mul_lo32 + ((a << i) & {32{b[i]}});
    endfunction

    // 2 * a * b for the fits checks: exact when a or b is below 2^16; when both are not, the
    // product is at least 2^33, beyond every space (sizes are 32-bit), and 2^64 stands in for it:
    // the check fails as it would with the full product
    function automatic logic [65:0] prod2(input logic [31:0] a, input logic [31:0] b);
        logic [31:0] n, w;
        n = a[31:16] == 16'd0 ? a : b;
        w = a[31:16] == 16'd0 ? b : a;
        if (n[31:16] != 16'd0) prod2 = 66'd1 << 64;
        else prod2 = {2'b00, mul_sa(64'(w), {16'd0, n[15:0]})} << 1;
    endfunction

    function automatic logic [31:0] min32(input logic [31:0] a, input logic [31:0] b);
        min32 = a < b ? a : b;
    endfunction

    function automatic logic [31:0] align64(input logic [31:0] n);
        align64 = (n + 32'd63) & ~32'd63;
    endfunction

    logic [7:0]  op;
    logic        is_gemm, g_gelu, g_w16, g_bias, g_res, c_res;
    logic [1:0]  xm, ym;
    logic [31:0] g_x, g_y, g_w, g_b, g_s, g_rows, g_k, g_n, g_xld, g_yld, g_fmt, g_gfmt, g_q, g_e, g_qs;
    logic [31:0] g_rref, g_rsh, g_rfmt;
    logic [31:0] c_sc, c_ix, c_y, c_sh, c_out, c_t, c_k, c_d, c_fmt, c_rref, c_rsh, c_rfmt;
    logic [31:0] n_exp, entries, tok_off, dst_off, q_bytes;
    logic        queued;

    always_comb begin
        op      = rec[7:0];
        is_gemm = op == 8'(`M3V_ISA_OP_GEMM);
        g_gelu  = rec[8 + `M3V_ISA_FLAG_GELU];
        g_w16   = rec[8 + `M3V_ISA_FLAG_W16];
        g_bias  = rec[8 + `M3V_ISA_FLAG_BIAS];
        g_res   = rec[8 + `M3V_ISA_FLAG_RESIDUAL];
        c_res   = rec[8 + `M3V_ISA_FLAG_RESIDUAL];
        xm      = rec[8 + `M3V_ISA_XMODE_SHIFT +: 2];
        ym      = rec[8 + `M3V_ISA_YMODE_SHIFT +: 2];
        g_x     = word(`M3V_ISA_F_GEMM_X_REF);
        g_y     = word(`M3V_ISA_F_GEMM_Y_REF);
        g_w     = word(`M3V_ISA_F_GEMM_W_REF);
        g_b     = word(`M3V_ISA_F_GEMM_BIAS_REF);
        g_s     = word(`M3V_ISA_F_GEMM_SHIFT_REF);
        g_rows  = word(`M3V_ISA_F_GEMM_ROWS);
        g_k     = word(`M3V_ISA_F_GEMM_IN_DIM);
        g_n     = word(`M3V_ISA_F_GEMM_OUT_DIM);
        g_xld   = word(`M3V_ISA_F_GEMM_X_LD);
        g_yld   = word(`M3V_ISA_F_GEMM_Y_LD);
        g_fmt   = word(`M3V_ISA_F_GEMM_FMT);
        g_gfmt  = word(`M3V_ISA_F_GEMM_GELU_FMT);
        g_q     = word(`M3V_ISA_F_GEMM_QUEUE_REF);
        g_e     = word(`M3V_ISA_F_GEMM_EXPERT);
        g_qs    = word(`M3V_ISA_F_GEMM_QUEUE_SHAPE);
        g_rref  = word(`M3V_ISA_F_GEMM_RES_REF);
        g_rsh   = word(`M3V_ISA_F_GEMM_RES_SHIFTS);
        g_rfmt  = word(`M3V_ISA_F_GEMM_RES_FMT);
        c_sc    = word(`M3V_ISA_F_MOE_COMBINE_SCORE_REF);
        c_ix    = word(`M3V_ISA_F_MOE_COMBINE_IDX_REF);
        c_y     = word(`M3V_ISA_F_MOE_COMBINE_Y_REF);
        c_sh    = word(`M3V_ISA_F_MOE_COMBINE_SHIFT_REF);
        c_out   = word(`M3V_ISA_F_MOE_COMBINE_OUT_REF);
        c_t     = word(`M3V_ISA_F_MOE_COMBINE_TOKENS);
        c_k     = word(`M3V_ISA_F_MOE_COMBINE_K);
        c_d     = word(`M3V_ISA_F_MOE_COMBINE_DIM);
        c_fmt   = word(`M3V_ISA_F_MOE_COMBINE_FMT);
        c_rref  = word(`M3V_ISA_F_MOE_COMBINE_RES_REF);
        c_rsh   = word(`M3V_ISA_F_MOE_COMBINE_RES_SHIFTS);
        c_rfmt  = word(`M3V_ISA_F_MOE_COMBINE_RES_FMT);
        queued  = xm != 2'd0 || ym != 2'd0;
        n_exp   = {16'd0, g_qs[15:0]};
        entries = {16'd0, g_qs[31:16]};
        tok_off = align64(2 * (n_exp + 32'd1));
        dst_off = tok_off + align64(2 * entries);
        q_bytes = dst_off + align64(2 * entries);
    end

    // ================================================================ control
    typedef enum logic [4:0] {
        S_IDLE, S_G0, S_QOFF, S_G1, S_LSRC, S_LDST, S_G2, S_GRUN, S_GDRAIN,
        S_C0, S_CIDX, S_CSH0, S_CSH, S_C1, S_CRUN, S_DONE
    } state_t;
    state_t state;

    logic [3:0]  st_code;
    logic        issued;                 // the pre-pass segment of this state went out
    logic [31:0] lo, hi, rows_e, cnt_pre, max_src, max_dst, max_idx;
    logic        neg_shift;
    logic        run_g, run_c, fin_g, fin_c;
    logic [15:0] src_list [0:MAX_T-1];
    logic [15:0] dst_list [0:MAX_T-1];
    logic signed [CSH_W:0] cshift [0:MAX_E-1];   // combine shifts, sign kept for the check

    // reader / writer handshakes (declared here, driven below)
    logic              r0_sv, r0_sr, r0_cv, r0_cr, r0_cl, r0_idle;
    logic [ADDR_W-1:0] r0_sa;
    logic [31:0]       r0_sb;
    logic [CW0-1:0]    r0_sc;
    logic [CH0*8-1:0]  r0_cd;
    logic              r1_sv, r1_sr, r1_cv, r1_cr, r1_cl, r1_idle;
    logic [ADDR_W-1:0] r1_sa;
    logic [31:0]       r1_sb;
    logic [CW1-1:0]    r1_sc;
    logic [CH1*8-1:0]  r1_cd;
    logic              r3_sv, r3_sr, r3_cv, r3_cr, r3_cl, r3_idle;
    logic [ADDR_W-1:0] r3_sa;
    logic [31:0]       r3_sb;
    logic [CW3-1:0]    r3_sc;
    logic [CH3*8-1:0]  r3_cd;
    logic              r2_sv, r2_sr, r2_cv, r2_cr, r2_cl, r2_idle;
    logic [CH1*8-1:0]  r2_cd;
    logic              wr_sv, wr_sr, wr_idle;
    logic [ADDR_W-1:0] wr_sa;
    logic [CWW-1:0]    wr_sb;
    logic [CH3*8-1:0]  wr_sd;

    logic r0_cfire, r1_cfire;
    logic [ADDR_W-1:0] r2_sa;
    logic [31:0]       r2_sb;
    logic [CW1-1:0]    r2_sc;
    assign r0_cfire = r0_cv && r0_cr;
    assign r1_cfire = r1_cv && r1_cr;

    // ---- checks of S_G2 (every operand of a gemm that runs)
    logic        g_hw_ok, g_fits;
    logic [31:0] x_rows, y_rows;
    logic [65:0] x_nb, y_nb;
    // the weight matrix's bytes; exact whenever g_k <= K_MAX, which every use also requires
    logic [63:0] w_nb;
    always_comb begin
        w_nb    = mul_sa(64'(g_n), 32'(g_k[KBW-1:0])) << g_w16;
        case (xm)
            2'd0: x_rows = g_rows;
            2'd1: x_rows = max_src + 32'd1;
            default: x_rows = hi;
        endcase
        case (ym)
            2'd0: y_rows = g_rows;
            2'd1: y_rows = hi;
            default: y_rows = max_dst + 32'd1;
        endcase
        x_nb    = prod2(x_rows, g_xld);
        y_nb    = prod2(y_rows, g_yld);
        g_hw_ok = g_k != 0 && g_k <= 32'(K_MAX) && g_n != 0 && g_xld >= g_k && g_yld >= g_n &&
                  fmt_ok(g_fmt[16], g_fmt[5:0]) && (!g_gelu || (fmt_ok(g_gfmt[16], g_gfmt[5:0]) && frac_ok(g_fmt[15:14]) && frac_ok(g_gfmt[15:14]))) &&
                  W_W >= 8 && (!g_w16 || W_W >= 16);
        g_fits = fits(g_x, x_nb);
        g_fits = g_fits && fits(g_w, {2'b00, w_nb});
        if (g_bias) g_fits = g_fits && fits(g_b, {34'd0, g_n} << 3);
        g_fits = g_fits && fits(g_s, {34'd0, g_n}) && m3v_writable(g_y);
        g_fits = g_fits && fits(g_y, y_nb);
        // a residual gemm is never queued (S_G0 refuses it), so its y rows are g_rows
        if (g_res) g_fits = g_fits && fits(g_rref, y_nb) && res_fmt_ok(g_rfmt[16], g_rfmt[5:0]);
    end

    // ---- checks of S_C0
    logic c_ok;
    logic [31:0] c_tk;
    logic [65:0] c_nb2;     // 2 * c_t * c_d, exact whenever c_d <= MAX_DIM (c_ok requires it)
    always_comb begin
        c_nb2 = {1'b0, mul_sa(64'(c_t), 32'(c_d[DMW-1:0])), 1'b0};
        // exact whenever c_k <= MAX_K, which c_ok and every later use require
        c_tk = 32'(mul_sa(64'(c_t), 32'(c_k[MKW-1:0])));
        c_ok = c_t != 0 && c_k != 0 && c_d != 0 && c_k <= 32'(MAX_K) && c_d <= 32'(`M3V_MAX_DIM) &&
               fmt_ok(c_fmt[16], c_fmt[5:0]) &&
               c_t < 32'h10000 && c_k < 32'h10000 &&
               fits(c_sc, {34'd0, c_tk} << 1) && fits(c_ix, {34'd0, c_tk} << 1) &&
               fits(c_y, {1'b0, mul_sa(64'(c_tk), 32'(c_d[DMW-1:0])), 1'b0}) && m3v_writable(c_out) &&
               fits(c_out, c_nb2) && (!c_res || (fits(c_rref, c_nb2) && res_fmt_ok(c_rfmt[16], c_rfmt[5:0])));
    end

    // ---- pre-pass segments (port 0: queue table; port 1: combine indices and shifts)
    logic              pre0_sv, pre1_sv;
    logic [63:0]       pre0_a, pre1_a;
    logic [31:0]       pre0_b, pre1_b;
    logic [3:0]        pre0_c, pre1_c;
    always_comb begin
        pre0_sv = 1'b0;
        pre0_a  = addr_of(g_q);
        pre0_b  = 32'd4;
        pre0_c  = 4'd2;
        case (state)
            S_QOFF: begin
                pre0_sv = !issued;
                pre0_a  = addr_of(g_q) + 64'(2 * g_e);
            end
            S_LSRC: begin
                pre0_sv = !issued;
                pre0_a  = addr_of(g_q) + 64'(tok_off) + 64'(2 * lo);
                pre0_b  = 2 * rows_e;
            end
            S_LDST: begin
                pre0_sv = !issued;
                pre0_a  = addr_of(g_q) + 64'(dst_off) + 64'(2 * lo);
                pre0_b  = 2 * rows_e;
            end
            default: ;
        endcase
        pre1_sv = 1'b0;
        pre1_a  = addr_of(c_ix);
        pre1_b  = c_tk << 1;
        pre1_c  = 4'd2;
        if (state == S_CIDX) pre1_sv = !issued;
        if (state == S_CSH) begin
            pre1_sv = !issued;
            pre1_a  = addr_of(c_sh);
            pre1_b  = max_idx + 32'd1;
            pre1_c  = 4'd1;
        end
    end

    logic [15:0] pre0_v, pre1_v;
    assign pre0_v = r0_cd[15:0];
    assign pre1_v = r1_cd[15:0];

    always_ff @(posedge clk) begin
        if (state == S_LSRC && r0_cfire) src_list[cnt_pre[TAW-1:0]] <= pre0_v;
        if (state == S_LDST && r0_cfire) dst_list[cnt_pre[TAW-1:0]] <= pre0_v;
        if (state == S_CSH && r1_cfire) cshift[cnt_pre[EAW-1:0]] <= (CSH_W+1)'(csh_clamp(r1_cd[7:0]));
    end

    // int8 combine shift -> CSH_W+1 signed bits (shifts beyond 2^CSH_W - 1 clamp; the contract
    // refuses them anyway)
    function automatic logic signed [CSH_W:0] csh_clamp(input logic [7:0] v);
        logic signed [8:0] s;
        s = 9'(signed'(v));
        if (s > 9'sd0 && s > 9'((1 << CSH_W) - 1)) csh_clamp = (CSH_W+1)'((1 << CSH_W) - 1);
        else if (s < 0) csh_clamp = -(CSH_W+1)'(1);
        else csh_clamp = (CSH_W+1)'(s);
    endfunction

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            state     <= S_IDLE;
            st_code   <= '0;
            issued    <= 1'b0;
            done      <= 1'b0;
            status    <= '0;
            lo        <= '0;
            hi        <= '0;
            rows_e    <= '0;
            cnt_pre   <= '0;
            max_src   <= '0;
            max_dst   <= '0;
            max_idx   <= '0;
            neg_shift <= 1'b0;
        end else begin
            done <= 1'b0;
            if ((pre0_sv && r0_sr) || (pre1_sv && r1_sr)) issued <= 1'b1;
            case (state)
                S_IDLE: if (start) begin
                    issued  <= 1'b0;
                    cnt_pre <= '0;
                    max_src <= '0;
                    max_dst <= '0;
                    max_idx <= '0;
                    neg_shift <= 1'b0;
                    state   <= is_gemm ? S_G0 : S_C0;
                end
                // ---------------------------------------------------- gemm
                S_G0: begin
                    lo     <= '0;
                    hi     <= g_rows;
                    rows_e <= g_rows;
                    if (xm == 2'd3 || ym == 2'd3 || (g_res && queued)) begin
                        st_code <= `M3V_ISA_STATUS_BAD_OPCODE;
                        state   <= S_DONE;
                    end else if (queued) begin
                        if (g_e >= n_exp || !fits(g_q, {34'd0, q_bytes})) begin
                            st_code <= `M3V_ISA_STATUS_OVER_LIMIT;
                            state   <= S_DONE;
                        end else state <= S_QOFF;
                    end else if (g_rows == 0) begin
                        st_code <= `M3V_ISA_STATUS_OK;
                        state   <= S_DONE;
                    end else state <= S_G2;
                end
                S_QOFF: if (r0_cfire) begin
                    if (r0_cl) begin
                        hi    <= {16'd0, pre0_v};
                        state <= S_G1;
                    end else lo <= {16'd0, pre0_v};
                end
                S_G1: begin
                    issued  <= 1'b0;
                    cnt_pre <= '0;
                    rows_e  <= hi > lo ? hi - lo : 32'd0;
                    if (hi <= lo) begin
                        st_code <= (xm == 2'd0 && !fits(g_x, x_nb)) ? `M3V_ISA_STATUS_OVER_LIMIT
                                                                                   : `M3V_ISA_STATUS_OK;
                        state <= S_GDRAIN;
                    end else if (hi > entries || hi - lo > g_rows || hi - lo > 32'(MAX_T)) begin
                        st_code <= `M3V_ISA_STATUS_OVER_LIMIT;
                        state   <= S_GDRAIN;
                    end else if (xm == 2'd1) state <= S_LSRC;
                    else if (ym == 2'd2) state <= S_LDST;
                    else state <= S_G2;
                end
                S_LSRC: if (r0_cfire) begin
                    cnt_pre <= cnt_pre + 32'd1;
                    if ({16'd0, pre0_v} > max_src) max_src <= {16'd0, pre0_v};
                    if (r0_cl) begin
                        issued  <= 1'b0;
                        cnt_pre <= '0;
                        state   <= ym == 2'd2 ? S_LDST : S_G2;
                    end
                end
                S_LDST: if (r0_cfire) begin
                    cnt_pre <= cnt_pre + 32'd1;
                    if ({16'd0, pre0_v} > max_dst) max_dst <= {16'd0, pre0_v};
                    if (r0_cl) state <= S_G2;
                end
                S_G2: begin
                    if (!g_hw_ok || !g_fits) begin
                        st_code <= `M3V_ISA_STATUS_OVER_LIMIT;
                        state   <= S_GDRAIN;
                    end else state <= S_GRUN;
                end
                // a refused or empty gemm: the weights read ahead during the pre-pass come in first
                S_GDRAIN: if (!wl_busy) state <= S_DONE;
                S_GRUN: if (fin_g) begin
                    st_code <= `M3V_ISA_STATUS_OK;
                    state   <= S_DONE;
                end
                // ---------------------------------------------------- moe_combine
                S_C0: begin
                    if (!c_ok) begin
                        st_code <= `M3V_ISA_STATUS_OVER_LIMIT;
                        state   <= S_DONE;
                    end else state <= S_CIDX;
                end
                S_CIDX: if (r1_cfire) begin
                    if ({16'd0, pre1_v} > max_idx) max_idx <= {16'd0, pre1_v};
                    if (r1_cl) state <= S_CSH0;
                end
                S_CSH0: begin
                    issued  <= 1'b0;
                    cnt_pre <= '0;
                    if (max_idx >= 32'(MAX_E) || !fits(c_sh, {34'd0, max_idx + 32'd1})) begin
                        st_code <= `M3V_ISA_STATUS_OVER_LIMIT;
                        state   <= S_DONE;
                    end else state <= S_CSH;
                end
                S_CSH: if (r1_cfire) begin
                    cnt_pre <= cnt_pre + 32'd1;
                    if (r1_cd[7]) neg_shift <= 1'b1;
                    if (r1_cl) state <= S_C1;
                end
                S_C1: begin
                    if (neg_shift) begin
                        st_code <= `M3V_ISA_STATUS_OVER_LIMIT;
                        state   <= S_DONE;
                    end else state <= S_CRUN;
                end
                S_CRUN: if (fin_c) begin
                    st_code <= `M3V_ISA_STATUS_OK;
                    state   <= S_DONE;
                end
                S_DONE: begin
                    done   <= 1'b1;
                    status <= st_code;
                    state  <= S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    assign run_g = state == S_GRUN;
    assign run_c = state == S_CRUN;

    // ================================================================ gemm: weight loader (ports 1, 2, 3)
    // The weights go on chip a group of up to GT output tiles at a time (as many as the K extent
    // lets into one half of the weight store), into one of two halves, so the next group loads
    // while the tile pusher serves this one. A group's weight row k is one segment of the group's
    // width (long bursts), cut into one P_OUT-weight chunk per tile. The rows are dealt to NW
    // ports (k mod NW: ports 1, 2 and, without residual, 3), each with its own receiver; two
    // receivers that would write the same bank in a cycle are served in port order (the other
    // waits a cycle). Port 1 first reads the group's biases and shifts, so the tile pusher may
    // start on a group while its rows still arrive: a K chunk goes out once its rows are in. When
    // N <= P_OUT (one tile spans the matrix) the whole matrix is one segment on port 1, one chunk
    // per row.
    localparam int  GT    = 4;                          // output tiles per weight group, at most
    localparam int  GTW   = $clog2(GT + 1);
    localparam int  BMW   = $clog2(2 * GT);
    localparam int  NWP   = 3;                          // weight receivers: ports 1, 2, 3
    localparam logic [1:0] WL_W = 2'd0, WL_B = 2'd1, WL_S = 2'd2, WL_D = 2'd3;

    logic [31:0]              ks, nw, gcols;
    // int8 weights go two chunks to a store entry (its low and high P_OUT bytes) when the store's
    // weights are 16 bits or wider: twice the K extent per half, larger groups
    logic                     wpk;
    assign wpk = W_W >= 16 && !g_w16;
    logic [GTW-1:0]           gsz;                      // tiles per group of this instruction
    logic                     wl_whole;
    assign ks       = (g_k + 32'(P_IN - 1)) / 32'(P_IN);
    assign wl_whole = g_n <= 32'(P_OUT);
    assign nw       = wl_whole ? 32'd1 : (g_res ? 32'd2 : 32'd3);
    assign gcols    = 32'(gsz) * 32'(P_OUT);

    always_ff @(posedge clk)
        if (state == S_G0) gsz <= GTW'(min32(32'(GT), (wpk ? 32'(2 * WS_HALF) : 32'(WS_HALF)) / (ks == 0 ? 32'd1 : ks)));

    // The weights do not depend on the queue: when the instruction's weight operands pass their
    // checks, the loader starts during the queue pre-pass (S_QOFF .. S_G2). A refusal found
    // after that waits in S_GDRAIN for the loader's group to come in.
    logic wl_early, wl_en;
    always_ff @(posedge clk)
        if (state == S_G0)
            wl_early <= g_hw_ok && fits(g_w, {2'b00, w_nb}) &&
                        (!g_bias || fits(g_b, {34'd0, g_n} << 3)) && fits(g_s, {34'd0, g_n});
    assign wl_en = run_g || (wl_early && (state == S_QOFF || state == S_G1 || state == S_LSRC ||
                                          state == S_LDST || state == S_G2 || state == S_GDRAIN));

    logic                     wl_busy, wl_half, pu_half, ld_done;
    logic [1:0]               wt_full, wt_bs;
    logic [31:0]              wl_g0, wl_gw;
    logic [63:0]              wl_base, w_row;
    assign w_row   = 64'(g_n) << g_w16;                  // bytes of one weight row (K index)
    assign wl_gw   = min32(32'(gsz) * 32'(P_OUT), g_n - wl_g0);
    assign wl_base = addr_of(g_w) + (64'(wl_g0) << g_w16);

    logic wl_start;
    assign wl_start = wl_en && state != S_GDRAIN && !wl_busy && !wt_full[wl_half] && !wt_bs[wl_half] && wl_g0 < g_n;

    // ---- per weight port p (port p + 1): issuer and receiver of rows k = p, p + nw, ...
    logic [1:0]           i_ph [0:NWP-1];
    logic [31:0]          i_k  [0:NWP-1];
    logic [63:0]          i_a  [0:NWP-1];
    logic [NWP-1:0]       i_sv, i_sr;
    logic [1:0]           rc_ph [0:NWP-1];
    logic [31:0]          rc_k  [0:NWP-1];
    logic [31:0]          rc_t  [0:NWP-1];
    logic [31:0]          rc_tb [0:NWP-1];
    logic [31:0]          rc_o;
    logic [NWP-1:0]       rc_cv, rc_cl, rc_cr, rc_fire, rc_want, rc_grant;
    logic [CH1*8-1:0]     rc_cd [0:NWP-1];
    logic [P_OUT*W_W-1:0] rc_row [0:NWP-1];
    logic [$clog2(P_IN)-1+1:0] rc_bank [0:NWP-1];
    logic [WKW-1:0]       rc_wa [0:NWP-1];
    logic [31:0]          rc_wl [0:NWP-1];        // chunk index in the half, before packing
    logic [P_OUT*ACC_W-1:0]   b_stage, b_next;
    logic [P_OUT*SHIFT_W-1:0] s_stage, s_next;
    logic [P_OUT*ACC_W-1:0]   bias_mem  [0:2*GT-1];
    logic [P_OUT*SHIFT_W-1:0] shift_mem [0:2*GT-1];

    assign rc_cv    = {r3_cv, r2_cv, r1_cv};
    assign rc_cl    = {r3_cl, r2_cl, r1_cl};
    assign rc_cd[0] = r1_cd;
    assign rc_cd[1] = r2_cd;
    assign rc_cd[2] = (CH1*8)'(r3_cd);
    assign i_sr    = {r3_sr, r2_sr, r1_sr};

    always_comb begin
        for (int p = 0; p < NWP; p++) begin
            i_sv[p]   = wl_en && wl_busy && i_ph[p] != WL_D;
            rc_want[p] = wl_en && wl_busy && rc_ph[p] == WL_W && rc_cv[p];
            rc_bank[p] = ($clog2(P_IN)+1)'(rc_k[p] % 32'(P_IN));
            rc_wl[p]   = rc_tb[p] + rc_k[p] / 32'(P_IN);
            rc_wa[p]   = WKW'((wl_half ? 32'(WS_HALF) : 32'd0) + (wpk ? rc_wl[p] >> 1 : rc_wl[p]));
            for (int o = 0; o < P_OUT; o++)
                rc_row[p][o*W_W +: W_W] = g_w16 ? W_W'(signed'(rc_cd[p][o*16 +: 16])) : W_W'(signed'(rc_cd[p][o*8 +: 8]));
        end
        // one write per bank and cycle: a lower port first
        for (int p = 0; p < NWP; p++) begin
            rc_grant[p] = 1'b1;
            for (int q = 0; q < p; q++)
                if (rc_want[q] && rc_bank[q] == rc_bank[p]) rc_grant[p] = 1'b0;
            rc_cr[p]   = wl_en && wl_busy && rc_ph[p] != WL_D && (rc_ph[p] != WL_W || rc_grant[p]);
            rc_fire[p] = rc_cv[p] && rc_cr[p];
        end
    end
    assign ld_done = wl_en && wl_busy && rc_ph[0] == WL_D && rc_ph[1] == WL_D && rc_ph[2] == WL_D;

    function automatic logic [SHIFT_W-1:0] sh_clamp(input logic [7:0] v);
        logic signed [8:0] s;
        s = 9'(signed'(v));
        if (s > 9'((1 << (SHIFT_W - 1)) - 1)) sh_clamp = SHIFT_W'((1 << (SHIFT_W - 1)) - 1);
        else if (s < -9'(1 << (SHIFT_W - 1))) sh_clamp = SHIFT_W'(-(1 << (SHIFT_W - 1)));
        else sh_clamp = SHIFT_W'(s);
    endfunction

    // bias / shift lane o of tile t: staged, a tile's entry written when its last lane (or the
    // group's last value) arrives
    logic           rc_tile_end;
    logic [BMW-1:0] rc_bm;
    assign rc_tile_end = rc_o == 32'(P_OUT - 1) || r1_cl;
    assign rc_bm       = BMW'(32'(wl_half) * 32'(GT) + rc_t[0]);

    always_comb begin
        b_next = b_stage;
        s_next = s_stage;
        // one lane per o (a variable part-select would scale rc_o by a multiplier)
        for (int o = 0; o < P_OUT; o++)
            if (rc_o == 32'(o)) begin
                b_next[o*ACC_W +: ACC_W]     = ACC_W'(r1_cd[63:0]);
                s_next[o*SHIFT_W +: SHIFT_W] = sh_clamp(r1_cd[7:0]);
            end
    end

    always_ff @(posedge clk) begin
        if (rc_fire[0] && rc_ph[0] == WL_B) begin
            b_stage <= rc_tile_end ? '0 : b_next;
            if (rc_tile_end) bias_mem[rc_bm] <= b_next;
        end
        if (rc_fire[0] && rc_ph[0] == WL_S) begin
            s_stage <= rc_tile_end ? '0 : s_next;
            if (rc_tile_end) shift_mem[rc_bm] <= s_next;
        end
        if (state == S_IDLE) begin
            b_stage <= '0;
            s_stage <= '0;
        end
    end

    logic bs_done;
    assign bs_done = rc_fire[0] && rc_ph[0] == WL_S && r1_cl;

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            wl_busy <= 1'b0;
            wl_half <= 1'b0;
            wl_g0   <= '0;
            rc_o     <= '0;
            for (int p = 0; p < NWP; p++) begin
                i_ph[p] <= WL_D;
                rc_ph[p] <= WL_D;
                i_k[p]  <= '0;
                i_a[p]  <= '0;
                rc_k[p]  <= '0;
                rc_t[p]  <= '0;
                rc_tb[p] <= '0;
            end
        end else begin
            if (wl_start) begin
                wl_busy <= 1'b1;
                rc_o     <= '0;
                for (int p = 0; p < NWP; p++) begin
                    i_k[p]  <= 32'(p);
                    i_a[p]  <= wl_base + mul_sa(w_row, 32'(p));
                    rc_k[p]  <= 32'(p);
                    rc_t[p]  <= '0;
                    rc_tb[p] <= '0;
                    // port 1 starts with the biases and shifts; a port without rows is done
                    if (p == 0) begin
                        i_ph[p] <= g_bias ? WL_B : WL_S;
                        rc_ph[p] <= g_bias ? WL_B : WL_S;
                    end else begin
                        i_ph[p] <= (32'(p) < nw && 32'(p) < g_k) ? WL_W : WL_D;
                        rc_ph[p] <= (32'(p) < nw && 32'(p) < g_k) ? WL_W : WL_D;
                    end
                end
            end
            for (int p = 0; p < NWP; p++) begin
                if (i_sv[p] && i_sr[p]) begin
                    case (i_ph[p])
                        WL_W: begin
                            i_k[p] <= i_k[p] + nw;
                            i_a[p] <= i_a[p] + mul_sa(w_row, 32'(nw[1:0]));
                            if (wl_whole || i_k[p] + nw >= g_k) i_ph[p] <= WL_D;
                        end
                        WL_B:    i_ph[p] <= WL_S;
                        default: i_ph[p] <= WL_W;
                    endcase
                end
                if (rc_fire[p]) begin
                    case (rc_ph[p])
                        WL_W: begin
                            if (wl_whole || rc_cl[p]) begin
                                // the row is complete: this port's next row
                                rc_t[p]  <= '0;
                                rc_tb[p] <= '0;
                                rc_k[p]  <= rc_k[p] + nw;
                                if (rc_k[p] + nw >= g_k) rc_ph[p] <= WL_D;
                            end else begin
                                rc_t[p]  <= rc_t[p] + 32'd1;
                                rc_tb[p] <= rc_tb[p] + ks;
                            end
                        end
                        default: begin      // port 1: biases, then shifts, P_OUT lanes per tile
                            rc_o <= rc_o + 32'd1;
                            if (rc_tile_end) begin
                                rc_o     <= '0;
                                rc_t[p]  <= rc_t[p] + 32'd1;
                            end
                            if (rc_cl[p]) begin
                                rc_o     <= '0;
                                rc_t[p]  <= '0;
                                rc_ph[p] <= rc_ph[p] == WL_B ? WL_S : WL_W;
                            end
                        end
                    endcase
                end
            end
            if (ld_done) begin
                wl_busy <= 1'b0;
                wl_half <= !wl_half;
                wl_g0   <= wl_g0 + gcols;
            end
        end
    end

    // weight store: bank i holds rows k = kc * P_IN + i; half h, tile t of its group, chunk kc at
    // h * WS_HALF + t * ks + kc
    logic [P_IN*P_OUT*W_W-1:0] tq_w;
    logic                      tq_load;
    logic [31:0]               pu_tb;
    logic [KAW-1:0]            pu_kc;
    logic [WKW-1:0]            pu_wa;
    logic [31:0]               pu_wl;
    assign pu_wl = pu_tb + 32'(pu_kc);
    assign pu_wa = WKW'((pu_half ? 32'(WS_HALF) : 32'd0) + (wpk ? pu_wl >> 1 : pu_wl));
    // one of the two packed int8 chunks of an entry, sign-extended to the store's weights
    function automatic logic [P_OUT*W_W-1:0] unpack8(input logic [P_OUT*W_W-1:0] e, input logic upper);
        for (int o = 0; o < P_OUT; o++)
            unpack8[o*W_W +: W_W] = W_W'(signed'(e[(32'(upper) * P_OUT + o) * 8 +: 8]));
    endfunction

    genvar gi;
    generate
        for (gi = 0; gi < P_IN; gi++) begin : g_wbank
            logic [P_OUT*W_W-1:0] mem [0:2*WS_HALF-1];
            always_ff @(posedge clk) begin
                for (int p = 0; p < NWP; p++)
                    if (rc_fire[p] && rc_ph[p] == WL_W && 32'(rc_bank[p]) == gi) begin
                        if (wpk) mem[rc_wa[p]][32'(rc_wl[p][0]) * P_OUT * 8 +: P_OUT * 8] <= rc_cd[p][P_OUT*8-1:0];
                        else mem[rc_wa[p]] <= rc_row[p];
                    end
                if (tq_load) tq_w[gi*P_OUT*W_W +: P_OUT*W_W] <= wpk ? unpack8(mem[pu_wa], pu_wl[0]) : mem[pu_wa];
            end
        end
    endgenerate

    // ================================================================ gemm: tile pusher
    // For each tile of a group, each block of SLOTS rows and each K chunk: one tile, once the
    // group's biases and shifts and the chunk's rows are in.
    logic                     pu_act, tq_v, pu_rows;
    logic [31:0]              pu_r0, pu_t, pu_o0, pu_g0, pu_end;
    logic [P_OUT*ACC_W-1:0]   tq_bias;
    logic [P_OUT*SHIFT_W-1:0] tq_shift;
    logic                     w_fire;
    logic [BMW-1:0]           pu_bm;

    assign w_fire  = cu_w_valid && cu_w_ready;
    assign pu_bm   = BMW'(32'(pu_half) * 32'(GT) + pu_t);
    assign pu_end  = min32(g_k, (32'(pu_kc) + 32'd1) * 32'(P_IN));
    always_comb begin
        pu_rows = wt_full[pu_half];
        if (wl_busy && wl_half == pu_half) begin
            pu_rows = 1'b1;
            for (int p = 0; p < NWP; p++)
                if (rc_ph[p] != WL_D && !(rc_ph[p] == WL_W && rc_k[p] >= pu_end)) pu_rows = 1'b0;
        end
    end
    assign tq_load = run_g && pu_act && pu_rows && (!tq_v || w_fire);

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            pu_act  <= 1'b0;
            tq_v    <= 1'b0;
            pu_kc   <= '0;
            pu_r0   <= '0;
            pu_t    <= '0;
            pu_tb   <= '0;
            pu_o0   <= '0;
            pu_g0   <= '0;
            pu_half <= 1'b0;
            wt_full <= '0;
            wt_bs   <= '0;
        end else begin
            if (ld_done) wt_full[wl_half] <= 1'b1;
            if (bs_done) wt_bs[wl_half] <= 1'b1;
            if (run_g && wt_bs[pu_half] && !pu_act) begin
                pu_act <= 1'b1;
                pu_kc  <= '0;
                pu_r0  <= '0;
                pu_t   <= '0;
                pu_tb  <= '0;
            end
            if (tq_load) begin
                tq_v     <= 1'b1;
                tq_bias  <= g_bias ? bias_mem[pu_bm] : '0;
                tq_shift <= shift_mem[pu_bm];
                if (32'(pu_kc) + 32'd1 == ks) begin
                    pu_kc <= '0;
                    if (pu_t + 32'd1 == 32'(gsz) || pu_o0 + 32'(P_OUT) >= g_n) begin
                        // the block has had every tile of the group: the next block, or the
                        // group is done and its half is released
                        pu_t  <= '0;
                        pu_tb <= '0;
                        pu_o0 <= pu_g0;
                        pu_r0 <= pu_r0 + 32'(SLOTS);
                        if (pu_r0 + 32'(SLOTS) >= rows_e) begin
                            pu_r0   <= '0;
                            pu_g0   <= pu_g0 + gcols;
                            pu_o0   <= pu_g0 + gcols;
                            pu_act  <= 1'b0;
                            pu_half <= !pu_half;
                            wt_full[pu_half] <= 1'b0;
                            wt_bs[pu_half]   <= 1'b0;
                        end
                    end else begin
                        pu_t  <= pu_t + 32'd1;
                        pu_tb <= pu_tb + ks;
                        pu_o0 <= pu_o0 + 32'(P_OUT);
                    end
                end else pu_kc <= pu_kc + 1'b1;
            end else if (w_fire) tq_v <= 1'b0;
        end
    end

    // ================================================================ gemm: x loader (port 0)
    // Resident (the instruction's rows x K chunks fit XRES entries): every row is read once, row r
    // at r * ks; the beats of a row may go as soon as the row is in. Otherwise the rows are read
    // again for every weight group, a block of SLOTS rows at a time into one of two banks.
    logic        x_res;
    logic [1:0]  xb_own, xb_rdy;
    logic        xi_bank, xr_bank, bi_bank;
    logic [31:0] xi_o0, xi_r0, xi_r, xr_r, xr_r0, xi_src, xi_nb, xr_nb, xr_rows, xr_base;
    logic [KAW-1:0] xr_kc;
    logic        xi_sv, xi_fire, xi_claim, xr_fire, xr_blk_done;
    logic        bi_release;
    logic [XAW-1:0] xr_wa;
    logic [P_IN*16-1:0] xbuf [0:XBD-1];

    always_ff @(posedge clk)
        // rows_e * ks <= XRES; ks <= KS_MAX whenever the gemm runs (g_k <= K_MAX)
        if (state == S_G2) x_res <= ks == 0 || (rows_e <= 32'(XRES) &&
                                                mul_sa(64'(rows_e[XRW-1:0]), 32'(ks[KSW-1:0])) <= 64'(XRES));

    assign xi_nb = min32(32'(SLOTS), rows_e - xi_r0);
    assign xr_nb = min32(32'(SLOTS), rows_e - xr_r0);
    always_comb begin
        case (xm)
            2'd0: xi_src = xi_r0 + xi_r;
            2'd1: xi_src = {16'd0, src_list[TAW'(xi_r0 + xi_r)]};
            default: xi_src = lo + xi_r0 + xi_r;
        endcase
    end
    assign xi_sv   = run_g && xi_o0 < g_n && (x_res || xi_r != 0 || !xb_own[xi_bank]);
    assign xi_fire = xi_sv && r0_sr;
    assign xi_claim = xi_fire && xi_r == 0 && !x_res;
    assign xr_fire = run_g && r0_cfire;
    assign xr_blk_done = xr_fire && r0_cl && xr_r + 32'd1 == xr_nb && !x_res;
    assign xr_wa = x_res ? XAW'(xr_base + 32'(xr_kc))
                         : XAW'(mul_sa(64'(mul_sa(64'(xr_bank), 32'(SLOTS)) + 64'(xr_r)), 32'(KS_MAX)) + 64'(xr_kc));

    always_ff @(posedge clk) begin
        if (xr_fire) xbuf[xr_wa] <= r0_cd[P_IN*16-1:0];
    end

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            xb_own  <= '0;
            xb_rdy  <= '0;
            xi_bank <= 1'b0;
            xr_bank <= 1'b0;
            xi_o0   <= '0;
            xi_r0   <= '0;
            xi_r    <= '0;
            xr_r    <= '0;
            xr_r0   <= '0;
            xr_kc   <= '0;
            xr_rows <= '0;
            xr_base <= '0;
        end else begin
            if (xi_fire) begin
                if (xi_r + 32'd1 == xi_nb) begin
                    xi_r    <= '0;
                    xi_bank <= !xi_bank;
                    if (xi_r0 + 32'(SLOTS) >= rows_e) begin
                        xi_r0 <= '0;
                        // resident rows are read once
                        xi_o0 <= x_res ? g_n : xi_o0 + gcols;
                    end else xi_r0 <= xi_r0 + 32'(SLOTS);
                end else xi_r <= xi_r + 32'd1;
            end
            if (xr_fire) begin
                if (r0_cl) begin
                    xr_kc   <= '0;
                    xr_rows <= xr_rows + 32'd1;
                    xr_base <= xr_base + ks;
                    if (xr_r + 32'd1 == xr_nb) begin
                        xr_r    <= '0;
                        xr_bank <= !xr_bank;
                        xr_r0   <= xr_r0 + 32'(SLOTS) >= rows_e ? 32'd0 : xr_r0 + 32'(SLOTS);
                    end else xr_r <= xr_r + 32'd1;
                end else xr_kc <= xr_kc + 1'b1;
            end
            for (int b = 0; b < 2; b++) begin
                if (xi_claim && 32'(xi_bank) == b) xb_own[b] <= 1'b1;
                if (xr_blk_done && 32'(xr_bank) == b) xb_rdy[b] <= 1'b1;
                if (bi_release && 32'(bi_bank) == b) begin
                    xb_own[b] <= 1'b0;
                    xb_rdy[b] <= 1'b0;
                end
            end
        end
    end

    // ================================================================ gemm: beat issuer
    // Per weight group, per block of SLOTS rows, per tile of the group, per K chunk: one beat per
    // row of the block (slot = row in the block). A block serves every tile of the group before
    // the next block, so the first pass over x feeds the whole group.
    logic [31:0]        bi_g0, bi_o0, bi_t, bi_r0, bi_r, bi_nb;
    logic [KAW-1:0]     bi_kc;
    logic               bq_v, bq_first, bq_last, bq_wnext, bi_load, x_fire, bi_rdy, bi_tlast;
    logic [SLOT_W-1:0]  bq_slot;
    logic [P_IN*16-1:0] bq_act;
    logic [XAW-1:0]     bi_ra;

    assign bi_nb    = min32(32'(SLOTS), rows_e - bi_r0);
    assign x_fire   = cu_x_valid && cu_x_ready;
    assign bi_tlast = bi_t + 32'd1 == 32'(gsz) || bi_o0 + 32'(P_OUT) >= g_n;
    assign bi_rdy   = x_res ? xr_rows > bi_r0 + bi_r : xb_rdy[bi_bank];
    assign bi_load  = run_g && bi_g0 < g_n && bi_rdy && (!bq_v || x_fire);
    assign bi_release = bi_load && bi_r + 32'd1 == bi_nb && 32'(bi_kc) + 32'd1 == ks && bi_tlast && !x_res;
    assign bi_ra    = x_res ? XAW'(mul_sa(64'(bi_r0 + bi_r), 32'(ks[KSW-1:0])) + 64'(bi_kc))
                            : XAW'(mul_sa(64'(mul_sa(64'(bi_bank), 32'(SLOTS)) + 64'(bi_r)), 32'(KS_MAX)) + 64'(bi_kc));

    always_ff @(posedge clk) begin
        if (bi_load) bq_act <= xbuf[bi_ra];
    end

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            bq_v    <= 1'b0;
            bi_bank <= 1'b0;
            bi_g0   <= '0;
            bi_o0   <= '0;
            bi_t    <= '0;
            bi_r0   <= '0;
            bi_r    <= '0;
            bi_kc   <= '0;
        end else begin
            if (bi_load) begin
                bq_v     <= 1'b1;
                bq_first <= bi_kc == 0;
                bq_last  <= 32'(bi_kc) + 32'd1 == ks;
                bq_wnext <= bi_r == 0;
                bq_slot  <= SLOT_W'(bi_r);
                if (bi_r + 32'd1 == bi_nb) begin
                    bi_r <= '0;
                    if (32'(bi_kc) + 32'd1 == ks) begin
                        bi_kc <= '0;
                        if (bi_tlast) begin
                            bi_t    <= '0;
                            bi_o0   <= bi_g0;
                            bi_bank <= !bi_bank;
                            if (bi_r0 + 32'(SLOTS) >= rows_e) begin
                                bi_r0 <= '0;
                                bi_g0 <= bi_g0 + gcols;
                                bi_o0 <= bi_g0 + gcols;
                            end else bi_r0 <= bi_r0 + 32'(SLOTS);
                        end else begin
                            bi_t  <= bi_t + 32'd1;
                            bi_o0 <= bi_o0 + 32'(P_OUT);
                        end
                    end else bi_kc <= bi_kc + 1'b1;
                end else bi_r <= bi_r + 32'd1;
            end else if (x_fire) bq_v <= 1'b0;
        end
    end

    // ================================================================ combine: block loads
    // Blocks of up to SLOTS tokens, two buffers: the next block loads while this one computes.
    // Port 1 reads a block's scores, then its indices (into
    // sbuf / ibuf, entry tt·k + j), then the block's odd expert-output rows; port 0 reads the even
    // rows. The rows t·k + j of a block are one contiguous region: one segment per row (all D
    // elements, long bursts), cut into P_OUT-element chunks, into ybuf0 / ybuf1 by row parity
    // (row / 2 · OT_MAX + chunk), so both ports write at once. A buffer is released when its
    // block's tiles and beats have all gone out.
    localparam int YBH = ((SBD + 1) / 2) * OT_MAX;
    localparam int YHW = $clog2(2 * YBH);
    logic [1:0]        sb_full;
    logic              sl_busy, c_blk_done, c_all_done, sl_sv, y0_sv, y_done, lb, cbb;
    logic [1:0]        sl_iss, sl_rph;
    logic [31:0]       ct0, lt0, c_nb, l_nb, c_nbk, sl_i, yl0_i, yl1_i, yr0_i, yr1_i, yr0_oc, yr1_oc;
    logic [15:0]       sbuf [0:2*SBD-1];
    logic [15:0]       ibuf [0:2*SBD-1];
    logic [P_OUT*16-1:0] ybuf0 [0:2*YBH-1];
    logic [P_OUT*16-1:0] ybuf1 [0:2*YBH-1];
    logic              c_load;

    // c_*: the block being computed (buffer cbb, tokens from ct0); l_*: the block loading (lb, lt0)
    assign c_nb   = min32(32'(SLOTS), c_t - ct0);
    assign l_nb   = min32(32'(SLOTS), c_t - lt0);
    // the block's first expert-output row, lt0 * c_k (c_k <= MAX_K while combining)
    logic [63:0] c_row0;
    assign c_row0 = mul_sa(64'(lt0), 32'(c_k[MKW-1:0]));
    assign c_nbk  = 32'(mul_sa(64'(l_nb), 32'(c_k[MKW-1:0])));   // c_k <= MAX_K when combining
    assign c_load = run_c && !sb_full[lb] && !sl_busy && lt0 < c_t;
    assign sl_sv  = run_c && sl_busy && (sl_iss < 2'd2 || (sl_iss == 2'd2 && yl1_i < c_nbk));
    assign y0_sv  = run_c && sl_busy && yl0_i < c_nbk;
    assign c_all_done = ct0 >= c_t;
    assign y_done = sl_rph == 2'd3 && yr0_i >= c_nbk;

    always_ff @(posedge clk) begin
        if (run_c && sl_busy && r1_cfire) begin
            if (sl_rph == 2'd0) sbuf[SAW'(32'(lb) * 32'(SBD) + sl_i)] <= pre1_v;
            if (sl_rph == 2'd1) ibuf[SAW'(32'(lb) * 32'(SBD) + sl_i)] <= pre1_v;
            if (sl_rph == 2'd2)
                ybuf1[YHW'(32'(lb) * 32'(YBH) + (yr1_i >> 1) * 32'(OT_MAX) + yr1_oc)] <= r1_cd[P_OUT*16-1:0];
        end
        if (run_c && sl_busy && r0_cfire)
            ybuf0[YHW'(32'(lb) * 32'(YBH) + (yr0_i >> 1) * 32'(OT_MAX) + yr0_oc)] <= r0_cd[P_OUT*16-1:0];
    end

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            sl_busy <= 1'b0;
            lb      <= 1'b0;
            lt0     <= '0;
            sl_iss  <= '0;
            sl_rph  <= '0;
            sl_i    <= '0;
            yl0_i   <= '0;
            yl1_i   <= '0;
            yr0_i   <= '0;
            yr1_i   <= '0;
            yr0_oc  <= '0;
            yr1_oc  <= '0;
        end else begin
            if (c_load) begin
                sl_busy <= 1'b1;
                sl_iss  <= '0;
                sl_rph  <= '0;
                sl_i    <= '0;
                yl0_i   <= '0;
                yl1_i   <= 32'd1;
                yr0_i   <= '0;
                yr1_i   <= 32'd1;
                yr0_oc  <= '0;
                yr1_oc  <= '0;
            end
            if (sl_sv && r1_sr) begin
                if (sl_iss == 2'd2) begin
                    yl1_i <= yl1_i + 32'd2;
                    if (yl1_i + 32'd2 >= c_nbk) sl_iss <= 2'd3;
                end else sl_iss <= (sl_iss == 2'd1 && c_nbk < 32'd2) ? 2'd3 : sl_iss + 2'd1;
            end
            if (y0_sv && r0_sr) yl0_i <= yl0_i + 32'd2;
            if (run_c && sl_busy && r1_cfire) begin
                if (sl_rph == 2'd2) begin
                    if (r1_cl) begin
                        yr1_oc <= '0;
                        yr1_i  <= yr1_i + 32'd2;
                        if (yr1_i + 32'd2 >= c_nbk) sl_rph <= 2'd3;
                    end else yr1_oc <= yr1_oc + 32'd1;
                end else begin
                    sl_i <= sl_i + 32'd1;
                    if (r1_cl) begin
                        sl_i   <= '0;
                        // after the indices: the odd rows, if the block has any
                        sl_rph <= (sl_rph == 2'd1 && c_nbk < 32'd2) ? 2'd3 : sl_rph + 2'd1;
                    end
                end
            end
            if (run_c && sl_busy && r0_cfire) begin
                if (r0_cl) begin
                    yr0_oc <= '0;
                    yr0_i  <= yr0_i + 32'd2;
                end else yr0_oc <= yr0_oc + 32'd1;
            end
            if (run_c && sl_busy && y_done) begin
                sl_busy <= 1'b0;
                lb      <= !lb;
                lt0     <= lt0 + 32'(SLOTS);
            end
        end
    end

    // ================================================================ combine: tile pusher, beat issuer
    // Per block: for each token, each output tile, each top-k slot j: one parameter tile and one
    // beat (slot = token in the block); a token's tiles come out one after the other, so its
    // output row and its residual row stream in order.
    logic [31:0]  cp_o0, cp_j, cp_t, cb_o0, cb_j, cb_t, cb_oc;
    logic         cp_done, cb_done, cp_fire, cb_fire;

    assign cp_fire = run_c && cu_w_valid && cu_w_ready;
    assign cb_fire = run_c && cu_x_valid && cu_x_ready;
    assign c_blk_done = cp_done && cb_done;

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            sb_full <= '0;
            cbb     <= 1'b0;
            ct0     <= '0;
            cp_o0   <= '0;
            cp_j    <= '0;
            cp_t    <= '0;
            cb_o0   <= '0;
            cb_j    <= '0;
            cb_t    <= '0;
            cb_oc   <= '0;
            cp_done <= 1'b0;
            cb_done <= 1'b0;
        end else begin
            if (run_c && sl_busy && y_done) sb_full[lb] <= 1'b1;
            if (cp_fire) begin
                if (cp_j + 32'd1 == c_k) begin
                    cp_j <= '0;
                    if (cp_o0 + 32'(P_OUT) >= c_d) begin
                        cp_o0 <= '0;
                        if (cp_t + 32'd1 == c_nb) begin
                            cp_t    <= '0;
                            cp_done <= 1'b1;
                        end else cp_t <= cp_t + 32'd1;
                    end else cp_o0 <= cp_o0 + 32'(P_OUT);
                end else cp_j <= cp_j + 32'd1;
            end
            if (cb_fire) begin
                if (cb_j + 32'd1 == c_k) begin
                    cb_j <= '0;
                    if (cb_o0 + 32'(P_OUT) >= c_d) begin
                        cb_o0 <= '0;
                        cb_oc <= '0;
                        if (cb_t + 32'd1 == c_nb) begin
                            cb_t    <= '0;
                            cb_done <= 1'b1;
                        end else cb_t <= cb_t + 32'd1;
                    end else begin
                        cb_o0 <= cb_o0 + 32'(P_OUT);
                        cb_oc <= cb_oc + 32'd1;
                    end
                end else cb_j <= cb_j + 32'd1;
            end
            if (run_c && c_blk_done) begin
                cp_done <= 1'b0;
                cb_done <= 1'b0;
                sb_full[cbb] <= 1'b0;
                cbb     <= !cbb;
                ct0     <= ct0 + 32'(SLOTS);
            end
        end
    end

    // ================================================================ compute-unit streams
    logic [SAW-1:0] cp_i, cb_i;
    logic [15:0]    cp_e;
    assign cp_i = SAW'(32'(cbb) * 32'(SBD) + cp_t * c_k + cp_j);
    assign cb_i = SAW'(32'(cbb) * 32'(SBD) + cb_t * c_k + cb_j);
    assign cp_e = ibuf[cp_i];
    logic [P_OUT*16-1:0] cb_y;
    logic [YHW-1:0]      cb_ya;
    logic [31:0]         cb_r;       // the expert-output row in the block
    assign cb_r  = cb_t * c_k + cb_j;

    // A block computes while it still loads: its tiles once its scores and indices are in, a
    // token's beats once its k expert-output rows are in (rows below yr0_i / yr1_i of each parity).
    logic        c_blk_rdy, cb_rows;
    logic [31:0] cb_rend;
    assign cb_rend   = 32'(mul_sa(64'(cb_t + 32'd1), 32'(c_k[MKW-1:0])));
    assign c_blk_rdy = sb_full[cbb] || (sl_busy && lb == cbb && sl_rph >= 2'd2);
    assign cb_rows   = sb_full[cbb] || (yr0_i >= cb_rend && yr1_i >= cb_rend);
    assign cb_ya = YHW'(32'(cbb) * 32'(YBH) + (cb_r >> 1) * 32'(OT_MAX) + cb_oc);
    assign cb_y  = cb_r[0] ? ybuf1[cb_ya] : ybuf0[cb_ya];

    always_comb begin
        cu_w_valid         = 1'b0;
        cu_w_weights       = tq_w;
        cu_w_bias          = tq_bias;
        cu_w_shift         = tq_shift;
        cu_w_out_bits      = OB_W'(g_fmt[5:0]);
        cu_w_comb_shift    = '0;
        cu_w_combine       = 1'b0;
        cu_w_gelu          = g_gelu;
        cu_w_gelu_in_frac  = g_fmt[14:8];
        cu_w_gelu_out_frac = g_gfmt[14:8];
        cu_w_gelu_out_bits = OB_W'(g_gfmt[5:0]);
        cu_x_valid = 1'b0;
        cu_x_wnext = bq_wnext;
        cu_x_act   = '0;
        for (int i = 0; i < P_IN; i++) cu_x_act[i*`M3V_X_W +: `M3V_X_W] = `M3V_X_W'(signed'(bq_act[i*16 +: 16]));
        cu_x_eout  = '0;
        cu_x_score = '0;
        cu_x_slot  = bq_slot;
        cu_x_first = bq_first;
        cu_x_last  = bq_last;
        cu_x_tag   = '0;
        if (run_g) begin
            cu_w_valid = tq_v;
            cu_x_valid = bq_v;
        end
        if (run_c) begin
            cu_w_valid      = c_blk_rdy && !cp_done;
            cu_w_bias       = '0;
            cu_w_shift      = '0;
            cu_w_out_bits   = OB_W'(c_fmt[5:0]);
            cu_w_comb_shift = CSH_W'(cshift[EAW'(cp_e)]);
            cu_w_combine    = 1'b1;
            cu_w_gelu       = 1'b0;
            cu_x_valid = c_blk_rdy && cb_rows && !cb_done;
            cu_x_wnext = 1'b1;
            for (int o = 0; o < P_OUT; o++) cu_x_eout[o*ACT_W +: ACT_W] = ACT_W'(signed'(cb_y[o*16 +: 16]));
            cu_x_score = SCORE_W'(sbuf[cb_i]);
            cu_x_slot  = SLOT_W'(cb_t);
            cu_x_first = cb_j == 0;
            cu_x_last  = cb_j + 32'd1 == c_k;
        end
    end
    assign active = cu_x_valid && cu_x_ready;

    // ================================================================ outputs: residual, writes
    // Output order: gemm (weight group, block of SLOTS rows, tile of the group, row of the block),
    // combine (row, tile). gemm residual: port 3 reads, per row of a block, the group's columns
    // (one segment, one chunk per tile) into one of two block buffers (rbuf: row, tile); the add
    // takes them in output order once the block is in. combine residual: one segment per row, its
    // chunks the row's tiles, straight to the add.
    logic [31:0] os_g0, os_o0, os_t, os_r0, os_r, os_nb, os_nc, os_row, os_t0;
    logic        os_all, os_tlast, os_fire;
    logic [31:0] rs_g0, rs_r0, rs_r, rs_nb, rs_row, rs_t0, rs_nw;
    logic        rs_all, rs_sv;
    logic [63:0] os_addr, rs_addr;
    logic        res_on;
    logic [31:0] a_sh, b_sh, z_fmt, n_cols;

    assign res_on   = (run_g && g_res) || (run_c && c_res);
    assign n_cols   = is_gemm ? g_n : c_d;
    assign os_nb    = min32(32'(SLOTS), rows_e - os_r0);
    assign os_nc    = min32(32'(P_OUT), n_cols - os_o0);
    assign os_tlast = os_t + 32'd1 == 32'(gsz) || os_o0 + 32'(P_OUT) >= n_cols;
    assign os_row   = is_gemm ? os_r0 + os_r : os_t0;
    assign os_all   = is_gemm ? os_g0 >= g_n : os_t0 >= c_t;
    assign rs_nb    = min32(32'(SLOTS), rows_e - rs_r0);
    assign rs_nw    = min32(gcols, g_n - rs_g0);
    assign rs_row   = is_gemm ? rs_r0 + rs_r : rs_t0;
    assign rs_all   = is_gemm ? rs_g0 >= g_n : rs_t0 >= c_t;

    logic [31:0] os_dst;
    always_comb begin
        case (ym)
            2'd0: os_dst = os_row;
            2'd1: os_dst = lo + os_row;
            default: os_dst = {16'd0, dst_list[TAW'(os_row)]};
        endcase
        if (!is_gemm) begin
            // c_d <= MAX_DIM while combining
            os_addr = addr_of(c_out) + ((mul_sa(64'(os_row), 32'(c_d[DMW-1:0])) + 64'(os_o0)) << 1);
            rs_addr = addr_of(c_rref) + (mul_sa(64'(rs_row), 32'(c_d[DMW-1:0])) << 1);
            a_sh    = {{16{c_rsh[15]}}, c_rsh[15:0]};
            b_sh    = {{16{c_rsh[31]}}, c_rsh[31:16]};
            z_fmt   = c_rfmt;
        end else begin
            // a row below the checked y rows: 2 * row * g_yld fits a 32-bit space
            os_addr = addr_of(g_y) + ((64'(mul_lo32(os_dst, g_yld)) + 64'(os_o0)) << 1);
            rs_addr = addr_of(g_rref) + ((64'(mul_lo32(rs_row, g_yld)) + 64'(rs_g0)) << 1);
            a_sh    = {{16{g_rsh[15]}}, g_rsh[15:0]};
            b_sh    = {{16{g_rsh[31]}}, g_rsh[31:16]};
            z_fmt   = g_rfmt;
        end
        if (!(is_gemm ? g_res : c_res)) begin
            a_sh  = '0;
            b_sh  = '0;
            z_fmt = 32'h10010;    // signed 16 bits: the identity on the compute unit's output
        end
    end
    assign rs_sv = res_on && !rs_all;

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            os_g0 <= '0;
            os_o0 <= '0;
            os_t  <= '0;
            os_r0 <= '0;
            os_r  <= '0;
            os_t0 <= '0;
            rs_g0 <= '0;
            rs_r0 <= '0;
            rs_r  <= '0;
            rs_t0 <= '0;
        end else begin
            if (os_fire && !is_gemm) begin
                if (os_o0 + 32'(P_OUT) >= n_cols) begin
                    os_o0 <= '0;
                    os_t0 <= os_t0 + 32'd1;
                end else os_o0 <= os_o0 + 32'(P_OUT);
            end
            if (os_fire && is_gemm) begin
                if (os_r + 32'd1 == os_nb) begin
                    os_r <= '0;
                    if (os_tlast) begin
                        os_t  <= '0;
                        os_o0 <= os_g0;
                        if (os_r0 + 32'(SLOTS) >= rows_e) begin
                            os_r0 <= '0;
                            os_g0 <= os_g0 + gcols;
                            os_o0 <= os_g0 + gcols;
                        end else os_r0 <= os_r0 + 32'(SLOTS);
                    end else begin
                        os_t  <= os_t + 32'd1;
                        os_o0 <= os_o0 + 32'(P_OUT);
                    end
                end else os_r <= os_r + 32'd1;
            end
            if (rs_sv && r3_sr && !is_gemm) rs_t0 <= rs_t0 + 32'd1;
            if (rs_sv && r3_sr && is_gemm) begin
                if (rs_r + 32'd1 == rs_nb) begin
                    rs_r <= '0;
                    if (rs_r0 + 32'(SLOTS) >= rows_e) begin
                        rs_r0 <= '0;
                        rs_g0 <= rs_g0 + gcols;
                    end else rs_r0 <= rs_r0 + 32'(SLOTS);
                end else rs_r <= rs_r + 32'd1;
            end
        end
    end

    // ---- gemm residual block buffers
    localparam int RBD = 2 * SLOTS * GT;
    localparam int RBW = $clog2(RBD);
    logic [P_OUT*16-1:0] rbuf [0:RBD-1];
    logic [1:0]          rfull;
    logic                rr_b, ab_b, rr_fire, ac_fire, ac_tlast;
    logic [31:0]         rr_r0, rr_r, rr_t, rr_nb, ac_g0, ac_o0, ac_t, ac_r0, ac_r, ac_nb;
    assign rr_nb    = min32(32'(SLOTS), rows_e - rr_r0);
    assign ac_nb    = min32(32'(SLOTS), rows_e - ac_r0);
    assign ac_tlast = ac_t + 32'd1 == 32'(gsz) || ac_o0 + 32'(P_OUT) >= g_n;
    assign rr_fire  = run_g && g_res && r3_cv && r3_cr;

    always_ff @(posedge clk)
        if (rr_fire) rbuf[RBW'((32'(rr_b) * 32'(SLOTS) + rr_r) * 32'(GT) + rr_t)] <= r3_cd[P_OUT*16-1:0];

    always_ff @(posedge clk) begin
        if (!rst_n || state == S_IDLE) begin
            rfull <= '0;
            rr_b  <= 1'b0;
            ab_b  <= 1'b0;
            rr_r0 <= '0;
            rr_r  <= '0;
            rr_t  <= '0;
            ac_g0 <= '0;
            ac_o0 <= '0;
            ac_t  <= '0;
            ac_r0 <= '0;
            ac_r  <= '0;
        end else begin
            if (rr_fire) begin
                if (r3_cl) begin
                    rr_t <= '0;
                    if (rr_r + 32'd1 == rr_nb) begin
                        rr_r        <= '0;
                        rfull[rr_b] <= 1'b1;
                        rr_b        <= !rr_b;
                        rr_r0       <= rr_r0 + 32'(SLOTS) >= rows_e ? 32'd0 : rr_r0 + 32'(SLOTS);
                    end else rr_r <= rr_r + 32'd1;
                end else rr_t <= rr_t + 32'd1;
            end
            if (ac_fire) begin
                if (ac_r + 32'd1 == ac_nb) begin
                    ac_r <= '0;
                    if (ac_tlast) begin
                        ac_t        <= '0;
                        ac_o0       <= ac_g0;
                        rfull[ab_b] <= 1'b0;
                        ab_b        <= !ab_b;
                        if (ac_r0 + 32'(SLOTS) >= rows_e) begin
                            ac_r0 <= '0;
                            ac_g0 <= ac_g0 + gcols;
                            ac_o0 <= ac_g0 + gcols;
                        end else ac_r0 <= ac_r0 + 32'(SLOTS);
                    end else begin
                        ac_t  <= ac_t + 32'd1;
                        ac_o0 <= ac_o0 + 32'(P_OUT);
                    end
                end else ac_r <= ac_r + 32'd1;
            end
        end
    end

    logic              add_in_v, add_in_r, add_out_v, res_rdy;
    logic [P_OUT*16-1:0] add_a, add_b, add_z;

    always_comb
        for (int o = 0; o < P_OUT; o++) add_a[o*16 +: 16] = 16'(signed'(cu_o_data[o*ACT_W +: ACT_W]));
    assign res_rdy    = is_gemm ? rfull[ab_b] : r3_cv;
    assign add_b      = !res_on ? '0 : is_gemm ? rbuf[RBW'((32'(ab_b) * 32'(SLOTS) + ac_r) * 32'(GT) + ac_t)]
                                              : r3_cd[P_OUT*16-1:0];
    assign add_in_v   = (run_g || run_c) && cu_o_valid && (!res_on || res_rdy);
    assign cu_o_ready = (run_g || run_c) && add_in_r && (!res_on || res_rdy);
    assign ac_fire    = run_g && g_res && add_in_v && add_in_r;

    add_unit #(.P(P_OUT), .EW(16)) u_res (
        .clk, .rst_n, .a_shift(a_sh), .b_shift(b_sh), .fmt_bits(z_fmt[5:0]), .fmt_signed(z_fmt[16]),
        .in_valid(add_in_v), .in_ready(add_in_r), .a_data(add_a), .b_data(add_b),
        .out_valid(add_out_v), .out_ready(wr_sr), .out_data(add_z));

    // three write ports when every row starts on a beat boundary (no beat holds two rows): row
    // mod 3 picks ports 2, 0, 3
    localparam int BB_L = $clog2(DW / 8);
    logic [BB_L-1:0] y_ld_lo, y_base_lo;
    logic            wr_multi, wr0_sr, wr2_sr, wr3_sr, wr0_idle, wr2_idle, wr3_idle;
    logic [1:0]      os_port;
    assign y_ld_lo   = BB_L'(is_gemm ? g_yld << 1 : c_d << 1);
    assign y_base_lo = BB_L'(is_gemm ? addr_of(g_y) : addr_of(c_out));
    assign wr_multi  = y_ld_lo == '0 && y_base_lo == '0;
    assign os_port   = wr_multi ? 2'((is_gemm ? os_dst : os_row) % 32'd3) : 2'd0;
    assign wr_sr     = os_port == 2'd1 ? wr0_sr : os_port == 2'd2 ? wr3_sr : wr2_sr;
    assign wr_idle   = wr0_idle && wr2_idle && wr3_idle;
    assign wr_sv   = add_out_v && !os_all;
    assign wr_sa   = ADDR_W'(os_addr);
    assign wr_sb   = CWW'(2 * os_nc);
    assign wr_sd   = add_z;
    assign os_fire = wr_sv && wr_sr;

    assign fin_g = run_g && os_all && wr_idle;
    assign fin_c = run_c && os_all && c_all_done && wr_idle;

    // ================================================================ reader commands
    always_comb begin
        // port 0: queue table pre-pass, gemm x rows, combine expert-output rows
        r0_sv = pre0_sv;
        r0_sa = ADDR_W'(pre0_a);
        r0_sb = pre0_b;
        r0_sc = CW0'(pre0_c);
        r0_cr = state == S_QOFF || state == S_LSRC || state == S_LDST;
        if (run_g) begin
            r0_sv = xi_sv;
            // a row below the checked x rows: 2 * row * g_xld fits a 32-bit space
            r0_sa = ADDR_W'(addr_of(g_x) + (64'(mul_lo32(xi_src, g_xld)) << 1));
            r0_sb = g_k << 1;
            r0_sc = CW0'(2 * P_IN);
            r0_cr = 1'b1;
        end
        if (run_c) begin
            r0_sv = y0_sv;
            r0_sa = ADDR_W'(addr_of(c_y) + (mul_sa(c_row0 + 64'(yl0_i), 32'(c_d[DMW-1:0])) << 1));
            r0_sb = c_d << 1;
            r0_sc = CW0'(2 * P_OUT);
            r0_cr = sl_busy;
        end
        // port 1: combine pre-pass, gemm weights / biases / shifts, combine scores / indices
        r1_sv = pre1_sv;
        r1_sa = ADDR_W'(pre1_a);
        r1_sb = pre1_b;
        r1_sc = CW1'(pre1_c);
        r1_cr = state == S_CIDX || state == S_CSH;
        r2_sv = 1'b0;
        r2_cr = 1'b0;
        r2_sa = ADDR_W'(i_a[1]);
        r2_sb = wl_gw << g_w16;
        r2_sc = CW1'(32'(P_OUT) << g_w16);
        if (wl_en) begin
            r1_sv = i_sv[0];
            r2_sv = i_sv[1];
            r1_cr = rc_cr[0];
            r2_cr = rc_cr[1];
            case (i_ph[0])
                WL_W: begin
                    r1_sa = ADDR_W'(i_a[0]);
                    r1_sb = wl_whole ? 32'(w_nb) : wl_gw << g_w16;
                    r1_sc = CW1'((wl_whole ? g_n : 32'(P_OUT)) << g_w16);
                end
                WL_B: begin
                    r1_sa = ADDR_W'(addr_of(g_b) + 64'(wl_g0) * 64'd8);
                    r1_sb = wl_gw << 3;
                    r1_sc = CW1'(8);
                end
                default: begin
                    r1_sa = ADDR_W'(addr_of(g_s) + 64'(wl_g0));
                    r1_sb = wl_gw;
                    r1_sc = CW1'(1);
                end
            endcase
        end
        if (run_c) begin
            r1_sv = sl_sv;
            r1_sa = ADDR_W'((sl_iss[0] ? addr_of(c_ix) : addr_of(c_sc)) + (c_row0 << 1));
            r1_sb = c_nbk << 1;
            r1_sc = CW1'(2);
            r1_cr = sl_busy;
            if (sl_iss == 2'd2) begin
                r1_sa = ADDR_W'(addr_of(c_y) + (mul_sa(c_row0 + 64'(yl1_i), 32'(c_d[DMW-1:0])) << 1));
                r1_sb = c_d << 1;
                r1_sc = CW1'(2 * P_OUT);
            end
        end
        // port 3: residual rows; without residual, the gemm's third share of weight rows
        r3_sv = rs_sv;
        r3_sa = ADDR_W'(rs_addr);
        r3_sb = is_gemm ? rs_nw << 1 : c_d << 1;
        r3_sc = CW3'(2 * P_OUT);
        r3_cr = is_gemm ? res_on && !rfull[rr_b] : res_on && add_in_r && cu_o_valid;
        if (wl_en && !g_res) begin
            r3_sv = i_sv[2];
            r3_sa = ADDR_W'(i_a[2]);
            r3_sb = wl_gw << g_w16;
            r3_sc = CW3'(32'(P_OUT) << g_w16);
            r3_cr = rc_cr[2];
        end
    end

    logic unused_sig;
    assign unused_sig = &{1'b0, task_idx, cu_o_tag, r0_idle, r1_idle, r2_idle, r3_idle, r3_cl, r2_cl, pre0_a[63:32],
                          pre1_a[63:32], cp_e[15:EAW], os_addr[63:32], rs_addr[63:32],
                          z_fmt[31:17], z_fmt[15:6], g_fmt[31:17], g_fmt[7:6], g_gfmt[31:17], g_gfmt[7:6],
                          c_fmt[31:17], c_fmt[15:6], m_awready[1], m_wready[1], m_bvalid[1],
                          m_bid[ID_W +: ID_W], m_bresp[3:2]};
    if (PORTS > 4) begin : g_unused_hi
        logic unused_hi;
        assign unused_hi = &{1'b0, m_arready[PORTS-1:4], m_rvalid[PORTS-1:4], m_rdata[PORTS*DW-1:4*DW],
                             m_rid[PORTS*ID_W-1:4*ID_W], m_rlast[PORTS-1:4], m_rresp[PORTS*2-1:8],
                             m_awready[PORTS-1:4], m_wready[PORTS-1:4], m_bvalid[PORTS-1:4],
                             m_bid[PORTS*ID_W-1:4*ID_W], m_bresp[PORTS*2-1:8]};
    end

    // ================================================================ DMA engines
    seg_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(RD_BURST),
                 .CHB(CH0), .QD(16)) u_r0 (
        .clk, .rst_n, .seg_valid(r0_sv), .seg_ready(r0_sr), .seg_addr(r0_sa), .seg_bytes(r0_sb),
        .seg_ch(r0_sc), .ch_valid(r0_cv), .ch_ready(r0_cr), .ch_data(r0_cd), .ch_last(r0_cl), .idle(r0_idle),
        .arvalid(m_arvalid[0]), .arready(m_arready[0]), .araddr(m_araddr[0 +: ADDR_W]), .arlen(m_arlen[0 +: 8]),
        .arsize(m_arsize[0 +: 3]), .arburst(m_arburst[0 +: 2]), .arid(m_arid[0 +: ID_W]),
        .rvalid(m_rvalid[0]), .rready(m_rready[0]), .rdata(m_rdata[0 +: DW]), .rid(m_rid[0 +: ID_W]),
        .rlast(m_rlast[0]), .rresp(m_rresp[0 +: 2]));

    seg_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(RD_BURST),
                 .CHB(CH1), .QD(16)) u_r1 (
        .clk, .rst_n, .seg_valid(r1_sv), .seg_ready(r1_sr), .seg_addr(r1_sa), .seg_bytes(r1_sb),
        .seg_ch(r1_sc), .ch_valid(r1_cv), .ch_ready(r1_cr), .ch_data(r1_cd), .ch_last(r1_cl), .idle(r1_idle),
        .arvalid(m_arvalid[1]), .arready(m_arready[1]), .araddr(m_araddr[ADDR_W +: ADDR_W]),
        .arlen(m_arlen[8 +: 8]), .arsize(m_arsize[3 +: 3]), .arburst(m_arburst[2 +: 2]),
        .arid(m_arid[ID_W +: ID_W]), .rvalid(m_rvalid[1]), .rready(m_rready[1]), .rdata(m_rdata[DW +: DW]),
        .rid(m_rid[ID_W +: ID_W]), .rlast(m_rlast[1]), .rresp(m_rresp[2 +: 2]));

    seg_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST),
                 .CHB(CH3), .QD(16)) u_r3 (
        .clk, .rst_n, .seg_valid(r3_sv), .seg_ready(r3_sr), .seg_addr(r3_sa), .seg_bytes(r3_sb),
        .seg_ch(r3_sc), .ch_valid(r3_cv), .ch_ready(r3_cr), .ch_data(r3_cd), .ch_last(r3_cl), .idle(r3_idle),
        .arvalid(m_arvalid[3]), .arready(m_arready[3]), .araddr(m_araddr[3*ADDR_W +: ADDR_W]),
        .arlen(m_arlen[24 +: 8]), .arsize(m_arsize[9 +: 3]), .arburst(m_arburst[6 +: 2]),
        .arid(m_arid[3*ID_W +: ID_W]), .rvalid(m_rvalid[3]), .rready(m_rready[3]), .rdata(m_rdata[3*DW +: DW]),
        .rid(m_rid[3*ID_W +: ID_W]), .rlast(m_rlast[3]), .rresp(m_rresp[6 +: 2]));

    // Output segments on the write channels of ports 2, 0 and 3 by their memory row mod 3 when no
    // two rows can share a beat (rows start on beat boundaries): three times the writes in flight.
    // Otherwise all on port 2, in order: neighbouring rows may share a beat (disjoint strobes),
    // and the DDR model merges same-cycle writes of two ports into one word with a race. A row
    // always goes to one port, so the writes of one row keep their order.
    seg_writer #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST),
                 .CHB(CH3), .QD(4)) u_wr (
        .clk, .rst_n, .seg_valid(wr_sv && os_port == 2'd0), .seg_ready(wr2_sr), .seg_addr(wr_sa), .seg_bytes(wr_sb),
        .seg_data(wr_sd), .idle(wr2_idle),
        .awvalid(m_awvalid[2]), .awready(m_awready[2]), .awaddr(m_awaddr[2*ADDR_W +: ADDR_W]),
        .awlen(m_awlen[16 +: 8]), .awsize(m_awsize[6 +: 3]), .awburst(m_awburst[4 +: 2]),
        .awid(m_awid[2*ID_W +: ID_W]), .wvalid(m_wvalid[2]), .wready(m_wready[2]),
        .wdata(m_wdata[2*DW +: DW]), .wstrb(m_wstrb[2*DW/8 +: DW/8]), .wlast(m_wlast[2]),
        .bvalid(m_bvalid[2]), .bready(m_bready[2]), .bid(m_bid[2*ID_W +: ID_W]), .bresp(m_bresp[4 +: 2]));

    seg_writer #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST),
                 .CHB(CH3), .QD(4)) u_wr0 (
        .clk, .rst_n, .seg_valid(wr_sv && os_port == 2'd1), .seg_ready(wr0_sr), .seg_addr(wr_sa), .seg_bytes(wr_sb),
        .seg_data(wr_sd), .idle(wr0_idle),
        .awvalid(m_awvalid[0]), .awready(m_awready[0]), .awaddr(m_awaddr[0 +: ADDR_W]),
        .awlen(m_awlen[0 +: 8]), .awsize(m_awsize[0 +: 3]), .awburst(m_awburst[0 +: 2]),
        .awid(m_awid[0 +: ID_W]), .wvalid(m_wvalid[0]), .wready(m_wready[0]),
        .wdata(m_wdata[0 +: DW]), .wstrb(m_wstrb[0 +: DW/8]), .wlast(m_wlast[0]),
        .bvalid(m_bvalid[0]), .bready(m_bready[0]), .bid(m_bid[0 +: ID_W]), .bresp(m_bresp[0 +: 2]));

    seg_writer #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST),
                 .CHB(CH3), .QD(4)) u_wr3 (
        .clk, .rst_n, .seg_valid(wr_sv && os_port == 2'd2), .seg_ready(wr3_sr), .seg_addr(wr_sa), .seg_bytes(wr_sb),
        .seg_data(wr_sd), .idle(wr3_idle),
        .awvalid(m_awvalid[3]), .awready(m_awready[3]), .awaddr(m_awaddr[3*ADDR_W +: ADDR_W]),
        .awlen(m_awlen[24 +: 8]), .awsize(m_awsize[9 +: 3]), .awburst(m_awburst[6 +: 2]),
        .awid(m_awid[3*ID_W +: ID_W]), .wvalid(m_wvalid[3]), .wready(m_wready[3]),
        .wdata(m_wdata[3*DW +: DW]), .wstrb(m_wstrb[3*DW/8 +: DW/8]), .wlast(m_wlast[3]),
        .bvalid(m_bvalid[3]), .bready(m_bready[3]), .bid(m_bid[3*ID_W +: ID_W]), .bresp(m_bresp[6 +: 2]));

    seg_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(RD_BURST),
                 .CHB(CH1), .QD(16)) u_r2 (
        .clk, .rst_n, .seg_valid(r2_sv), .seg_ready(r2_sr), .seg_addr(r2_sa), .seg_bytes(r2_sb),
        .seg_ch(r2_sc), .ch_valid(r2_cv), .ch_ready(r2_cr), .ch_data(r2_cd), .ch_last(r2_cl), .idle(r2_idle),
        .arvalid(m_arvalid[2]), .arready(m_arready[2]), .araddr(m_araddr[2*ADDR_W +: ADDR_W]),
        .arlen(m_arlen[16 +: 8]), .arsize(m_arsize[6 +: 3]), .arburst(m_arburst[4 +: 2]),
        .arid(m_arid[2*ID_W +: ID_W]), .rvalid(m_rvalid[2]), .rready(m_rready[2]), .rdata(m_rdata[2*DW +: DW]),
        .rid(m_rid[2*ID_W +: ID_W]), .rlast(m_rlast[2]), .rresp(m_rresp[4 +: 2]));

    // the write channels of ports 0, 1, 3 and up, the read channels beyond port 3
    genvar gp;
    generate
        for (gp = 0; gp < PORTS; gp++) begin : g_idle
            if (gp == 1 || gp > 3) begin : g_no_wr
                assign m_awvalid[gp] = 1'b0;
                assign m_awaddr[gp*ADDR_W +: ADDR_W] = '0;
                assign m_awlen[gp*8 +: 8] = '0;
                assign m_awsize[gp*3 +: 3] = '0;
                assign m_awburst[gp*2 +: 2] = '0;
                assign m_awid[gp*ID_W +: ID_W] = '0;
                assign m_wvalid[gp] = 1'b0;
                assign m_wdata[gp*DW +: DW] = '0;
                assign m_wstrb[gp*DW/8 +: DW/8] = '0;
                assign m_wlast[gp] = 1'b0;
                assign m_bready[gp] = 1'b0;
            end
            if (gp > 3) begin : g_no_rd
                assign m_arvalid[gp] = 1'b0;
                assign m_araddr[gp*ADDR_W +: ADDR_W] = '0;
                assign m_arlen[gp*8 +: 8] = '0;
                assign m_arsize[gp*3 +: 3] = '0;
                assign m_arburst[gp*2 +: 2] = '0;
                assign m_arid[gp*ID_W +: ID_W] = '0;
                assign m_rready[gp] = 1'b0;
            end
        end
    endgenerate
endmodule
