// mac_array: P_IN x P_OUT signed multipliers and one adder tree per output lane.
//
//   sum[o] = sum_i a[i] * w[i][o]        (exact, SUM_W = ACT_W + W_W + ceil(log2(P_IN)) bits)
//
// The caller registers a and w (the DSP48E2 A/B registers); each product is registered here
// (the M register), then the lane's adder tree adds one register per level.
// LATENCY = 1 + LEVELS cycles from a/w to sum. One multiplier maps to one DSP48E2 while
// ACT_W <= 27 and W_W <= 18.
module mac_array #(
    parameter int P_IN   = 4,
    parameter int P_OUT  = 4,
    parameter int ACT_W  = 16,
    parameter int W_W    = 8,
    parameter int LEVELS = (P_IN > 1) ? $clog2(P_IN) : 0,
    parameter int SUM_W  = ACT_W + W_W + LEVELS
) (
    input  logic                      clk,
    input  logic [P_IN*ACT_W-1:0]     a,      // a[i] at [i*ACT_W +: ACT_W]
    input  logic [P_IN*P_OUT*W_W-1:0] w,      // w[i][o] at [(i*P_OUT + o)*W_W +: W_W]
    output logic [P_OUT*SUM_W-1:0]    sum     // sum[o] at [o*SUM_W +: SUM_W]
);
    localparam int PROD_W = ACT_W + W_W;

    genvar i, o;
    generate
        for (o = 0; o < P_OUT; o = o + 1) begin : g_lane
            logic [P_IN*PROD_W-1:0] m_q;
            for (i = 0; i < P_IN; i = i + 1) begin : g_mul
                // One register per product (not one wide register per lane): yosys only packs
                // a flop into the DSP48E2 M register when it holds exactly that product.
                logic signed [ACT_W-1:0]  ai;
                logic signed [W_W-1:0]    wi;
                logic signed [PROD_W-1:0] mq;
                assign ai = a[i*ACT_W +: ACT_W];
                assign wi = w[(i*P_OUT + o)*W_W +: W_W];
                always_ff @(posedge clk) mq <= PROD_W'(ai * wi);
                assign m_q[i*PROD_W +: PROD_W] = mq;
            end
            adder_tree #(
                .N(P_IN), .IN_W(PROD_W), .LEVELS(LEVELS), .OUT_W(SUM_W)
            ) u_tree (
                .clk(clk), .in_flat(m_q), .sum(sum[o*SUM_W +: SUM_W])
            );
        end
    endgenerate
endmodule
