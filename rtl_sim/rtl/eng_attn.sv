// eng_attn: the attention engine of the accelerator top. It executes one `attention` instruction
// (docs/program.md) bit-exactly as compiler/program_exec.py (numerics.attention):
//   s = requant(q·kᵀ, score_shift, score_fmt), m = row max over all keys, p = exp_int(m − s),
//   y = requant(Σ p·v · r, R + k + out_shift, fmt) with (r, k) = recip_int(Σ p)
// on the three column groups of qkv [T, 3D] (head h owns columns h·dh..(h+1)·dh-1 of each).
// Both matrix products run on the shared compute unit; the score and probability matrices never
// leave the chip.
//
// Per head, the three attn_slice_readers (ports 0, 1, 2) bring the head's Q, K and V slices of all
// T rows into three banked buffers (attn_buf); everything below starts as soon as the rows it
// reads have arrived. The queries are cut into groups of G = min(SLOTS, q_tile, what half the
// score buffer holds) rows; group g passes four stages, each running beside the others on other
// groups:
//   QK(g)   the compute unit: weight tiles w[i][o] = k[key kt·P_OUT + o][dim c·P_IN + i] (built two
//           dim chunks at a time from one read of 2·P_IN dims of a key), x beats = query rows,
//           one slot per query; the requantised scores go to half g mod 2 of the score buffer and
//           the row maxima are kept as they arrive.
//   EXP(g)  SM_P exp_units: p = exp_int(m − s) for SM_P keys of one row per cycle into half g mod 2
//           of the probability buffer (rows of P_IN-key words, exp_frac + 1 bits each); Σ p per row
//           as they are made, then recip_unit gives (r, k) per row.
//   AV(g)   the compute unit in raw mode: weight tiles w[i][o] = v[key kc·P_IN + i][dim ot·P_OUT + o],
//           x beats = P_IN probabilities of one query (X_W-bit operands), one slot per query; a
//           row's result is its exact 48-bit accumulator Σ p·v.
//   FIN(g)  SM_P lanes per cycle: requant(acc·r, R + k + out_shift, fmt), two DSP products per lane
//           as in softmax_unit; a row's P_OUT results become one y segment.
// The compute unit runs QK(0), QK(1), AV(0), QK(2), AV(1), ...: the QKᵀ of the next group overlaps
// EXP of this one. Two halves of the score and probability buffers let EXP(g) read while QK(g+1)
// and AV(g−1) use the others. The y segments are written as INCR bursts (split at 4 KB and
// MAX_BURST beats) with byte strobes, rotating over the write channels of all PORTS ports (the
// reads use only read channels), so any 2-byte alignment works and write latency is hidden.
// Formats: signed widths 1..ACT_W and unsigned widths 1..ACT_W-1 for score_fmt and fmt (an
// unsigned result is the signed ACT_W-bit one clamped at 0 and 2^bits - 1, which equals the
// contract's single clamp); score fraction and both shifts within SHIFT_W / 7 signed bits.
// Anything else, T or D outside the limits, D not a multiple of heads, a head larger than the
// Q/K/V buffers, a score row longer than half the score buffer, or an operand outside its space
// ends with STATUS over_limit before any access.
// Traffic per head: the three slices of every row (each row's beats once) plus the y segments.
`include "m3v_isa.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"
`include "m3v_mem.svh"

module eng_attn #(
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
    // ---------------------------------------------------------------- sizes
    localparam int PI      = `M3V_P_IN;
    localparam int PO      = `M3V_P_OUT;
    localparam int SMP     = `M3V_SM_P;
    localparam int AW      = `M3V_ACT_W;
    localparam int XW      = `M3V_X_W;
    localparam int WW      = `M3V_W_W;
    localparam int SW      = `M3V_SCORE_W;
    localparam int SHW     = `M3V_SHIFT_W;
    localparam int OBW     = `M3V_OB_W;
    localparam int ACCW    = `M3V_ACC_W;
    localparam int SLOTS   = `M3V_SLOTS;
    localparam int MAXT    = `M3V_MAX_TOKENS;
    localparam int MAXD    = `M3V_MAX_DIM;
    localparam int PF      = `M3V_EXP_P;
    localparam int R       = `M3V_RECIP_R;
    localparam int KLOG    = $clog2(`M3V_MAX_KEYS);
    localparam int E       = DW / 16;                 // elements per DMA beat
    localparam int BB      = DW / 8;
    localparam int BB_L    = $clog2(BB);
    localparam int LW      = $clog2(E + 1);
    function automatic int pow2_at_least(input int n);
        pow2_at_least = 1 << $clog2(n);
    endfunction
    function automatic int imax(input int a, input int b);
        imax = (a > b) ? a : b;
    endfunction
    // banks: any run of what one cycle reads (Q: P_IN dims, K: 2·P_IN dims, V: P_OUT dims) or
    // one DMA beat writes is one word per bank
    localparam int NBQ     = pow2_at_least(imax(E, PI));
    localparam int NBK     = pow2_at_least(imax(E, 2 * PI));
    localparam int NBV     = pow2_at_least(imax(E, PO));
    // one head's Q, K and V: K and V share buffers.activations (the compiler's check), Q as big
    localparam int BUF_A   = `M3V_BUF_ACTIVATIONS / 4;
    localparam int BUF_EL  = (MAXT * MAXD < BUF_A) ? MAXT * MAXD : BUF_A;
    localparam int HALF_EL = BUF_EL / 2;
    // score buffer: 16-bit scores, two halves; half h holds the rows of a group, T keys each
    localparam int SC_EL   = `M3V_BUF_SCORES / 2;
    localparam int SC_HALF = SC_EL / 2;
    localparam int NBS     = pow2_at_least(imax(PO, SMP));
    localparam int SLW     = $clog2(PO + 1);
    // probability buffer: words of P_IN probabilities; a half holds G rows of ceil(T / P_IN) words
    localparam int EP      = PF + 1;                  // p ≤ 2^exp_frac
    localparam int PWH     = SC_HALF / PI + SLOTS;    // G·ceil(T/P_IN) ≤ SC_HALF/P_IN + G
    localparam int PWA_W   = $clog2(2 * PWH);
    localparam int SLOT_A  = $clog2(2 * SLOTS);
    // finish lanes: A = Σ p·v in A_W bits (|A| ≤ MAX_KEYS·2^P·2^(ACT_W−1)), A·r as two products
    localparam int S_W     = PF + 1 + KLOG;           // Σ p
    localparam int Z_W     = $clog2(S_W);             // k
    localparam int A_W     = PF + AW + KLOG;
    localparam int BL      = 26;
    localparam int AH_W    = A_W - BL;
    localparam int Y_W     = A_W + R + 1;
    localparam int SH_W    = 9;                       // R + k + out_shift
    localparam int X_LAT   = 10;                      // exp_unit
    localparam int R_LAT   = 16;                      // recip_unit
    localparam int F_LAT   = 8;                       // finish: products 3, requant 5
    localparam int SEG_D   = 8;                       // y segments waiting for the writer
    localparam int NSEG_W  = $clog2(PO + 1);
    localparam int WO_W    = $clog2(MAX_OUT + 1);
    localparam int YP_W    = (PORTS > 1) ? $clog2(PORTS) : 1;
    // ---------------------------------------------------------------- instruction fields
    logic [31:0] f_qkv, f_y, f_t, f_d, f_heads, f_sfmt, f_ssh, f_osh, f_fmt, f_qtile;
    assign f_qkv   = rec[32*`M3V_ISA_F_ATTENTION_QKV_REF +: 32];
    assign f_y     = rec[32*`M3V_ISA_F_ATTENTION_Y_REF +: 32];
    assign f_t     = rec[32*`M3V_ISA_F_ATTENTION_TOKENS +: 32];
    assign f_d     = rec[32*`M3V_ISA_F_ATTENTION_DIM +: 32];
    assign f_heads = rec[32*`M3V_ISA_F_ATTENTION_HEADS +: 32];
    assign f_sfmt  = rec[32*`M3V_ISA_F_ATTENTION_SCORE_FMT +: 32];
    assign f_ssh   = rec[32*`M3V_ISA_F_ATTENTION_SCORE_SHIFT +: 32];
    assign f_osh   = rec[32*`M3V_ISA_F_ATTENTION_OUT_SHIFT +: 32];
    assign f_fmt   = rec[32*`M3V_ISA_F_ATTENTION_FMT +: 32];
    assign f_qtile = rec[32*`M3V_ISA_F_ATTENTION_Q_TILE +: 32];

    function automatic logic fmt_ok(input logic [5:0] bits, input logic sgn);
        fmt_ok = bits != 0 && (sgn ? 32'(bits) <= 32'(AW) : 32'(bits) < 32'(AW));
    endfunction
    // a 32-bit signed word that fits n signed bits
    function automatic logic fits_signed(input logic [31:0] w, input int n);
        logic [31:0] top;
        top = $signed(w) >>> (n - 1);
        fits_signed = top == '0 || top == '1;
    endfunction

    logic [5:0]  sbits, obits;
    logic        s_signed, o_signed;
    logic [7:0]  sfrac;
    assign sbits    = f_sfmt[5:0];
    assign s_signed = f_sfmt[16];
    assign sfrac    = f_sfmt[15:8];
    assign obits    = f_fmt[5:0];
    assign o_signed = f_fmt[16];

    // a * b mod 2^32, as shift-and-add over b's set bits: the engine's products (sizes, buffer
    // indices, addresses) are control arithmetic, and a multiplier cell would take a DSP slice
    // from the MAC array's budget. b is 16-bit (the engine's sizes) or a constant, so the terms
    // of b's zero bits drop out.
    function automatic logic [31:0] mul_lo(input logic [31:0] a, input logic [31:0] b);
        mul_lo = '0;
        for (int i = 0; i < 32; i++) mul_lo = mul_lo + ((a << i) & {32{b[i]}});
    endfunction

    // sizes of the instruction (registered by the checks)
    logic [15:0] T, D, H, dh, nc, nct, nkt, nkc, cap, gs, ng;
    logic [63:0] qkv_bytes, y_bytes;
    // T * D < 2^32 (16-bit sizes)
    assign qkv_bytes = (64'(mul_lo(32'(T), 32'(D))) << 2) + (64'(mul_lo(32'(T), 32'(D))) << 1);
    assign y_bytes   = 64'(mul_lo(32'(T), 32'(D))) << 1;
    logic [ADDR_W-1:0] qkv_addr, y_addr;
    assign qkv_addr = ADDR_W'(m3v_addr(f_qkv, base_wgt, base_arena, base_in, base_out));
    assign y_addr   = ADDR_W'(m3v_addr(f_y, base_wgt, base_arena, base_in, base_out));

    // ---------------------------------------------------------------- control
    typedef enum logic [3:0] {
        S_IDLE, S_CHK, S_FITS, S_DIV, S_CAP, S_HEAD, S_RUN, S_NEXT, S_DRAIN, S_FIN
    } state_t;
    state_t st;
    logic [3:0]  fin_status;
    logic [15:0] h, hc;
    logic        head_go;        // one-cycle pulse: the stages start on head h
    logic        dbuf;           // a head fits half of each Q / K / V buffer: head h uses half h mod 2
    logic        cu_half;        // the half head h reads

    // sequential divider (restoring, 16-bit): dv_k selects which quotient is being formed
    logic [15:0] dv_n, dv_d, dv_q, dv_r;
    logic [4:0]  dv_i;
    logic [2:0]  dv_k;
    logic [16:0] dv_rs;
    logic [15:0] dv_qn, dv_rn;
    always_comb begin
        dv_rs = {dv_r, dv_n[15]};
        if (dv_rs >= {1'b0, dv_d}) begin
            dv_rn = 16'(dv_rs - {1'b0, dv_d});
            dv_qn = {dv_q[14:0], 1'b1};
        end else begin
            dv_rn = dv_rs[15:0];
            dv_qn = {dv_q[14:0], 1'b0};
        end
    end

    // group g: queries g·gs .. g·gs + gsize(g) − 1
    function automatic logic [15:0] gsize(input logic [15:0] g);
        logic [31:0] q0;
        q0 = mul_lo(32'(g), 32'(gs));
        gsize = (32'(T) - q0 > 32'(gs)) ? gs : 16'(32'(T) - q0);
    endfunction
    function automatic logic [15:0] min16(input logic [31:0] a, input logic [31:0] b);
        min16 = (a < b) ? 16'(a) : 16'(b);
    endfunction

    // ---------------------------------------------------------------- Q / K / V loads
    // Loads run ahead of the stages: with dbuf, head h+1 loads into the other half while the
    // stages work on head h; without, head h loads while its own stages start on the rows that
    // have arrived.
    logic [ADDR_W-1:0] ld_base_q, ld_base_k, ld_base_v;
    logic [31:0]       row_stride, ld_off, cu_off;
    logic [15:0]       ld_next, ld_hc;
    logic              ld_start, ld_guard, ld_half, ld_kick, running;
    assign row_stride = (32'(D) << 2) + (32'(D) << 1);
    assign ld_base_q  = qkv_addr + ADDR_W'({ld_hc, 1'b0});
    assign ld_base_k  = qkv_addr + ADDR_W'({D, 1'b0}) + ADDR_W'({ld_hc, 1'b0});
    assign ld_base_v  = qkv_addr + ADDR_W'({D, 2'b00}) + ADDR_W'({ld_hc, 1'b0});
    assign ld_off     = ld_half ? 32'(HALF_EL) : '0;
    assign cu_off     = cu_half ? 32'(HALF_EL) : '0;

    logic [2:0]        rd_valid;
    logic [3*DW-1:0]   rd_data;
    logic [3*LW-1:0]   rd_lo, rd_hi;
    logic [3*32-1:0]   rd_flat;
    logic [2:0]        r_arvalid, r_arready, r_rvalid, r_rready, r_rlast;
    logic [3*ADDR_W-1:0] r_araddr;
    logic [3*8-1:0]    r_arlen;
    logic [3*3-1:0]    r_arsize;
    logic [3*2-1:0]    r_arburst, r_rresp;
    logic [3*ID_W-1:0] r_arid, r_rid;
    logic [3*DW-1:0]   r_rdata;
    logic [2:0]        ld_busy;
    logic [3*32-1:0]   ld_cnt [0:1];   // per half: elements of each slice written so far (rows arrive in order)

    genvar g;
    generate
        for (g = 0; g < 3; g = g + 1) begin : g_rd
            logic [ADDR_W-1:0] b;
            assign b = (g == 0) ? ld_base_q : (g == 1) ? ld_base_k : ld_base_v;
            attn_slice_reader #(
                .DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)
            ) u_rd (
                .clk(clk), .rst_n(rst_n), .start(ld_start), .base(b), .stride(row_stride),
                .rows(32'(T)), .elems(32'(dh)), .busy(ld_busy[g]),
                .o_valid(rd_valid[g]), .o_data(rd_data[g*DW +: DW]), .o_lo(rd_lo[g*LW +: LW]),
                .o_hi(rd_hi[g*LW +: LW]), .o_flat(rd_flat[g*32 +: 32]),
                .arvalid(r_arvalid[g]), .arready(r_arready[g]), .araddr(r_araddr[g*ADDR_W +: ADDR_W]),
                .arlen(r_arlen[g*8 +: 8]), .arsize(r_arsize[g*3 +: 3]), .arburst(r_arburst[g*2 +: 2]),
                .arid(r_arid[g*ID_W +: ID_W]), .rvalid(r_rvalid[g]), .rready(r_rready[g]),
                .rdata(r_rdata[g*DW +: DW]), .rid(r_rid[g*ID_W +: ID_W]), .rlast(r_rlast[g]),
                .rresp(r_rresp[g*2 +: 2])
            );
        end
    endgenerate
    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ld_cnt[0] <= '0;
            ld_cnt[1] <= '0;
        end else if (ld_start) begin
            ld_cnt[ld_half] <= '0;
        end else begin
            for (int s = 0; s < 3; s++)
                if (rd_valid[s])
                    ld_cnt[ld_half][s*32 +: 32] <= rd_flat[s*32 +: 32] + 32'(rd_hi[s*LW +: LW]) - 32'(rd_lo[s*LW +: LW]);
        end
    end

    // rows 0 .. n−1 of head h's slice are in its buffer
    function automatic logic rows_in(input int s, input logic [31:0] n);
        rows_in = ld_cnt[cu_half][s*32 +: 32] >= mul_lo(n, 32'(dh));
    endfunction

    // the next load: head ld_next, once the previous load is finished and its half is free
    assign ld_kick = running && !ld_start && !ld_guard && ld_busy == '0 && ld_next < H &&
                     (ld_next == h || (dbuf && ld_next == h + 16'd1));
    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ld_start <= 1'b0;
            ld_guard <= 1'b0;
        end else begin
            ld_start <= ld_kick;
            ld_guard <= ld_start;   // busy rises the cycle after start
            if (ld_kick) begin
                ld_hc   <= 16'(mul_lo(32'(ld_next), 32'(dh)));
                ld_half <= dbuf && ld_next[0];
                ld_next <= ld_next + 16'd1;
            end
            if (st == S_CAP) ld_next <= '0;
        end
    end

    logic [31:0]        q_rflat, k_rflat, v_rflat;
    logic [PI*16-1:0]   q_rd;
    logic [2*PI*16-1:0] k_rd;
    logic [PO*16-1:0]   v_rd;
    attn_buf #(.NB(NBQ), .DEPTH(pow2_at_least((BUF_EL + NBQ - 1) / NBQ)), .E(E), .RL(PI)) u_qbuf (
        .clk(clk), .we(rd_valid[0]), .wdata(rd_data[0 +: DW]), .wlo(rd_lo[0 +: LW]),
        .whi(rd_hi[0 +: LW]), .wflat(rd_flat[0 +: 32] + ld_off), .rflat(q_rflat + cu_off), .rdata(q_rd)
    );
    attn_buf #(.NB(NBK), .DEPTH(pow2_at_least((BUF_EL + NBK - 1) / NBK)), .E(E), .RL(2 * PI)) u_kbuf (
        .clk(clk), .we(rd_valid[1]), .wdata(rd_data[DW +: DW]), .wlo(rd_lo[LW +: LW]),
        .whi(rd_hi[LW +: LW]), .wflat(rd_flat[32 +: 32] + ld_off), .rflat(k_rflat + cu_off), .rdata(k_rd)
    );
    attn_buf #(.NB(NBV), .DEPTH(pow2_at_least((BUF_EL + NBV - 1) / NBV)), .E(E), .RL(PO)) u_vbuf (
        .clk(clk), .we(rd_valid[2]), .wdata(rd_data[2*DW +: DW]), .wlo(rd_lo[2*LW +: LW]),
        .whi(rd_hi[2*LW +: LW]), .wflat(rd_flat[64 +: 32] + ld_off), .rflat(v_rflat + cu_off), .rdata(v_rd)
    );

    // ---------------------------------------------------------------- the compute unit's job order
    // QK(0), QK(1), AV(0), QK(2), AV(1), ..., QK(ng−1), AV(ng−2), AV(ng−1); {av, g} -> next, end
    function automatic logic [17:0] job_next(input logic av, input logic [15:0] jg);
        logic [16:0] nx;
        logic        fin;
        fin = 1'b0;
        if (!av) nx = (jg == '0) ? ((ng > 16'd1) ? {1'b0, 16'd1} : {1'b1, 16'd0}) : {1'b1, jg - 16'd1};
        else if (32'(jg) + 32'd2 < 32'(ng)) nx = {1'b0, jg + 16'd2};
        else if (32'(jg) + 32'd1 < 32'(ng)) nx = {1'b1, jg + 16'd1};
        else begin
            nx  = '0;
            fin = 1'b1;
        end
        job_next = {fin, nx};
    endfunction

    // progress between the stages, per head: groups whose scores are all in (qk_done), whose
    // probabilities and (r, k) are all made (exp_done), whose y segments are all made (fin_cnt)
    logic [15:0] qk_done, exp_done, fin_cnt;

    // ---------------------------------------------------------------- weight tiles
    // Two staging tiles feed the compute unit's shadow tile in order. A QK build reads 2·P_IN
    // dims of one key per cycle and fills the tiles of dim chunks c and c+1 together (P_OUT
    // cycles); when a head is exactly P_IN wide the same read holds two keys, so its one tile
    // takes P_OUT / 2 cycles. An AV build reads P_OUT dims of one value row per cycle (P_IN cycles).
    logic [PI*PO*WW-1:0] st_w0, st_w1;
    logic [1:0]          st_raw, st_full;
    logic                st_wp, st_rp;
    logic                tb_on, tb_av, tb_busy, tb_pair, tb_dual, w_fire;
    logic [15:0]         tb_g, tb_a, tb_b, tb_r;
    logic [17:0]         tb_nx;
    logic                tb_can;
    assign tb_nx   = job_next(tb_av, tb_g);
    assign tb_pair = !tb_av && tb_b + 16'd1 < nc;
    assign tb_dual = !tb_av && dh == 16'(PI);
    // the rows a build reads are loaded, and its staging tiles are free
    assign tb_can  = tb_av ? (!st_full[st_wp] && rows_in(2, 32'(min16(mul_lo(32'(tb_b), 32'(PI)) + 32'(PI), 32'(T)))))
                           : (!st_full[st_wp] && (!tb_pair || !st_full[!st_wp]) &&
                              rows_in(1, 32'(min16(mul_lo(32'(tb_a), 32'(PO)) + 32'(PO), 32'(T)))));
    assign k_rflat = mul_lo(tb_qkey, 32'(dh)) + tb_qdim;
    assign v_rflat = mul_lo(tb_vkey, 32'(dh)) + tb_vdim;
    assign w_fire  = cu_w_valid && cu_w_ready;

    // what one build cycle writes: QK column o = tb_r (key kt·P_OUT + o, dims c·P_IN + i of tile
    // c and (c+1)·P_IN + i of tile c+1, or with tb_dual, key kt·P_OUT + o + 1 for column o + 1);
    // AV row i = tb_r (key kc·P_IN + i, dims ot·P_OUT + o)
    logic [PI*WW-1:0] tb_col0, tb_col1;
    logic [PO*WW-1:0] tb_row;
    logic [31:0]      tb_qkey, tb_qdim, tb_vkey, tb_vdim;
    assign tb_qkey = mul_lo(32'(tb_a), 32'(PO)) + 32'(tb_r);
    assign tb_qdim = mul_lo(32'(tb_b), 32'(PI));
    assign tb_vkey = mul_lo(32'(tb_b), 32'(PI)) + 32'(tb_r);
    assign tb_vdim = mul_lo(32'(tb_a), 32'(PO));
    always_comb begin
        for (int i = 0; i < PI; i++) begin
            tb_col0[i*WW +: WW] = (tb_qkey < 32'(T) && tb_qdim + 32'(i) < 32'(dh))
                                  ? WW'($signed(k_rd[i*16 +: 16])) : '0;
            tb_col1[i*WW +: WW] = (tb_dual ? tb_qkey + 32'd1 < 32'(T)
                                           : tb_qkey < 32'(T) && tb_qdim + 32'(PI + i) < 32'(dh))
                                  ? WW'($signed(k_rd[(PI + i)*16 +: 16])) : '0;
        end
        for (int o = 0; o < PO; o++)
            tb_row[o*WW +: WW] = (tb_vkey < 32'(T) && tb_vdim + 32'(o) < 32'(dh))
                                 ? WW'($signed(v_rd[o*16 +: 16])) : '0;
    end

    assign cu_w_valid        = st_full[st_rp];
    assign cu_w_weights      = st_rp ? st_w1 : st_w0;
    assign cu_w_raw          = st_raw[st_rp];
    assign cu_w_bias         = '0;
    assign cu_w_out_bits     = s_signed ? OBW'(sbits) : '0;
    assign cu_w_comb_shift   = '0;
    assign cu_w_combine      = 1'b0;
    assign cu_w_gelu         = 1'b0;
    assign cu_w_gelu_in_frac = '0;
    assign cu_w_gelu_out_frac = '0;
    assign cu_w_gelu_out_bits = '0;
    always_comb
        for (int o = 0; o < PO; o++) cu_w_shift[o*SHW +: SHW] = f_ssh[SHW-1:0];

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            tb_on   <= 1'b0;
            tb_busy <= 1'b0;
            st_full <= '0;
            st_wp   <= 1'b0;
            st_rp   <= 1'b0;
        end else if (head_go) begin
            tb_on   <= 1'b1;
            tb_busy <= 1'b0;
            tb_av   <= 1'b0;
            tb_g    <= '0;
            tb_a    <= '0;
            tb_b    <= '0;
            tb_r    <= '0;
        end else begin
            if (w_fire) begin
                st_full[st_rp] <= 1'b0;
                st_rp          <= !st_rp;
            end
            if (tb_on && (tb_busy || tb_can)) begin
                tb_busy <= 1'b1;
                // the other staging tile may hold a tile waiting for the unit: a single build
                // writes only tile st_wp
                if (!tb_av) begin
                    for (int o = 0; o < PO; o++)
                        if (16'(o) == tb_r)
                            for (int i = 0; i < PI; i++) begin
                                if (!st_wp) st_w0[(i*PO + o)*WW +: WW] <= tb_col0[i*WW +: WW];
                                else        st_w1[(i*PO + o)*WW +: WW] <= tb_col0[i*WW +: WW];
                                if (tb_pair && !st_wp) st_w1[(i*PO + o)*WW +: WW] <= tb_col1[i*WW +: WW];
                                if (tb_pair && st_wp)  st_w0[(i*PO + o)*WW +: WW] <= tb_col1[i*WW +: WW];
                            end
                        else if (tb_dual && 16'(o) == tb_r + 16'd1)
                            for (int i = 0; i < PI; i++) begin
                                if (!st_wp) st_w0[(i*PO + o)*WW +: WW] <= tb_col1[i*WW +: WW];
                                else        st_w1[(i*PO + o)*WW +: WW] <= tb_col1[i*WW +: WW];
                            end
                end else begin
                    for (int i = 0; i < PI; i++)
                        if (16'(i) == tb_r)
                            for (int o = 0; o < PO; o++) begin
                                if (!st_wp) st_w0[(i*PO + o)*WW +: WW] <= tb_row[o*WW +: WW];
                                else        st_w1[(i*PO + o)*WW +: WW] <= tb_row[o*WW +: WW];
                            end
                end
                if (tb_r + (tb_dual ? 16'd2 : 16'd1) < (tb_av ? 16'(PI) : 16'(PO))) begin
                    tb_r <= tb_r + (tb_dual ? 16'd2 : 16'd1);
                end else begin
                    // the build is complete: hand its tiles over, then the next build
                    tb_r    <= '0;
                    tb_busy <= 1'b0;
                    st_full[st_wp] <= 1'b1;
                    st_raw[st_wp]  <= tb_av;
                    if (tb_pair) begin
                        st_full[!st_wp] <= 1'b1;
                        st_raw[!st_wp]  <= 1'b0;
                    end else begin
                        st_wp <= !st_wp;
                    end
                    if (!tb_av && tb_b + 16'd2 < nc) begin
                        tb_b <= tb_b + 16'd2;
                    end else if (tb_av && tb_b + 16'd1 < nkc) begin
                        tb_b <= tb_b + 16'd1;
                    end else begin
                        tb_b <= '0;
                        if (tb_a + 16'd1 < (tb_av ? nct : nkt)) begin
                            tb_a <= tb_a + 16'd1;
                        end else begin
                            tb_a <= '0;
                            tb_av <= tb_nx[16];
                            tb_g  <= tb_nx[15:0];
                            if (tb_nx[17]) tb_on <= 1'b0;
                        end
                    end
                end
            end
        end
    end

    // ---------------------------------------------------------------- x beats
    // QK(g): for kt, for c, for each query of the group: Q chunk c (slot = the query)
    // AV(g): for ot, for kc, for each query: its P_IN probabilities of key chunk kc
    logic              bi_on, bi_av, bi_ok, x_fire;
    logic [15:0]       bi_g, bi_a, bi_b, bi_qi, bi_gsz;
    logic [17:0]       bi_nx;
    logic [PI*EP-1:0]  p_word;
    logic [PWA_W-1:0]  p_raddr;
    assign bi_nx   = job_next(bi_av, bi_g);
    assign bi_gsz  = gsize(bi_g);
    assign q_rflat = mul_lo(mul_lo(32'(bi_g), 32'(gs)) + 32'(bi_qi), 32'(dh)) + bi_c0;
    assign p_raddr = PWA_W'(mul_lo(32'(bi_g[0]), 32'(PWH)) + mul_lo(32'(bi_qi), 32'(nkc)) + 32'(bi_b));
    // QK(g) overwrites the scores of group g−2 (EXP(g−2) must be done); AV(g) needs EXP(g)
    assign bi_ok   = bi_av ? (exp_done > bi_g)
                           : ((bi_g < 16'd2 || exp_done + 16'd1 >= bi_g) &&
                              rows_in(0, mul_lo(32'(bi_g), 32'(gs)) + 32'(bi_qi) + 32'd1));
    assign x_fire  = cu_x_valid && cu_x_ready;

    assign cu_x_valid = bi_on && bi_ok;
    assign cu_x_wnext = bi_qi == '0;
    assign cu_x_first = bi_b == '0;
    assign cu_x_last  = bi_b + 16'd1 == (bi_av ? nkc : nc);
    assign cu_x_slot  = SLOT_W'(bi_qi);
    assign cu_x_tag   = `M3V_TAG_W'(bi_qi);
    assign cu_x_eout  = '0;
    assign cu_x_score = '0;
    logic [31:0] bi_c0;   // first key (AV) or dim (QK) of the beat's chunk
    assign bi_c0 = mul_lo(32'(bi_b), 32'(PI));
    always_comb
        for (int i = 0; i < PI; i++)
            if (bi_av)
                cu_x_act[i*XW +: XW] = (bi_c0 + 32'(i) < 32'(T)) ? XW'(p_word[i*EP +: EP]) : '0;
            else
                cu_x_act[i*XW +: XW] = (bi_c0 + 32'(i) < 32'(dh)) ? XW'($signed(q_rd[i*16 +: 16])) : '0;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            bi_on <= 1'b0;
        end else if (head_go) begin
            bi_on <= 1'b1;
            bi_av <= 1'b0;
            bi_g  <= '0;
            bi_a  <= '0;
            bi_b  <= '0;
            bi_qi <= '0;
        end else if (x_fire) begin
            if (bi_qi + 16'd1 < bi_gsz) begin
                bi_qi <= bi_qi + 16'd1;
            end else begin
                bi_qi <= '0;
                if (bi_b + 16'd1 < (bi_av ? nkc : nc)) begin
                    bi_b <= bi_b + 16'd1;
                end else begin
                    bi_b <= '0;
                    if (bi_a + 16'd1 < (bi_av ? nct : nkt)) begin
                        bi_a <= bi_a + 16'd1;
                    end else begin
                        bi_a  <= '0;
                        bi_av <= bi_nx[16];
                        bi_g  <= bi_nx[15:0];
                        if (bi_nx[17]) bi_on <= 1'b0;
                    end
                end
            end
        end
    end

    // ---------------------------------------------------------------- QKᵀ: scores and row maxima
    // Rows of QK(g) arrive in the order of their last beats: for kt, for each query.
    logic             co_g0;    // half of the group being received
    logic [15:0]      co_g, co_kt, co_qi, co_gsz, co_n;
    logic [PO*SW-1:0] co_s;
    logic signed [SW-1:0] co_max;
    logic [SW-1:0]    mbuf [0:2*SLOTS-1];
    logic [31:0]      s_rflat;
    logic [SMP*SW-1:0] s_rd;
    logic             co_fire;
    assign co_g0   = co_g[0];
    assign co_gsz  = gsize(co_g);
    assign co_n    = min16(32'(T) - mul_lo(32'(co_kt), 32'(PO)), 32'(PO));
    assign co_fire = cu_o_valid;
    assign cu_o_ready = 1'b1;

    // an unsigned score format clamps the signed ACT_W-bit result once more, to 0 .. 2^bits - 1
    always_comb begin
        logic signed [AW-1:0] v, hi;
        hi = AW'((33'd1 << sbits) - 33'd1);
        for (int o = 0; o < PO; o++) begin
            v = $signed(cu_o_data[o*AW +: AW]);
            if (!s_signed) begin
                if (v < 0) v = '0;
                else if (v > hi) v = hi;
            end
            co_s[o*SW +: SW] = SW'(v);
        end
        co_max = $signed(co_s[0 +: SW]);
        for (int o = 1; o < PO; o++)
            if (16'(o) < co_n && $signed(co_s[o*SW +: SW]) > co_max)
                co_max = $signed(co_s[o*SW +: SW]);
    end

    attn_buf #(.NB(NBS), .DEPTH(pow2_at_least((SC_EL + NBS - 1) / NBS)), .E(PO), .RL(SMP), .EW(SW)) u_sbuf (
        .clk(clk), .we(co_fire), .wdata(co_s), .wlo('0), .whi(SLW'(co_n)),
        .wflat(mul_lo(32'(co_g0), 32'(SC_HALF)) + mul_lo(32'(co_qi), 32'(T)) + mul_lo(32'(co_kt), 32'(PO))),
        .rflat(s_rflat), .rdata(s_rd)
    );

    always_ff @(posedge clk) begin
        if (!rst_n || head_go) begin
            co_g    <= '0;
            co_kt   <= '0;
            co_qi   <= '0;
            qk_done <= '0;
        end else if (co_fire) begin
            if (co_qi + 16'd1 < co_gsz) begin
                co_qi <= co_qi + 16'd1;
            end else begin
                co_qi <= '0;
                if (co_kt + 16'd1 < nkt) begin
                    co_kt <= co_kt + 16'd1;
                end else begin
                    co_kt   <= '0;
                    co_g    <= co_g + 16'd1;
                    qk_done <= qk_done + 16'd1;
                end
            end
        end
    end
    always_ff @(posedge clk)
        if (co_fire && (co_kt == '0 || co_max > $signed(mbuf[SLOT_A'(mul_lo(32'(co_g0), 32'(SLOTS)) + 32'(co_qi))])))
            mbuf[SLOT_A'(mul_lo(32'(co_g0), 32'(SLOTS)) + 32'(co_qi))] <= co_max;

    // ---------------------------------------------------------------- EXP: p = exp_int(m − s)
    // One step per cycle: up to SM_P keys j0 .. j0+n−1 of one row, all in one P_IN-key word.
    logic        ex_on;
    logic [15:0] ex_g, ex_qi, ex_kc, ex_s, ex_gsz, ex_j0, ex_n, ex_ce;
    logic        ex_step, ex_row_last, ex_chunk_last, ex_can;
    assign ex_gsz  = gsize(ex_g);
    assign ex_j0   = 16'(mul_lo(32'(ex_kc), 32'(PI)) + mul_lo(32'(ex_s), 32'(SMP)));
    assign ex_ce   = min16(mul_lo(32'(ex_kc), 32'(PI)) + 32'(PI), 32'(T));
    assign ex_n    = min16(32'(ex_ce) - 32'(ex_j0), 32'(SMP));
    assign ex_chunk_last = ex_j0 + ex_n == ex_ce;
    assign ex_row_last   = ex_j0 + ex_n == T;
    assign s_rflat = mul_lo(32'(ex_g[0]), 32'(SC_HALF)) + mul_lo(32'(ex_qi), 32'(T)) + 32'(ex_j0);
    // EXP(g) needs every score of g, and writes the buffers AV(g−2) / FIN(g−2) have finished with
    assign ex_can  = ex_g < ng && qk_done > ex_g && (ex_g < 16'd2 || fin_cnt + 16'd1 >= ex_g);
    assign ex_step = ex_on && ex_can;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ex_on <= 1'b0;
        end else if (head_go) begin
            ex_on <= 1'b1;
            ex_g  <= '0;
            ex_qi <= '0;
            ex_kc <= '0;
            ex_s  <= '0;
        end else if (ex_step) begin
            if (ex_row_last) begin
                ex_kc <= '0;
                ex_s  <= '0;
                if (ex_qi + 16'd1 < ex_gsz) begin
                    ex_qi <= ex_qi + 16'd1;
                end else begin
                    ex_qi <= '0;
                    ex_g  <= ex_g + 16'd1;
                    if (ex_g + 16'd1 >= ng) ex_on <= 1'b0;
                end
            end else if (ex_chunk_last) begin
                ex_kc <= ex_kc + 16'd1;
                ex_s  <= '0;
            end else begin
                ex_s <= ex_s + 16'd1;
            end
        end
    end

    // E1: scores, row max, the step's place
    logic                  e1_v;
    logic [SMP*SW-1:0]     e1_s;
    logic signed [SW-1:0]  e1_m;
    logic                  e1_half, e1_first, e1_rlast, e1_glast;
    logic [15:0]           e1_qi, e1_kc, e1_off, e1_n;
    always_ff @(posedge clk) begin
        if (!rst_n) e1_v <= 1'b0;
        else        e1_v <= ex_step;
        e1_s <= s_rd;
        e1_m     <= $signed(mbuf[SLOT_A'(mul_lo(32'(ex_g[0]), 32'(SLOTS)) + 32'(ex_qi))]);
        e1_half  <= ex_g[0];
        e1_first <= ex_j0 == '0;
        e1_rlast <= ex_row_last;
        e1_glast <= ex_row_last && ex_qi + 16'd1 >= ex_gsz;
        e1_qi    <= ex_qi;
        e1_kc    <= ex_kc;
        e1_off   <= 16'(mul_lo(32'(ex_s), 32'(SMP)));
        e1_n     <= ex_n;
    end

    logic [SMP*EP-1:0] e_p;
    genvar l;
    generate
        for (l = 0; l < SMP; l = l + 1) begin : g_exp
            logic [SW:0] t;
            assign t = {e1_m[SW-1], e1_m} - {e1_s[l*SW + SW - 1], e1_s[l*SW +: SW]};   // ≥ 0 on used lanes
            exp_unit #(.T_W(SW), .FRAC_W(7)) u_exp (
                .clk(clk), .t(t[SW-1:0]), .frac(sfrac[6:0]), .p(e_p[l*EP +: EP])
            );
            logic unused_t;
            assign unused_t = t[SW];
        end
    endgenerate

    // E11: the probabilities of the step, its place delayed beside the exp pipeline
    logic        e11_v, e11_half, e11_first, e11_rlast, e11_glast;
    logic [15:0] e11_qi, e11_kc, e11_off, e11_n;
    pipe_delay #(.WIDTH(1), .DEPTH(X_LAT), .RESET(1)) u_e11v (
        .clk(clk), .rst_n(rst_n), .d(e1_v), .q(e11_v)
    );
    pipe_delay #(.WIDTH(4 + 64), .DEPTH(X_LAT)) u_e11 (
        .clk(clk), .rst_n(rst_n), .d({e1_half, e1_first, e1_rlast, e1_glast, e1_qi, e1_kc, e1_off, e1_n}),
        .q({e11_half, e11_first, e11_rlast, e11_glast, e11_qi, e11_kc, e11_off, e11_n})
    );

    logic [PWA_W-1:0] p_waddr;
    logic [PI*EP-1:0] pw_d;
    logic [PI-1:0]    pw_en;
    logic [S_W-1:0]   ps_acc, ps_step, ps_row;
    assign p_waddr = PWA_W'(mul_lo(32'(e11_half), 32'(PWH)) + mul_lo(32'(e11_qi), 32'(nkc)) + 32'(e11_kc));
    always_comb begin
        ps_step = '0;
        for (int i = 0; i < SMP; i++)
            if (16'(i) < e11_n) ps_step = ps_step + S_W'(e_p[i*EP +: EP]);
        ps_row = (e11_first ? '0 : ps_acc) + ps_step;
    end
    // word lane w takes step lane w − off
    always_comb begin
        pw_d  = '0;
        pw_en = '0;
        for (int w = 0; w < PI; w++)
            for (int i = 0; i < SMP; i++)
                if (32'(w) == 32'(e11_off) + 32'(i) && 16'(i) < e11_n) begin
                    pw_d[w*EP +: EP] = e_p[i*EP +: EP];
                    pw_en[w]         = e11_v;
                end
    end
    always_ff @(posedge clk) if (e11_v) ps_acc <= ps_row;
    // one memory per word lane: an exp step writes some lanes of a word, an AV beat reads a word
    generate
        for (l = 0; l < PI; l = l + 1) begin : g_pbuf
            logic [EP-1:0] mem [0:2*PWH-1];
            always_ff @(posedge clk) if (pw_en[l]) mem[p_waddr] <= pw_d[l*EP +: EP];
            assign p_word[l*EP +: EP] = mem[p_raddr];
        end
    endgenerate

    // (r, k) = recip_int(Σ p) per row, into half g mod 2 of the row table
    logic           rc_v, rc_half, rc_glast;
    logic [15:0]    rc_qi;
    logic [S_W-1:0] rc_s;
    always_ff @(posedge clk) begin
        if (!rst_n) rc_v <= 1'b0;
        else        rc_v <= e11_v && e11_rlast;
        rc_s     <= ps_row;
        rc_half  <= e11_half;
        rc_glast <= e11_glast;
        rc_qi    <= e11_qi;
    end
    logic [R:0]     rk_r;
    logic [Z_W-1:0] rk_k;
    recip_unit #(.S_W(S_W)) u_recip (.clk(clk), .s(rc_s), .r(rk_r), .k(rk_k));
    logic        rk_v, rk_half, rk_glast;
    logic [15:0] rk_qi;
    pipe_delay #(.WIDTH(1), .DEPTH(R_LAT), .RESET(1)) u_rkv (
        .clk(clk), .rst_n(rst_n), .d(rc_v), .q(rk_v)
    );
    pipe_delay #(.WIDTH(2 + 16), .DEPTH(R_LAT)) u_rk (
        .clk(clk), .rst_n(rst_n), .d({rc_half, rc_glast, rc_qi}), .q({rk_half, rk_glast, rk_qi})
    );
    logic [R+Z_W:0] rk_tab [0:2*SLOTS-1];
    always_ff @(posedge clk)
        if (rk_v) rk_tab[SLOT_A'(mul_lo(32'(rk_half), 32'(SLOTS)) + 32'(rk_qi))] <= {rk_r, rk_k};
    always_ff @(posedge clk) begin
        if (!rst_n || head_go) exp_done <= '0;
        else if (rk_v && rk_glast) exp_done <= exp_done + 16'd1;
    end

    // ---------------------------------------------------------------- FIN: y = requant(A·r)
    // Raw rows arrive in the order of AV's last beats: for ot, for each query of the group. Each
    // row is finished SM_P lanes per cycle (pieces); its P_OUT results become one y segment.
    logic        fn_on;
    logic [15:0] fn_g, fn_ot, fn_qi, fn_pc, fn_gsz, fn_nd, fn_npc;
    logic        fn_issue, fn_last_pc, fn_room;
    logic [7:0]  seg_inflight;
    logic [$clog2(SEG_D):0] seg_count;
    logic        seg_push;
    assign fn_gsz  = gsize(fn_g);
    assign fn_nd   = min16(32'(dh) - mul_lo(32'(fn_ot), 32'(PO)), 32'(PO));
    assign fn_npc  = 16'((32'(fn_nd) + 32'(SMP) - 32'd1) / 32'(SMP));
    assign fn_last_pc = fn_pc + 16'd1 >= fn_npc;
    assign fn_room = 32'(seg_count) + 32'(seg_inflight) < 32'(SEG_D) || fn_pc != '0;
    assign fn_issue = fn_on && cu_o_raw_valid && fn_room;
    // ready does not look at valid: the top's muxes would otherwise close a combinational loop
    assign cu_o_raw_ready = fn_on && fn_room && fn_last_pc;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            fn_on <= 1'b0;
        end else if (head_go) begin
            fn_on <= 1'b1;
            fn_g  <= '0;
            fn_ot <= '0;
            fn_qi <= '0;
            fn_pc <= '0;
        end else if (fn_issue) begin
            if (!fn_last_pc) begin
                fn_pc <= fn_pc + 16'd1;
            end else begin
                fn_pc <= '0;
                if (fn_qi + 16'd1 < fn_gsz) begin
                    fn_qi <= fn_qi + 16'd1;
                end else begin
                    fn_qi <= '0;
                    if (fn_ot + 16'd1 < nct) begin
                        fn_ot <= fn_ot + 16'd1;
                    end else begin
                        fn_ot <= '0;
                        fn_g  <= fn_g + 16'd1;
                        if (fn_g + 16'd1 >= ng) fn_on <= 1'b0;
                    end
                end
            end
        end
    end

    // F1: the piece's accumulators, (r, k), the segment's place
    logic                   f1_v, f1_first, f1_last, f1_glast;
    logic [SMP*A_W-1:0]     f1_a;
    logic [R:0]             f1_r;
    logic signed [SH_W-1:0] f1_sh;
    logic [15:0]            f1_pc, f1_nd;
    logic [ADDR_W-1:0]      f1_addr;
    logic [R+Z_W:0]         fn_rk;
    logic [31:0]            fn_o0;   // the piece's first lane
    assign fn_o0 = mul_lo(32'(fn_pc), 32'(SMP));
    assign fn_rk = rk_tab[SLOT_A'(mul_lo(32'(fn_g[0]), 32'(SLOTS)) + 32'(fn_qi))];
    always_ff @(posedge clk) begin
        if (!rst_n) f1_v <= 1'b0;
        else        f1_v <= fn_issue;
        for (int i = 0; i < SMP; i++) begin
            f1_a[i*A_W +: A_W] <= '0;
            for (int o = 0; o < PO; o++)
                if (32'(o) == fn_o0 + 32'(i)) f1_a[i*A_W +: A_W] <= cu_o_raw_acc[o*ACCW +: A_W];
        end
        f1_r     <= fn_rk[R+Z_W : Z_W];
        f1_sh    <= SH_W'(R) + SH_W'(fn_rk[Z_W-1:0]) + SH_W'($signed(f_osh[SHW-1:0]));
        f1_first <= fn_pc == '0;
        f1_last  <= fn_last_pc;
        f1_glast <= fn_last_pc && fn_qi + 16'd1 >= fn_gsz && fn_ot + 16'd1 >= nct;
        f1_pc    <= fn_pc;
        f1_nd    <= fn_nd;
        f1_addr  <= y_addr + ADDR_W'((mul_lo(mul_lo(32'(fn_g), 32'(gs)) + 32'(fn_qi), 32'(D)) << 1) +
                                     ((32'(hc) + mul_lo(32'(fn_ot), 32'(PO))) << 1));
    end

    logic [SMP*AW-1:0] fy;
    logic signed [SH_W-1:0] f4_sh;
    pipe_delay #(.WIDTH(SH_W), .DEPTH(3)) u_f4sh (.clk(clk), .rst_n(rst_n), .d(f1_sh), .q(f4_sh));
    generate
        for (l = 0; l < SMP; l = l + 1) begin : g_fin
            logic signed [A_W-1:0]   a;
            logic signed [BL+R+1:0]  pl2, pl3;   // AL (BL bits, unsigned) · r
            logic signed [AH_W+R:0]  ph2, ph3;
            logic signed [Y_W-1:0]   y4;
            assign a = f1_a[l*A_W +: A_W];
            always_ff @(posedge clk) begin
                pl2 <= $signed({1'b0, a[BL-1:0]}) * $signed({1'b0, f1_r});
                ph2 <= $signed(a[A_W-1:BL]) * $signed({1'b0, f1_r});
                pl3 <= pl2;
                ph3 <= ph2;
                y4  <= (Y_W'(ph3) <<< BL) + Y_W'(pl3);
            end
            requant #(.IN_W(Y_W), .OUT_W(AW), .SHIFT_W(SH_W), .OB_W(OBW), .MAX_LSHIFT(AW)) u_rq (
                .clk(clk), .x(y4), .shift(f4_sh), .out_bits(o_signed ? OBW'(obits) : '0),
                .y(fy[l*AW +: AW])
            );
        end
    endgenerate

    logic                f9_v, f9_first, f9_last, f9_glast;
    logic [15:0]         f9_pc, f9_nd;
    logic [ADDR_W-1:0]   f9_addr;
    pipe_delay #(.WIDTH(1), .DEPTH(F_LAT), .RESET(1)) u_f9v (.clk(clk), .rst_n(rst_n), .d(f1_v), .q(f9_v));
    pipe_delay #(.WIDTH(3 + 32 + ADDR_W), .DEPTH(F_LAT)) u_f9 (
        .clk(clk), .rst_n(rst_n), .d({f1_first, f1_last, f1_glast, f1_pc, f1_nd, f1_addr}),
        .q({f9_first, f9_last, f9_glast, f9_pc, f9_nd, f9_addr})
    );

    // an unsigned output format: the signed ACT_W-bit result clamped to 0 .. 2^bits - 1; the
    // pieces of a row gather in seg_row
    logic [PO*AW-1:0] seg_row, seg_new;
    logic [31:0] f9_o0;
    assign f9_o0 = mul_lo(32'(f9_pc), 32'(SMP));
    always_comb begin
        logic signed [AW-1:0] v, hi;
        hi = AW'((33'd1 << obits) - 33'd1);
        seg_new = f9_first ? '0 : seg_row;
        for (int i = 0; i < SMP; i++) begin
            v = $signed(fy[i*AW +: AW]);
            if (!o_signed) begin
                if (v < 0) v = '0;
                else if (v > hi) v = hi;
            end
            for (int o = 0; o < PO; o++)
                if (32'(o) == f9_o0 + 32'(i)) seg_new[o*AW +: AW] = v;
        end
    end
    always_ff @(posedge clk) if (f9_v) seg_row <= seg_new;
    assign seg_push = f9_v && f9_last;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            seg_inflight <= '0;
        end else begin
            seg_inflight <= seg_inflight + 8'(fn_issue && fn_pc == '0) - 8'(seg_push);
        end
        if (!rst_n || head_go) fin_cnt <= '0;
        else if (seg_push && f9_glast) fin_cnt <= fin_cnt + 16'd1;
    end

    // ---------------------------------------------------------------- y writes
    logic                    sq_valid, sq_pop;
    logic [ADDR_W+NSEG_W+PO*AW-1:0] sq_data;
    logic [ADDR_W-1:0]       sg_a;
    logic [NSEG_W-1:0]       sg_n;
    logic [PO*AW-1:0]        sg_row;
    stream_fifo #(.WIDTH(ADDR_W + NSEG_W + PO*AW), .DEPTH(SEG_D)) u_sq (
        .clk(clk), .rst_n(rst_n), .push(seg_push), .push_data({f9_addr, NSEG_W'(f9_nd), seg_new}),
        .out_valid(sq_valid), .out_ready(sq_pop), .out_data(sq_data), .count(seg_count)
    );
    assign {sg_a, sg_n, sg_row} = sq_data;

    // the segment's beats b0 .. b1 (beat addresses >> BB_L); a burst ends at b1, at MAX_BURST
    // beats or before a 4 KB boundary
    logic [ADDR_W-1:0] yw_b, yw_b1, yw_cap, yw_blen, yw_bi;
    logic              yw_seg, yw_burst;
    logic [YP_W-1:0]   yw_port;
    logic [PORTS*WO_W-1:0] yw_out;
    logic [PORTS-1:0]  yw_awf, yw_wf, yw_bf;
    logic [DW-1:0]     yw_data;
    logic [BB-1:0]     yw_strb;
    assign yw_b1  = (sg_a + ADDR_W'({sg_n, 1'b0}) - ADDR_W'(1)) >> BB_L;
    assign yw_cap = ADDR_W'(((yw_b >> (12 - BB_L)) + ADDR_W'(1)) << (12 - BB_L)) - yw_b;   // beats to 4 KB
    always_comb begin
        yw_blen = yw_b1 - yw_b + ADDR_W'(1);
        if (yw_blen > ADDR_W'(MAX_BURST)) yw_blen = ADDR_W'(MAX_BURST);
        if (yw_blen > yw_cap) yw_blen = yw_cap;
    end
    // byte p of beat yw_b + yw_bi is byte (beat address + p − sg_a) of the segment
    always_comb begin
        logic [31:0] pos;
        logic [ADDR_W-1:0] ba;
        ba = (yw_b + yw_bi) << BB_L;
        yw_data = '0;
        yw_strb = '0;
        for (int p = 0; p < BB; p++) begin
            pos = 32'(ba) + 32'(p) - 32'(sg_a);
            if (ba + ADDR_W'(p) >= sg_a && pos < {31'(sg_n), 1'b0}) begin
                yw_data[p*8 +: 8] = sg_row[pos*8 +: 8];
                yw_strb[p] = 1'b1;
            end
        end
    end
    logic yw_can_aw;
    assign yw_can_aw = yw_seg && !yw_burst && yw_out[32'(yw_port)*WO_W +: WO_W] < WO_W'(MAX_OUT);
    assign sq_pop    = yw_burst && yw_wf[yw_port] && yw_bi + ADDR_W'(1) == yw_blen && yw_b + yw_blen > yw_b1;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            yw_seg   <= 1'b0;
            yw_burst <= 1'b0;
            yw_port  <= '0;
            yw_out   <= '0;
        end else begin
            if (!yw_seg && sq_valid) begin
                yw_seg <= 1'b1;
                yw_b   <= sg_a >> BB_L;
            end
            if (yw_can_aw && yw_awf[yw_port]) begin
                yw_burst <= 1'b1;
                yw_bi    <= '0;
            end
            if (yw_burst && yw_wf[yw_port]) begin
                if (yw_bi + ADDR_W'(1) < yw_blen) begin
                    yw_bi <= yw_bi + ADDR_W'(1);
                end else begin
                    yw_burst <= 1'b0;
                    yw_port  <= (32'(yw_port) + 32'd1 >= 32'(PORTS)) ? '0 : yw_port + YP_W'(1);
                    yw_b     <= yw_b + yw_blen;
                    if (yw_b + yw_blen > yw_b1) yw_seg <= 1'b0;
                end
            end
            for (int p = 0; p < PORTS; p++)
                yw_out[p*WO_W +: WO_W] <= yw_out[p*WO_W +: WO_W] + WO_W'(yw_awf[p]) - WO_W'(yw_bf[p]);
        end
    end

    // ---------------------------------------------------------------- AXI ports
    always_comb begin
        m_arvalid = '0; m_araddr = '0; m_arlen = '0; m_arsize = '0; m_arburst = '0; m_arid = '0;
        m_rready = '0;
        m_awvalid = '0; m_awaddr = '0; m_awlen = '0; m_awsize = '0; m_awburst = '0; m_awid = '0;
        m_wvalid = '0; m_wdata = '0; m_wstrb = '0; m_wlast = '0; m_bready = '1;
        for (int p = 0; p < 3; p++) begin
            m_arvalid[p]                = r_arvalid[p];
            m_araddr[p*ADDR_W +: ADDR_W] = r_araddr[p*ADDR_W +: ADDR_W];
            m_arlen[p*8 +: 8]           = r_arlen[p*8 +: 8];
            m_arsize[p*3 +: 3]          = r_arsize[p*3 +: 3];
            m_arburst[p*2 +: 2]         = r_arburst[p*2 +: 2];
            m_arid[p*ID_W +: ID_W]      = r_arid[p*ID_W +: ID_W];
            m_rready[p]                 = r_rready[p];
        end
        for (int p = 0; p < PORTS; p++) begin
            m_awvalid[p]                 = yw_can_aw && 32'(yw_port) == 32'(p);
            m_awaddr[p*ADDR_W +: ADDR_W] = yw_b << BB_L;
            m_awlen[p*8 +: 8]            = 8'(yw_blen - ADDR_W'(1));
            m_awsize[p*3 +: 3]           = 3'(BB_L);
            m_awburst[p*2 +: 2]          = 2'b01;
            m_wvalid[p]                  = yw_burst && 32'(yw_port) == 32'(p);
            m_wdata[p*DW +: DW]          = yw_data;
            m_wstrb[p*BB +: BB]          = yw_strb;
            m_wlast[p]                   = yw_bi + ADDR_W'(1) == yw_blen;
        end
    end
    always_comb
        for (int p = 0; p < PORTS; p++) begin
            yw_awf[p] = m_awvalid[p] && m_awready[p];
            yw_wf[p]  = m_wvalid[p] && m_wready[p];
            yw_bf[p]  = m_bvalid[p];
        end
    always_comb
        for (int p = 0; p < 3; p++) begin
            r_arready[p]             = m_arready[p];
            r_rvalid[p]              = m_rvalid[p];
            r_rdata[p*DW +: DW]      = m_rdata[p*DW +: DW];
            r_rid[p*ID_W +: ID_W]    = m_rid[p*ID_W +: ID_W];
            r_rlast[p]               = m_rlast[p];
            r_rresp[p*2 +: 2]        = m_rresp[p*2 +: 2];
        end

    // ---------------------------------------------------------------- the instruction
    assign active  = x_fire || ex_step;
    assign running = st == S_HEAD || st == S_RUN || st == S_NEXT;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            st      <= S_IDLE;
            done    <= 1'b0;
            status  <= '0;
            head_go <= 1'b0;
        end else begin
            done    <= 1'b0;
            head_go <= 1'b0;
            case (st)
                S_IDLE: if (start) st <= S_CHK;
                S_CHK: begin
                    // sizes first, so that the byte counts below cannot overflow
                    fin_status <= `M3V_ISA_STATUS_OVER_LIMIT;
                    if (f_t == 0 || f_t > 32'(MAXT) || f_d == 0 || f_d > 32'(MAXD) ||
                        f_heads == 0 || f_heads > f_d || !fmt_ok(sbits, s_signed) || !fmt_ok(obits, o_signed) ||
                        !fits_signed(f_ssh, SHW) || !fits_signed(f_osh, SHW) ||
                        sfrac[7] != sfrac[6]) begin
                        st <= S_FIN;
                    end else begin
                        T  <= f_t[15:0];
                        D  <= f_d[15:0];
                        H  <= f_heads[15:0];
                        st <= S_FITS;
                    end
                end
                S_FITS: begin
                    if (!m3v_fits(f_qkv, 65'(qkv_bytes), sz_wgt, sz_arena, sz_in, sz_out) ||
                        !m3v_fits(f_y, 65'(y_bytes), sz_wgt, sz_arena, sz_in, sz_out) ||
                        !m3v_writable(f_y)) begin
                        st <= S_FIN;
                    end else begin
                        dv_n <= D;
                        dv_d <= H;
                        dv_q <= '0;
                        dv_r <= '0;
                        dv_i <= '0;
                        dv_k <= '0;
                        st   <= S_DIV;
                    end
                end
                S_DIV: begin
                    dv_n <= {dv_n[14:0], 1'b0};
                    dv_q <= dv_qn;
                    dv_r <= dv_rn;
                    dv_i <= dv_i + 5'd1;
                    if (dv_i == 5'd15) begin
                        dv_i <= '0;
                        dv_q <= '0;
                        dv_r <= '0;
                        dv_k <= dv_k + 3'd1;
                        case (dv_k)
                            3'd0: begin
                                dh <= dv_qn;
                                if (dv_rn != 0) st <= S_FIN;
                                dv_n <= dv_qn + 16'(PI - 1);
                                dv_d <= 16'(PI);
                            end
                            3'd1: begin
                                nc   <= dv_qn;
                                dv_n <= dh + 16'(PO - 1);
                                dv_d <= 16'(PO);
                            end
                            3'd2: begin
                                nct  <= dv_qn;
                                dv_n <= T + 16'(PO - 1);
                                dv_d <= 16'(PO);
                            end
                            3'd3: begin
                                nkt  <= dv_qn;
                                dv_n <= T + 16'(PI - 1);
                                dv_d <= 16'(PI);
                            end
                            3'd4: begin
                                nkc  <= dv_qn;
                                dv_n <= (SC_HALF > 65535) ? 16'hFFFF : 16'(SC_HALF);
                                dv_d <= T;
                                if (mul_lo(32'(T), 32'(dh)) > 32'(BUF_EL)) st <= S_FIN;
                            end
                            3'd5: begin
                                cap <= dv_qn;
                                st  <= (dv_qn == '0) ? S_FIN : S_CAP;
                            end
                            default: begin
                                ng <= dv_qn;
                                h  <= '0;
                                hc <= '0;
                                fin_status <= `M3V_ISA_STATUS_OK;
                                st <= S_HEAD;
                            end
                        endcase
                    end
                end
                S_CAP: begin
                    // the group: SLOTS queries at most, within half the score buffer, the
                    // instruction's q_tile (0: no limit) and T
                    logic [15:0] g_sz;
                    g_sz = (32'(cap) < 32'(SLOTS)) ? cap : 16'(SLOTS);
                    if (T < g_sz) g_sz = T;
                    if (f_qtile != 0 && f_qtile < 32'(g_sz)) g_sz = f_qtile[15:0];
                    gs   <= g_sz;
                    dbuf <= mul_lo(32'(T), 32'(dh)) <= 32'(HALF_EL);
                    dv_n <= T + g_sz - 16'd1;
                    dv_d <= g_sz;
                    st   <= S_DIV;
                end
                S_HEAD: if (ld_next > h) begin
                    // head h's load has started (its counts are reset): the stages may follow it
                    head_go <= 1'b1;
                    cu_half <= dbuf && h[0];
                    st      <= S_RUN;
                end
                S_RUN: if (!head_go && fin_cnt == ng) st <= S_NEXT;
                S_NEXT: begin
                    if (h + 16'd1 < H) begin
                        h  <= h + 16'd1;
                        hc <= hc + dh;
                        st <= S_HEAD;
                    end else begin
                        st <= S_DRAIN;
                    end
                end
                S_DRAIN: if (!sq_valid && !yw_seg && seg_inflight == '0 && yw_out == '0 && ld_busy == '0) st <= S_FIN;
                S_FIN: begin
                    done   <= 1'b1;
                    status <= fin_status;
                    st     <= S_IDLE;
                end
                default: st <= S_IDLE;
            endcase
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, task_idx, cu_o_tag, cu_o_raw_tag, cu_o_raw_acc, sfrac[7], f_osh, f_ssh, m_bid,
                         m_bresp, m_rvalid, m_rdata, m_rid, m_rlast, m_rresp, m_arready, m_awready,
                         m_wready, m_bvalid, dv_q[15], rec[511:352], rec[31:0], f_sfmt, f_fmt, nkc, cap,
                         q_rd, k_rd, v_rd, s_rd, p_word, f9_nd};
endmodule
