// accel_tb: the accelerator top (m3v_accel) on the simulation DDR (axi_ddr_model), for the cocotb
// harness (tests/rtl/accel_device.py). The host side is the AXI4-Lite slave and the DDR model's
// `load` / `dump` pulses (the driver's DDR writes and reads, through manifest files).
//
// Independent of the accelerator's own counters, this testbench measures each run from the
// handshakes it sees: from the AXI4-Lite write that sets CTRL.start (exclusive) to the first
// cycle the interrupt is high (exclusive; the harness enables GIE and IER), the cycles, and the
// bytes of every read and write beat on the master ports.
`include "m3v_regmap.svh"
`include "m3v_accel_cfg.svh"

module accel_tb #(
    parameter int DW        = `M3V_AXI_W,
    parameter int PORTS     = `M3V_AXI_PORTS,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int LAW       = `M3V_REGMAP_ADDR_BITS,
    parameter int MEM_WORDS = 1 << 18
) (
    input  logic              clk,
    input  logic              rst_n,
    input  logic [9:0]        stall_permille,
    input  logic              load,
    input  logic              dump,
    input  logic              s_awvalid,
    output logic              s_awready,
    input  logic [LAW-1:0]    s_awaddr,
    input  logic              s_wvalid,
    output logic              s_wready,
    input  logic [31:0]       s_wdata,
    input  logic [3:0]        s_wstrb,
    output logic              s_bvalid,
    input  logic              s_bready,
    output logic [1:0]        s_bresp,
    input  logic              s_arvalid,
    output logic              s_arready,
    input  logic [LAW-1:0]    s_araddr,
    output logic              s_rvalid,
    input  logic              s_rready,
    output logic [31:0]       s_rdata,
    output logic [1:0]        s_rresp,
    output logic              irq,
    output logic [63:0]       tb_cycles,
    output logic [63:0]       tb_rd_bytes,
    output logic [63:0]       tb_wr_bytes,
    output logic [63:0]       ddr_bytes_rd,
    output logic [63:0]       ddr_bytes_wr,
    output logic [31:0]       ddr_errors
);
    logic [PORTS-1:0]         arvalid, arready, rvalid, rready, rlast, awvalid, awready, wvalid, wready, wlast;
    logic [PORTS-1:0]         bvalid, bready;
    logic [PORTS*ADDR_W-1:0]  araddr, awaddr;
    logic [PORTS*8-1:0]       arlen, awlen;
    logic [PORTS*3-1:0]       arsize, awsize;
    logic [PORTS*2-1:0]       arburst, awburst, rresp, bresp;
    logic [PORTS*ID_W-1:0]    arid, rid, awid, bid;
    logic [PORTS*DW-1:0]      rdata, wdata;
    logic [PORTS*DW/8-1:0]    wstrb;

    // The accelerator takes its reset from a flop, as on the board, where the processor's reset
    // reaches the fabric through a synchroniser. For the simulation it matters because several
    // units use their reset in combinational logic (ready signals): driven straight from a
    // top-level input, that reset would put the whole combinational network into the
    // input-change region of the Verilator model, evaluated again on both clock edges and on
    // every signal the harness writes. The harness holds rst_n low for several cycles and starts
    // nothing in the cycle after it, so the one cycle more of reset changes no result. The DDR
    // model keeps rst_n itself (its arbitration phase counts from its reset).
    logic rst_q;
    always_ff @(posedge clk) rst_q <= rst_n;

    m3v_accel #(.DW(DW), .PORTS(PORTS), .ADDR_W(ADDR_W), .ID_W(ID_W), .LAW(LAW)) u_accel (
        .clk, .rst_n(rst_q),
        .s_awvalid, .s_awready, .s_awaddr, .s_wvalid, .s_wready, .s_wdata, .s_wstrb, .s_bvalid, .s_bready,
        .s_bresp, .s_arvalid, .s_arready, .s_araddr, .s_rvalid, .s_rready, .s_rdata, .s_rresp, .irq,
        .m_arvalid(arvalid), .m_arready(arready), .m_araddr(araddr), .m_arlen(arlen), .m_arsize(arsize),
        .m_arburst(arburst), .m_arid(arid), .m_rvalid(rvalid), .m_rready(rready), .m_rdata(rdata),
        .m_rid(rid), .m_rlast(rlast), .m_rresp(rresp), .m_awvalid(awvalid), .m_awready(awready),
        .m_awaddr(awaddr), .m_awlen(awlen), .m_awsize(awsize), .m_awburst(awburst), .m_awid(awid),
        .m_wvalid(wvalid), .m_wready(wready), .m_wdata(wdata), .m_wstrb(wstrb), .m_wlast(wlast),
        .m_bvalid(bvalid), .m_bready(bready), .m_bid(bid), .m_bresp(bresp));

    axi_ddr_model #(.PORTS(PORTS), .DATA_W(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MEM_WORDS(MEM_WORDS)) u_ddr (
        .clk, .rst_n, .stall_permille, .load, .dump,
        .arvalid, .arready, .araddr, .arlen, .arsize, .arburst, .arid, .rvalid, .rready, .rdata, .rid, .rlast,
        .rresp, .awvalid, .awready, .awaddr, .awlen, .awsize, .awburst, .awid, .wvalid, .wready, .wdata, .wstrb,
        .wlast, .bvalid, .bready, .bid, .bresp, .bytes_rd(ddr_bytes_rd), .bytes_wr(ddr_bytes_wr),
        .errors(ddr_errors));

    // Per-instruction log (+instr_log=FILE), for rtlsim's breakdown and progress: one line per
    // retired instruction: run number, instruction index, opcode, its cycles from fetch to
    // retirement, and the accelerator's running counts of stall cycles and DDR bytes.
    integer ilog = 0;
    integer runs = 0;
    string  ilog_path;
    initial if ($value$plusargs("instr_log=%s", ilog_path)) ilog = $fopen(ilog_path, "w");
    always @(posedge clk) begin
        if (rst_q && u_accel.start) runs = runs + 1;
        if (ilog != 0 && rst_q && u_accel.state == 4'd9) begin
            $fwrite(ilog, "%0d %0d %0d %0d %0d %0d %0d\n", runs, u_accel.pc, u_accel.op, u_accel.icyc + 64'd1,
                    u_accel.stall_cycles, u_accel.rd_bytes, u_accel.wr_bytes);
            $fflush(ilog);
        end
    end

    // Wave window (+wave_file=F.fst +wave_run=R +wave_pc=P +wave_cycles=N, a build with
    // --trace-fst): dumping starts when run R fetches instruction P and stops, ending the
    // simulation, when that instruction retires or after N cycles, so a mismatch deep into a
    // frame gives a small file.
`ifdef M3V_WAVES
    string  wave_path;
    integer wave_run = 0, wave_pc = -1, wave_cycles = 20000, waved = 0;
    logic   wave_on = 1'b0;
    initial begin
        void'($value$plusargs("wave_file=%s", wave_path));
        void'($value$plusargs("wave_run=%d", wave_run));
        void'($value$plusargs("wave_pc=%d", wave_pc));
        void'($value$plusargs("wave_cycles=%d", wave_cycles));
    end
    always @(posedge clk) begin
        if (!wave_on && wave_path.len() != 0 && rst_n && runs == wave_run && u_accel.state == 4'd4
            && 32'(u_accel.pc) == 32'(wave_pc)) begin
            $dumpfile(wave_path);
            $dumpvars(0, u_accel);
            wave_on = 1'b1;
        end else if (wave_on) begin
            waved = waved + 1;
            if ((u_accel.state == 4'd9 && 32'(u_accel.pc) == 32'(wave_pc)) || u_accel.state == 4'd10
                || waved >= wave_cycles) begin
                $dumpflush;
                $finish;
            end
        end
    end
`endif

    logic counting;
    always_ff @(posedge clk) begin
        if (!rst_q) begin
            counting    <= 1'b0;
            tb_cycles   <= '0;
            tb_rd_bytes <= '0;
            tb_wr_bytes <= '0;
        end else if (s_awvalid && s_awready && s_wvalid && s_wready && s_awaddr == LAW'(`M3V_REG_CTRL)
                     && s_wstrb[0] && s_wdata[0]) begin
            counting    <= 1'b1;
            tb_cycles   <= '0;
            tb_rd_bytes <= '0;
            tb_wr_bytes <= '0;
        end else if (counting) begin
            if (irq) counting <= 1'b0;
            else tb_cycles <= tb_cycles + 64'd1;
            tb_rd_bytes <= tb_rd_bytes + 64'(DW / 8) * 64'($countones(rvalid & rready));
            tb_wr_bytes <= tb_wr_bytes + 64'(DW / 8) * 64'($countones(wvalid & wready));
        end
    end
endmodule
