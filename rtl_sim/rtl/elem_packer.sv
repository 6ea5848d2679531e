// elem_packer: packs a stream of partly filled beats into full beats of P elements.
//
// Each input beat holds `in_n` (1..P) valid elements in its low lanes; consecutive beats are
// concatenated element by element, so a stream made of several DMA commands whose lengths are
// not multiples of a beat (EMBED's CLS row followed by the patch rows) comes out dense. After
// an input beat with `in_eos`, the remaining elements are flushed as a last, partly filled beat
// (its upper lanes hold stale values, which the write DMA's strobes never store); a new stream
// is taken once the flush is out. Full throughput: one beat in and one out per cycle.
module elem_packer #(
    parameter int P    = 8,
    parameter int EW   = 16,
    parameter int NW   = $clog2(P + 1),
    parameter int CW   = $clog2(2 * P + 1)
) (
    input  logic            clk,
    input  logic            rst_n,
    input  logic            in_valid,
    output logic            in_ready,
    input  logic [P*EW-1:0] in_data,
    input  logic [NW-1:0]   in_n,
    input  logic            in_eos,
    output logic            out_valid,
    input  logic            out_ready,
    output logic [P*EW-1:0] out_data
);
    logic [2*P*EW-1:0] buf_q, buf_d;
    logic [CW-1:0]     cnt, base, cnt_d;
    logic              flush, flush_d, out_fire, in_fire;

    assign out_valid = cnt >= CW'(P) || (flush && cnt != 0);
    assign out_data  = buf_q[P*EW-1:0];
    assign out_fire  = out_valid && out_ready;
    // elements left after this cycle's output, where the next input lands
    assign base      = !out_fire ? cnt : (cnt >= CW'(P) ? cnt - CW'(P) : '0);
    assign in_ready  = !flush && base <= CW'(P);
    assign in_fire   = in_valid && in_ready;
    assign cnt_d     = base + (in_fire ? CW'(in_n) : '0);

    always_comb begin
        buf_d = out_fire ? {{(P*EW){1'b0}}, buf_q[2*P*EW-1:P*EW]} : buf_q;
        if (in_fire)
            for (int i = 0; i < 2 * P; i++)
                if (32'(i) >= 32'(base) && 32'(i) < 32'(base) + 32'(in_n))
                    buf_d[i*EW +: EW] = in_data[(32'(i) - 32'(base))*EW +: EW];
        flush_d = flush;
        if (out_fire && flush && cnt <= CW'(P)) flush_d = 1'b0;
        if (in_fire && in_eos) flush_d = 1'b1;
    end

    always_ff @(posedge clk) begin
        buf_q <= buf_d;
        if (!rst_n) begin
            cnt   <= '0;
            flush <= 1'b0;
        end else begin
            cnt   <= cnt_d;
            flush <= flush_d;
        end
    end
endmodule
