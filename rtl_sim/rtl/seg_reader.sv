// seg_reader: an AXI4 read DMA for segments at any byte address, delivered as chunks.
//
// A segment command is a byte address (any alignment), a byte count (> 0) and a chunk size
// `seg_ch` (1..CHB bytes). The AR side turns it into INCR bursts of full beats from the beat
// holding its first byte (at most MAX_BURST beats, never across 4 KB, up to MAX_OUT bursts in
// flight) and takes the next segment without waiting for the data, so short segments (one row of
// a strided tensor, a queue range) keep the read latency hidden as long as QD segments cover it.
// The R side drops the bytes before the segment and after its end and re-cuts the bytes into
// chunks of seg_ch bytes in the low bytes of ch_data; the last chunk of a segment (ch_last) is
// zero-padded, and bytes at and above seg_ch are always zero. Segments never share a chunk.
// One beat in and one chunk out per cycle at most.
module seg_reader #(
    parameter int DW        = 128,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 8,
    parameter int MAX_BURST = 16,
    parameter int CHB       = 16,
    parameter int QD        = 16,
    parameter int CW        = $clog2(CHB + 1)
) (
    input  logic              clk,
    input  logic              rst_n,
    input  logic              seg_valid,
    output logic              seg_ready,
    input  logic [ADDR_W-1:0] seg_addr,
    input  logic [31:0]       seg_bytes,
    input  logic [CW-1:0]     seg_ch,
    output logic              ch_valid,
    input  logic              ch_ready,
    output logic [CHB*8-1:0]  ch_data,
    output logic              ch_last,
    output logic              idle,       // no segment accepted and not yet delivered
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
    localparam int QW   = $clog2(QD);
    localparam int GB   = CHB + BB;                 // gearbox bytes: a chunk's worth plus one beat
    localparam int GW   = $clog2(GB + 1);
    localparam int IW   = BB_L + 32 + CW;           // segment info: skip, bytes, chunk size

    // ---------------------------------------------------------------- AR side
    logic              ar_busy, ar_fire, ar_free;
    logic [ADDR_W-1:0] ar_addr;
    logic [31:0]       ar_beats, to_4k, len;
    logic [OW-1:0]     outstanding;
    logic [QW:0]       q_count;
    logic              seg_fire, q_pop, r_fire;

    assign to_4k = (32'd4096 - 32'(ar_addr[11:0])) >> BB_L;
    always_comb begin
        len = ar_beats;
        if (len > 32'(MAX_BURST)) len = 32'(MAX_BURST);
        if (len > to_4k) len = to_4k;
    end

    assign arvalid  = ar_busy && outstanding < OW'(MAX_OUT);
    assign araddr   = ar_addr;
    assign arlen    = 8'(len - 32'd1);
    assign arsize   = 3'(BB_L);
    assign arburst  = 2'b01;
    assign arid     = '0;
    assign ar_fire  = arvalid && arready;
    assign ar_free  = !ar_busy || (ar_fire && ar_beats == len);
    assign seg_ready = rst_n && ar_free && q_count < (QW+1)'(QD);
    assign seg_fire  = seg_valid && seg_ready;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ar_busy     <= 1'b0;
            ar_addr     <= '0;
            ar_beats    <= '0;
            outstanding <= '0;
        end else begin
            if (ar_fire) begin
                ar_addr  <= ar_addr + ADDR_W'(len << BB_L);
                ar_beats <= ar_beats - len;
                if (ar_beats == len) ar_busy <= 1'b0;
            end
            if (seg_fire) begin
                ar_busy  <= 1'b1;
                ar_addr  <= {seg_addr[ADDR_W-1:BB_L], {BB_L{1'b0}}};
                ar_beats <= (32'(seg_addr[BB_L-1:0]) + seg_bytes + 32'(BB - 1)) >> BB_L;
            end
            outstanding <= outstanding + OW'(ar_fire) - OW'(r_fire && rlast);
        end
    end

    // ---------------------------------------------------------------- segment info FIFO
    logic [IW-1:0] q_mem [0:QD-1];
    logic [QW-1:0] q_wr, q_rd;
    logic [IW-1:0] q_head;
    assign q_head = q_mem[q_rd];

    always_ff @(posedge clk) begin
        if (seg_fire) q_mem[q_wr] <= {seg_addr[BB_L-1:0], seg_bytes, seg_ch};
        if (!rst_n) begin
            q_wr    <= '0;
            q_rd    <= '0;
            q_count <= '0;
        end else begin
            if (seg_fire) q_wr <= q_wr + 1'b1;
            if (q_pop) q_rd <= q_rd + 1'b1;
            q_count <= q_count + (QW+1)'(seg_fire) - (QW+1)'(q_pop);
        end
    end

    // ---------------------------------------------------------------- R side: gearbox
    logic              cur_v, cur_first, cur_in_done;
    logic [BB_L-1:0]   cur_skip;
    logic [31:0]       cur_rem;
    logic [CW-1:0]     cur_ch;
    logic [GB*8-1:0]   gbuf, g_shift, g_next, beat_bits;
    logic [GW-1:0]     cnt, cnt_after;
    logic              ch_fire;
    logic [31:0]       n_take;
    logic [BB_L:0]     s_off;

    assign ch_valid = cur_v && cnt != 0 && (cnt >= GW'(cur_ch) || cur_in_done);
    assign ch_last  = cur_in_done && cnt <= GW'(cur_ch);
    assign ch_fire  = ch_valid && ch_ready;
    always_comb
        for (int b = 0; b < CHB; b++) ch_data[b*8 +: 8] = b < 32'(cur_ch) ? gbuf[b*8 +: 8] : 8'd0;

    assign q_pop = q_count != 0 && (!cur_v || (ch_fire && ch_last));

    // bytes left after this cycle's chunk; a beat is taken only if all its bytes fit after them
    assign cnt_after = !ch_fire ? cnt : (ch_last ? '0 : cnt - GW'(cur_ch));
    assign s_off     = cur_first ? {1'b0, cur_skip} : '0;
    always_comb begin
        n_take = 32'(BB) - 32'(s_off);
        if (n_take > cur_rem) n_take = cur_rem;
    end
    assign rready = rst_n && cur_v && !cur_in_done && 32'(cnt_after) + 32'(BB) <= 32'(GB);
    assign r_fire = rvalid && rready;

    always_comb begin
        g_shift = !ch_fire ? gbuf : (ch_last ? '0 : gbuf >> (32'(cur_ch) * 8));
        beat_bits = '0;
        for (int b = 0; b < BB; b++)
            if (32'(b) < n_take) beat_bits[b*8 +: 8] = rdata[(32'(b) + 32'(s_off))*8 +: 8];
        g_next = g_shift;
        if (r_fire) g_next = g_shift | (beat_bits << (32'(cnt_after) * 8));
    end

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            cur_v       <= 1'b0;
            cur_first   <= 1'b0;
            cur_in_done <= 1'b0;
            cur_skip    <= '0;
            cur_rem     <= '0;
            cur_ch      <= '0;
            gbuf        <= '0;
            cnt         <= '0;
        end else begin
            gbuf <= g_next;
            cnt  <= cnt_after + (r_fire ? GW'(n_take) : '0);
            if (r_fire) begin
                cur_first <= 1'b0;
                cur_rem   <= cur_rem - n_take;
                if (cur_rem == n_take) cur_in_done <= 1'b1;
            end
            if (ch_fire && ch_last) cur_v <= 1'b0;
            if (q_pop) begin
                cur_v       <= 1'b1;
                cur_first   <= 1'b1;
                cur_in_done <= 1'b0;
                {cur_skip, cur_rem, cur_ch} <= q_head;
            end
        end
    end

    assign idle = !ar_busy && q_count == 0 && !cur_v;

    logic unused_ok;
    assign unused_ok = &{1'b0, rid, rresp};
endmodule
