// axi_reader: an AXI4 read DMA engine. A command (beat-aligned byte address, byte count, eos
// flag) becomes INCR bursts of full-width beats, each at most MAX_BURST beats and never across a
// 4 KB boundary, with up to MAX_OUT bursts outstanding; the data comes out as a valid/ready
// stream of beats, each with its count of valid bytes (the last one may be ragged) and `eos` on
// the last beat of a command that had it set. A new command is taken only when the previous one
// has delivered all its data (`cmd_ready`); a zero-byte command completes at once.
// Back-pressure on the output holds rready low: the slave keeps its data.
module axi_reader #(
    parameter int DW        = 128,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 4,
    parameter int MAX_BURST = 16,
    parameter int NB_W      = $clog2(DW / 8) + 1
) (
    input  logic              clk,
    input  logic              rst_n,
    input  logic              cmd_valid,
    output logic              cmd_ready,
    input  logic [ADDR_W-1:0] cmd_addr,
    input  logic [31:0]       cmd_bytes,
    input  logic              cmd_eos,
    output logic              out_valid,
    input  logic              out_ready,
    output logic [DW-1:0]     out_data,
    output logic [NB_W-1:0]   out_nbytes,
    output logic              out_eos,
    // AXI4 read master
    output logic              arvalid,
    input  logic              arready,
    output logic [ADDR_W-1:0] araddr,
    output logic [7:0]        arlen,
    output logic [2:0]        arsize,
    output logic [1:0]        arburst,
    output logic [ID_W-1:0]   arid,
    input  logic              rvalid,
    output logic              rready,
    input  logic [DW-1:0]     rdata,
    input  logic [ID_W-1:0]   rid,
    input  logic              rlast,
    input  logic [1:0]        rresp
);
    localparam int BB   = DW / 8;
    localparam int BB_L = $clog2(BB);
    localparam int OW   = $clog2(MAX_OUT + 1);

    logic [ADDR_W-1:0] ar_addr;
    logic [31:0]       ar_beats;     // beats still to request
    logic [31:0]       r_bytes;      // bytes still to deliver
    logic              eos_q;
    logic [OW-1:0]     outstanding;
    logic [31:0]       to_4k, len;

    // beats to the next 4 KB boundary, and the next burst's length
    assign to_4k = (32'd4096 - 32'(ar_addr[11:0])) >> BB_L;
    always_comb begin
        len = ar_beats;
        if (len > 32'(MAX_BURST)) len = 32'(MAX_BURST);
        if (len > to_4k) len = to_4k;
    end

    assign cmd_ready = ar_beats == 0 && r_bytes == 0;
    assign arvalid   = ar_beats != 0 && outstanding < OW'(MAX_OUT);
    assign araddr    = ar_addr;
    assign arlen     = 8'(len - 32'd1);
    assign arsize    = 3'(BB_L);
    assign arburst   = 2'b01;
    assign arid      = '0;

    assign out_valid  = rvalid && r_bytes != 0;
    assign rready     = out_ready && r_bytes != 0;
    assign out_data   = rdata;
    assign out_nbytes = r_bytes < 32'(BB) ? NB_W'(r_bytes) : NB_W'(BB);
    assign out_eos    = eos_q && r_bytes <= 32'(BB);

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ar_addr     <= '0;
            ar_beats    <= '0;
            r_bytes     <= '0;
            eos_q       <= 1'b0;
            outstanding <= '0;
        end else begin
            if (cmd_valid && cmd_ready) begin
                ar_addr  <= cmd_addr;
                ar_beats <= (cmd_bytes + 32'(BB - 1)) >> BB_L;
                r_bytes  <= cmd_bytes;
                eos_q    <= cmd_eos;
            end
            if (arvalid && arready) begin
                ar_addr  <= ar_addr + ADDR_W'(len << BB_L);
                ar_beats <= ar_beats - len;
            end
            if (rvalid && rready)
                r_bytes <= r_bytes < 32'(BB) ? 32'd0 : r_bytes - 32'(BB);
            outstanding <= outstanding + OW'(arvalid && arready) - OW'(rvalid && rready && rlast);
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, rid, rresp};
endmodule
