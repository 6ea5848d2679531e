// eng_patchify: the engine of patchify (the engine interface: docs/accelerator.md).
`include "m3v_isa.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"
`include "m3v_mem.svh"

module eng_patchify #(
    parameter int DW        = `M3V_AXI_W,
    parameter int PORTS     = `M3V_AXI_PORTS,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    /* verilator lint_off UNUSEDPARAM */
    parameter int MAX_OUT   = 8,
    parameter int MAX_BURST = 16,
    /* verilator lint_on UNUSEDPARAM */
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
    // Not implemented in this RTL yet: the instruction ends the run with STATUS bad_opcode.
    always_ff @(posedge clk) done <= rst_n && start;
    assign status = 4'(`M3V_ISA_STATUS_BAD_OPCODE);
    assign active = 1'b0;
    assign {m_arvalid, m_araddr, m_arlen, m_arsize, m_arburst, m_arid, m_rready} = '0;
    assign {m_awvalid, m_awaddr, m_awlen, m_awsize, m_awburst, m_awid, m_wvalid, m_wdata, m_wstrb, m_wlast,
            m_bready} = '0;
    /* verilator lint_off WIDTHCONCAT */
    assign cu_w_weights = '0;   // a constant tile: no replication hazard
    /* verilator lint_on WIDTHCONCAT */
    assign {cu_w_valid, cu_w_bias, cu_w_shift, cu_w_out_bits, cu_w_comb_shift, cu_w_combine, cu_w_gelu,
            cu_w_gelu_in_frac, cu_w_gelu_out_frac, cu_w_gelu_out_bits} = '0;
    assign {cu_x_valid, cu_x_wnext, cu_x_act, cu_x_eout, cu_x_score, cu_x_slot, cu_x_first, cu_x_last, cu_x_tag,
            cu_o_ready} = '0;

    logic unused_ok;
    assign unused_ok = &{1'b0, rec, task_idx, base_wgt, base_arena, base_in, base_out, sz_wgt, sz_arena, sz_in,
                         sz_out, m_arready, m_rvalid, m_rdata, m_rid, m_rlast, m_rresp, m_awready, m_wready,
                         m_bvalid, m_bid, m_bresp, cu_w_ready, cu_x_ready, cu_o_valid, cu_o_data, cu_o_tag};
endmodule
