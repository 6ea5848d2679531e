// elem_gather: an element queue that changes the width of a stream. Each input beat adds in_n
// (0..IN_N) elements from its low lanes; the consumer sees the oldest OUT_N elements on out_data
// and `count` (all queued elements), and removes `take` (0..min(OUT_N, count)) of them in the
// same cycle. Used where the two sides disagree on lanes per beat or where rows end in the
// middle of a beat: AXI beats into the LayerNorm unit's lanes and back, patch runs into beats.
//
// in_ready depends only on the registered count (no path from `take`), so the queue holds
// CAP >= IN_N + OUT_N elements and keeps one beat in and one out per cycle. Lanes of out_data at
// or beyond `count` hold stale values.
module elem_gather #(
    parameter int EW    = 16,
    parameter int IN_N  = 8,
    parameter int OUT_N = 8,
    parameter int CAP   = 2 * (IN_N + OUT_N),
    parameter int IW    = $clog2(IN_N + 1),
    parameter int OW    = $clog2(OUT_N + 1),
    parameter int CW    = $clog2(CAP + 1)
) (
    input  logic               clk,
    input  logic               rst_n,
    input  logic               in_valid,
    output logic               in_ready,
    input  logic [IN_N*EW-1:0] in_data,
    input  logic [IW-1:0]      in_n,
    output logic [OUT_N*EW-1:0] out_data,
    output logic [CW-1:0]      count,
    input  logic [OW-1:0]      take
);
    logic [CAP*EW-1:0] buf_q, buf_d;
    logic [CW-1:0]     base;
    logic              in_fire;

    assign in_ready = count <= CW'(CAP - IN_N);
    assign in_fire  = in_valid && in_ready;
    assign out_data = buf_q[OUT_N*EW-1:0];
    assign base     = count - CW'(take);

    always_comb begin
        buf_d = buf_q >> (32'(take) * EW);
        if (in_fire)
            for (int i = 0; i < CAP; i++)
                if (32'(i) >= 32'(base) && 32'(i) < 32'(base) + 32'(in_n))
                    buf_d[i*EW +: EW] = in_data[(32'(i) - 32'(base))*EW +: EW];
    end

    always_ff @(posedge clk) begin
        buf_q <= buf_d;
        if (!rst_n) count <= '0;
        else        count <= base + (in_fire ? CW'(in_n) : '0);
    end
endmodule
