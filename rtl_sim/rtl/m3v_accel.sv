// m3v_accel: the accelerator top. The host (rtl_sim/driver.py) writes the registers of
// compiler/regmap.py over AXI4-Lite and starts a Program (docs/program.md) that sits in DDR; the
// top fetches it through its AXI4 master port 0 and hands each instruction to one engine, which
// owns every master port and (for the matrix engines) the shared compute unit until it is done.
// docs/accelerator.md has the diagram and the engine interface.
//
//   axil_regs ── start/bases/TASK ──> controller ── counters/STATUS ──> axil_regs
//   port 0 (between instructions): axi_reader ── header + instructions ──> controller
//   engines: eng_elem (add, embed), eng_gemm (gemm, moe_combine), eng_gate (moe_gate),
//            eng_attn (attention), eng_ln (layernorm), eng_patchify (patchify)
//   compute_unit ── shared by eng_gemm, eng_gate, eng_attn
//
// The controller, on start: fetches the 64-byte header and refuses it with STATUS bad_magic,
// bad_version or hw_mismatch (all 32 digest bytes against the configuration this top was built
// for, `M3V_HW_DIGEST) or bad_task (TASK >= the header's task count); then fetches and runs one
// instruction at a time until END or the header's instruction count (STATUS ok). An opcode
// without an engine stops the run with bad_opcode; an engine that refuses its instruction
// (over_limit, bad_opcode) stops it with its code. A run that stops keeps the stores of the
// instructions before it. INSTR_COUNT counts completed instructions (END included).
// Counters (reset at start): CYCLES = cycles from the start write to done; STALL_CYCLES = those in
// which no engine's datapath did useful work (fetch, decode, DDR latency, back-pressure);
// DDR_RD/WR_BYTES = beats moved on all master ports times the beat size; OP_CYCLES_<op> = cycles
// of each completed instruction from its fetch to its retirement.
// Addresses on the master ports are the low ADDR_W bits of base + offset; the buffers must be
// beat-aligned (the driver allocates 4 KB-aligned buffers; refs are 64-byte aligned).
`include "m3v_isa.svh"
`include "m3v_regmap.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"

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
    localparam int BB     = DW / 8;
    localparam int BPR    = 512 / DW;         // beats per 64-byte record
    localparam int RBW    = $clog2(BPR);
    localparam int NB_W   = $clog2(BB) + 1;
    localparam int N_OPS  = 9;
    localparam int N_ENG  = 6;
    localparam int SLOT_W = $clog2(`M3V_SLOTS);
    localparam int CUW_W  = `M3V_P_IN * `M3V_P_OUT * `M3V_W_W;
    localparam int CUB_W  = `M3V_P_OUT * `M3V_ACC_W;
    localparam int CUS_W  = `M3V_P_OUT * `M3V_SHIFT_W;
    localparam int CUX_W  = `M3V_P_IN * `M3V_X_W;
    localparam int CUA_W  = `M3V_P_OUT * `M3V_ACC_W;
    localparam int CUO_W  = `M3V_P_OUT * `M3V_ACT_W;
    // engine numbers
    localparam logic [2:0] E_ELEM = 3'd0, E_GEMM = 3'd1, E_GATE = 3'd2, E_ATTN = 3'd3, E_LN = 3'd4,
                           E_PATCH = 3'd5, E_NONE = 3'd7;

    localparam logic [3:0] S_IDLE = 4'd0, S_HDR_REQ = 4'd1, S_HDR_RD = 4'd2, S_HDR_CHK = 4'd3,
                           S_FETCH_REQ = 4'd4, S_FETCH_RD = 4'd5, S_DECODE = 4'd6, S_EXEC = 4'd8,
                           S_RETIRE = 4'd9, S_DONE = 4'd10;

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

    logic [3:0]     state;
    logic [2:0]     sel;                 // the engine running the current instruction
    logic           run;                 // an engine owns the ports
    assign run = state == S_EXEC;

    // ---- Program fetch: its own reader on port 0, connected while no engine runs
    logic              f_cmd_valid, f_cmd_ready, f_valid, f_ready, f_eos;
    logic [ADDR_W-1:0] f_cmd_addr;
    logic [DW-1:0]     f_data;
    logic [NB_W-1:0]   f_nbytes;
    logic              f_arvalid, f_rready;
    logic [ADDR_W-1:0] f_araddr;
    logic [7:0]        f_arlen;
    logic [2:0]        f_arsize;
    logic [1:0]        f_arburst;
    logic [ID_W-1:0]   f_arid;
    logic [31:0]       pc;

    assign f_cmd_valid = state == S_HDR_REQ || state == S_FETCH_REQ;
    assign f_cmd_addr  = ADDR_W'(base_prog + (state == S_FETCH_REQ ? {26'd0, pc + 32'd1, 6'd0} : 64'd0));
    assign f_ready     = state == S_HDR_RD || state == S_FETCH_RD;

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_fetch (
        .clk, .rst_n, .cmd_valid(f_cmd_valid), .cmd_ready(f_cmd_ready), .cmd_addr(f_cmd_addr),
        .cmd_bytes(32'd64), .cmd_eos(1'b1), .out_valid(f_valid), .out_ready(f_ready),
        .out_data(f_data), .out_nbytes(f_nbytes), .out_eos(f_eos),
        .arvalid(f_arvalid), .arready(!run && m_arready[0]), .araddr(f_araddr), .arlen(f_arlen),
        .arsize(f_arsize), .arburst(f_arburst), .arid(f_arid),
        .rvalid(!run && m_rvalid[0]), .rready(f_rready), .rdata(m_rdata[0 +: DW]), .rid(m_rid[0 +: ID_W]),
        .rlast(m_rlast[0]), .rresp(m_rresp[0 +: 2]));

    // ---- engines: one instance each, outputs side by side, muxed by sel
    logic [N_ENG-1:0]                  e_start, e_done, e_active;
    logic [N_ENG*4-1:0]               e_status;
    logic [N_ENG*(PORTS)-1:0] e_arvalid, e_rready, e_awvalid, e_wvalid, e_wlast, e_bready;
    logic [N_ENG*(PORTS*ADDR_W)-1:0] e_araddr, e_awaddr;
    logic [N_ENG*(PORTS*8)-1:0] e_arlen, e_awlen;
    logic [N_ENG*(PORTS*3)-1:0] e_arsize, e_awsize;
    logic [N_ENG*(PORTS*2)-1:0] e_arburst, e_awburst;
    logic [N_ENG*(PORTS*ID_W)-1:0] e_arid, e_awid;
    logic [N_ENG*(PORTS*DW)-1:0] e_wdata;
    logic [N_ENG*(PORTS*DW/8)-1:0] e_wstrb;
    logic [N_ENG*(PORTS)-1:0] g_arready, g_rvalid, g_awready, g_wready, g_bvalid;
    logic [N_ENG-1:0]                  e_cu_w_valid, e_cu_w_combine, e_cu_w_gelu, e_cu_x_valid, e_cu_x_wnext,
                                       e_cu_x_first, e_cu_x_last, e_cu_o_ready, g_cu_w_ready, g_cu_x_ready,
                                       g_cu_o_valid, e_cu_w_raw, e_cu_o_raw_ready, g_cu_o_raw_valid;
    logic [N_ENG*(CUW_W)-1:0] e_cu_w_weights;
    logic [N_ENG*(CUB_W)-1:0] e_cu_w_bias;
    logic [N_ENG*(CUS_W)-1:0] e_cu_w_shift;
    logic [N_ENG*(`M3V_OB_W)-1:0] e_cu_w_out_bits, e_cu_w_gelu_out_bits;
    logic [N_ENG*(`M3V_CSH_W)-1:0] e_cu_w_comb_shift;
    logic [N_ENG*7-1:0]               e_cu_w_gelu_in_frac, e_cu_w_gelu_out_frac;
    logic [N_ENG*(CUX_W)-1:0] e_cu_x_act;
    logic [N_ENG*(CUO_W)-1:0] e_cu_x_eout;
    logic [N_ENG*(`M3V_SCORE_W)-1:0] e_cu_x_score;
    logic [N_ENG*(SLOT_W)-1:0] e_cu_x_slot;
    logic [N_ENG*(`M3V_TAG_W)-1:0] e_cu_x_tag;
    logic                              cu_w_ready, cu_x_ready, cu_o_valid, cu_o_raw_valid;
    logic [CUO_W-1:0]                  cu_o_data;
    logic [CUA_W-1:0]                  cu_o_raw_acc;
    logic [`M3V_TAG_W-1:0]             cu_o_raw_tag;
    logic [`M3V_TAG_W-1:0]             cu_o_tag;

    // an engine sees its AXI and compute-unit handshakes only while it is selected
    always_comb begin
        for (int e = 0; e < N_ENG; e++) begin
            g_arready[e*PORTS +: PORTS]    = (run && sel == 3'(e)) ? m_arready : '0;
            g_rvalid[e*PORTS +: PORTS]     = (run && sel == 3'(e)) ? m_rvalid : '0;
            g_awready[e*PORTS +: PORTS]    = (run && sel == 3'(e)) ? m_awready : '0;
            g_wready[e*PORTS +: PORTS]     = (run && sel == 3'(e)) ? m_wready : '0;
            g_bvalid[e*PORTS +: PORTS]     = (run && sel == 3'(e)) ? m_bvalid : '0;
            g_cu_w_ready[e] = run && sel == 3'(e) && cu_w_ready;
            g_cu_x_ready[e] = run && sel == 3'(e) && cu_x_ready;
            g_cu_o_valid[e] = run && sel == 3'(e) && cu_o_valid;
            g_cu_o_raw_valid[e] = run && sel == 3'(e) && cu_o_raw_valid;
        end
    end

`define M3V_ENGINE(MOD, INST, E) \
    MOD #(.DW(DW), .PORTS(PORTS), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) INST ( \
        .clk, .rst_n, .start(e_start[E]), .rec, .task_idx, .base_wgt, .base_arena, .base_in, .base_out, \
        .sz_wgt, .sz_arena, .sz_in, .sz_out, .done(e_done[E]), .status(e_status[32'(E)*4 +: 4]), .active(e_active[E]), \
        .m_arvalid(e_arvalid[32'(E)*(PORTS) +: PORTS]), .m_arready(g_arready[32'(E)*(PORTS) +: PORTS]), .m_araddr(e_araddr[32'(E)*(PORTS*ADDR_W) +: PORTS*ADDR_W]), .m_arlen(e_arlen[32'(E)*(PORTS*8) +: PORTS*8]), \
        .m_arsize(e_arsize[32'(E)*(PORTS*3) +: PORTS*3]), .m_arburst(e_arburst[32'(E)*(PORTS*2) +: PORTS*2]), .m_arid(e_arid[32'(E)*(PORTS*ID_W) +: PORTS*ID_W]), .m_rvalid(g_rvalid[32'(E)*(PORTS) +: PORTS]), \
        .m_rready(e_rready[32'(E)*(PORTS) +: PORTS]), .m_rdata, .m_rid, .m_rlast, .m_rresp, .m_awvalid(e_awvalid[32'(E)*(PORTS) +: PORTS]), \
        .m_awready(g_awready[32'(E)*(PORTS) +: PORTS]), .m_awaddr(e_awaddr[32'(E)*(PORTS*ADDR_W) +: PORTS*ADDR_W]), .m_awlen(e_awlen[32'(E)*(PORTS*8) +: PORTS*8]), .m_awsize(e_awsize[32'(E)*(PORTS*3) +: PORTS*3]), \
        .m_awburst(e_awburst[32'(E)*(PORTS*2) +: PORTS*2]), .m_awid(e_awid[32'(E)*(PORTS*ID_W) +: PORTS*ID_W]), .m_wvalid(e_wvalid[32'(E)*(PORTS) +: PORTS]), .m_wready(g_wready[32'(E)*(PORTS) +: PORTS]), \
        .m_wdata(e_wdata[32'(E)*(PORTS*DW) +: PORTS*DW]), .m_wstrb(e_wstrb[32'(E)*(PORTS*DW/8) +: PORTS*DW/8]), .m_wlast(e_wlast[32'(E)*(PORTS) +: PORTS]), .m_bvalid(g_bvalid[32'(E)*(PORTS) +: PORTS]), \
        .m_bready(e_bready[32'(E)*(PORTS) +: PORTS]), .m_bid, .m_bresp, \
        .cu_w_valid(e_cu_w_valid[E]), .cu_w_ready(g_cu_w_ready[E]), .cu_w_weights(e_cu_w_weights[32'(E)*(CUW_W) +: CUW_W]), \
        .cu_w_bias(e_cu_w_bias[32'(E)*(CUB_W) +: CUB_W]), .cu_w_shift(e_cu_w_shift[32'(E)*(CUS_W) +: CUS_W]), .cu_w_out_bits(e_cu_w_out_bits[32'(E)*(`M3V_OB_W) +: `M3V_OB_W]), \
        .cu_w_comb_shift(e_cu_w_comb_shift[32'(E)*(`M3V_CSH_W) +: `M3V_CSH_W]), .cu_w_combine(e_cu_w_combine[E]), .cu_w_gelu(e_cu_w_gelu[E]), \
        .cu_w_gelu_in_frac(e_cu_w_gelu_in_frac[32'(E)*7 +: 7]), .cu_w_gelu_out_frac(e_cu_w_gelu_out_frac[32'(E)*7 +: 7]), \
        .cu_w_gelu_out_bits(e_cu_w_gelu_out_bits[32'(E)*(`M3V_OB_W) +: `M3V_OB_W]), .cu_x_valid(e_cu_x_valid[E]), \
        .cu_x_ready(g_cu_x_ready[E]), .cu_x_wnext(e_cu_x_wnext[E]), .cu_x_act(e_cu_x_act[32'(E)*(CUX_W) +: CUX_W]), \
        .cu_x_eout(e_cu_x_eout[32'(E)*(CUO_W) +: CUO_W]), .cu_x_score(e_cu_x_score[32'(E)*(`M3V_SCORE_W) +: `M3V_SCORE_W]), .cu_x_slot(e_cu_x_slot[32'(E)*(SLOT_W) +: SLOT_W]), \
        .cu_x_first(e_cu_x_first[E]), .cu_x_last(e_cu_x_last[E]), .cu_x_tag(e_cu_x_tag[32'(E)*(`M3V_TAG_W) +: `M3V_TAG_W]), \
        .cu_o_valid(g_cu_o_valid[E]), .cu_o_ready(e_cu_o_ready[E]), .cu_o_data, .cu_o_tag, \
        .cu_w_raw(e_cu_w_raw[E]), .cu_o_raw_valid(g_cu_o_raw_valid[E]), .cu_o_raw_ready(e_cu_o_raw_ready[E]), \
        .cu_o_raw_acc, .cu_o_raw_tag);

    `M3V_ENGINE(eng_elem, u_elem, 0)
    `M3V_ENGINE(eng_gemm, u_gemm, 1)
    `M3V_ENGINE(eng_gate, u_gate, 2)
    `M3V_ENGINE(eng_attn, u_attn, 3)
    `M3V_ENGINE(eng_ln, u_ln, 4)
    `M3V_ENGINE(eng_patchify, u_patchify, 5)
`undef M3V_ENGINE

    // ---- the master ports: the selected engine's, or the fetch reader on port 0
`define M3V_PORT_PICK(E) begin \
                m_arvalid = e_arvalid[32'(E)*(PORTS) +: PORTS]; m_araddr = e_araddr[32'(E)*(PORTS*ADDR_W) +: PORTS*ADDR_W]; \
                m_arlen = e_arlen[32'(E)*(PORTS*8) +: PORTS*8]; m_arsize = e_arsize[32'(E)*(PORTS*3) +: PORTS*3]; \
                m_arburst = e_arburst[32'(E)*(PORTS*2) +: PORTS*2]; m_arid = e_arid[32'(E)*(PORTS*ID_W) +: PORTS*ID_W]; \
                m_rready = e_rready[32'(E)*(PORTS) +: PORTS]; m_awvalid = e_awvalid[32'(E)*(PORTS) +: PORTS]; \
                m_awaddr = e_awaddr[32'(E)*(PORTS*ADDR_W) +: PORTS*ADDR_W]; m_awlen = e_awlen[32'(E)*(PORTS*8) +: PORTS*8]; \
                m_awsize = e_awsize[32'(E)*(PORTS*3) +: PORTS*3]; m_awburst = e_awburst[32'(E)*(PORTS*2) +: PORTS*2]; \
                m_awid = e_awid[32'(E)*(PORTS*ID_W) +: PORTS*ID_W]; m_wvalid = e_wvalid[32'(E)*(PORTS) +: PORTS]; \
                m_wdata = e_wdata[32'(E)*(PORTS*DW) +: PORTS*DW]; m_wstrb = e_wstrb[32'(E)*(PORTS*DW/8) +: PORTS*DW/8]; \
                m_wlast = e_wlast[32'(E)*(PORTS) +: PORTS]; m_bready = e_bready[32'(E)*(PORTS) +: PORTS]; \
            end
    always_comb begin
        m_arvalid = '0; m_araddr = '0; m_arlen = '0; m_arsize = '0; m_arburst = '0; m_arid = '0;
        m_rready = '0; m_awvalid = '0; m_awaddr = '0; m_awlen = '0; m_awsize = '0; m_awburst = '0;
        m_awid = '0; m_wvalid = '0; m_wdata = '0; m_wstrb = '0; m_wlast = '0; m_bready = '0;
        if (run && sel < 3'(N_ENG)) begin
            // constant part-selects, one arm per engine (see the compute unit's mux below)
            case (sel)
                E_ELEM:  `M3V_PORT_PICK(E_ELEM)
                E_GEMM:  `M3V_PORT_PICK(E_GEMM)
                E_GATE:  `M3V_PORT_PICK(E_GATE)
                E_ATTN:  `M3V_PORT_PICK(E_ATTN)
                E_LN:    `M3V_PORT_PICK(E_LN)
                default: `M3V_PORT_PICK(E_PATCH)
            endcase
        end else begin
            m_arvalid[0] = f_arvalid; m_araddr[0 +: ADDR_W] = f_araddr; m_arlen[0 +: 8] = f_arlen;
            m_arsize[0 +: 3] = f_arsize; m_arburst[0 +: 2] = f_arburst; m_arid[0 +: ID_W] = f_arid;
            m_rready[0] = f_rready;
            m_bready = '1;
        end
    end
`undef M3V_PORT_PICK

    // ---- the shared compute unit, driven by the selected engine
    logic                     c_w_valid, c_w_combine, c_w_gelu, c_x_valid, c_x_wnext, c_x_first, c_x_last,
                              c_o_ready, c_w_raw, c_o_raw_ready;
    logic [CUW_W-1:0]         c_w_weights;
    logic [CUB_W-1:0]         c_w_bias;
    logic [CUS_W-1:0]         c_w_shift;
    logic [`M3V_OB_W-1:0]     c_w_out_bits, c_w_gelu_out_bits;
    logic [`M3V_CSH_W-1:0]    c_w_comb_shift;
    logic [6:0]               c_w_gelu_in_frac, c_w_gelu_out_frac;
    logic [CUX_W-1:0]         c_x_act;
    logic [CUO_W-1:0]         c_x_eout;
    logic [`M3V_SCORE_W-1:0]  c_x_score;
    logic [SLOT_W-1:0]        c_x_slot;
    logic [`M3V_TAG_W-1:0]    c_x_tag;

`define M3V_CU_PICK(E) begin \
            c_w_weights = e_cu_w_weights[32'(E)*(CUW_W) +: CUW_W]; c_w_bias = e_cu_w_bias[32'(E)*(CUB_W) +: CUB_W]; \
            c_w_shift = e_cu_w_shift[32'(E)*(CUS_W) +: CUS_W]; c_w_out_bits = e_cu_w_out_bits[32'(E)*(`M3V_OB_W) +: `M3V_OB_W]; \
            c_w_comb_shift = e_cu_w_comb_shift[32'(E)*(`M3V_CSH_W) +: `M3V_CSH_W]; c_w_combine = e_cu_w_combine[E]; \
            c_w_gelu = e_cu_w_gelu[E]; c_w_gelu_in_frac = e_cu_w_gelu_in_frac[32'(E)*7 +: 7]; \
            c_w_gelu_out_frac = e_cu_w_gelu_out_frac[32'(E)*7 +: 7]; \
            c_w_gelu_out_bits = e_cu_w_gelu_out_bits[32'(E)*(`M3V_OB_W) +: `M3V_OB_W]; c_x_wnext = e_cu_x_wnext[E]; \
            c_x_act = e_cu_x_act[32'(E)*(CUX_W) +: CUX_W]; c_x_eout = e_cu_x_eout[32'(E)*(CUO_W) +: CUO_W]; \
            c_x_score = e_cu_x_score[32'(E)*(`M3V_SCORE_W) +: `M3V_SCORE_W]; c_x_slot = e_cu_x_slot[32'(E)*(SLOT_W) +: SLOT_W]; \
            c_x_first = e_cu_x_first[E]; c_x_last = e_cu_x_last[E]; c_x_tag = e_cu_x_tag[32'(E)*(`M3V_TAG_W) +: `M3V_TAG_W]; \
        end

    always_comb begin
        // only the matrix engines drive it; the others' outputs are constant zero
        logic [2:0] s;
        s = (sel == E_GEMM || sel == E_GATE || sel == E_ATTN) ? sel : E_GEMM;
        c_w_valid = run && sel == s && e_cu_w_valid[s];
        c_x_valid = run && sel == s && e_cu_x_valid[s];
        c_o_ready = run && sel == s && e_cu_o_ready[s];
        c_o_raw_ready = run && sel == s && e_cu_o_raw_ready[s];
        c_w_raw = e_cu_w_raw[s];
        // One arm per engine, with constant part-selects: a part-select at a variable offset
        // makes the simulator assemble the six engines' side-by-side vectors (at 32x48, 18 KB
        // of weight tiles) and shift them every cycle; the arms select the same bits.
        case (s)
            E_GATE:  `M3V_CU_PICK(E_GATE)
            E_ATTN:  `M3V_CU_PICK(E_ATTN)
            default: `M3V_CU_PICK(E_GEMM)
        endcase
    end
`undef M3V_CU_PICK

    compute_unit u_cu (
        .clk, .rst_n,
        .w_valid(c_w_valid), .w_ready(cu_w_ready), .w_weights(c_w_weights), .w_bias(c_w_bias),
        .w_shift(c_w_shift), .w_out_bits(c_w_out_bits), .w_comb_shift(c_w_comb_shift), .w_combine(c_w_combine),
        .w_gelu(c_w_gelu), .w_gelu_in_frac(c_w_gelu_in_frac), .w_gelu_out_frac(c_w_gelu_out_frac),
        .w_gelu_out_bits(c_w_gelu_out_bits),
        .x_valid(c_x_valid), .x_ready(cu_x_ready), .x_wnext(c_x_wnext), .x_act(c_x_act), .x_eout(c_x_eout),
        .x_score(c_x_score), .x_slot(c_x_slot), .x_first(c_x_first), .x_last(c_x_last), .x_tag(c_x_tag),
        .o_valid(cu_o_valid), .o_ready(c_o_ready), .o_data(cu_o_data), .o_tag(cu_o_tag),
        .w_raw(c_w_raw), .o_raw_valid(cu_o_raw_valid), .o_raw_ready(c_o_raw_ready),
        .o_raw_acc(cu_o_raw_acc), .o_raw_tag(cu_o_raw_tag));

    // ---- controller
    logic [511:0]   rec;                 // the header or instruction being read
    logic [RBW-1:0] rb;
    logic [31:0]    n_instr, sz_wgt, sz_arena, sz_in, sz_out;
    logic [7:0]     op;
    logic [63:0]    icyc;
    logic [2:0]     dec_eng;

    function automatic logic [31:0] word(input logic [511:0] r, input int k);
        word = r[32*k +: 32];
    endfunction

    assign core_idle = state == S_IDLE;
    assign core_done = state == S_DONE;

    always_comb begin
        case (rec[7:0])
            8'(`M3V_ISA_OP_ADD), 8'(`M3V_ISA_OP_EMBED):        dec_eng = E_ELEM;
            8'(`M3V_ISA_OP_GEMM), 8'(`M3V_ISA_OP_MOE_COMBINE): dec_eng = E_GEMM;
            8'(`M3V_ISA_OP_MOE_GATE):                          dec_eng = E_GATE;
            8'(`M3V_ISA_OP_ATTENTION):                         dec_eng = E_ATTN;
            8'(`M3V_ISA_OP_LAYERNORM):                         dec_eng = E_LN;
            8'(`M3V_ISA_OP_PATCHIFY):                          dec_eng = E_PATCH;
            default:                                           dec_eng = E_NONE;
        endcase
    end

    always_ff @(posedge clk) begin
        e_start <= '0;
        if (!rst_n) begin
            state        <= S_IDLE;
            sel          <= E_NONE;
            status_q     <= '0;
            instr_count  <= '0;
            cycles       <= '0;
            stall_cycles <= '0;
            rd_bytes     <= '0;
            wr_bytes     <= '0;
            op_cycles    <= '0;
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
                if (!(run && sel < 3'(N_ENG) && e_active[sel])) stall_cycles <= stall_cycles + 64'd1;
                rd_bytes <= rd_bytes + 64'(BB) * 64'($countones(m_rvalid & m_rready));
                wr_bytes <= wr_bytes + 64'(BB) * 64'($countones(m_wvalid & m_wready));
            end
            icyc <= icyc + 64'd1;
            case (state)
                S_HDR_REQ, S_FETCH_REQ:
                    if (f_cmd_ready) begin
                        state <= state == S_HDR_REQ ? S_HDR_RD : S_FETCH_RD;
                        rb <= '0;
                    end
                S_HDR_RD, S_FETCH_RD:
                    if (f_valid) begin
                        rec[32'(rb)*DW +: DW] <= f_data;
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
                    end else if (dec_eng == E_NONE) begin
                        status_q <= `M3V_ISA_STATUS_BAD_OPCODE;
                        state <= S_DONE;
                    end else begin
                        sel <= dec_eng;
                        e_start[dec_eng] <= 1'b1;
                        state <= S_EXEC;
                    end
                end
                S_EXEC:
                    if (sel < 3'(N_ENG) && e_done[sel]) begin
                        sel <= E_NONE;
                        if (e_status[32'(sel)*4 +: 4] != 4'd0) begin
                            status_q <= 32'(e_status[32'(sel)*4 +: 4]);
                            state <= S_DONE;
                        end else begin
                            state <= S_RETIRE;
                        end
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
    assign unused_ok = &{1'b0, f_nbytes, f_eos, word(rec, 13)};
    // the compute-unit outputs of the engines that never drive it (constant zero)
`define M3V_CU_OUTS(E) e_cu_w_weights[32'(E)*(CUW_W) +: CUW_W], e_cu_w_bias[32'(E)*(CUB_W) +: CUB_W], \
        e_cu_w_shift[32'(E)*(CUS_W) +: CUS_W], e_cu_w_out_bits[32'(E)*(`M3V_OB_W) +: `M3V_OB_W], \
        e_cu_w_comb_shift[32'(E)*(`M3V_CSH_W) +: `M3V_CSH_W], e_cu_w_combine[E], e_cu_w_gelu[E], \
        e_cu_w_gelu_in_frac[32'(E)*7 +: 7], e_cu_w_gelu_out_frac[32'(E)*7 +: 7], \
        e_cu_w_gelu_out_bits[32'(E)*(`M3V_OB_W) +: `M3V_OB_W], e_cu_x_wnext[E], e_cu_x_act[32'(E)*(CUX_W) +: CUX_W], \
        e_cu_x_eout[32'(E)*(CUO_W) +: CUO_W], e_cu_x_score[32'(E)*(`M3V_SCORE_W) +: `M3V_SCORE_W], \
        e_cu_x_slot[32'(E)*(SLOT_W) +: SLOT_W], e_cu_x_first[E], e_cu_x_last[E], e_cu_x_tag[32'(E)*(`M3V_TAG_W) +: `M3V_TAG_W]
    logic unused_cu;
    assign unused_cu = &{1'b0, `M3V_CU_OUTS(E_ELEM), `M3V_CU_OUTS(E_LN), `M3V_CU_OUTS(E_PATCH)};
`undef M3V_CU_OUTS
endmodule
