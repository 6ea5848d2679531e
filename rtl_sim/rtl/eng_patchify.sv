// eng_patchify: the PATCHIFY engine of the accelerator top. One instruction:
//   dst = numerics.patchify(src [C, H, W], p): [(H/p)(W/p), C p p], patches in raster order,
//   columns (c, i, j) = src[c, py p + i, px p + j], all int16, bit-exact with program_exec.
//
// A band (one patch row py) of the output is C p W contiguous elements, made of the C blocks
// src[c, py p .. py p + p - 1, :], each p W contiguous elements of the source. So every source
// byte is read once, in C long commands per band, and the output is one long write:
//
//   port 0 read: band py+1, channel by channel ─> band buffer half h^1
//   band buffer half h ─> runs of p pixels (px, c, i) ─> elem_gather ─> port 1 write (one command)
//
// The band buffer has two halves of HB beats (M3V_PATCH_BAND_BYTES each): one fills while the other
// drains. Channel c's block sits at beat c·CS of its half, CS = ceil(p W / P) + 1, starting at its
// source element offset mod P (blocks start anywhere in a beat; the reader fetches from the beat
// boundary below). A run of p pixels is read as windows of P elements at any element address:
// the half is split into even and odd beats (two RAMs), so the two beats under a window are read
// in one cycle and shifted into place. One window per cycle: full rate for p >= P, p elements per
// cycle below.
//
// Refusals (STATUS over_limit, nothing stored): src past the end of its space, dst outside
// arena/out or past its end (as program_exec), and what numerics.patchify refuses (p = 0, H or W
// not a multiple of p), and a band larger than a buffer half (C·CS > HB). An empty image (C, H or
// W = 0) stores nothing. H mod p and W mod p come from a 32-step serial divider.
`include "m3v_isa.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"
`include "m3v_mem.svh"

module eng_patchify #(
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
    localparam int BB    = DW / 8;
    localparam int BB_L  = $clog2(BB);
    localparam int P     = DW / 16;                  // int16 elements per beat
    localparam int LP    = $clog2(P);
    localparam int NB_W  = $clog2(BB) + 1;
    localparam int HB    = `M3V_PATCH_BAND_BYTES / BB; // beats per buffer half
    localparam int HB_L  = $clog2(HB);
    localparam int EA_W  = HB_L + 1 + LP;            // element address in the buffer (both halves)
    localparam int GCAP  = 6 * P;
    localparam int GC_W  = $clog2(GCAP + 1);
    localparam int PN_W  = $clog2(P + 1);

    localparam logic [2:0] S_IDLE = 3'd0, S_DIV = 3'd1, S_CHECK = 3'd2, S_RUN = 3'd3, S_DONE = 3'd4;

    // ---------------------------------------------------------------- the instruction record
    function automatic logic [31:0] word(input logic [511:0] r, input int k);
        word = r[32*k +: 32];
    endfunction

    // ---------------------------------------------------------------- the instruction
    logic [31:0] f_src, f_dst, f_c, f_h, f_w, f_p;
    always_comb begin
        f_src = word(rec, `M3V_ISA_F_PATCHIFY_SRC_REF);
        f_dst = word(rec, `M3V_ISA_F_PATCHIFY_DST_REF);
        f_c   = word(rec, `M3V_ISA_F_PATCHIFY_CHANNELS);
        f_h   = word(rec, `M3V_ISA_F_PATCHIFY_HEIGHT);
        f_w   = word(rec, `M3V_ISA_F_PATCHIFY_WIDTH);
        f_p   = word(rec, `M3V_ISA_F_PATCHIFY_PATCH);
    end

    logic [2:0]  state;
    logic [5:0]  dstep;
    logic [31:0] rem_h, rem_w;         // serial remainders H mod p, W mod p
    logic [32:0] rh_t, rw_t;
    logic [63:0] hw_q, pw_q;           // H·W, p·W
    logic [95:0] chw_q;                // C·H·W
    logic [63:0] cs_q;                 // beats per channel block
    logic        band_over;            // C * (beats per channel block) > HB
    logic [63:0] a_src;
    logic [ADDR_W-1:0] a_dst;

    // one restoring-division step: shift in the next dividend bit, subtract p when possible
    assign rh_t = {rem_h, f_h[5'(31 - dstep)]};
    assign rw_t = {rem_w, f_w[5'(31 - dstep)]};
    // The products here are shift-and-add, without multiplier cells (a DSP slice each, and the
    // DSPs are the MAC array's): H·W and p·W step one bit of H and p per division step; C·H·W and
    // C·(block beats) matter exactly only below 2^32 and HB.
    function automatic logic [63:0] mul_sa(input logic [63:0] a, input logic [15:0] b);
        mul_sa = '0;
        for (int i = 0; i < 16; i++) mul_sa = mul_sa + ((a << i) & {64{b[i]}});
    endfunction

    // a * b when it is below 2^32 (or when a or b is below 2^16); otherwise some value at or past
    // 2^32, which no 32-bit space holds, so every check on it fails as on the full product
    function automatic logic [95:0] mul_sat(input logic [31:0] a, input logic [63:0] b);
        logic [31:0] n, w;
        if (a == '0 || b == '0) mul_sat = '0;
        else if (b[63:32] != '0) mul_sat = 96'(1) << 32;
        else begin
            n = a[31:16] == '0 ? a : b[31:0];
            w = a[31:16] == '0 ? b[31:0] : a;
            mul_sat = n[31:16] != '0 ? 96'(1) << 32 : 96'(mul_sa(64'(w), n[15:0]));
        end
    endfunction

    always_comb begin
        logic [HB_L:0] c_n, b_n;
        c_n = (HB_L+1)'(f_c);
        b_n = (HB_L+1)'(cs_q);
        if (f_c == '0 || cs_q == '0) band_over = 1'b0;
        else if (f_c > 32'(HB) || cs_q > 64'(HB)) band_over = 1'b1;
        else band_over = mul_sa(64'(c_n), 16'(b_n)) > 64'(HB);
    end

    // ---------------------------------------------------------------- DMA
    logic              rd_cv, rd_cr, rd_v, rd_e, wr_cv, wr_cr, wr_v, wr_r;
    logic [63:0]       rd_addr;
    logic [31:0]       rd_bytes, out_bytes;
    logic [DW-1:0]     rd_d, wr_d;
    logic [NB_W-1:0]   rd_n;

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rd (
        .clk, .rst_n, .cmd_valid(rd_cv), .cmd_ready(rd_cr),
        .cmd_addr(ADDR_W'({rd_addr[63:BB_L], {BB_L{1'b0}}})), .cmd_bytes(rd_bytes), .cmd_eos(1'b1),
        .out_valid(rd_v), .out_ready(1'b1), .out_data(rd_d), .out_nbytes(rd_n), .out_eos(rd_e),
        .arvalid(m_arvalid[0]), .arready(m_arready[0]), .araddr(m_araddr[0 +: ADDR_W]),
        .arlen(m_arlen[0 +: 8]), .arsize(m_arsize[0 +: 3]), .arburst(m_arburst[0 +: 2]),
        .arid(m_arid[0 +: ID_W]), .rvalid(m_rvalid[0]), .rready(m_rready[0]), .rdata(m_rdata[0 +: DW]),
        .rid(m_rid[0 +: ID_W]), .rlast(m_rlast[0]), .rresp(m_rresp[0 +: 2]));

    axi_writer #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_wr (
        .clk, .rst_n, .cmd_valid(wr_cv), .cmd_ready(wr_cr), .cmd_addr(a_dst), .cmd_bytes(out_bytes),
        .in_valid(wr_v), .in_ready(wr_r), .in_data(wr_d),
        .awvalid(m_awvalid[1]), .awready(m_awready[1]), .awaddr(m_awaddr[ADDR_W +: ADDR_W]),
        .awlen(m_awlen[8 +: 8]), .awsize(m_awsize[3 +: 3]), .awburst(m_awburst[2 +: 2]),
        .awid(m_awid[ID_W +: ID_W]), .wvalid(m_wvalid[1]), .wready(m_wready[1]), .wdata(m_wdata[DW +: DW]),
        .wstrb(m_wstrb[BB +: BB]), .wlast(m_wlast[1]), .bvalid(m_bvalid[1]), .bready(m_bready[1]),
        .bid(m_bid[ID_W +: ID_W]), .bresp(m_bresp[2 +: 2]));

    // every other channel idle
    assign m_arvalid[PORTS-1:1] = '0;
    assign m_araddr[PORTS*ADDR_W-1:ADDR_W] = '0;
    assign m_arlen[PORTS*8-1:8] = '0;
    assign m_arsize[PORTS*3-1:3] = '0;
    assign m_arburst[PORTS*2-1:2] = '0;
    assign m_arid[PORTS*ID_W-1:ID_W] = '0;
    assign m_rready[PORTS-1:1] = '1;
    assign m_awvalid[0] = 1'b0;
    assign m_awaddr[0 +: ADDR_W] = '0;
    assign m_awlen[0 +: 8] = '0;
    assign m_awsize[0 +: 3] = '0;
    assign m_awburst[0 +: 2] = '0;
    assign m_awid[0 +: ID_W] = '0;
    assign m_wvalid[0] = 1'b0;
    assign m_wdata[0 +: DW] = '0;
    assign m_wstrb[0 +: BB] = '0;
    assign m_wlast[0] = 1'b0;
    assign m_bready[0] = 1'b1;
    generate
        if (PORTS > 2) begin : g_idle
            assign m_awvalid[PORTS-1:2] = '0;
            assign m_awaddr[PORTS*ADDR_W-1:2*ADDR_W] = '0;
            assign m_awlen[PORTS*8-1:16] = '0;
            assign m_awsize[PORTS*3-1:6] = '0;
            assign m_awburst[PORTS*2-1:4] = '0;
            assign m_awid[PORTS*ID_W-1:2*ID_W] = '0;
            assign m_wvalid[PORTS-1:2] = '0;
            assign m_wdata[PORTS*DW-1:2*DW] = '0;
            assign m_wstrb[PORTS*BB-1:2*BB] = '0;
            assign m_wlast[PORTS-1:2] = '0;
            assign m_bready[PORTS-1:2] = '1;
            logic unused_hi;
            assign unused_hi = &{1'b0, m_awready[PORTS-1:2], m_wready[PORTS-1:2], m_bvalid[PORTS-1:2],
                                 m_bid[PORTS*ID_W-1:2*ID_W], m_bresp[PORTS*2-1:4]};
        end
    endgenerate

    // ---------------------------------------------------------------- band buffer
    logic [DW-1:0] ram_e [0:HB-1];     // even beats of both halves
    logic [DW-1:0] ram_o [0:HB-1];     // odd beats
    logic [HB_L:0] wptr;               // beat written next: {half, beat}
    logic          rd_fire;
    assign rd_fire = rd_v;             // the buffer always takes a beat
    always_ff @(posedge clk) begin
        if (rd_fire && !wptr[0]) ram_e[wptr[HB_L:1]] <= rd_d;
        if (rd_fire &&  wptr[0]) ram_o[wptr[HB_L:1]] <= rd_d;
    end

    // ---------------------------------------------------------------- fill side (reader)
    logic [1:0]  full;                 // half holds a complete band not yet drained
    logic        fh;                   // half being filled
    logic [1:0]  f_st;                 // F_OFF: no band left; F_CMD: issue channel f_ch; F_DATA: its data
    logic [31:0] f_row, f_ch;          // band's first source row, channel
    logic [63:0] f_band_e, f_ce;       // element offsets: band start in channel 0, current block
    logic [HB_L-1:0] f_cbeat;          // block's beat in the half
    localparam logic [1:0] F_OFF = 2'd0, F_CMD = 2'd1, F_DATA = 2'd2;

    // a band starts only in a free half
    assign rd_cv    = state == S_RUN && f_st == F_CMD && (f_ch != 0 || !full[fh]);
    assign rd_addr  = a_src + {f_ce[62:0], 1'b0};
    assign rd_bytes = 32'(pw_q << 1) + 32'(rd_addr[BB_L-1:0]);

    // ---------------------------------------------------------------- drain side (runs)
    logic          dh;                 // half being drained
    logic [31:0]   g_px, g_i, g_c, g_jo;   // px·p, i·W, channel, offset within the run
    logic [31:0]   g_ioff;
    logic [HB_L-1:0] g_cbeat;
    logic [LP-1:0] g_lead, g_band_lead, hw_mod;
    logic [EA_W-1:0] ga;
    logic [PN_W-1:0] gn;
    logic [31:0]   run_left;
    logic          g_issue, g_last_run;
    logic          v1;
    logic [LP-1:0] off1;
    logic [PN_W-1:0] n1;
    logic          sel1;
    logic [DW-1:0] qe1, qo1;
    logic [2*DW-1:0] win;
    logic [GC_W-1:0] gq_c;
    logic          gq_ir;              // always high when v1 is: the issue keeps room
    logic [PN_W-1:0] gq_take, wneed;
    logic [31:0]   wrem;               // bytes of dst still to hand to the writer
    logic          w_fire;

    assign ga       = EA_W'({dh, g_cbeat, {LP{1'b0}}}) + EA_W'(g_lead) + EA_W'(g_ioff) + EA_W'(g_px)
                      + EA_W'(g_jo);
    assign run_left = f_p - g_jo;
    assign gn       = run_left < 32'(P) ? PN_W'(run_left) : PN_W'(P);
    // a window is issued with room for it and the one in flight
    assign g_issue  = state == S_RUN && full[dh] && 32'(gq_c) + (v1 ? 32'(2 * P) : 32'(P)) <= 32'(GCAP);
    assign g_last_run = run_left <= 32'(P);

    // window read: beat b0 = ga / P and b0 + 1, one from each RAM
    logic [HB_L:0] b0, b1;
    assign b0 = ga[EA_W-1:LP];
    assign b1 = b0 + 1'b1;
    always_ff @(posedge clk) begin
        qe1  <= ram_e[b0[0] ? b1[HB_L:1] : b0[HB_L:1]];
        qo1  <= ram_o[b0[0] ? b0[HB_L:1] : b1[HB_L:1]];
        sel1 <= b0[0];
        off1 <= ga[LP-1:0];
        n1   <= gn;
        if (!rst_n) v1 <= 1'b0;
        else        v1 <= g_issue;
    end
    assign win = (sel1 ? {qe1, qo1} : {qo1, qe1}) >> (32'(off1) * 16);

    elem_gather #(.EW(16), .IN_N(P), .OUT_N(P), .CAP(GCAP)) u_gq (
        .clk, .rst_n, .in_valid(v1), .in_ready(gq_ir), .in_data(win[DW-1:0]), .in_n(n1),
        .out_data(wr_d), .count(gq_c), .take(gq_take));

    assign wneed   = wrem < 32'(BB) ? PN_W'(wrem >> 1) : PN_W'(P);
    assign wr_v    = state == S_RUN && !wr_cv && wrem != 0 && gq_c >= GC_W'(wneed);
    assign w_fire  = wr_v && wr_r;
    assign gq_take = w_fire ? wneed : '0;
    assign active  = g_issue;

    logic w_cmd;
    assign wr_cv = state == S_RUN && w_cmd;

    // ---------------------------------------------------------------- sequencer
    always_ff @(posedge clk) begin
        done <= 1'b0;
        if (!rst_n) begin
            state  <= S_IDLE;
            status <= '0;
            full   <= '0;
            f_st   <= F_OFF;
            w_cmd  <= 1'b0;
            wrem   <= '0;
        end else begin
            case (state)
                S_IDLE: if (start) begin
                    state <= S_DIV;
                    dstep <= '0;
                    rem_h <= '0;
                    rem_w <= '0;
                    hw_q  <= '0;
                    pw_q  <= '0;
                end
                S_DIV: begin
                    rem_h <= rh_t >= {1'b0, f_p} ? 32'(rh_t - {1'b0, f_p}) : rh_t[31:0];
                    rem_w <= rw_t >= {1'b0, f_p} ? 32'(rw_t - {1'b0, f_p}) : rw_t[31:0];
                    dstep <= dstep + 6'd1;
                    // H·W and p·W, MSB first: after step 31 they are the full products
                    hw_q  <= (hw_q << 1) + (f_h[5'(31 - dstep)] ? 64'(f_w) : 64'd0);
                    pw_q  <= (pw_q << 1) + (f_p[5'(31 - dstep)] ? 64'(f_w) : 64'd0);
                    if (dstep == 6'd31) state <= S_CHECK;
                end
                S_CHECK: begin
                    // C·H·W and the block size, then the checks (two cycles, dstep 32 and 33)
                    chw_q <= mul_sat(f_c, hw_q);
                    cs_q  <= ((pw_q + 64'(2 * P - 1)) >> LP);
                    dstep <= dstep + 6'd1;
                    a_src <= m3v_addr(f_src, base_wgt, base_arena, base_in, base_out);
                    a_dst <= ADDR_W'(m3v_addr(f_dst, base_wgt, base_arena, base_in, base_out));
                    if (dstep == 6'd33) begin
                        out_bytes <= 32'({chw_q, 1'b0});
                        wrem      <= 32'({chw_q, 1'b0});
                        full      <= '0;
                        fh        <= 1'b0;
                        dh        <= 1'b0;
                        f_row     <= '0;
                        f_ch      <= '0;
                        f_band_e  <= '0;
                        f_ce      <= '0;
                        f_cbeat   <= '0;
                        g_px      <= '0;
                        g_i       <= '0;
                        g_ioff    <= '0;
                        g_c       <= '0;
                        g_jo      <= '0;
                        g_cbeat   <= '0;
                        g_lead    <= '0;
                        g_band_lead <= '0;
                        hw_mod    <= hw_q[LP-1:0];
                        state     <= S_DONE;
                        status    <= 4'(`M3V_ISA_STATUS_OK);
                        if (chw_q[95:64] != 0 || !m3v_fits(f_src, {chw_q[63:0], 1'b0}, sz_wgt, sz_arena, sz_in, sz_out)
                            || f_p == 0 || rem_h != 0 || rem_w != 0
                            || !m3v_writable(f_dst)
                            || !m3v_fits(f_dst, {chw_q[63:0], 1'b0}, sz_wgt, sz_arena, sz_in, sz_out)
                            || band_over)
                            status <= 4'(`M3V_ISA_STATUS_OVER_LIMIT);
                        else if (chw_q != 0) begin
                            state  <= S_RUN;
                            f_st   <= F_CMD;
                            w_cmd  <= 1'b1;
                        end
                    end
                end
                S_RUN: begin
                    if (wr_cv && wr_cr) w_cmd <= 1'b0;
                    // fill: one command per channel block, the next once the reader is idle again
                    if (rd_cv && rd_cr) begin
                        f_st <= F_DATA;
                        wptr <= {fh, f_cbeat};
                    end else if (rd_fire) begin
                        wptr <= wptr + 1'b1;
                    end
                    if (f_st == F_DATA && rd_cr) begin
                        if (f_ch + 32'd1 == f_c) begin
                            full[fh] <= 1'b1;
                            fh       <= !fh;
                            f_ch     <= '0;
                            f_cbeat  <= '0;
                            f_row    <= f_row + f_p;
                            f_band_e <= f_band_e + pw_q;
                            f_ce     <= f_band_e + pw_q;
                            f_st     <= f_row + f_p == f_h ? F_OFF : F_CMD;
                        end else begin
                            f_ch    <= f_ch + 32'd1;
                            f_cbeat <= f_cbeat + HB_L'(cs_q);
                            f_ce    <= f_ce + hw_q;
                            f_st    <= F_CMD;
                        end
                    end
                    // drain: windows over runs (px, c, i)
                    if (g_issue) begin
                        if (!g_last_run) begin
                            g_jo <= g_jo + 32'(P);
                        end else begin
                            g_jo <= '0;
                            if (g_i + 32'd1 != f_p) begin
                                g_i    <= g_i + 32'd1;
                                g_ioff <= g_ioff + f_w;
                            end else begin
                                g_i    <= '0;
                                g_ioff <= '0;
                                if (g_c + 32'd1 != f_c) begin
                                    g_c     <= g_c + 32'd1;
                                    g_cbeat <= g_cbeat + HB_L'(cs_q);
                                    g_lead  <= g_lead + hw_mod;
                                end else begin
                                    g_c     <= '0;
                                    g_cbeat <= '0;
                                    g_lead  <= g_band_lead;
                                    if (g_px + f_p != f_w) begin
                                        g_px <= g_px + f_p;
                                    end else begin
                                        // band done: the buffer half goes back to the fill side
                                        g_px        <= '0;
                                        g_lead      <= g_band_lead + LP'(pw_q);
                                        g_band_lead <= g_band_lead + LP'(pw_q);
                                        full[dh]    <= 1'b0;
                                        dh          <= !dh;
                                    end
                                end
                            end
                        end
                    end
                    if (w_fire) wrem <= wrem - 32'({wneed, 1'b0});
                    if (!w_cmd && wrem == 0 && wr_cr) state <= S_DONE;
                end
                S_DONE: begin
                    done  <= 1'b1;
                    state <= S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    // ---------------------------------------------------------------- unused ports
    assign cu_w_valid         = 1'b0;
    // one lane at a time: a single '0 of this width trips the replication limit
    for (genvar k = 0; k < `M3V_P_IN * `M3V_P_OUT; k++) begin : g_cu_w
        assign cu_w_weights[k*`M3V_W_W +: `M3V_W_W] = '0;
    end
    assign cu_w_bias          = '0;
    assign cu_w_shift         = '0;
    assign cu_w_out_bits      = '0;
    assign cu_w_comb_shift    = '0;
    assign cu_w_combine       = 1'b0;
    assign cu_w_gelu          = 1'b0;
    assign cu_w_gelu_in_frac  = '0;
    assign cu_w_gelu_out_frac = '0;
    assign cu_w_gelu_out_bits = '0;
    assign cu_x_valid         = 1'b0;
    assign cu_x_wnext         = 1'b0;
    assign cu_x_act           = '0;
    assign cu_x_eout          = '0;
    assign cu_x_score         = '0;
    assign cu_x_slot          = '0;
    assign cu_x_first         = 1'b0;
    assign cu_x_last          = 1'b0;
    assign cu_x_tag           = '0;
    assign cu_o_ready         = 1'b0;

    logic unused_ok;
    assign unused_ok = &{1'b0, task_idx, rec, rd_e, rd_n, gq_ir, b1[0], win[2*DW-1:DW],
                         m_arready[PORTS-1:1], m_rvalid[PORTS-1:1], m_rdata[PORTS*DW-1:DW],
                         m_rid[PORTS*ID_W-1:ID_W], m_rlast[PORTS-1:1], m_rresp[PORTS*2-1:2],
                         m_awready[0], m_wready[0], m_bvalid[0], m_bid[ID_W-1:0], m_bresp[1:0],
                         cu_w_ready, cu_x_ready, cu_o_valid, cu_o_data, cu_o_tag};
endmodule
