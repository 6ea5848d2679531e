// attn_slice_reader: reads one column slice of every row of a row-major int16 tensor through one
// AXI4 read port (the attention engine's Q, K or V slice of one head: `rows` rows, `elems`
// elements each, row r starting at byte base + r·stride, any 2-byte address).
//
// Each row's slice becomes INCR bursts over the beats it touches (at most MAX_BURST beats, never
// across 4 KB), up to MAX_OUT bursts in flight, issued row after row without waiting for data, so
// the DDR latency is paid once per slice rather than once per row. The data side walks the same
// rows in the same order (a single ID returns bursts in order) and gives, for every beat, the
// lanes [o_lo, o_hi) that belong to the slice and the dense index (row·elems + element) of lane
// o_lo. There is no back-pressure: rready is high while busy, the consumer takes one beat per
// cycle. Two rows sharing a beat read it twice.
module attn_slice_reader #(
    parameter int DW        = 128,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 8,
    parameter int MAX_BURST = 16,
    parameter int E         = DW / 16,
    parameter int LW        = $clog2(E + 1)
) (
    input  logic              clk,
    input  logic              rst_n,
    input  logic              start,
    input  logic [ADDR_W-1:0] base,
    input  logic [31:0]       stride,
    input  logic [31:0]       rows,      // >= 1
    input  logic [31:0]       elems,     // >= 1
    output logic              busy,
    output logic              o_valid,
    output logic [DW-1:0]     o_data,
    output logic [LW-1:0]     o_lo,
    output logic [LW-1:0]     o_hi,
    output logic [31:0]       o_flat,
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

    logic [ADDR_W-1:0] row_bytes;
    assign row_bytes = ADDR_W'(elems) << 1;

    // ---------------------------------------------------------------- address side
    logic              ar_on;
    logic [31:0]       ar_row;
    logic [ADDR_W-1:0] ar_a, ar_b, ar_last, ar_a_nx, len_b, to_4k, len;
    logic [OW-1:0]     outstanding;
    logic              ar_fire, r_end;

    assign ar_a_nx = ar_a + ADDR_W'(stride);
    // ar_b: next beat address to request; ar_last: the row's last beat address
    always_comb begin
        len_b = ((ar_last - ar_b) >> BB_L) + ADDR_W'(1);
        to_4k = (ADDR_W'(4096) - ADDR_W'(ar_b[11:0])) >> BB_L;
        len   = len_b;
        if (len > ADDR_W'(MAX_BURST)) len = ADDR_W'(MAX_BURST);
        if (len > to_4k) len = to_4k;
    end

    function automatic logic [ADDR_W-1:0] beat_of(input logic [ADDR_W-1:0] a);
        beat_of = a & ~ADDR_W'(BB - 1);
    endfunction

    assign arvalid = ar_on && outstanding < OW'(MAX_OUT);
    assign araddr  = ar_b;
    assign arlen   = 8'(len - ADDR_W'(1));
    assign arsize  = 3'(BB_L);
    assign arburst = 2'b01;
    assign arid    = '0;
    assign ar_fire = arvalid && arready;

    // ---------------------------------------------------------------- data side
    logic              r_on;
    logic [31:0]       r_row, r_flat;
    logic [ADDR_W-1:0] r_a, r_b, r_end_a, lo_b, hi_b;

    assign r_end_a = r_a + row_bytes;
    assign lo_b    = (r_a > r_b) ? r_a - r_b : '0;
    assign hi_b    = (r_end_a - r_b < ADDR_W'(BB)) ? r_end_a - r_b : ADDR_W'(BB);
    assign rready  = r_on;
    assign o_valid = rvalid && r_on;
    assign o_data  = rdata;
    assign o_lo    = LW'(lo_b >> 1);
    assign o_hi    = LW'(hi_b >> 1);
    assign o_flat  = r_flat + 32'((r_b + lo_b - r_a) >> 1);
    assign r_end   = r_b + ADDR_W'(BB) >= r_end_a;   // this beat is the row's last
    assign busy    = ar_on || r_on;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ar_on       <= 1'b0;
            r_on        <= 1'b0;
            outstanding <= '0;
        end else begin
            if (start) begin
                ar_on   <= 1'b1;
                ar_row  <= 32'd1;
                ar_a    <= base;
                ar_b    <= beat_of(base);
                ar_last <= beat_of(base + row_bytes - ADDR_W'(1));
                r_on    <= 1'b1;
                r_row   <= 32'd1;
                r_a     <= base;
                r_b     <= beat_of(base);
                r_flat  <= '0;
            end else begin
                if (ar_fire) begin
                    if (ar_b + (len << BB_L) > ar_last) begin
                        // the row's last burst: move to the next row
                        if (ar_row >= rows) ar_on <= 1'b0;
                        ar_row  <= ar_row + 32'd1;
                        ar_a    <= ar_a_nx;
                        ar_b    <= beat_of(ar_a_nx);
                        ar_last <= beat_of(ar_a_nx + row_bytes - ADDR_W'(1));
                    end else begin
                        ar_b <= ar_b + (len << BB_L);
                    end
                end
                if (o_valid) begin
                    if (r_end) begin
                        if (r_row >= rows) r_on <= 1'b0;
                        r_row  <= r_row + 32'd1;
                        r_a    <= r_a + ADDR_W'(stride);
                        r_b    <= beat_of(r_a + ADDR_W'(stride));
                        r_flat <= r_flat + elems;
                    end else begin
                        r_b <= r_b + ADDR_W'(BB);
                    end
                end
            end
            outstanding <= outstanding + OW'(ar_fire) - OW'(rvalid && rready && rlast);
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, rid, rresp};
endmodule
