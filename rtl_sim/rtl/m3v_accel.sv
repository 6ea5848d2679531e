// m3v_accel: the accelerator top. The host (rtl_sim/driver.py) writes the registers of
// compiler/regmap.py over AXI4-Lite and starts a Program (docs/program.md) that sits in DDR; the
// top fetches it through its AXI4 master ports and runs it. docs/accelerator.md has the diagram.
//
//   axil_regs ── start/bases/TASK ──> controller ── counters/STATUS ──> axil_regs
//   port 0: axi_reader  ── header + instructions ──> controller
//                       └─ operand B (add: b, embed: pos) ──> elem_packer ─┐
//   port 1: axi_reader  ── operand A (add: a, embed: cls then x) ──> elem_packer ─┤
//                                                                        add_unit (P lanes)
//   port 2: axi_writer  <── y ─────────────────────────────────────────────────────┘
//   ports 3..: idle (reserved for the weight streams of the GEMM engine)
//
// The controller, on start: fetches the 64-byte header through port 0 and refuses it with STATUS
// bad_magic, bad_version or hw_mismatch (all 32 digest bytes against the configuration this top
// was built for, `M3V_HW_DIGEST) or bad_task (TASK >= the header's task count); then fetches and
// runs one instruction at a time until END or the header's instruction count (STATUS ok).
// Current state: ADD and EMBED run, bit-exact with compiler/program_exec.py (residual_add, with
// EMBED's A stream = the CLS row then the patch rows); every other opcode stops the run with
// STATUS bad_opcode (their engines come later). An operand past the end of its space or a store
// outside arena/out stops it with over_limit. A run that stops keeps the stores of the
// instructions before it. INSTR_COUNT counts completed instructions (END included).
// Counters (reset at start): CYCLES = cycles from the start write to done; STALL_CYCLES = those in
// which the elementwise datapath took no beat (fetch, decode, DDR latency and back-pressure), so
// CYCLES - STALL_CYCLES = beats computed; DDR_RD/WR_BYTES = beats moved on the master ports times
// the beat size; OP_CYCLES_<op> = cycles of each completed instruction from its fetch to its
// retirement (their sum leaves out the header check and the final cycle).
// Addresses on the master ports are the low ADDR_W bits of base + offset; the buffers must be
// beat-aligned (the driver allocates 4 KB-aligned buffers; refs are 64-byte aligned).
`include "m3v_isa.svh"
`include "m3v_regmap.svh"
`include "m3v_accel_cfg.svh"

module m3v_accel #(
    parameter int DW        = `M3V_AXI_W,
    parameter int PORTS     = `M3V_AXI_PORTS,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 8,     // bursts in flight per engine: 8 x 16 beats cover the DDR latency
    parameter int MAX_BURST = 16,
    parameter int LAW       = `M3V_REGMAP_ADDR_BITS
) (
    input  logic                     clk,
    input  logic                     rst_n,
    // AXI4-Lite control slave
    input  logic                     s_awvalid,
    output logic                     s_awready,
    input  logic [LAW-1:0]           s_awaddr,
    input  logic                     s_wvalid,
    output logic                     s_wready,
    input  logic [31:0]              s_wdata,
    input  logic [3:0]               s_wstrb,
    output logic                     s_bvalid,
    input  logic                     s_bready,
    output logic [1:0]               s_bresp,
    input  logic                     s_arvalid,
    output logic                     s_arready,
    input  logic [LAW-1:0]           s_araddr,
    output logic                     s_rvalid,
    input  logic                     s_rready,
    output logic [31:0]              s_rdata,
    output logic [1:0]               s_rresp,
    output logic                     irq,
    // AXI4 masters, PORTS channels packed side by side (as rtl_sim/tb/axi_ddr_model.sv)
    output logic [PORTS-1:0]         m_arvalid,
    input  logic [PORTS-1:0]         m_arready,
    output logic [PORTS*ADDR_W-1:0]  m_araddr,
    output logic [PORTS*8-1:0]       m_arlen,
    output logic [PORTS*3-1:0]       m_arsize,
    output logic [PORTS*2-1:0]       m_arburst,
    output logic [PORTS*ID_W-1:0]    m_arid,
    input  logic [PORTS-1:0]         m_rvalid,
    output logic [PORTS-1:0]         m_rready,
    input  logic [PORTS*DW-1:0]      m_rdata,
    input  logic [PORTS*ID_W-1:0]    m_rid,
    input  logic [PORTS-1:0]         m_rlast,
    input  logic [PORTS*2-1:0]       m_rresp,
    output logic [PORTS-1:0]         m_awvalid,
    input  logic [PORTS-1:0]         m_awready,
    output logic [PORTS*ADDR_W-1:0]  m_awaddr,
    output logic [PORTS*8-1:0]       m_awlen,
    output logic [PORTS*3-1:0]       m_awsize,
    output logic [PORTS*2-1:0]       m_awburst,
    output logic [PORTS*ID_W-1:0]    m_awid,
    output logic [PORTS-1:0]         m_wvalid,
    input  logic [PORTS-1:0]         m_wready,
    output logic [PORTS*DW-1:0]      m_wdata,
    output logic [PORTS*DW/8-1:0]    m_wstrb,
    output logic [PORTS-1:0]         m_wlast,
    input  logic [PORTS-1:0]         m_bvalid,
    output logic [PORTS-1:0]         m_bready,
    input  logic [PORTS*ID_W-1:0]    m_bid,
    input  logic [PORTS*2-1:0]       m_bresp
);
    localparam int P     = DW / 16;          // int16 lanes: one beat per cycle
    localparam int BB    = DW / 8;
    localparam int BPR   = 512 / DW;         // beats per 64-byte record
    localparam int RBW   = $clog2(BPR);
    localparam int NB_W  = $clog2(BB) + 1;
    localparam int NW    = $clog2(P + 1);
    localparam int N_OPS = 9;

    localparam logic [3:0] S_IDLE = 4'd0, S_HDR_REQ = 4'd1, S_HDR_RD = 4'd2, S_HDR_CHK = 4'd3,
                           S_FETCH_REQ = 4'd4, S_FETCH_RD = 4'd5, S_DECODE = 4'd6, S_CHECK = 4'd7,
                           S_EXEC = 4'd8, S_RETIRE = 4'd9, S_DONE = 4'd10;

    // ---- register file
    logic        start, core_idle, core_done;
    logic [31:0] task_idx, status_q, instr_count;
    logic [63:0] base_prog, base_wgt, base_arena, base_in, base_out;
    logic [63:0] cycles, stall_cycles, rd_bytes, wr_bytes;
    logic [N_OPS*64-1:0] op_cycles;

    axil_regs #(.AW(LAW), .N_OPS(N_OPS)) u_regs (
        .clk, .rst_n,
        .awvalid(s_awvalid), .awready(s_awready), .awaddr(s_awaddr), .wvalid(s_wvalid), .wready(s_wready),
        .wdata(s_wdata), .wstrb(s_wstrb), .bvalid(s_bvalid), .bready(s_bready), .bresp(s_bresp),
        .arvalid(s_arvalid), .arready(s_arready), .araddr(s_araddr), .rvalid(s_rvalid), .rready(s_rready),
        .rdata(s_rdata), .rresp(s_rresp), .irq,
        .start, .task_idx, .base_prog, .base_wgt, .base_arena, .base_in, .base_out,
        .core_idle, .core_done, .status(status_q), .instr_count, .cycles, .stall_cycles,
        .rd_bytes, .wr_bytes, .op_cycles);

    // ---- DMA engines
    logic              r0_cmd_valid, r0_cmd_ready, r1_cmd_valid, r1_cmd_ready, w_cmd_valid, w_cmd_ready;
    logic [ADDR_W-1:0] r0_cmd_addr, r1_cmd_addr, w_cmd_addr;
    logic [31:0]       r0_cmd_bytes, r1_cmd_bytes, w_cmd_bytes;
    logic              r1_cmd_eos;
    logic              r0_valid, r0_ready, r0_eos, r1_valid, r1_ready, r1_eos;
    logic [DW-1:0]     r0_data, r1_data;
    logic [NB_W-1:0]   r0_nbytes, r1_nbytes;

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rd0 (
        .clk, .rst_n, .cmd_valid(r0_cmd_valid), .cmd_ready(r0_cmd_ready), .cmd_addr(r0_cmd_addr),
        .cmd_bytes(r0_cmd_bytes), .cmd_eos(1'b1), .out_valid(r0_valid), .out_ready(r0_ready),
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
        .clk, .rst_n, .cmd_valid(w_cmd_valid), .cmd_ready(w_cmd_ready), .cmd_addr(w_cmd_addr),
        .cmd_bytes(w_cmd_bytes), .in_valid(y_valid), .in_ready(y_ready), .in_data(y_data),
        .awvalid(m_awvalid[2]), .awready(m_awready[2]), .awaddr(m_awaddr[2*ADDR_W +: ADDR_W]),
        .awlen(m_awlen[16 +: 8]), .awsize(m_awsize[6 +: 3]), .awburst(m_awburst[4 +: 2]),
        .awid(m_awid[2*ID_W +: ID_W]), .wvalid(m_wvalid[2]), .wready(m_wready[2]),
        .wdata(m_wdata[2*DW +: DW]), .wstrb(m_wstrb[2*BB +: BB]), .wlast(m_wlast[2]),
        .bvalid(m_bvalid[2]), .bready(m_bready[2]), .bid(m_bid[2*ID_W +: ID_W]), .bresp(m_bresp[4 +: 2]));

    // the channels no engine drives yet
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

    // ---- elementwise datapath: A and B packed to full beats, added, written
    logic          pa_valid, pa_ready, pb_valid, pb_ready, pb_in_valid, pb_in_ready;
    logic [DW-1:0] pa_data, pb_data;
    logic          add_in_valid, add_in_ready, add_fire;
    logic [31:0]   x_a_shift, x_b_shift;
    logic [5:0]    x_fmt_bits;
    logic          x_fmt_signed;
    logic [3:0]    state;

    elem_packer #(.P(P), .EW(16)) u_pack_a (
        .clk, .rst_n, .in_valid(r1_valid), .in_ready(r1_ready), .in_data(r1_data), .in_n(NW'(r1_nbytes >> 1)),
        .in_eos(r1_eos), .out_valid(pa_valid), .out_ready(pa_ready), .out_data(pa_data));

    assign pb_in_valid = state == S_EXEC && r0_valid;
    assign r0_ready = (state == S_HDR_RD || state == S_FETCH_RD) || (state == S_EXEC && pb_in_ready);

    elem_packer #(.P(P), .EW(16)) u_pack_b (
        .clk, .rst_n, .in_valid(pb_in_valid), .in_ready(pb_in_ready), .in_data(r0_data),
        .in_n(NW'(r0_nbytes >> 1)), .in_eos(r0_eos), .out_valid(pb_valid), .out_ready(pb_ready),
        .out_data(pb_data));

    assign add_in_valid = pa_valid && pb_valid;
    assign pa_ready = add_in_ready && pb_valid;
    assign pb_ready = add_in_ready && pa_valid;
    assign add_fire = add_in_valid && add_in_ready;

    add_unit #(.P(P), .EW(16)) u_add (
        .clk, .rst_n, .a_shift(x_a_shift), .b_shift(x_b_shift), .fmt_bits(x_fmt_bits), .fmt_signed(x_fmt_signed),
        .in_valid(add_in_valid), .in_ready(add_in_ready), .a_data(pa_data), .b_data(pb_data),
        .out_valid(y_valid), .out_ready(y_ready), .out_data(y_data));

    // ---- controller
    logic [511:0]   rec;                 // the header or instruction being read
    logic [RBW-1:0] rb;
    logic [31:0]    n_instr, sz_wgt, sz_arena, sz_in, sz_out, pc, d_fmt;
    logic [7:0]     op;
    logic [63:0]    n_elem, icyc;
    logic           a1_pend, a2_pend, b_pend, y_pend;
    logic [ADDR_W-1:0] a1_addr, a2_addr, b_addr, y_addr;
    logic [31:0]    a1_bytes, a2_bytes, n_bytes;
    logic           a1_eos;

    function automatic logic [31:0] word(input logic [511:0] r, input int k);
        word = r[32*k +: 32];
    endfunction

    assign core_idle = state == S_IDLE;
    assign core_done = state == S_DONE;

    // the byte address of a ref
    function automatic logic [ADDR_W-1:0] addr_of(input logic [31:0] r, input logic [63:0] bw, input logic [63:0] ba,
                                                  input logic [63:0] bi, input logic [63:0] bo);
        logic [63:0] b;
        case (r[31:30])
            2'd0: b = bw;
            2'd1: b = ba;
            2'd2: b = bi;
            default: b = bo;
        endcase
        addr_of = ADDR_W'(b + {34'd0, r[29:0]});
    endfunction

    // bytes from a ref inside its space (the sizes the header states)
    function automatic logic fits(input logic [31:0] r, input logic [64:0] nb, input logic [31:0] sw,
                                  input logic [31:0] sa, input logic [31:0] si, input logic [31:0] so);
        logic [31:0] s;
        case (r[31:30])
            2'd0: s = sw;
            2'd1: s = sa;
            2'd2: s = si;
            default: s = so;
        endcase
        fits = 66'(r[29:0]) + 66'(nb) <= 66'(s);
    endfunction

    // operands of the instruction in rec, for the limit checks and the commands
    logic        is_add;
    logic [31:0] f_a, f_b, f_y, f_x, f_cls, f_pos, f_patches, f_dim;
    logic [64:0] nb_all, nb_cls;
    logic        in_limits;
    always_comb begin
        is_add    = op == 8'(`M3V_ISA_OP_ADD);
        d_fmt     = rec[7:0] == 8'(`M3V_ISA_OP_ADD) ? word(rec, `M3V_ISA_F_ADD_FMT) : word(rec, `M3V_ISA_F_EMBED_FMT);
        f_a       = word(rec, `M3V_ISA_F_ADD_A_REF);
        f_b       = word(rec, `M3V_ISA_F_ADD_B_REF);
        f_y       = is_add ? word(rec, `M3V_ISA_F_ADD_Y_REF) : word(rec, `M3V_ISA_F_EMBED_Y_REF);
        f_x       = word(rec, `M3V_ISA_F_EMBED_X_REF);
        f_cls     = word(rec, `M3V_ISA_F_EMBED_CLS_REF);
        f_pos     = word(rec, `M3V_ISA_F_EMBED_POS_REF);
        f_patches = word(rec, `M3V_ISA_F_EMBED_PATCHES);
        f_dim     = word(rec, `M3V_ISA_F_EMBED_DIM);
        nb_all    = {n_elem, 1'b0};
        nb_cls    = {32'd0, f_dim, 1'b0};
        // only arena and out take stores
        in_limits = (f_y[31:30] == 2'(`M3V_ISA_SPACE_ARENA) || f_y[31:30] == 2'(`M3V_ISA_SPACE_OUT))
                    && fits(f_y, nb_all, sz_wgt, sz_arena, sz_in, sz_out);
        if (is_add)
            in_limits = in_limits && fits(f_a, nb_all, sz_wgt, sz_arena, sz_in, sz_out)
                        && fits(f_b, nb_all, sz_wgt, sz_arena, sz_in, sz_out);
        else
            in_limits = in_limits && fits(f_x, nb_all - nb_cls, sz_wgt, sz_arena, sz_in, sz_out)
                        && fits(f_cls, nb_cls, sz_wgt, sz_arena, sz_in, sz_out)
                        && fits(f_pos, nb_all, sz_wgt, sz_arena, sz_in, sz_out);
    end

    always_comb begin
        r0_cmd_valid = state == S_HDR_REQ || state == S_FETCH_REQ || (state == S_EXEC && b_pend);
        r0_cmd_addr  = state == S_EXEC ? b_addr
                     : ADDR_W'(base_prog + (state == S_FETCH_REQ ? {26'd0, pc + 32'd1, 6'd0} : 64'd0));
        r0_cmd_bytes = state == S_EXEC ? n_bytes : 32'd64;
        r1_cmd_valid = state == S_EXEC && (a1_pend || a2_pend);
        r1_cmd_addr  = a1_pend ? a1_addr : a2_addr;
        r1_cmd_bytes = a1_pend ? a1_bytes : a2_bytes;
        r1_cmd_eos   = a1_pend ? a1_eos : 1'b1;
        w_cmd_valid  = state == S_EXEC && y_pend;
        w_cmd_addr   = y_addr;
        w_cmd_bytes  = n_bytes;
    end

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            state        <= S_IDLE;
            status_q     <= '0;
            instr_count  <= '0;
            cycles       <= '0;
            stall_cycles <= '0;
            rd_bytes     <= '0;
            wr_bytes     <= '0;
            op_cycles    <= '0;
            a1_pend      <= 1'b0;
            a2_pend      <= 1'b0;
            b_pend       <= 1'b0;
            y_pend       <= 1'b0;
        end else begin
            if (start) begin
                // the cycle start is taken counts: CYCLES spans the start write to done
                state        <= S_HDR_REQ;
                status_q     <= '0;
                instr_count  <= '0;
                cycles       <= 64'd1;
                stall_cycles <= 64'd1;
                rd_bytes     <= '0;
                wr_bytes     <= '0;
                op_cycles    <= '0;
            end
            if (state != S_IDLE) begin
                cycles <= cycles + 64'd1;
                if (!add_fire) stall_cycles <= stall_cycles + 64'd1;
                rd_bytes <= rd_bytes + 64'(BB) * (64'(m_rvalid[0] && m_rready[0]) + 64'(m_rvalid[1] && m_rready[1]));
                wr_bytes <= wr_bytes + 64'(BB) * 64'(m_wvalid[2] && m_wready[2]);
            end
            icyc <= icyc + 64'd1;
            case (state)
                S_HDR_REQ, S_FETCH_REQ:
                    if (r0_cmd_ready) begin
                        state <= state == S_HDR_REQ ? S_HDR_RD : S_FETCH_RD;
                        rb <= '0;
                    end
                S_HDR_RD, S_FETCH_RD:
                    if (r0_valid) begin
                        rec[32'(rb)*DW +: DW] <= r0_data;
                        rb <= rb + 1'b1;
                        if (rb == RBW'(BPR - 1)) state <= state == S_HDR_RD ? S_HDR_CHK : S_DECODE;
                    end
                S_HDR_CHK: begin
                    n_instr  <= word(rec, 10);
                    sz_wgt   <= word(rec, 11);
                    sz_arena <= word(rec, 12);
                    sz_in    <= word(rec, 14);
                    sz_out   <= word(rec, 15);
                    pc       <= '0;
                    icyc     <= '0;
                    state    <= S_DONE;
                    if (word(rec, 0) != 32'(`M3V_ISA_MAGIC))        status_q <= `M3V_ISA_STATUS_BAD_MAGIC;
                    else if (word(rec, 1) != 32'(`M3V_ISA_VERSION)) status_q <= `M3V_ISA_STATUS_BAD_VERSION;
                    else if (rec[64 +: 256] != `M3V_HW_DIGEST)       status_q <= `M3V_ISA_STATUS_HW_MISMATCH;
                    else if (task_idx >= word(rec, 13))              status_q <= `M3V_ISA_STATUS_BAD_TASK;
                    else if (word(rec, 10) != 0)                     state <= S_FETCH_REQ;
                end
                S_DECODE: begin
                    op <= rec[7:0];
                    if (rec[7:0] == 8'(`M3V_ISA_OP_END)) begin
                        state <= S_RETIRE;
                    end else if (rec[7:0] == 8'(`M3V_ISA_OP_ADD)) begin
                        n_elem <= word(rec, `M3V_ISA_F_ADD_ROWS) * word(rec, `M3V_ISA_F_ADD_COLS);
                        x_a_shift <= word(rec, `M3V_ISA_F_ADD_A_SHIFT);
                        x_b_shift <= word(rec, `M3V_ISA_F_ADD_B_SHIFT);
                        {x_fmt_signed, x_fmt_bits} <= {d_fmt[16], d_fmt[5:0]};
                        state <= S_CHECK;
                    end else if (rec[7:0] == 8'(`M3V_ISA_OP_EMBED)) begin
                        n_elem <= 64'(word(rec, `M3V_ISA_F_EMBED_PATCHES) + 33'd1)
                                  * 64'(word(rec, `M3V_ISA_F_EMBED_DIM));
                        x_a_shift <= word(rec, `M3V_ISA_F_EMBED_A_SHIFT);
                        x_b_shift <= word(rec, `M3V_ISA_F_EMBED_B_SHIFT);
                        {x_fmt_signed, x_fmt_bits} <= {d_fmt[16], d_fmt[5:0]};
                        state <= S_CHECK;
                    end else begin
                        status_q <= `M3V_ISA_STATUS_BAD_OPCODE;
                        state <= S_DONE;
                    end
                end
                S_CHECK: begin
                    n_bytes  <= 32'(nb_all);
                    y_addr   <= addr_of(f_y, base_wgt, base_arena, base_in, base_out);
                    b_addr   <= addr_of(is_add ? f_b : f_pos, base_wgt, base_arena, base_in, base_out);
                    a1_addr  <= addr_of(is_add ? f_a : f_cls, base_wgt, base_arena, base_in, base_out);
                    a1_bytes <= is_add ? 32'(nb_all) : 32'(nb_cls);
                    a2_addr  <= addr_of(f_x, base_wgt, base_arena, base_in, base_out);
                    a2_bytes <= 32'(nb_all - nb_cls);
                    a1_eos   <= is_add || f_patches == 0;
                    if (!in_limits) begin
                        status_q <= `M3V_ISA_STATUS_OVER_LIMIT;
                        state <= S_DONE;
                    end else if (n_elem == 0) begin
                        state <= S_RETIRE;
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
                    if (!a1_pend && !a2_pend && !b_pend && !y_pend && w_cmd_ready) state <= S_RETIRE;
                end
                S_RETIRE: begin
                    instr_count <= instr_count + 32'd1;
                    op_cycles[32'(op)*64 +: 64] <= op_cycles[32'(op)*64 +: 64] + icyc + 64'd1;
                    pc <= pc + 32'd1;
                    icyc <= '0;
                    if (op == 8'(`M3V_ISA_OP_END) || pc + 32'd1 == n_instr) state <= S_DONE;
                    else state <= S_FETCH_REQ;
                end
                S_DONE: state <= S_IDLE;
                default: ;
            endcase
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, d_fmt[31:17], d_fmt[15:6], m_arready[PORTS-1:2], m_rvalid[PORTS-1:2],
                         m_rdata[PORTS*DW-1:2*DW],
                         m_rid[PORTS*ID_W-1:2*ID_W], m_rlast[PORTS-1:2], m_rresp[PORTS*2-1:4], m_awready[1:0],
                         m_wready[1:0], m_bvalid[1:0], m_bid[2*ID_W-1:0], m_bresp[3:0]};
    if (PORTS > 3) begin : g_unused
        logic unused_hi;
        assign unused_hi = &{1'b0, m_awready[PORTS-1:3], m_wready[PORTS-1:3], m_bvalid[PORTS-1:3],
                             m_bid[PORTS*ID_W-1:3*ID_W], m_bresp[PORTS*2-1:6]};
    end
endmodule
