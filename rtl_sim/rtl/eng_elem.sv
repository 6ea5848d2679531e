// eng_elem: the engine of add and embed (the engine interface: docs/accelerator.md).
`include "m3v_isa.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"
`include "m3v_mem.svh"

module eng_elem #(
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
    // add: y = residual_add(a, b) over rows*cols elements; embed: the A stream is the CLS row
    // then the patch rows, B the position embedding (numerics.residual_add, prepend_cls).
    // Port 0 reads B, port 1 reads A, port 2 writes y; all three stream at one beat per cycle.
    localparam int P    = DW / 16;
    localparam int BB   = DW / 8;
    localparam int NB_W = $clog2(BB) + 1;
    localparam int NW   = $clog2(P + 1);

    localparam logic [1:0] S_IDLE = 2'd0, S_CHECK = 2'd1, S_EXEC = 2'd2, S_DONE = 2'd3;
    logic [1:0] state;

    function automatic logic [31:0] word(input logic [511:0] r, input int k);
        word = r[32*k +: 32];
    endfunction

    // ---- DMA: port 0 reads B, port 1 reads A, port 2 writes y
    logic              r0_cmd_valid, r0_cmd_ready, r1_cmd_valid, r1_cmd_ready, w_cmd_valid, w_cmd_ready;
    logic [ADDR_W-1:0] r1_cmd_addr;
    logic [31:0]       r1_cmd_bytes;
    logic              r1_cmd_eos;
    logic              r0_valid, r0_ready, r0_eos, r1_valid, r1_ready, r1_eos;
    logic [DW-1:0]     r0_data, r1_data;
    logic [NB_W-1:0]   r0_nbytes, r1_nbytes;
    logic              a1_pend, a2_pend, b_pend, y_pend, a1_eos;
    logic [ADDR_W-1:0] a1_addr, a2_addr, b_addr, y_addr;
    logic [31:0]       a1_bytes, a2_bytes, n_bytes;

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rd0 (
        .clk, .rst_n, .cmd_valid(r0_cmd_valid), .cmd_ready(r0_cmd_ready), .cmd_addr(b_addr),
        .cmd_bytes(n_bytes), .cmd_eos(1'b1), .out_valid(r0_valid), .out_ready(r0_ready),
        .out_data(r0_data), .out_nbytes(r0_nbytes), .out_eos(r0_eos),
        .arvalid(m_arvalid[0]), .arready(m_arready[0]), .araddr(m_araddr[0 +: ADDR_W]), .arlen(m_arlen[0 +: 8]),
        .arsize(m_arsize[0 +: 3]), .arburst(m_arburst[0 +: 2]), .arid(m_arid[0 +: ID_W]),
        .rvalid(m_rvalid[0]), .rready(m_rready[0]), .rdata(m_rdata[0 +: DW]), .rid(m_rid[0 +: ID_W]),
        .rlast(m_rlast[0]), .rresp(m_rresp[0 +: 2]));

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rd1 (
        .clk, .rst_n, .cmd_valid(r1_cmd_valid), .cmd_ready(r1_cmd_ready), .cmd_addr(r1_cmd_addr),
        .cmd_bytes(r1_cmd_bytes), .cmd_eos(r1_cmd_eos), .out_valid(r1_valid), .out_ready(r1_ready),
        .out_data(r1_data), .out_nbytes(r1_nbytes), .out_eos(r1_eos),
        .arvalid(m_arvalid[1]), .arready(m_arready[1]), .araddr(m_araddr[ADDR_W +: ADDR_W]),
        .arlen(m_arlen[8 +: 8]), .arsize(m_arsize[3 +: 3]), .arburst(m_arburst[2 +: 2]),
        .arid(m_arid[ID_W +: ID_W]), .rvalid(m_rvalid[1]), .rready(m_rready[1]), .rdata(m_rdata[DW +: DW]),
        .rid(m_rid[ID_W +: ID_W]), .rlast(m_rlast[1]), .rresp(m_rresp[2 +: 2]));

    logic          y_valid, y_ready;
    logic [DW-1:0] y_data;

    axi_writer #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_wr (
        .clk, .rst_n, .cmd_valid(w_cmd_valid), .cmd_ready(w_cmd_ready), .cmd_addr(y_addr),
        .cmd_bytes(n_bytes), .in_valid(y_valid), .in_ready(y_ready), .in_data(y_data),
        .awvalid(m_awvalid[2]), .awready(m_awready[2]), .awaddr(m_awaddr[2*ADDR_W +: ADDR_W]),
        .awlen(m_awlen[16 +: 8]), .awsize(m_awsize[6 +: 3]), .awburst(m_awburst[4 +: 2]),
        .awid(m_awid[2*ID_W +: ID_W]), .wvalid(m_wvalid[2]), .wready(m_wready[2]),
        .wdata(m_wdata[2*DW +: DW]), .wstrb(m_wstrb[2*BB +: BB]), .wlast(m_wlast[2]),
        .bvalid(m_bvalid[2]), .bready(m_bready[2]), .bid(m_bid[2*ID_W +: ID_W]), .bresp(m_bresp[4 +: 2]));

    // the channels this engine does not drive
    assign m_awvalid[1:0] = '0;
    assign m_awaddr[2*ADDR_W-1:0] = '0;
    assign m_awlen[15:0] = '0;
    assign m_awsize[5:0] = '0;
    assign m_awburst[3:0] = '0;
    assign m_awid[2*ID_W-1:0] = '0;
    assign m_wvalid[1:0] = '0;
    assign m_wdata[2*DW-1:0] = '0;
    assign m_wstrb[2*BB-1:0] = '0;
    assign m_wlast[1:0] = '0;
    assign m_bready[1:0] = '1;
    assign m_arvalid[2] = 1'b0;
    assign m_araddr[2*ADDR_W +: ADDR_W] = '0;
    assign m_arlen[16 +: 8] = '0;
    assign m_arsize[6 +: 3] = '0;
    assign m_arburst[4 +: 2] = '0;
    assign m_arid[2*ID_W +: ID_W] = '0;
    assign m_rready[2] = 1'b1;
    generate
        if (PORTS > 3) begin : g_idle
            assign m_arvalid[PORTS-1:3] = '0;
            assign m_araddr[PORTS*ADDR_W-1:3*ADDR_W] = '0;
            assign m_arlen[PORTS*8-1:24] = '0;
            assign m_arsize[PORTS*3-1:9] = '0;
            assign m_arburst[PORTS*2-1:6] = '0;
            assign m_arid[PORTS*ID_W-1:3*ID_W] = '0;
            assign m_rready[PORTS-1:3] = '1;
            assign m_awvalid[PORTS-1:3] = '0;
            assign m_awaddr[PORTS*ADDR_W-1:3*ADDR_W] = '0;
            assign m_awlen[PORTS*8-1:24] = '0;
            assign m_awsize[PORTS*3-1:9] = '0;
            assign m_awburst[PORTS*2-1:6] = '0;
            assign m_awid[PORTS*ID_W-1:3*ID_W] = '0;
            assign m_wvalid[PORTS-1:3] = '0;
            assign m_wdata[PORTS*DW-1:3*DW] = '0;
            assign m_wstrb[PORTS*BB-1:3*BB] = '0;
            assign m_wlast[PORTS-1:3] = '0;
            assign m_bready[PORTS-1:3] = '1;
        end
    endgenerate
    /* verilator lint_off WIDTHCONCAT */
    assign cu_w_weights = '0;   // a constant tile: no replication hazard
    /* verilator lint_on WIDTHCONCAT */
    assign {cu_w_valid, cu_w_bias, cu_w_shift, cu_w_out_bits, cu_w_comb_shift, cu_w_combine, cu_w_gelu,
            cu_w_gelu_in_frac, cu_w_gelu_out_frac, cu_w_gelu_out_bits} = '0;
    assign {cu_x_valid, cu_x_wnext, cu_x_act, cu_x_eout, cu_x_score, cu_x_slot, cu_x_first, cu_x_last, cu_x_tag,
            cu_o_ready} = '0;

    // ---- datapath: A and B packed to full beats, added, written
    logic          pa_valid, pa_ready, pb_valid, pb_ready, pb_in_valid, pb_in_ready;
    logic [DW-1:0] pa_data, pb_data;
    logic          add_in_valid, add_in_ready;
    logic [31:0]   x_a_shift, x_b_shift;
    logic [5:0]    x_fmt_bits;
    logic          x_fmt_signed;

    elem_packer #(.P(P), .EW(16)) u_pack_a (
        .clk, .rst_n, .in_valid(r1_valid), .in_ready(r1_ready), .in_data(r1_data), .in_n(NW'(r1_nbytes >> 1)),
        .in_eos(r1_eos), .out_valid(pa_valid), .out_ready(pa_ready), .out_data(pa_data));

    assign pb_in_valid = r0_valid;
    assign r0_ready    = pb_in_ready;

    elem_packer #(.P(P), .EW(16)) u_pack_b (
        .clk, .rst_n, .in_valid(pb_in_valid), .in_ready(pb_in_ready), .in_data(r0_data),
        .in_n(NW'(r0_nbytes >> 1)), .in_eos(r0_eos), .out_valid(pb_valid), .out_ready(pb_ready),
        .out_data(pb_data));

    assign add_in_valid = pa_valid && pb_valid;
    assign pa_ready = add_in_ready && pb_valid;
    assign pb_ready = add_in_ready && pa_valid;
    assign active   = add_in_valid && add_in_ready;

    add_unit #(.P(P), .EW(16)) u_add (
        .clk, .rst_n, .a_shift(x_a_shift), .b_shift(x_b_shift), .fmt_bits(x_fmt_bits), .fmt_signed(x_fmt_signed),
        .in_valid(add_in_valid), .in_ready(add_in_ready), .a_data(pa_data), .b_data(pb_data),
        .out_valid(y_valid), .out_ready(y_ready), .out_data(y_data));

    // ---- operands of the instruction, for the limit checks and the commands
    // The element count is shift-and-add, without a multiplier cell (a DSP slice, and the DSPs are
    // the MAC array's): it matters exactly below 2^32; past that, 2·n_elem leaves every 32-bit
    // space and the checks refuse the instruction whatever its value, so 2^32 stands in for it
    // when both factors are 2^16 or more (the product is then at least 2^32).
    function automatic logic [63:0] count_sat(input logic [32:0] a, input logic [32:0] b);
        logic [32:0] n, w;
        n = a[32:16] == '0 ? a : b;
        w = a[32:16] == '0 ? b : a;
        count_sat = '0;
        if (n[32:16] != '0) count_sat = 64'd1 << 32;
        else for (int i = 0; i < 16; i++) count_sat = count_sat + ((64'(w) << i) & {64{n[i]}});
    endfunction

    logic        is_add;
    logic [31:0] d_fmt, f_a, f_b, f_y, f_x, f_cls, f_pos, f_patches, f_dim;
    logic [63:0] n_elem;
    logic [64:0] nb_all, nb_cls;
    logic        in_limits;
    always_comb begin
        is_add    = rec[7:0] == 8'(`M3V_ISA_OP_ADD);
        d_fmt     = is_add ? word(rec, `M3V_ISA_F_ADD_FMT) : word(rec, `M3V_ISA_F_EMBED_FMT);
        f_a       = word(rec, `M3V_ISA_F_ADD_A_REF);
        f_b       = word(rec, `M3V_ISA_F_ADD_B_REF);
        f_y       = is_add ? word(rec, `M3V_ISA_F_ADD_Y_REF) : word(rec, `M3V_ISA_F_EMBED_Y_REF);
        f_x       = word(rec, `M3V_ISA_F_EMBED_X_REF);
        f_cls     = word(rec, `M3V_ISA_F_EMBED_CLS_REF);
        f_pos     = word(rec, `M3V_ISA_F_EMBED_POS_REF);
        f_patches = word(rec, `M3V_ISA_F_EMBED_PATCHES);
        f_dim     = word(rec, `M3V_ISA_F_EMBED_DIM);
        n_elem    = is_add ? count_sat(33'(word(rec, `M3V_ISA_F_ADD_ROWS)), 33'(word(rec, `M3V_ISA_F_ADD_COLS)))
                           : count_sat(33'(f_patches) + 33'd1, 33'(f_dim));
        nb_all    = {n_elem, 1'b0};
        nb_cls    = {32'd0, f_dim, 1'b0};
        in_limits = m3v_writable(f_y) && m3v_fits(f_y, nb_all, sz_wgt, sz_arena, sz_in, sz_out);
        if (is_add)
            in_limits = in_limits && m3v_fits(f_a, nb_all, sz_wgt, sz_arena, sz_in, sz_out)
                        && m3v_fits(f_b, nb_all, sz_wgt, sz_arena, sz_in, sz_out);
        else
            in_limits = in_limits && m3v_fits(f_x, nb_all - nb_cls, sz_wgt, sz_arena, sz_in, sz_out)
                        && m3v_fits(f_cls, nb_cls, sz_wgt, sz_arena, sz_in, sz_out)
                        && m3v_fits(f_pos, nb_all, sz_wgt, sz_arena, sz_in, sz_out);
    end

    always_comb begin
        r0_cmd_valid = state == S_EXEC && b_pend;
        r1_cmd_valid = state == S_EXEC && (a1_pend || a2_pend);
        r1_cmd_addr  = a1_pend ? a1_addr : a2_addr;
        r1_cmd_bytes = a1_pend ? a1_bytes : a2_bytes;
        r1_cmd_eos   = a1_pend ? a1_eos : 1'b1;
        w_cmd_valid  = state == S_EXEC && y_pend;
    end

    always_ff @(posedge clk) begin
        done <= 1'b0;
        if (!rst_n) begin
            state   <= S_IDLE;
            status  <= '0;
            a1_pend <= 1'b0;
            a2_pend <= 1'b0;
            b_pend  <= 1'b0;
            y_pend  <= 1'b0;
        end else begin
            case (state)
                S_IDLE: if (start) state <= S_CHECK;
                S_CHECK: begin
                    x_a_shift <= is_add ? word(rec, `M3V_ISA_F_ADD_A_SHIFT) : word(rec, `M3V_ISA_F_EMBED_A_SHIFT);
                    x_b_shift <= is_add ? word(rec, `M3V_ISA_F_ADD_B_SHIFT) : word(rec, `M3V_ISA_F_EMBED_B_SHIFT);
                    {x_fmt_signed, x_fmt_bits} <= {d_fmt[16], d_fmt[5:0]};
                    n_bytes  <= 32'(nb_all);
                    y_addr   <= ADDR_W'(m3v_addr(f_y, base_wgt, base_arena, base_in, base_out));
                    b_addr   <= ADDR_W'(m3v_addr(is_add ? f_b : f_pos, base_wgt, base_arena, base_in, base_out));
                    a1_addr  <= ADDR_W'(m3v_addr(is_add ? f_a : f_cls, base_wgt, base_arena, base_in, base_out));
                    a1_bytes <= is_add ? 32'(nb_all) : 32'(nb_cls);
                    a2_addr  <= ADDR_W'(m3v_addr(f_x, base_wgt, base_arena, base_in, base_out));
                    a2_bytes <= 32'(nb_all - nb_cls);
                    a1_eos   <= is_add || f_patches == 0;
                    status   <= in_limits ? 4'd0 : 4'(`M3V_ISA_STATUS_OVER_LIMIT);
                    if (!in_limits || n_elem == 0) begin
                        state <= S_DONE;
                    end else begin
                        a1_pend <= 1'b1;
                        a2_pend <= !is_add && f_patches != 0;
                        b_pend  <= 1'b1;
                        y_pend  <= 1'b1;
                        state   <= S_EXEC;
                    end
                end
                S_EXEC: begin
                    if (r0_cmd_ready) b_pend <= 1'b0;
                    if (r1_cmd_valid && r1_cmd_ready) begin
                        if (a1_pend) a1_pend <= 1'b0;
                        else a2_pend <= 1'b0;
                    end
                    if (w_cmd_ready) y_pend <= 1'b0;
                    // the writer is idle again once every response of its command is in
                    if (!a1_pend && !a2_pend && !b_pend && !y_pend && w_cmd_ready) state <= S_DONE;
                end
                default: begin
                    done  <= 1'b1;
                    state <= S_IDLE;
                end
            endcase
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, d_fmt[31:17], d_fmt[15:6], task_idx, m_rvalid[PORTS-1:2], m_rdata[PORTS*DW-1:2*DW],
                         m_arready[PORTS-1:2], m_rid[PORTS*ID_W-1:2*ID_W], m_rlast[PORTS-1:2],
                         m_rresp[PORTS*2-1:4], m_awready[1:0], m_wready[1:0], m_bvalid[1:0], m_bid[2*ID_W-1:0],
                         m_bresp[3:0], cu_w_ready, cu_x_ready, cu_o_valid, cu_o_data, cu_o_tag};
    if (PORTS > 3) begin : g_unused
        logic unused_hi;
        assign unused_hi = &{1'b0, m_awready[PORTS-1:3], m_wready[PORTS-1:3], m_bvalid[PORTS-1:3],
                             m_bid[PORTS*ID_W-1:3*ID_W], m_bresp[PORTS*2-1:6]};
    end
endmodule
