// epilogue: the element-wise stage between requantisation and the output FIFO.
//
//   sel = 0   q = d (bypass)
//   sel = 1   q = gelu(d, in_frac, Fmt(out_bits, out_frac)), numerics.md §9 (gelu_unit.sv)
//
// d, q are P_OUT values, each a signed DATA_W container; sel, in_frac, out_frac and out_bits are
// per row, aligned with d. For GELU, d is the requantised value in the GELU input format (f_mid)
// and out_bits/out_frac are the output format (out_bits 0 means DATA_W). The compute unit tracks
// valid bits and tags around this module, so it is a pure fixed-latency pipeline: q follows d by
// LATENCY cycles, LATENCY >= GELU_LAT (the GELU unit's stall-all handshake is tied open).
module epilogue #(
    parameter int P_OUT   = 4,
    parameter int DATA_W  = 16,
    parameter int OB_W    = 5,
    parameter int FRAC_W  = 7,
    parameter int LATENCY = 19
) (
    input  logic                    clk,
    input  logic                    sel,
    input  logic [OB_W-1:0]         out_bits,
    input  logic [FRAC_W-1:0]       in_frac,
    input  logic [FRAC_W-1:0]       out_frac,
    input  logic [P_OUT*DATA_W-1:0] d,
    output logic [P_OUT*DATA_W-1:0] q
);
    localparam int GELU_LAT = 19;   // gelu_unit.sv

    logic [P_OUT*DATA_W-1:0] byp, g, g_d;
    logic                    sel_d;
    logic                    g_in_ready, g_out_valid;

    pipe_delay #(.WIDTH(P_OUT*DATA_W + 1), .DEPTH(LATENCY), .RESET(0)) u_bypass (
        .clk(clk), .rst_n(1'b1), .d({sel, d}), .q({sel_d, byp})
    );

    gelu_unit #(.P(P_OUT), .DATA_W(DATA_W), .FRAC_W(FRAC_W), .OB_W(OB_W)) u_gelu (
        .clk(clk), .rst_n(1'b1), .in_valid(1'b1), .in_ready(g_in_ready), .x(d),
        .in_frac(in_frac), .out_frac(out_frac), .out_bits(out_bits),
        .out_valid(g_out_valid), .out_ready(1'b1), .y(g)
    );
    pipe_delay #(.WIDTH(P_OUT*DATA_W), .DEPTH(LATENCY - GELU_LAT), .RESET(0)) u_gelu_pad (
        .clk(clk), .rst_n(1'b1), .d(g), .q(g_d)
    );

    assign q = sel_d ? g_d : byp;

    logic unused_ok;
    assign unused_ok = &{1'b0, g_in_ready, g_out_valid};
endmodule
