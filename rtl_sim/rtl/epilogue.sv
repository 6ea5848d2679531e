// epilogue: the element-wise stage between requantisation and the output FIFO.
//
// This is the hook for a fused activation. Today it is a bypass: q is d delayed by LATENCY cycles
// whatever sel says. A GELU unit plugs in here with the same ports and the same fixed LATENCY:
//   d, q      P_OUT values, each a signed DATA_W container holding an out_bits-wide number
//   sel       per row: 0 = bypass, 1 = GELU (aligned with d)
//   out_bits  per row: the format width, for the unit's own saturation (aligned with d)
// The compute unit tracks valid bits and tags around this module, so whatever is plugged in must
// be a pure fixed-latency pipeline (no handshake of its own).
module epilogue #(
    parameter int P_OUT   = 4,
    parameter int DATA_W  = 16,
    parameter int OB_W    = 5,
    parameter int LATENCY = 1
) (
    input  logic                    clk,
    input  logic                    sel,
    input  logic [OB_W-1:0]         out_bits,
    input  logic [P_OUT*DATA_W-1:0] d,
    output logic [P_OUT*DATA_W-1:0] q
);
    pipe_delay #(.WIDTH(P_OUT*DATA_W), .DEPTH(LATENCY), .RESET(0)) u_bypass (
        .clk(clk), .rst_n(1'b1), .d(d), .q(q)
    );

    logic unused_ok;
    assign unused_ok = &{1'b0, sel, out_bits};
endmodule
