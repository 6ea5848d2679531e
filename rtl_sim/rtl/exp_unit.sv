// exp_unit: p = exp_int(t, frac) of the numeric contract (numerics.md §5), bit-exact, one value
// per cycle.
//
//   u  = t·L2E                                   (frac + C fraction bits)
//   v  = rshift_round(u, frac + C − L)
//   n  = v >> L,  j = v & (2^L − 1)
//   p  = rshift_round(LUT[j], min(n, P + 2))     LUT = the contract's exp2_lut(), from LUT_FILE
//
// Ports: t unsigned T_W bits (t = m − s ≥ 0), frac signed FRAC_W bits, p unsigned EXP_P + 1 bits
// (p ≤ 2^EXP_P). Every frac is exact: a shift frac + C − L below 0 is clamped to 0 (for t ≥ 1 the
// exponent is already far beyond P + 2, and a left shift only makes it larger, so p = 0 either
// way), and one above U_W + 1 gives v = 0 like the formula.
//
// Pipeline: LATENCY = 10, free running (no enable, no reset: a valid bit travels beside it).
//   1 inputs  2-3 product t·L2E  4-5 coarse and fine shift  6 round
//   7 split v into n (clamped) and j  8 table read (registered: block RAM)  9 shift  10 round
// L2E is a constant, so t·L2E is a sum of shifted copies of t (one per set bit of L2E) in
// fabric: the engine runs many exp lanes, and none of them spends a DSP48E2.
// Both rounding shifts use the trick of requant.sv: shifting the value placed one bit up leaves
// the last bit shifted out in bit 0, and (w >> 1) + w[0] is the round-half-up result.
`include "m3v_hw_config.svh"

module exp_unit #(
    parameter int T_W      = `M3V_SCORE_W,
    parameter int FRAC_W   = 7,
    parameter     LUT_FILE = "m3v_exp2_lut.mem"
) (
    input  logic                clk,
    input  logic [T_W-1:0]      t,
    input  logic [FRAC_W-1:0]   frac,
    output logic [`M3V_EXP_P:0] p
);
    localparam int C     = `M3V_EXP_C;
    localparam int L     = `M3V_EXP_L;
    localparam int PF    = `M3V_EXP_P;
    localparam int L2E   = `M3V_EXP_L2E;
    localparam int K_W   = $clog2(L2E + 1);          // L2E bits
    localparam int U_W   = T_W + K_W;                // u = t·L2E
    localparam int A_MAX = U_W + 1;                  // shifts beyond this give v = 0 as well
    localparam int A_W   = $clog2(A_MAX + 1);
    localparam int SW    = (FRAC_W > A_W ? FRAC_W : A_W) + 2;
    localparam int N_MAX = PF + 2;
    localparam int NC_W  = $clog2(N_MAX + 1);
    localparam int E_W   = PF + 1;                   // table values ≤ 2^P

    // 1: inputs
    logic [T_W-1:0]    t1;
    logic [FRAC_W-1:0] f1;
    always_ff @(posedge clk) begin
        t1 <= t;
        f1 <= frac;
    end

    // 2: product and the shift amount, clamped to [0, A_MAX]
    logic signed [SW-1:0] a_w;
    logic [A_W-1:0]       a_cl;
    assign a_w = SW'($signed(f1)) + SW'(C - L);
    always_comb begin
        if (a_w < 0)                 a_cl = '0;
        else if (a_w > SW'(A_MAX))   a_cl = A_W'(A_MAX);
        else                         a_cl = a_w[A_W-1:0];
    end

    logic [U_W-1:0] u2, u3, tl2e;
    logic [A_W-1:0] a2, a3;
    always_comb begin
        tl2e = '0;
        for (int b = 0; b < K_W; b++)
            if (L2E[b]) tl2e = tl2e + (U_W'(t1) << b);
    end
    always_ff @(posedge clk) begin
        u2 <= tl2e;
        a2 <= a_cl;
        u3 <= u2;
        a3 <= a2;
    end

    // 4-6: v = rshift_round(u, a)
    logic [U_W:0]   w4, w5;
    logic [2:0]     af4;
    logic [U_W-1:0] v6;
    always_ff @(posedge clk) begin
        w4  <= {u3, 1'b0} >> {a3[A_W-1:3], 3'b000};
        af4 <= a3[2:0];
        w5  <= w4 >> af4;
        v6  <= w5[U_W:1] + U_W'(w5[0]);
    end

    // 7: n clamped to P + 2 (a larger n gives 0 as well), table index
    logic [L-1:0]    j7;
    logic [NC_W-1:0] nc7, nc8;
    logic            big;
    assign big = (v6[U_W-1:L] >= (U_W-L)'(N_MAX));
    always_ff @(posedge clk) begin
        j7  <= v6[L-1:0];
        nc7 <= big ? NC_W'(N_MAX) : v6[L +: NC_W];
    end

    // 8: table read
    logic [E_W-1:0] lut [0:(1<<L)-1];
    initial $readmemh(LUT_FILE, lut);
    logic [E_W-1:0] e8;
    always_ff @(posedge clk) begin
        e8  <= lut[j7];
        nc8 <= nc7;
    end

    // 9-10: p = rshift_round(e, nc)
    logic [E_W:0] x9;
    always_ff @(posedge clk) begin
        x9 <= {e8, 1'b0} >> nc8;
        p  <= x9[E_W:1] + E_W'(x9[0]);
    end
endmodule
