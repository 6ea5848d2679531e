// eng_attn: the attention engine of the accelerator top. It executes one `attention` instruction
// (docs/program.md) bit-exactly as compiler/program_exec.py (numerics.attention):
//   s = requant(q·kᵀ, score_shift, score_fmt), m = row max over all keys,
//   y = softmax_av_finish(softmax_av_partial(s, v, m, score_frac), out_shift, fmt)
// on the three column groups of qkv [T, 3D] (head h owns columns h·dh..(h+1)·dh-1 of each).
//
// Per head:
//   1 load   three attn_slice_readers (ports 0, 1, 2) bring the head's Q, K and V slices of all T
//            rows into three banked buffers (attn_buf), one DMA beat per cycle each.
//   2 scores per query tile (the instruction's q_tile, reduced to what the score buffer holds):
//            QKᵀ on the shared compute unit. A weight tile is w[i][o] = k[key kt·P_OUT + o][dim
//            c·P_IN + i] (bias 0, shift = score_shift on every channel, out_bits = the score
//            width); x beats are query rows, P_IN dims each, on one slot per query, so a tile
//            serves up to SLOTS queries (the next tile loads into the shadow meanwhile). Scores
//            go to the on-chip score buffer (never to DDR), row by row in words of P_OUT keys,
//            and the row maxima are kept as they arrive.
//   3 A·V    softmax_unit, one key per beat (score, SM_P value lanes, the row max), every row of
//            the tile, in column passes of SM_P lanes over the same scores when dh > SM_P. Each
//            result row piece is written to y with single-beat bursts and byte strobes (port
//            PORTS-1's write channel), so any 2-byte alignment works.
// Formats: signed widths 1..ACT_W and unsigned widths 1..ACT_W-1 for score_fmt and fmt (an
// unsigned result is the signed ACT_W-bit one clamped at 0 and 2^bits - 1, which equals the
// contract's single clamp); score fraction and both shifts within SHIFT_W / 7 signed bits.
// Anything else, T or D outside the limits, D not a multiple of heads, a head larger than the
// Q/K/V buffers, or an operand outside its space ends with STATUS over_limit before any access.
// Traffic per head: the three slices of every row (each row's beats once) plus the y pieces.
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
    output logic [`M3V_P_IN*`M3V_ACT_W-1:0]          cu_x_act,
    output logic [`M3V_P_OUT*`M3V_ACT_W-1:0]         cu_x_eout,
    output logic [`M3V_SCORE_W-1:0]                  cu_x_score,
    output logic [SLOT_W-1:0]                        cu_x_slot,
    output logic                                     cu_x_first,
    output logic                                     cu_x_last,
    output logic [`M3V_TAG_W-1:0]                    cu_x_tag,
    input  logic                                     cu_o_valid,
    output logic                                     cu_o_ready,
    input  logic [`M3V_P_OUT*`M3V_ACT_W-1:0]         cu_o_data,
    input  logic [`M3V_TAG_W-1:0]                    cu_o_tag
);
    // ---------------------------------------------------------------- sizes
    localparam int PI      = `M3V_P_IN;
    localparam int PO      = `M3V_P_OUT;
    localparam int SMP     = `M3V_SM_P;
    localparam int AW      = `M3V_ACT_W;
    localparam int WW      = `M3V_W_W;
    localparam int SW      = `M3V_SCORE_W;
    localparam int SHW     = `M3V_SHIFT_W;
    localparam int OBW     = `M3V_OB_W;
    localparam int SLOTS   = `M3V_SLOTS;
    localparam int TAGW    = `M3V_TAG_W;
    localparam int MAXT    = `M3V_MAX_TOKENS;
    localparam int MAXD    = `M3V_MAX_DIM;
    localparam int E       = DW / 16;                 // elements per DMA beat
    localparam int BB      = DW / 8;
    localparam int BB_L    = $clog2(BB);
    localparam int LW      = $clog2(E + 1);
    localparam int NB0     = (E > PI) ? ((E > SMP) ? E : SMP) : ((PI > SMP) ? PI : SMP);
    localparam int NB      = 1 << $clog2(NB0);        // banks of each Q / K / V buffer
    // one head's Q, K and V: K and V share buffers.activations (the compiler's check), Q as big
    localparam int BUF_A   = `M3V_BUF_ACTIVATIONS / 4;
    localparam int BUF_EL  = (MAXT * MAXD < BUF_A) ? MAXT * MAXD : BUF_A;
    localparam int BDEPTH  = 1 << $clog2((BUF_EL + NB - 1) / NB);
    // score buffer: words of P_OUT scores, a row of T keys takes ceil(T / P_OUT) words
    localparam int KT_MAX  = (MAXT + PO - 1) / PO;
    localparam int SC_A    = `M3V_BUF_SCORES / 2 / PO;
    localparam int SC_WORDS = (MAXT * KT_MAX < SC_A) ? MAXT * KT_MAX : SC_A;
    localparam int SCA_W   = $clog2(SC_WORDS);
    localparam int QT_MAX  = (MAXT < SC_WORDS) ? MAXT : SC_WORDS;   // rows of a query tile
    localparam int QTA_W   = (QT_MAX > 1) ? $clog2(QT_MAX) : 1;
    localparam int KEY_W   = $clog2(`M3V_MAX_KEYS + 1);
    localparam int DH_W    = $clog2(SMP + 1);
    localparam int NW      = $clog2(SMP + 1);
    localparam int DQ_DEPTH = 32;                     // y descriptors: covers the softmax FIFO
    localparam int WPORT   = PORTS - 1;               // y writes (its read channel may be busy)
    localparam int NBT_W   = $clog2(2 * SMP / BB + 3); // beats of one y piece

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

    // sizes of the instruction (registered by the checks)
    logic [15:0] T, D, H, dh, nc, npass, nkt, qt;
    logic [63:0] qkv_bytes, y_bytes;
    assign qkv_bytes = 64'(T) * 64'(D) * 64'd6;
    assign y_bytes   = 64'(T) * 64'(D) * 64'd2;
    logic [ADDR_W-1:0] qkv_addr, y_addr;
    assign qkv_addr = ADDR_W'(m3v_addr(f_qkv, base_wgt, base_arena, base_in, base_out));
    assign y_addr   = ADDR_W'(m3v_addr(f_y, base_wgt, base_arena, base_in, base_out));

    // ---------------------------------------------------------------- control
    typedef enum logic [3:0] {
        S_IDLE, S_CHK, S_FITS, S_DIV, S_CAP, S_LOAD_GO, S_LOAD, S_SCORE_GO, S_SCORE,
        S_SM_GO, S_SM, S_NEXT, S_DRAIN, S_FIN
    } state_t;
    state_t st;
    logic [3:0]  fin_status;
    logic [15:0] h, hc, q0, nq;

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

    // ---------------------------------------------------------------- Q / K / V loads
    logic              ld_start;
    logic [ADDR_W-1:0] ld_base_q, ld_base_k, ld_base_v;
    logic [31:0]       row_stride;
    assign row_stride = 32'(D) * 32'd6;
    assign ld_base_q  = qkv_addr + ADDR_W'({hc, 1'b0});
    assign ld_base_k  = qkv_addr + ADDR_W'({D, 1'b0}) + ADDR_W'({hc, 1'b0});
    assign ld_base_v  = qkv_addr + ADDR_W'({D, 2'b00}) + ADDR_W'({hc, 1'b0});

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

    logic [31:0]        q_rflat, k_rflat, v_rflat;
    logic [PI*16-1:0]   q_rd, k_rd;
    logic [SMP*16-1:0]  v_rd;
    attn_buf #(.NB(NB), .DEPTH(BDEPTH), .E(E), .RL(PI)) u_qbuf (
        .clk(clk), .we(rd_valid[0]), .wdata(rd_data[0 +: DW]), .wlo(rd_lo[0 +: LW]),
        .whi(rd_hi[0 +: LW]), .wflat(rd_flat[0 +: 32]), .rflat(q_rflat), .rdata(q_rd)
    );
    attn_buf #(.NB(NB), .DEPTH(BDEPTH), .E(E), .RL(PI)) u_kbuf (
        .clk(clk), .we(rd_valid[1]), .wdata(rd_data[DW +: DW]), .wlo(rd_lo[LW +: LW]),
        .whi(rd_hi[LW +: LW]), .wflat(rd_flat[32 +: 32]), .rflat(k_rflat), .rdata(k_rd)
    );
    attn_buf #(.NB(NB), .DEPTH(BDEPTH), .E(E), .RL(SMP)) u_vbuf (
        .clk(clk), .we(rd_valid[2]), .wdata(rd_data[2*DW +: DW]), .wlo(rd_lo[2*LW +: LW]),
        .whi(rd_hi[2*LW +: LW]), .wflat(rd_flat[64 +: 32]), .rflat(v_rflat), .rdata(v_rd)
    );

    // ---------------------------------------------------------------- QKᵀ: weight tiles
    logic        sc_start;
    logic        wp_on, wp_full;
    logic [15:0] wp_g0, wp_kt, wp_c, wp_o, wp_key;
    logic [PI*PO*WW-1:0] wtile;
    logic        w_fire;
    assign wp_key  = 16'(wp_kt * 16'(PO)) + wp_o;
    assign k_rflat = 32'(wp_key) * 32'(dh) + 32'(wp_c) * 32'(PI);
    assign w_fire  = cu_w_valid && cu_w_ready;

    assign cu_w_valid        = wp_full;
    assign cu_w_weights      = wtile;
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

    // group size of the queries starting at tile row g0
    function automatic logic [15:0] gsize(input logic [15:0] g0, input logic [15:0] n);
        gsize = (n - g0 > 16'(SLOTS)) ? 16'(SLOTS) : n - g0;
    endfunction

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            wp_on   <= 1'b0;
            wp_full <= 1'b0;
        end else if (sc_start) begin
            wp_on   <= 1'b1;
            wp_full <= 1'b0;
            wp_g0   <= '0;
            wp_kt   <= '0;
            wp_c    <= '0;
            wp_o    <= '0;
        end else begin
            if (wp_on && !wp_full) begin
                for (int o = 0; o < PO; o++)
                    if (16'(o) == wp_o)
                        for (int i = 0; i < PI; i++)
                            wtile[(i*PO + o)*WW +: WW] <=
                                (wp_key < T && 32'(wp_c) * 32'(PI) + 32'(i) < 32'(dh))
                                ? WW'($signed(k_rd[i*16 +: 16])) : '0;
                if (wp_o == 16'(PO - 1)) begin
                    wp_o    <= '0;
                    wp_full <= 1'b1;
                end else begin
                    wp_o <= wp_o + 16'd1;
                end
            end
            if (w_fire) begin
                wp_full <= 1'b0;
                if (wp_c + 16'd1 < nc) begin
                    wp_c <= wp_c + 16'd1;
                end else begin
                    wp_c <= '0;
                    if (wp_kt + 16'd1 < nkt) begin
                        wp_kt <= wp_kt + 16'd1;
                    end else begin
                        wp_kt <= '0;
                        wp_g0 <= wp_g0 + 16'(SLOTS);
                        if (wp_g0 + 16'(SLOTS) >= nq) wp_on <= 1'b0;
                    end
                end
            end
        end
    end

    // ---------------------------------------------------------------- QKᵀ: query beats
    logic        bp_on;
    logic [15:0] bp_g0, bp_kt, bp_c, bp_qi, bp_gsz;
    logic        x_fire;
    assign bp_gsz  = gsize(bp_g0, nq);
    assign q_rflat = (32'(q0) + 32'(bp_g0) + 32'(bp_qi)) * 32'(dh) + 32'(bp_c) * 32'(PI);
    assign x_fire  = cu_x_valid && cu_x_ready;

    assign cu_x_valid = bp_on;
    assign cu_x_wnext = bp_qi == '0;
    assign cu_x_first = bp_c == '0;
    assign cu_x_last  = bp_c + 16'd1 == nc;
    assign cu_x_slot  = SLOT_W'(bp_qi);
    assign cu_x_tag   = TAGW'(bp_g0 + bp_qi);
    assign cu_x_eout  = '0;
    assign cu_x_score = '0;
    always_comb
        for (int i = 0; i < PI; i++)
            cu_x_act[i*AW +: AW] = (32'(bp_c) * 32'(PI) + 32'(i) < 32'(dh))
                                   ? AW'($signed(q_rd[i*16 +: 16])) : '0;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            bp_on <= 1'b0;
        end else if (sc_start) begin
            bp_on <= 1'b1;
            bp_g0 <= '0;
            bp_kt <= '0;
            bp_c  <= '0;
            bp_qi <= '0;
        end else if (x_fire) begin
            if (bp_qi + 16'd1 < bp_gsz) begin
                bp_qi <= bp_qi + 16'd1;
            end else begin
                bp_qi <= '0;
                if (bp_c + 16'd1 < nc) begin
                    bp_c <= bp_c + 16'd1;
                end else begin
                    bp_c <= '0;
                    if (bp_kt + 16'd1 < nkt) begin
                        bp_kt <= bp_kt + 16'd1;
                    end else begin
                        bp_kt <= '0;
                        bp_g0 <= bp_g0 + 16'(SLOTS);
                        if (bp_g0 + 16'(SLOTS) >= nq) bp_on <= 1'b0;
                    end
                end
            end
        end
    end

    // ---------------------------------------------------------------- QKᵀ: scores and row maxima
    logic [PO*SW-1:0] sbuf [0:SC_WORDS-1];
    logic [SW-1:0]    mbuf [0:QT_MAX-1];
    logic             co_on;
    logic [15:0]      co_g0, co_kt, co_qi, co_gsz, co_row;
    logic [PO*SW-1:0] co_s;
    logic signed [SW-1:0] co_max;
    logic [SCA_W-1:0] co_addr;
    assign co_gsz     = gsize(co_g0, nq);
    assign co_row     = co_g0 + co_qi;
    assign co_addr    = SCA_W'(32'(co_row) * 32'(nkt) + 32'(co_kt));
    assign cu_o_ready = 1'b1;

    // an unsigned score format clamps the signed ACT_W-bit result once more, to 0 .. 2^bits - 1
    always_comb begin
        logic signed [AW-1:0] v, hi;
        hi = AW'((33'd1 << sbits) - 33'd1);
        co_max = '0;
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
            if (32'(co_kt) * 32'(PO) + 32'(o) < 32'(T) && $signed(co_s[o*SW +: SW]) > co_max)
                co_max = $signed(co_s[o*SW +: SW]);
    end

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            co_on <= 1'b0;
        end else if (sc_start) begin
            co_on <= 1'b1;
            co_g0 <= '0;
            co_kt <= '0;
            co_qi <= '0;
        end else if (co_on && cu_o_valid) begin
            if (co_qi + 16'd1 < co_gsz) begin
                co_qi <= co_qi + 16'd1;
            end else begin
                co_qi <= '0;
                if (co_kt + 16'd1 < nkt) begin
                    co_kt <= co_kt + 16'd1;
                end else begin
                    co_kt <= '0;
                    co_g0 <= co_g0 + 16'(SLOTS);
                    if (co_g0 + 16'(SLOTS) >= nq) co_on <= 1'b0;
                end
            end
        end
    end
    always_ff @(posedge clk) begin
        if (co_on && cu_o_valid) begin
            sbuf[co_addr] <= co_s;
            if (co_kt == '0 || co_max > $signed(mbuf[QTA_W'(co_row)]))
                mbuf[QTA_W'(co_row)] <= co_max;
        end
    end

    // ---------------------------------------------------------------- A·V: softmax feed
    logic        sm_start, fd_on;
    logic [15:0] fd_cp, fd_r, fd_j, fd_kt, fd_o, fd_rem;
    logic [31:0] fd_vf;
    logic        sm_in_valid, sm_in_ready, sm_fire;
    logic [PO*SW-1:0] fd_word;
    logic [SW-1:0]    fd_score;
    logic [DH_W-1:0]  fd_dh;
    logic [NW-1:0]    fd_n;
    logic [ADDR_W-1:0] fd_addr;
    logic              dq_push, dq_full;
    logic [5:0]        dq_count;
    logic [31:0]       rows_fed, rows_done;

    assign fd_word  = sbuf[SCA_W'(32'(fd_r) * 32'(nkt) + 32'(fd_kt))];
    always_comb begin
        fd_score = fd_word[0 +: SW];
        for (int o = 0; o < PO; o++)
            if (16'(o) == fd_o) fd_score = fd_word[o*SW +: SW];
    end
    assign v_rflat  = fd_vf;
    assign fd_n     = (fd_rem > 16'(SMP)) ? NW'(SMP) : NW'(fd_rem);
    assign fd_dh    = DH_W'(fd_n);
    assign fd_addr  = y_addr + ADDR_W'((32'(q0 + fd_r) * 32'(D) + 32'(hc) + 32'(fd_cp) * 32'(SMP)) << 1);
    assign dq_full  = dq_count >= 6'(DQ_DEPTH - 1);
    assign sm_in_valid = fd_on && (fd_j != '0 || !dq_full);
    assign sm_fire  = sm_in_valid && sm_in_ready;
    assign dq_push  = sm_fire && fd_j == '0;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            fd_on <= 1'b0;
        end else if (sm_start) begin
            fd_on  <= 1'b1;
            fd_cp  <= '0;
            fd_r   <= '0;
            fd_j   <= '0;
            fd_kt  <= '0;
            fd_o   <= '0;
            fd_rem <= dh;
            fd_vf  <= '0;
        end else if (sm_fire) begin
            if (fd_j + 16'd1 < T) begin
                fd_j  <= fd_j + 16'd1;
                fd_vf <= fd_vf + 32'(dh);
                if (fd_o == 16'(PO - 1)) begin
                    fd_o  <= '0;
                    fd_kt <= fd_kt + 16'd1;
                end else begin
                    fd_o <= fd_o + 16'd1;
                end
            end else begin
                fd_j  <= '0;
                fd_o  <= '0;
                fd_kt <= '0;
                fd_vf <= 32'(fd_cp) * 32'(SMP);
                if (fd_r + 16'd1 < nq) begin
                    fd_r <= fd_r + 16'd1;
                end else begin
                    fd_r   <= '0;
                    fd_cp  <= fd_cp + 16'd1;
                    fd_rem <= fd_rem - 16'(SMP);
                    fd_vf  <= 32'(fd_cp + 16'd1) * 32'(SMP);
                    if (fd_cp + 16'd1 >= npass) fd_on <= 1'b0;
                end
            end
        end
    end

    logic               sm_out_valid, sm_out_ready;
    logic [SMP*AW-1:0]  sm_out_y, y_cl;
    softmax_unit #(.P(SMP)) u_sm (
        .clk(clk), .rst_n(rst_n),
        .in_valid(sm_in_valid), .in_ready(sm_in_ready), .in_score(fd_score), .in_v(v_rd),
        .in_max(mbuf[QTA_W'(fd_r)]), .in_keys(KEY_W'(T)), .in_score_frac(sfrac[6:0]),
        .in_out_shift(f_osh[SHW-1:0]), .in_out_bits(o_signed ? OBW'(obits) : '0), .in_dh(fd_dh),
        .out_valid(sm_out_valid), .out_ready(sm_out_ready), .out_y(sm_out_y)
    );

    // an unsigned output format: the signed ACT_W-bit result clamped to 0 .. 2^bits - 1
    always_comb begin
        logic signed [AW-1:0] v, hi;
        hi = AW'((33'd1 << obits) - 33'd1);
        for (int c = 0; c < SMP; c++) begin
            v = $signed(sm_out_y[c*AW +: AW]);
            if (!o_signed) begin
                if (v < 0) v = '0;
                else if (v > hi) v = hi;
            end
            y_cl[c*AW +: AW] = v;
        end
    end

    // ---------------------------------------------------------------- y writes
    logic              dq_valid, dq_pop;
    logic [ADDR_W+NW-1:0] dq_data;
    logic [ADDR_W-1:0] wr_a, wr_b0;
    logic [NW-1:0]     wr_n;
    logic [NBT_W-1:0]  wr_nb, wr_aw, wr_w;
    logic              item, aw_fire, wb_fire, b_fire;
    logic [7:0]        outstanding;
    logic [DW-1:0]     wr_data;
    logic [BB-1:0]     wr_strb;

    stream_fifo #(.WIDTH(ADDR_W + NW), .DEPTH(DQ_DEPTH)) u_dq (
        .clk(clk), .rst_n(rst_n), .push(dq_push), .push_data({fd_addr, fd_n}),
        .out_valid(dq_valid), .out_ready(dq_pop), .out_data(dq_data), .count(dq_count)
    );
    assign {wr_a, wr_n} = dq_data;
    assign wr_b0 = wr_a & ~ADDR_W'(BB - 1);
    assign wr_nb = NBT_W'(((wr_a + ADDR_W'({wr_n, 1'b0}) - ADDR_W'(1)) >> BB_L) - (wr_a >> BB_L) + ADDR_W'(1));
    assign item  = dq_valid && sm_out_valid;
    assign aw_fire = m_awvalid[WPORT] && m_awready[WPORT];
    assign wb_fire = m_wvalid[WPORT] && m_wready[WPORT];
    assign b_fire  = m_bvalid[WPORT];
    assign dq_pop       = wb_fire && wr_w + NBT_W'(1) == wr_nb;
    assign sm_out_ready = dq_pop;

    // byte p of beat wr_w is byte (wr_w·BB + p − the piece's offset in its first beat) of the piece
    always_comb begin
        logic [31:0] pos, off;
        off = 32'(wr_a[BB_L-1:0]);
        wr_data = '0;
        wr_strb = '0;
        for (int p = 0; p < BB; p++) begin
            pos = 32'(wr_w) * 32'(BB) + 32'(p);
            if (pos >= off && pos - off < {31'(wr_n), 1'b0}) begin
                wr_data[p*8 +: 8] = y_cl[(pos - off)*8 +: 8];
                wr_strb[p] = 1'b1;
            end
        end
    end

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            wr_aw       <= '0;
            wr_w        <= '0;
            outstanding <= '0;
        end else begin
            if (dq_pop) begin
                wr_aw <= '0;
                wr_w  <= '0;
            end else begin
                if (aw_fire) wr_aw <= wr_aw + NBT_W'(1);
                if (wb_fire) wr_w  <= wr_w + NBT_W'(1);
            end
            outstanding <= outstanding + 8'(aw_fire) - 8'(b_fire);
        end
    end

    // ---------------------------------------------------------------- AXI ports
    always_comb begin
        m_arvalid = '0; m_araddr = '0; m_arlen = '0; m_arsize = '0; m_arburst = '0; m_arid = '0;
        m_rready = '0;
        m_awvalid = '0; m_awaddr = '0; m_awlen = '0; m_awsize = '0; m_awburst = '0; m_awid = '0;
        m_wvalid = '0; m_wdata = '0; m_wstrb = '0; m_wlast = '0; m_bready = '0;
        for (int p = 0; p < 3; p++) begin
            m_arvalid[p]                = r_arvalid[p];
            m_araddr[p*ADDR_W +: ADDR_W] = r_araddr[p*ADDR_W +: ADDR_W];
            m_arlen[p*8 +: 8]           = r_arlen[p*8 +: 8];
            m_arsize[p*3 +: 3]          = r_arsize[p*3 +: 3];
            m_arburst[p*2 +: 2]         = r_arburst[p*2 +: 2];
            m_arid[p*ID_W +: ID_W]      = r_arid[p*ID_W +: ID_W];
            m_rready[p]                 = r_rready[p];
        end
        m_awvalid[WPORT]                   = item && wr_aw < wr_nb && outstanding < 8'(MAX_OUT);
        m_awaddr[WPORT*ADDR_W +: ADDR_W]   = wr_b0 + ADDR_W'({wr_aw, {BB_L{1'b0}}});
        m_awlen[WPORT*8 +: 8]              = 8'd0;
        m_awsize[WPORT*3 +: 3]             = 3'(BB_L);
        m_awburst[WPORT*2 +: 2]            = 2'b01;
        m_wvalid[WPORT]                    = item && wr_w < wr_aw;
        m_wdata[WPORT*DW +: DW]            = wr_data;
        m_wstrb[WPORT*BB +: BB]            = wr_strb;
        m_wlast[WPORT]                     = 1'b1;
        m_bready[WPORT]                    = 1'b1;
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
    logic [15:0] cap;
    assign active = x_fire || sm_fire;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            st        <= S_IDLE;
            done      <= 1'b0;
            status    <= '0;
            ld_start  <= 1'b0;
            sc_start  <= 1'b0;
            sm_start  <= 1'b0;
            rows_fed  <= '0;
            rows_done <= '0;
        end else begin
            done     <= 1'b0;
            ld_start <= 1'b0;
            sc_start <= 1'b0;
            sm_start <= 1'b0;
            if (dq_push) rows_fed  <= rows_fed + 32'd1;
            if (dq_pop)  rows_done <= rows_done + 32'd1;
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
                                dv_n <= dh + 16'(SMP - 1);
                                dv_d <= 16'(SMP);
                            end
                            3'd2: begin
                                npass <= dv_qn;
                                dv_n  <= T + 16'(PO - 1);
                                dv_d  <= 16'(PO);
                            end
                            3'd3: begin
                                nkt  <= dv_qn;
                                dv_n <= 16'(SC_WORDS);
                                dv_d <= (dv_qn == 0) ? 16'd1 : dv_qn;
                                if (32'(T) * 32'(dh) > 32'(BUF_EL) || 32'(dv_qn) > 32'(SC_WORDS))
                                    st <= S_FIN;
                            end
                            default: begin
                                cap <= dv_qn;
                                st  <= S_CAP;
                            end
                        endcase
                    end
                end
                S_CAP: begin
                    // the query tile: the instruction's q_tile (0: as many as fit), within the
                    // score buffer and T
                    qt <= T;
                    if (f_qtile != 0 && f_qtile < 32'(T)) qt <= f_qtile[15:0];
                    if (cap < T && (f_qtile == 0 || 32'(cap) < f_qtile)) qt <= cap;
                    h  <= '0;
                    hc <= '0;
                    fin_status <= `M3V_ISA_STATUS_OK;
                    st <= S_LOAD_GO;
                end
                S_LOAD_GO: begin
                    ld_start <= 1'b1;
                    st       <= S_LOAD;
                end
                S_LOAD: if (!ld_start && ld_busy == '0) begin
                    q0 <= '0;
                    nq <= (qt < T) ? qt : T;
                    st <= S_SCORE_GO;
                end
                S_SCORE_GO: begin
                    sc_start <= 1'b1;
                    st       <= S_SCORE;
                end
                S_SCORE: if (!sc_start && !co_on) st <= S_SM_GO;
                S_SM_GO: begin
                    sm_start <= 1'b1;
                    st       <= S_SM;
                end
                S_SM: if (!sm_start && !fd_on) begin
                    if (q0 + qt < T) begin
                        q0 <= q0 + qt;
                        nq <= (T - (q0 + qt) < qt) ? T - (q0 + qt) : qt;
                        st <= S_SCORE_GO;
                    end else begin
                        st <= S_NEXT;
                    end
                end
                S_NEXT: begin
                    if (h + 16'd1 < H) begin
                        h  <= h + 16'd1;
                        hc <= hc + dh;
                        st <= S_LOAD_GO;
                    end else begin
                        st <= S_DRAIN;
                    end
                end
                S_DRAIN: if (rows_fed == rows_done && outstanding == 0) st <= S_FIN;
                S_FIN: begin
                    done      <= 1'b1;
                    status    <= fin_status;
                    rows_fed  <= '0;
                    rows_done <= '0;
                    st        <= S_IDLE;
                end
                default: st <= S_IDLE;
            endcase
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, task_idx, cu_o_tag, sfrac[7], f_osh, f_ssh, m_bid, m_bresp,
                         m_rvalid, m_rdata, m_rid, m_rlast, m_rresp, m_arready, m_awready,
                         m_wready, m_bvalid, dv_q[15], rec[511:352], rec[31:0],
                         f_sfmt, f_fmt};
endmodule
