// axil_regs: the accelerator's AXI4-Lite control slave, the register map of compiler/regmap.py.
//
// Offsets come from the generated m3v_regmap.svh, so the driver, the HLS top and this file share
// one map. CTRL follows ap_ctrl_hs: writing bit 0 raises start, which stays set until the core,
// idle, takes it (`start` pulses that cycle); done (bit 1) is set when the core finishes and
// cleared by a read of CTRL; idle (bit 2) and ready (bit 3) read the core's idle state. ISR bit 0
// latches done when IER bit 0 is set and toggles on a written 1; `irq` = GIE & ISR & IER.
// A write is taken when address and data are both valid, one per cycle; a read answers the cycle
// after its address. Unmapped offsets read 0 and ignore writes; every response is OKAY.
`include "m3v_regmap.svh"

module axil_regs #(
    parameter int AW     = `M3V_REGMAP_ADDR_BITS,
    parameter int N_OPS  = 9
) (
    input  logic              clk,
    input  logic              rst_n,
    // AXI4-Lite slave
    input  logic              awvalid,
    output logic              awready,
    input  logic [AW-1:0]     awaddr,
    input  logic              wvalid,
    output logic              wready,
    input  logic [31:0]       wdata,
    input  logic [3:0]        wstrb,
    output logic              bvalid,
    input  logic              bready,
    output logic [1:0]        bresp,
    input  logic              arvalid,
    output logic              arready,
    input  logic [AW-1:0]     araddr,
    output logic              rvalid,
    input  logic              rready,
    output logic [31:0]       rdata,
    output logic [1:0]        rresp,
    output logic              irq,
    // toward the core
    output logic              start,
    output logic [31:0]       task_idx,
    output logic [63:0]       base_prog,
    output logic [63:0]       base_wgt,
    output logic [63:0]       base_arena,
    output logic [63:0]       base_in,
    output logic [63:0]       base_out,
    input  logic              core_idle,
    input  logic              core_done,
    input  logic [31:0]       status,
    input  logic [31:0]       instr_count,
    input  logic [63:0]       cycles,
    input  logic [63:0]       stall_cycles,
    input  logic [63:0]       rd_bytes,
    input  logic [63:0]       wr_bytes,
    input  logic [N_OPS*64-1:0] op_cycles
);
    logic        ap_start, ap_done;
    logic        gie, ier, isr;
    logic [31:0] regs_rw [10];   // PROG..OUT, low word then high word
    logic [AW-1:0] wa, ra;

    logic unused_ok;
    assign unused_ok = &{1'b0, awaddr[1:0], araddr[1:0]};
    assign wa = {awaddr[AW-1:2], 2'b00};
    assign ra = {araddr[AW-1:2], 2'b00};

    assign awready = awvalid && wvalid && !bvalid;
    assign wready  = awready;
    assign arready = !rvalid;
    assign bresp   = 2'b00;
    assign rresp   = 2'b00;
    assign start   = ap_start && core_idle;
    assign irq     = gie && isr && ier;

    assign base_prog  = {regs_rw[1], regs_rw[0]};
    assign base_wgt   = {regs_rw[3], regs_rw[2]};
    assign base_arena = {regs_rw[5], regs_rw[4]};
    assign base_in    = {regs_rw[7], regs_rw[6]};
    assign base_out   = {regs_rw[9], regs_rw[8]};

    function automatic logic [31:0] merge(input logic [31:0] old, input logic [31:0] val, input logic [3:0] strb);
        for (int b = 0; b < 4; b++)
            merge[8*b +: 8] = strb[b] ? val[8*b +: 8] : old[8*b +: 8];
    endfunction

    // index of a base-address word (PROG_LO at 0 ... OUT_HI at 9), 15 when the offset is not one
    function automatic logic [3:0] base_index(input logic [AW-1:0] a);
        base_index = 4'd15;
        for (int i = 0; i < 10; i++)
            if (a == AW'(`M3V_REG_PROG_LO) + AW'(4 * i)) base_index = 4'(i);
    endfunction

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ap_start <= 1'b0;
            ap_done  <= 1'b0;
            gie      <= 1'b0;
            ier      <= 1'b0;
            isr      <= 1'b0;
            task_idx <= '0;
            bvalid   <= 1'b0;
            for (int i = 0; i < 10; i++) regs_rw[i] <= '0;
        end else begin
            if (bvalid && bready) bvalid <= 1'b0;
            if (start) ap_start <= 1'b0;
            if (arvalid && arready && ra == AW'(`M3V_REG_CTRL)) ap_done <= 1'b0;
            if (core_done) begin
                ap_done <= 1'b1;
                if (ier) isr <= 1'b1;
            end
            if (awready) begin
                bvalid <= 1'b1;
                if (wa == AW'(`M3V_REG_CTRL) && wstrb[0] && wdata[0]) ap_start <= 1'b1;
                if (wa == AW'(`M3V_REG_GIE) && wstrb[0]) gie <= wdata[0];
                if (wa == AW'(`M3V_REG_IER) && wstrb[0]) ier <= wdata[0];
                if (wa == AW'(`M3V_REG_ISR) && wstrb[0] && wdata[0]) isr <= !isr;
                if (wa == AW'(`M3V_REG_TASK)) task_idx <= merge(task_idx, wdata, wstrb);
                if (base_index(wa) != 4'd15) regs_rw[base_index(wa)] <= merge(regs_rw[base_index(wa)], wdata, wstrb);
            end
        end
    end

    // read data: registered, the cycle after the address handshake
    logic [31:0] rd_mux;
    always_comb begin
        rd_mux = '0;
        if (ra == AW'(`M3V_REG_CTRL))        rd_mux = {28'd0, core_idle, core_idle, ap_done, ap_start};
        if (ra == AW'(`M3V_REG_GIE))         rd_mux = {31'd0, gie};
        if (ra == AW'(`M3V_REG_IER))         rd_mux = {31'd0, ier};
        if (ra == AW'(`M3V_REG_ISR))         rd_mux = {31'd0, isr};
        if (ra == AW'(`M3V_REG_TASK))        rd_mux = task_idx;
        if (base_index(ra) != 4'd15)         rd_mux = regs_rw[base_index(ra)];
        if (ra == AW'(`M3V_REG_STATUS))      rd_mux = status;
        if (ra == AW'(`M3V_REG_HW_HASH))     rd_mux = `M3V_REGMAP_HW_HASH32;
        if (ra == AW'(`M3V_REG_INSTR_COUNT)) rd_mux = instr_count;
        if (ra == AW'(`M3V_REG_CYCLES_LO))   rd_mux = cycles[31:0];
        if (ra == AW'(`M3V_REG_CYCLES_HI))   rd_mux = cycles[63:32];
        if (ra == AW'(`M3V_REG_STALL_CYCLES_LO)) rd_mux = stall_cycles[31:0];
        if (ra == AW'(`M3V_REG_STALL_CYCLES_HI)) rd_mux = stall_cycles[63:32];
        if (ra == AW'(`M3V_REG_DDR_RD_BYTES_LO)) rd_mux = rd_bytes[31:0];
        if (ra == AW'(`M3V_REG_DDR_RD_BYTES_HI)) rd_mux = rd_bytes[63:32];
        if (ra == AW'(`M3V_REG_DDR_WR_BYTES_LO)) rd_mux = wr_bytes[31:0];
        if (ra == AW'(`M3V_REG_DDR_WR_BYTES_HI)) rd_mux = wr_bytes[63:32];
        // OP_CYCLES_<op> pairs follow each other in opcode order
        for (int op = 0; op < N_OPS; op++) begin
            if (ra == AW'(`M3V_REG_OP_CYCLES_END_LO) + AW'(8 * op)) rd_mux = op_cycles[64*op +: 32];
            if (ra == AW'(`M3V_REG_OP_CYCLES_END_HI) + AW'(8 * op)) rd_mux = op_cycles[64*op + 32 +: 32];
        end
    end

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            rvalid <= 1'b0;
            rdata  <= '0;
        end else begin
            if (rvalid && rready) rvalid <= 1'b0;
            if (arvalid && arready) begin
                rvalid <= 1'b1;
                rdata  <= rd_mux;
            end
        end
    end
endmodule
