// eng_ln: the LAYERNORM engine of the accelerator top. One instruction:
//   y[r, :] = numerics.layernorm(x[r, :], gamma, beta, E, beta_shift, shift, fmt),  r < rows,
// x, y int16 [rows, dim] contiguous, gamma int16 [dim], beta int64 [dim], shift int8 [dim],
// E = eps_hi:eps_lo, bit-exact with compiler/program_exec.py through layernorm_unit.sv.
//
//   port 0 read  beta  ─> elem_gather ─┐
//   port 1 read  gamma ─> elem_gather ─┼─> β' = rshift_round(β, beta_shift) ─> the unit's table
//   port 2 read  shift ─> elem_gather ─┘
//   port 3 read  x ─> elem_gather (AXI beats -> rows of ceil(dim/LP) beats of LP lanes) ─> layernorm_unit
//   port 0 write y <─ elem_gather (rows -> dense AXI beats) <─ unsigned clamp <──────────┘
//
// All four reads and the write are issued at once: rows enter the unit (row slots, statistics)
// while the table loads, the unit's read-out waits for the table's last entry (out_en), then rows
// flow through at one unit beat per cycle while y is written; one write command covers all of y,
// so its bursts are full. Needs PORTS >= 4.
//
// Refusals (STATUS over_limit, nothing stored), as program_exec: an operand past the end of its
// space, y outside arena/out; and what the contract refuses (numerics.layernorm raises): E = 0 or
// E >= 2^61, beta_shift outside [-62, 62], and what this hardware cannot hold: dim > MAX_DIM, a
// format wider than the int16 store (signed 1..16 bits, unsigned 1..15 bits, as the HLS kernel).
// Unsigned formats run the unit signed with one more bit and clamp negatives to 0 (the same
// value). rows = 0 or dim = 0 stores nothing.
`include "m3v_isa.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"
`include "m3v_mem.svh"

module eng_ln #(
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
    localparam int BB      = DW / 8;                 // bytes per AXI beat
    localparam int NB_W    = $clog2(BB) + 1;
    localparam int LP      = (`M3V_P_OUT < 8) ? `M3V_P_OUT : 8;   // the unit's lanes
    localparam int MAX_DIM = `M3V_MAX_DIM;
    localparam int DIM_W   = $clog2(MAX_DIM + 1);
    localparam int NBK     = (MAX_DIM + LP - 1) / LP;
    localparam int BK_W    = (NBK > 1) ? $clog2(NBK) : 1;
    localparam int B_W     = 48;                     // the affine accumulator (β' and n·γ + β')
    localparam int SH_W    = `M3V_SHIFT_W;
    // queue widths in bytes: an AXI beat in, unit beats out (and back)
    localparam int XO      = 2 * LP;
    localparam int GCAP    = 2 * (BB + 8 * LP);
    localparam int GC_W    = $clog2(GCAP + 1);
    localparam int XI_W    = $clog2(BB + 1);
    localparam int XO_W    = $clog2(XO + 1);
    localparam int BO_W    = $clog2(8 * LP + 1);
    localparam int SO_W    = $clog2(LP + 1);
    localparam int LN_W    = $clog2(LP + 1);

    localparam logic [2:0] S_IDLE = 3'd0, S_CHECK = 3'd1, S_RUN = 3'd2, S_DONE = 3'd3;

    // ---------------------------------------------------------------- the instruction record
    function automatic logic [31:0] word(input logic [511:0] r, input int k);
        word = r[32*k +: 32];
    endfunction

    // ---------------------------------------------------------------- the instruction
    logic [31:0] f_x, f_y, f_g, f_b, f_s, f_rows, f_dim, f_bsh, f_fmt;
    logic [63:0] f_eps;
    logic [63:0] n_elem;
    logic        fmt_ok, checks_ok;
    always_comb begin
        f_x    = word(rec, `M3V_ISA_F_LAYERNORM_X_REF);
        f_y    = word(rec, `M3V_ISA_F_LAYERNORM_Y_REF);
        f_g    = word(rec, `M3V_ISA_F_LAYERNORM_GAMMA_REF);
        f_b    = word(rec, `M3V_ISA_F_LAYERNORM_BETA_REF);
        f_s    = word(rec, `M3V_ISA_F_LAYERNORM_SHIFT_REF);
        f_rows = word(rec, `M3V_ISA_F_LAYERNORM_ROWS);
        f_dim  = word(rec, `M3V_ISA_F_LAYERNORM_DIM);
        f_bsh  = word(rec, `M3V_ISA_F_LAYERNORM_BETA_SHIFT);
        f_fmt  = word(rec, `M3V_ISA_F_LAYERNORM_FMT);
        f_eps  = {word(rec, `M3V_ISA_F_LAYERNORM_EPS_HI), word(rec, `M3V_ISA_F_LAYERNORM_EPS_LO)};
        n_elem = 64'(f_rows) * 64'(f_dim);
        fmt_ok = f_fmt[16] ? (f_fmt[5:0] >= 6'd1 && f_fmt[5:0] <= 6'd16)
                           : (f_fmt[5:0] >= 6'd1 && f_fmt[5:0] <= 6'd15);
        checks_ok = m3v_fits(f_x, {n_elem, 1'b0}, sz_wgt, sz_arena, sz_in, sz_out)
                 && m3v_fits(f_g, {32'd0, f_dim, 1'b0}, sz_wgt, sz_arena, sz_in, sz_out)
                 && m3v_fits(f_b, {30'd0, f_dim, 3'b0}, sz_wgt, sz_arena, sz_in, sz_out)
                 && m3v_fits(f_s, {33'd0, f_dim}, sz_wgt, sz_arena, sz_in, sz_out)
                 && m3v_writable(f_y)
                 && m3v_fits(f_y, {n_elem, 1'b0}, sz_wgt, sz_arena, sz_in, sz_out)
                 && f_dim <= 32'(MAX_DIM)
                 && f_eps != 64'd0 && f_eps[63:61] == 3'd0
                 && ($signed(f_bsh) >= -32'sd62 && $signed(f_bsh) <= 32'sd62)
                 && fmt_ok;
    end

    // ---------------------------------------------------------------- control
    logic [2:0]        state;
    logic              cmd_b, cmd_g, cmd_s, cmd_x, cmd_y;    // commands still to issue
    logic [DIM_W-1:0]  dim_q;
    logic [60:0]       eps_q;
    logic [4:0]        obits_q;
    logic              uns_q;
    logic signed [7:0] bsh_q;
    logic [31:0]       trem;          // channels of the table still to load
    logic [BK_W-1:0]   taddr;
    logic              tbl_done;
    logic [31:0]       xrows, orows;  // rows still to feed to / take from the unit
    logic [DIM_W-1:0]  xrem, orem;    // channels left in the current row (0: a new row starts)
    logic [31:0]       wrem;          // bytes of y still to hand to the writer
    logic [ADDR_W-1:0] a_x, a_y, a_g, a_b, a_s;

    // ---------------------------------------------------------------- DMA
    logic              rb_cv, rb_cr, rg_cv, rg_cr, rs_cv, rs_cr, rx_cv, rx_cr, wy_cv, wy_cr;
    logic              rb_v, rb_r, rg_v, rg_r, rs_v, rs_r, rx_v, rx_r;
    logic [DW-1:0]     rb_d, rg_d, rs_d, rx_d;
    logic [NB_W-1:0]   rb_n, rg_n, rs_n, rx_n;
    logic              rb_e, rg_e, rs_e, rx_e;
    logic              wy_v, wy_r;
    logic [DW-1:0]     wy_d;

    assign rb_cv = state == S_RUN && cmd_b;
    assign rg_cv = state == S_RUN && cmd_g;
    assign rs_cv = state == S_RUN && cmd_s;
    assign rx_cv = state == S_RUN && cmd_x;
    assign wy_cv = state == S_RUN && cmd_y;

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rb (
        .clk, .rst_n, .cmd_valid(rb_cv), .cmd_ready(rb_cr), .cmd_addr(a_b),
        .cmd_bytes(32'({dim_q, 3'b0})), .cmd_eos(1'b1),
        .out_valid(rb_v), .out_ready(rb_r), .out_data(rb_d), .out_nbytes(rb_n), .out_eos(rb_e),
        .arvalid(m_arvalid[0]), .arready(m_arready[0]), .araddr(m_araddr[0 +: ADDR_W]),
        .arlen(m_arlen[0 +: 8]), .arsize(m_arsize[0 +: 3]), .arburst(m_arburst[0 +: 2]),
        .arid(m_arid[0 +: ID_W]), .rvalid(m_rvalid[0]), .rready(m_rready[0]), .rdata(m_rdata[0 +: DW]),
        .rid(m_rid[0 +: ID_W]), .rlast(m_rlast[0]), .rresp(m_rresp[0 +: 2]));

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rg (
        .clk, .rst_n, .cmd_valid(rg_cv), .cmd_ready(rg_cr), .cmd_addr(a_g),
        .cmd_bytes(32'({dim_q, 1'b0})), .cmd_eos(1'b1),
        .out_valid(rg_v), .out_ready(rg_r), .out_data(rg_d), .out_nbytes(rg_n), .out_eos(rg_e),
        .arvalid(m_arvalid[1]), .arready(m_arready[1]), .araddr(m_araddr[ADDR_W +: ADDR_W]),
        .arlen(m_arlen[8 +: 8]), .arsize(m_arsize[3 +: 3]), .arburst(m_arburst[2 +: 2]),
        .arid(m_arid[ID_W +: ID_W]), .rvalid(m_rvalid[1]), .rready(m_rready[1]), .rdata(m_rdata[DW +: DW]),
        .rid(m_rid[ID_W +: ID_W]), .rlast(m_rlast[1]), .rresp(m_rresp[2 +: 2]));

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rs (
        .clk, .rst_n, .cmd_valid(rs_cv), .cmd_ready(rs_cr), .cmd_addr(a_s),
        .cmd_bytes(32'(dim_q)), .cmd_eos(1'b1),
        .out_valid(rs_v), .out_ready(rs_r), .out_data(rs_d), .out_nbytes(rs_n), .out_eos(rs_e),
        .arvalid(m_arvalid[2]), .arready(m_arready[2]), .araddr(m_araddr[2*ADDR_W +: ADDR_W]),
        .arlen(m_arlen[16 +: 8]), .arsize(m_arsize[6 +: 3]), .arburst(m_arburst[4 +: 2]),
        .arid(m_arid[2*ID_W +: ID_W]), .rvalid(m_rvalid[2]), .rready(m_rready[2]),
        .rdata(m_rdata[2*DW +: DW]), .rid(m_rid[2*ID_W +: ID_W]), .rlast(m_rlast[2]), .rresp(m_rresp[4 +: 2]));

    logic [31:0] x_bytes;
    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rx (
        .clk, .rst_n, .cmd_valid(rx_cv), .cmd_ready(rx_cr), .cmd_addr(a_x),
        .cmd_bytes(x_bytes), .cmd_eos(1'b1),
        .out_valid(rx_v), .out_ready(rx_r), .out_data(rx_d), .out_nbytes(rx_n), .out_eos(rx_e),
        .arvalid(m_arvalid[3]), .arready(m_arready[3]), .araddr(m_araddr[3*ADDR_W +: ADDR_W]),
        .arlen(m_arlen[24 +: 8]), .arsize(m_arsize[9 +: 3]), .arburst(m_arburst[6 +: 2]),
        .arid(m_arid[3*ID_W +: ID_W]), .rvalid(m_rvalid[3]), .rready(m_rready[3]),
        .rdata(m_rdata[3*DW +: DW]), .rid(m_rid[3*ID_W +: ID_W]), .rlast(m_rlast[3]), .rresp(m_rresp[6 +: 2]));

    axi_writer #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_wy (
        .clk, .rst_n, .cmd_valid(wy_cv), .cmd_ready(wy_cr), .cmd_addr(a_y), .cmd_bytes(x_bytes),
        .in_valid(wy_v), .in_ready(wy_r), .in_data(wy_d),
        .awvalid(m_awvalid[0]), .awready(m_awready[0]), .awaddr(m_awaddr[0 +: ADDR_W]),
        .awlen(m_awlen[0 +: 8]), .awsize(m_awsize[0 +: 3]), .awburst(m_awburst[0 +: 2]),
        .awid(m_awid[0 +: ID_W]), .wvalid(m_wvalid[0]), .wready(m_wready[0]), .wdata(m_wdata[0 +: DW]),
        .wstrb(m_wstrb[0 +: BB]), .wlast(m_wlast[0]), .bvalid(m_bvalid[0]), .bready(m_bready[0]),
        .bid(m_bid[0 +: ID_W]), .bresp(m_bresp[0 +: 2]));

    // write channels of ports 1.., read channels of ports 4..: idle
    assign m_awvalid[PORTS-1:1] = '0;
    assign m_awaddr[PORTS*ADDR_W-1:ADDR_W] = '0;
    assign m_awlen[PORTS*8-1:8] = '0;
    assign m_awsize[PORTS*3-1:3] = '0;
    assign m_awburst[PORTS*2-1:2] = '0;
    assign m_awid[PORTS*ID_W-1:ID_W] = '0;
    assign m_wvalid[PORTS-1:1] = '0;
    assign m_wdata[PORTS*DW-1:DW] = '0;
    assign m_wstrb[PORTS*BB-1:BB] = '0;
    assign m_wlast[PORTS-1:1] = '0;
    assign m_bready[PORTS-1:1] = '1;
    generate
        if (PORTS > 4) begin : g_idle
            assign m_arvalid[PORTS-1:4] = '0;
            assign m_araddr[PORTS*ADDR_W-1:4*ADDR_W] = '0;
            assign m_arlen[PORTS*8-1:32] = '0;
            assign m_arsize[PORTS*3-1:12] = '0;
            assign m_arburst[PORTS*2-1:8] = '0;
            assign m_arid[PORTS*ID_W-1:4*ID_W] = '0;
            assign m_rready[PORTS-1:4] = '1;
            logic unused_hi;
            assign unused_hi = &{1'b0, m_arready[PORTS-1:4], m_rvalid[PORTS-1:4], m_rdata[PORTS*DW-1:4*DW],
                                 m_rid[PORTS*ID_W-1:4*ID_W], m_rlast[PORTS-1:4], m_rresp[PORTS*2-1:8]};
        end
    endgenerate

    // ---------------------------------------------------------------- table: γ, β', shift
    logic [8*LP*8-1:0] qb_d;     // LP betas (64 bits each)
    logic [2*LP*8-1:0] qg_d;     // LP gammas
    logic [LP*8-1:0]   qs_d;     // LP shifts
    logic [GC_W-1:0]   qb_c, qg_c, qs_c;
    logic [BO_W-1:0]   qb_take;
    logic [XO_W-1:0]   qg_take;
    logic [SO_W-1:0]   qs_take;
    logic [LN_W-1:0]   tneed;
    logic              t_fire;

    elem_gather #(.EW(8), .IN_N(BB), .OUT_N(8 * LP), .CAP(GCAP)) u_qb (
        .clk, .rst_n, .in_valid(rb_v), .in_ready(rb_r), .in_data(rb_d), .in_n(XI_W'(rb_n)),
        .out_data(qb_d), .count(qb_c), .take(qb_take));
    elem_gather #(.EW(8), .IN_N(BB), .OUT_N(2 * LP), .CAP(GCAP)) u_qg (
        .clk, .rst_n, .in_valid(rg_v), .in_ready(rg_r), .in_data(rg_d), .in_n(XI_W'(rg_n)),
        .out_data(qg_d), .count(qg_c), .take(qg_take));
    elem_gather #(.EW(8), .IN_N(BB), .OUT_N(LP), .CAP(GCAP)) u_qs (
        .clk, .rst_n, .in_valid(rs_v), .in_ready(rs_r), .in_data(rs_d), .in_n(XI_W'(rs_n)),
        .out_data(qs_d), .count(qs_c), .take(qs_take));

    assign tneed   = trem < 32'(LP) ? LN_W'(trem) : LN_W'(LP);
    assign t_fire  = state == S_RUN && trem != 0 && qb_c >= GC_W'(8 * 32'(tneed))
                     && qg_c >= GC_W'(2 * 32'(tneed)) && qs_c >= GC_W'(tneed);
    assign qb_take = t_fire ? BO_W'(8 * 32'(tneed)) : '0;
    assign qg_take = t_fire ? XO_W'(2 * 32'(tneed)) : '0;
    assign qs_take = t_fire ? SO_W'(tneed) : '0;

    // β' = rshift_round(β, beta_shift) in int64 arithmetic, as numerics.rshift_round
    function automatic logic [63:0] beta_align(input logic [63:0] b, input logic signed [7:0] s);
        logic [63:0] half, v;
        if (s > 0) begin
            half = 64'd1 << (s - 8'sd1);
            v = $unsigned($signed(b + half) >>> s);
        end else begin
            v = b << (-s);
        end
        beta_align = v;
    endfunction

    logic [LP*64-1:0]   tb_full;     // β' in int64; the contract keeps it within B_W bits
    always_comb
        for (int l = 0; l < LP; l++) tb_full[l*64 +: 64] = beta_align(qb_d[l*64 +: 64], bsh_q);
    logic               tw_q;
    logic [BK_W-1:0]    ta_q;
    logic [LP*16-1:0]   tg_q;
    logic [LP*B_W-1:0]  tb_q;
    logic [LP*SH_W-1:0] ts_q;
    always_ff @(posedge clk) begin
        ta_q <= taddr;
        for (int l = 0; l < LP; l++) begin
            tg_q[l*16 +: 16]     <= qg_d[l*16 +: 16];
            tb_q[l*B_W +: B_W]   <= tb_full[l*64 +: B_W];
            ts_q[l*SH_W +: SH_W] <= qs_d[l*8 +: SH_W];
        end
        if (!rst_n) tw_q <= 1'b0;
        else        tw_q <= t_fire;
    end

    // ---------------------------------------------------------------- rows through the unit
    logic [XO*8-1:0]   qx_d;
    logic [GC_W-1:0]   qx_c;
    logic [XO_W-1:0]   qx_take;
    logic [LN_W-1:0]   xneed, oneed;
    logic              ln_iv, ln_ir, ln_ov, ln_or, ln_olast, x_fire, o_fire;
    logic [LP*16-1:0]  ln_y, ln_yc;

    elem_gather #(.EW(8), .IN_N(BB), .OUT_N(XO), .CAP(GCAP)) u_qx (
        .clk, .rst_n, .in_valid(rx_v), .in_ready(rx_r), .in_data(rx_d), .in_n(XI_W'(rx_n)),
        .out_data(qx_d), .count(qx_c), .take(qx_take));

    // the channels of the unit beat: LP, or what is left of the row
    logic [DIM_W-1:0] xcur, ocur;
    assign xcur    = xrem == 0 ? dim_q : xrem;
    assign ocur    = orem == 0 ? dim_q : orem;
    assign xneed   = 32'(xcur) < 32'(LP) ? LN_W'(xcur) : LN_W'(LP);
    // rows enter while the table loads (their statistics need no table); the read-out waits for it
    assign ln_iv   = state == S_RUN && xrows != 0 && qx_c >= GC_W'(2 * 32'(xneed));
    assign x_fire  = ln_iv && ln_ir;
    assign qx_take = x_fire ? XO_W'(2 * 32'(xneed)) : '0;

    layernorm_unit #(.P(LP), .DATA_W(16), .G_W(16), .B_W(B_W), .SHIFT_W(SH_W), .OB_W(5), .MAX_DIM(MAX_DIM)) u_ln (
        .clk, .rst_n, .dim(dim_q), .eps_int(eps_q), .out_bits(obits_q),
        .tbl_we(tw_q), .tbl_addr(ta_q), .tbl_gamma(tg_q), .tbl_beta(tb_q), .tbl_shift(ts_q), .out_en(tbl_done),
        .in_valid(ln_iv), .in_ready(ln_ir), .x(qx_d),
        .out_valid(ln_ov), .out_ready(ln_or), .y(ln_y), .out_last(ln_olast));

    // unsigned formats: the unit saturated to bits + 1 signed bits; negatives become 0
    always_comb
        for (int l = 0; l < LP; l++)
            ln_yc[l*16 +: 16] = (uns_q && ln_y[l*16 + 15]) ? 16'd0 : ln_y[l*16 +: 16];

    logic [GC_W-1:0]   qy_c;
    logic [NB_W-1:0]   wneed;
    logic [DW-1:0]     qy_d;
    logic [NB_W-1:0]   qy_take;
    logic              w_fire;

    assign oneed   = 32'(ocur) < 32'(LP) ? LN_W'(ocur) : LN_W'(LP);
    elem_gather #(.EW(8), .IN_N(XO), .OUT_N(BB), .CAP(GCAP)) u_qy (
        .clk, .rst_n, .in_valid(ln_ov), .in_ready(ln_or), .in_data(ln_yc), .in_n(XO_W'(2 * 32'(oneed))),
        .out_data(qy_d), .count(qy_c), .take(qy_take));
    assign o_fire  = ln_ov && ln_or;

    assign wneed   = wrem < 32'(BB) ? NB_W'(wrem) : NB_W'(BB);
    assign wy_v    = state == S_RUN && !cmd_y && wrem != 0 && qy_c >= GC_W'(wneed);
    assign wy_d    = qy_d;
    assign w_fire  = wy_v && wy_r;
    assign qy_take = w_fire ? wneed : '0;

    assign active  = x_fire || o_fire || t_fire;

    // ---------------------------------------------------------------- sequencer
    always_ff @(posedge clk) begin
        done <= 1'b0;
        if (!rst_n) begin
            state  <= S_IDLE;
            status <= '0;
            cmd_b  <= 1'b0;
            cmd_g  <= 1'b0;
            cmd_s  <= 1'b0;
            cmd_x  <= 1'b0;
            cmd_y  <= 1'b0;
            trem   <= '0;
            xrows  <= '0;
            orows  <= '0;
            wrem   <= '0;
        end else begin
            case (state)
                S_IDLE: if (start) state <= S_CHECK;
                S_CHECK: begin
                    dim_q   <= DIM_W'(f_dim);
                    eps_q   <= f_eps[60:0];
                    obits_q <= 5'(f_fmt[5:0]) + 5'(!f_fmt[16]);
                    uns_q   <= !f_fmt[16];
                    bsh_q   <= f_bsh[7:0];
                    a_x     <= ADDR_W'(m3v_addr(f_x, base_wgt, base_arena, base_in, base_out));
                    a_y     <= ADDR_W'(m3v_addr(f_y, base_wgt, base_arena, base_in, base_out));
                    a_g     <= ADDR_W'(m3v_addr(f_g, base_wgt, base_arena, base_in, base_out));
                    a_b     <= ADDR_W'(m3v_addr(f_b, base_wgt, base_arena, base_in, base_out));
                    a_s     <= ADDR_W'(m3v_addr(f_s, base_wgt, base_arena, base_in, base_out));
                    x_bytes <= 32'({n_elem, 1'b0});
                    wrem    <= 32'({n_elem, 1'b0});
                    trem    <= f_dim;
                    taddr   <= '0;
                    tbl_done <= 1'b0;
                    xrows   <= f_rows;
                    orows   <= f_rows;
                    xrem    <= '0;
                    orem    <= '0;
                    if (!checks_ok) begin
                        status <= 4'(`M3V_ISA_STATUS_OVER_LIMIT);
                        state  <= S_DONE;
                    end else if (n_elem == 0) begin
                        status <= 4'(`M3V_ISA_STATUS_OK);
                        state  <= S_DONE;
                    end else begin
                        status <= 4'(`M3V_ISA_STATUS_OK);
                        {cmd_b, cmd_g, cmd_s, cmd_x, cmd_y} <= '1;
                        state  <= S_RUN;
                    end
                end
                S_RUN: begin
                    if (rb_cv && rb_cr) cmd_b <= 1'b0;
                    if (rg_cv && rg_cr) cmd_g <= 1'b0;
                    if (rs_cv && rs_cr) cmd_s <= 1'b0;
                    if (rx_cv && rx_cr) cmd_x <= 1'b0;
                    if (wy_cv && wy_cr) cmd_y <= 1'b0;
                    if (t_fire) begin
                        trem  <= trem - 32'(tneed);
                        taddr <= taddr + 1'b1;
                    end
                    // the last entry is written the cycle after its t_fire
                    if (trem == 0 && !tw_q) tbl_done <= 1'b1;
                    if (x_fire) begin
                        xrem <= xcur - DIM_W'(xneed);
                        if (xcur == DIM_W'(xneed)) xrows <= xrows - 32'd1;
                    end
                    if (o_fire) begin
                        orem <= ocur - DIM_W'(oneed);
                        if (ocur == DIM_W'(oneed)) orows <= orows - 32'd1;
                    end
                    if (w_fire) wrem <= wrem - 32'(wneed);
                    // every y byte handed over, the writer idle again: all responses are in
                    if (!cmd_y && wrem == 0 && wy_cr && orows == 0) state <= S_DONE;
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
    assign unused_ok = &{1'b0, task_idx, rec, tb_full, rb_e, rg_e, rs_e, rx_e, ln_olast, f_fmt, f_bsh, f_eps,
                         m_awready[PORTS-1:1], m_wready[PORTS-1:1], m_bvalid[PORTS-1:1],
                         m_bid[PORTS*ID_W-1:ID_W], m_bresp[PORTS*2-1:2],
                         cu_w_ready, cu_x_ready, cu_o_valid, cu_o_data, cu_o_tag};
endmodule
