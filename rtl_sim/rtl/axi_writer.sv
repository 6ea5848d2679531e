// axi_writer: an AXI4 write DMA engine. A command (beat-aligned byte address, byte count) takes
// ceil(bytes / beat) beats from the input stream and writes them as INCR bursts of full-width
// beats, each at most MAX_BURST beats and never across a 4 KB boundary, with up to MAX_OUT
// bursts awaiting their response. The last beat of a ragged count carries only its valid bytes'
// strobes. A burst's data is sent only after its address was accepted, and the W side splits the
// command into bursts with the same rule as the AW side, so the two agree without a queue.
// `cmd_ready` (idle) returns once every response of the command has arrived.
module axi_writer #(
    parameter int DW        = 128,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 4,
    parameter int MAX_BURST = 16
) (
    input  logic              clk,
    input  logic              rst_n,
    input  logic              cmd_valid,
    output logic              cmd_ready,
    input  logic [ADDR_W-1:0] cmd_addr,
    input  logic [31:0]       cmd_bytes,
    input  logic              in_valid,
    output logic              in_ready,
    input  logic [DW-1:0]     in_data,
    // AXI4 write master
    output logic              awvalid,
    input  logic              awready,
    output logic [ADDR_W-1:0] awaddr,
    output logic [7:0]        awlen,
    output logic [2:0]        awsize,
    output logic [1:0]        awburst,
    output logic [ID_W-1:0]   awid,
    output logic              wvalid,
    input  logic              wready,
    output logic [DW-1:0]     wdata,
    output logic [DW/8-1:0]   wstrb,
    output logic              wlast,
    input  logic              bvalid,
    output logic              bready,
    input  logic [ID_W-1:0]   bid,
    input  logic [1:0]        bresp
);
    localparam int BB   = DW / 8;
    localparam int BB_L = $clog2(BB);
    localparam int OW   = $clog2(MAX_OUT + 1);

    function automatic logic [31:0] burst_len(input logic [11:0] page_off, input logic [31:0] beats);
        logic [31:0] to_4k;
        to_4k = (32'd4096 - 32'(page_off)) >> BB_L;
        burst_len = beats;
        if (burst_len > 32'(MAX_BURST)) burst_len = 32'(MAX_BURST);
        if (burst_len > to_4k) burst_len = to_4k;
    endfunction

    logic [ADDR_W-1:0] aw_addr, w_addr;
    logic [31:0]       aw_beats, w_beats, w_bytes, aw_len, w_len;
    logic [7:0]        w_idx;          // beat within the current W burst
    logic [OW-1:0]     outstanding;    // bursts without a response
    logic [OW-1:0]     aw_ahead;       // bursts whose address went out before their data
    logic              w_fire, w_end;

    assign aw_len = burst_len(aw_addr[11:0], aw_beats);
    assign w_len  = burst_len(w_addr[11:0], w_beats);

    assign cmd_ready = aw_beats == 0 && w_beats == 0 && outstanding == 0;
    assign awvalid   = aw_beats != 0 && outstanding < OW'(MAX_OUT);
    assign awaddr    = aw_addr;
    assign awlen     = 8'(aw_len - 32'd1);
    assign awsize    = 3'(BB_L);
    assign awburst   = 2'b01;
    assign awid      = '0;

    assign wvalid   = in_valid && w_beats != 0 && aw_ahead != 0;
    assign in_ready = wready && w_beats != 0 && aw_ahead != 0;
    assign wdata    = in_data;
    assign wlast    = 32'(w_idx) + 32'd1 == w_len;
    always_comb
        for (int b = 0; b < BB; b++) wstrb[b] = 32'(b) < w_bytes;
    assign w_fire = wvalid && wready;
    assign w_end  = w_fire && wlast;
    assign bready = 1'b1;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            aw_addr     <= '0;
            aw_beats    <= '0;
            w_addr      <= '0;
            w_beats     <= '0;
            w_bytes     <= '0;
            w_idx       <= '0;
            outstanding <= '0;
            aw_ahead    <= '0;
        end else begin
            if (cmd_valid && cmd_ready) begin
                aw_addr  <= cmd_addr;
                aw_beats <= (cmd_bytes + 32'(BB - 1)) >> BB_L;
                w_addr   <= cmd_addr;
                w_beats  <= (cmd_bytes + 32'(BB - 1)) >> BB_L;
                w_bytes  <= cmd_bytes;
                w_idx    <= '0;
            end
            if (awvalid && awready) begin
                aw_addr  <= aw_addr + ADDR_W'(aw_len << BB_L);
                aw_beats <= aw_beats - aw_len;
            end
            if (w_fire) begin
                w_bytes <= w_bytes < 32'(BB) ? 32'd0 : w_bytes - 32'(BB);
                w_idx   <= w_end ? 8'd0 : w_idx + 8'd1;
            end
            if (w_end) begin
                w_addr  <= w_addr + ADDR_W'(w_len << BB_L);
                w_beats <= w_beats - w_len;
            end
            outstanding <= outstanding + OW'(awvalid && awready) - OW'(bvalid && bready);
            aw_ahead    <= aw_ahead + OW'(awvalid && awready) - OW'(w_end);
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, bid, bresp};
endmodule
