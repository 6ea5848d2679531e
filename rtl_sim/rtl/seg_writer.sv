// seg_writer: an AXI4 write DMA for short segments at any byte address.
//
// A segment command carries its byte address (any alignment), its byte count (1..CHB) and its
// bytes (the low seg_bytes bytes of seg_data). It becomes INCR bursts of full beats covering
// the segment (at most MAX_BURST beats, never across 4 KB), the strobes marking exactly the
// segment's bytes, so neighbouring data in the same beats is untouched. Up to QD segments wait
// in a FIFO; the AW side runs ahead of the W side (a burst's data goes out only after its
// address), with up to MAX_OUT bursts awaiting their response. `idle` is high when every
// accepted segment is written and every response has arrived.
module seg_writer #(
    parameter int DW        = 128,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 8,
    parameter int MAX_BURST = 16,
    parameter int CHB       = 16,
    parameter int QD        = 4,
    parameter int CW        = $clog2(CHB + 1)
) (
    input  logic              clk,
    input  logic              rst_n,
    input  logic              seg_valid,
    output logic              seg_ready,
    input  logic [ADDR_W-1:0] seg_addr,
    input  logic [CW-1:0]     seg_bytes,
    input  logic [CHB*8-1:0]  seg_data,
    output logic              idle,
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
    localparam int QW   = $clog2(QD);
    localparam int SB   = CHB + 2 * BB;      // bytes of a segment's beats, rounded up generously
    localparam int EW   = ADDR_W + CW + CHB * 8;

    function automatic logic [31:0] burst_len(input logic [11:0] page_off, input logic [31:0] beats);
        logic [31:0] to_4k;
        to_4k = (32'd4096 - 32'(page_off)) >> BB_L;
        burst_len = beats;
        if (burst_len > 32'(MAX_BURST)) burst_len = 32'(MAX_BURST);
        if (burst_len > to_4k) burst_len = to_4k;
    endfunction

    function automatic logic [31:0] beats_of(input logic [BB_L-1:0] off, input logic [CW-1:0] n);
        beats_of = (32'(off) + 32'(n) + 32'(BB - 1)) >> BB_L;
    endfunction

    // ---------------------------------------------------------------- FIFO (AW and W read it)
    logic [EW-1:0] f_mem [0:QD-1];
    logic [QW-1:0] f_wr, f_aw, f_w;
    logic [QW:0]   f_count, f_aw_n;       // entries not yet written / not yet addressed
    logic          seg_fire, aw_load, w_load, w_done;

    assign seg_ready = rst_n && f_count < (QW+1)'(QD);
    assign seg_fire  = seg_valid && seg_ready;

    always_ff @(posedge clk) begin
        if (seg_fire) f_mem[f_wr] <= {seg_addr, seg_bytes, seg_data};
    end

    // ---------------------------------------------------------------- AW side
    logic              aw_act, aw_fire;
    logic [ADDR_W-1:0] aw_addr, aw_e_addr;
    logic [31:0]       aw_beats, aw_len;
    logic [CW-1:0]     aw_e_bytes;
    logic [CHB*8-1:0]  aw_e_data;
    logic [OW-1:0]     outstanding, aw_ahead;
    logic              w_fire, w_end;

    assign {aw_e_addr, aw_e_bytes, aw_e_data} = f_mem[f_aw];
    assign aw_len  = burst_len(aw_addr[11:0], aw_beats);
    assign awvalid = aw_act && outstanding < OW'(MAX_OUT);
    assign awaddr  = aw_addr;
    assign awlen   = 8'(aw_len - 32'd1);
    assign awsize  = 3'(BB_L);
    assign awburst = 2'b01;
    assign awid    = '0;
    assign aw_fire = awvalid && awready;
    assign aw_load = !aw_act && f_aw_n != 0;

    // ---------------------------------------------------------------- W side
    logic              w_act;
    logic [ADDR_W-1:0] w_addr, w_e_addr;
    logic [31:0]       w_beats, w_len, w_bi;
    logic [7:0]        w_idx;
    logic [CW-1:0]     w_e_bytes, w_bytes;
    logic [CHB*8-1:0]  w_e_data;
    logic [BB_L-1:0]   w_off;
    logic [SB*8-1:0]   w_sh;

    assign {w_e_addr, w_e_bytes, w_e_data} = f_mem[f_w];
    assign w_len  = burst_len(w_addr[11:0], w_beats);
    assign w_load = !w_act && f_count != f_aw_n;   // an addressed segment waits for its data
    assign wvalid = w_act && aw_ahead != 0;
    assign wdata  = w_sh[w_bi*DW +: DW];
    assign wlast  = 32'(w_idx) + 32'd1 == w_len;
    always_comb
        for (int b = 0; b < BB; b++) begin
            logic [31:0] p;
            p = w_bi * 32'(BB) + 32'(b);
            wstrb[b] = p >= 32'(w_off) && p < 32'(w_off) + 32'(w_bytes);
        end
    assign w_fire = wvalid && wready;
    assign w_end  = w_fire && wlast;
    assign w_done = w_end && w_beats == w_len;
    assign bready = 1'b1;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            f_wr        <= '0;
            f_aw        <= '0;
            f_w         <= '0;
            f_count     <= '0;
            f_aw_n      <= '0;
            aw_act      <= 1'b0;
            aw_addr     <= '0;
            aw_beats    <= '0;
            w_act       <= 1'b0;
            w_addr      <= '0;
            w_beats     <= '0;
            w_bi        <= '0;
            w_idx       <= '0;
            w_off       <= '0;
            w_bytes     <= '0;
            w_sh        <= '0;
            outstanding <= '0;
            aw_ahead    <= '0;
        end else begin
            if (seg_fire) f_wr <= f_wr + 1'b1;
            f_count <= f_count + (QW+1)'(seg_fire) - (QW+1)'(w_done);
            f_aw_n  <= f_aw_n + (QW+1)'(seg_fire) - (QW+1)'(aw_load);
            if (aw_load) begin
                aw_act   <= 1'b1;
                aw_addr  <= {aw_e_addr[ADDR_W-1:BB_L], {BB_L{1'b0}}};
                aw_beats <= beats_of(aw_e_addr[BB_L-1:0], aw_e_bytes);
                f_aw     <= f_aw + 1'b1;
            end
            if (aw_fire) begin
                aw_addr  <= aw_addr + ADDR_W'(aw_len << BB_L);
                aw_beats <= aw_beats - aw_len;
                if (aw_beats == aw_len) aw_act <= 1'b0;
            end
            if (w_load) begin
                w_act   <= 1'b1;
                w_addr  <= {w_e_addr[ADDR_W-1:BB_L], {BB_L{1'b0}}};
                w_beats <= beats_of(w_e_addr[BB_L-1:0], w_e_bytes);
                w_bi    <= '0;
                w_idx   <= '0;
                w_off   <= w_e_addr[BB_L-1:0];
                w_bytes <= w_e_bytes;
                w_sh    <= (SB*8)'(w_e_data) << (32'(w_e_addr[BB_L-1:0]) * 8);
            end
            if (w_fire) begin
                w_bi  <= w_bi + 32'd1;
                w_idx <= wlast ? 8'd0 : w_idx + 8'd1;
            end
            if (w_end) begin
                w_addr  <= w_addr + ADDR_W'(w_len << BB_L);
                w_beats <= w_beats - w_len;
            end
            if (w_done) begin
                w_act <= 1'b0;
                f_w   <= f_w + 1'b1;
            end
            outstanding <= outstanding + OW'(aw_fire) - OW'(bvalid && bready);
            aw_ahead    <= aw_ahead + OW'(aw_fire) - OW'(w_end);
        end
    end

    assign idle = f_count == 0 && outstanding == 0;

    logic unused_ok;
    assign unused_ok = &{1'b0, bid, bresp, aw_e_data};
endmodule
