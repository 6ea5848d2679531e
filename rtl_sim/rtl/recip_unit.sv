// recip_unit: (r, k) = recip_int(s) of the numeric contract (numerics.md §6), bit-exact, one value
// per cycle; 1/s ≈ r·2^−(R+k).
//
//   k     = bit_length(s) − 1
//   mant  = s normalised to [2^M, 2^(M+1))      (floor for k ≥ M, zero-filled for k < M)
//   r0    = RLUT[(mant >> (M − Lr)) − 2^Lr]     RLUT = the contract's recip_lut(), from LUT_FILE
//   r1    = r0 + rshift_round(r0·(2^(M+R) − mant·r0), M + R)
//   d     = 2^(M+R+1) − mant·(2·r1 + 1)
//   r     = r1 + 1 if d ≥ 0;  r1 if d + 2·mant ≥ 0;  r1 − 1 otherwise
//
// Ports: s unsigned S_W bits (s ≥ 1; s = 0 gives an unspecified r), r unsigned R + 1 bits
// (2^(R−1) ≤ r ≤ 2^R), k unsigned. Normalisation is one left shift by the leading-zero count:
// the top M + 1 bits of s << lz are mant in both cases of the formula.
//
// Pipeline: LATENCY = 16, free running (no enable, no reset: a valid bit travels beside it).
//   1 input  2 leading zeros  3-4 coarse and fine normalising shift  5 seed read
//   6-7 mant·r0 (DSP M, P)  8 error 2^(M+R) − mant·r0  9-10 r0·error (DSP M, P)
//   11 round  12 r1  13-14 mant·(2·r1 + 1) (DSP M, P)  15 both comparisons  16 r
// Widths (contract M = R = 16, Lr = 7, checked over every mantissa): the error fits 25 bits
// signed (held in 26), r0·error 41 bits signed, r1 ≤ 2^R − 1, mant·(2·r1 + 1) 35 bits.
`include "m3v_hw_config.svh"

module recip_unit #(
    parameter int S_W      = 29,
    parameter     LUT_FILE = "m3v_recip_lut.mem"
) (
    input  logic                   clk,
    input  logic [S_W-1:0]         s,
    output logic [`M3V_RECIP_R:0]  r,
    output logic [$clog2(S_W)-1:0] k
);
    localparam int LATENCY = 16;
    localparam int M    = `M3V_RECIP_M;
    localparam int R    = `M3V_RECIP_R;
    localparam int LR   = `M3V_RECIP_LR;
    localparam int Z_W  = $clog2(S_W);          // leading-zero count and k
    localparam int MT_W = M + 1;                // mant
    localparam int R0_W = R;                    // seed
    localparam int E_W  = M + R - 6;            // error, 25 bits signed for M = R = 16
    localparam int RE_W = R0_W + E_W + 1;       // r0·error
    localparam int R1_W = R + 2;                // r1 within 3/2 of a value ≤ 2^R
    localparam int Q_W  = MT_W + R1_W + 1;      // mant·(2·r1 + 1)
    localparam int D_W  = Q_W + 2;              // comparisons, signed

    // 1: input
    logic [S_W-1:0] s1;
    always_ff @(posedge clk) s1 <= s;

    // 2: leading zeros (the highest set bit wins)
    logic [Z_W-1:0] lz_w, lz2;
    logic [S_W-1:0] s2;
    always_comb begin
        lz_w = Z_W'(S_W - 1);
        for (int b = 0; b < S_W; b++)
            if (s1[b]) lz_w = Z_W'(S_W - 1 - b);
    end
    always_ff @(posedge clk) begin
        lz2 <= lz_w;
        s2  <= s1;
    end

    // 3-4: normalise; k = S_W − 1 − lz
    logic [S_W-1:0]  n3, n4;
    logic [2:0]      lzf3;
    logic [Z_W-1:0]  k3;
    always_ff @(posedge clk) begin
        n3   <= s2 << {lz2[Z_W-1:3], 3'b000};
        lzf3 <= lz2[2:0];
        k3   <= Z_W'(S_W - 1) - lz2;
        n4   <= n3 << lzf3;
    end
    logic [MT_W-1:0] mant4;
    assign mant4 = n4[S_W-1 -: MT_W];

    // 5: seed
    logic [R0_W-1:0] lut [0:(1<<LR)-1];
    initial $readmemh(LUT_FILE, lut);
    logic [R0_W-1:0] r0_5;
    logic [MT_W-1:0] mant5;
    always_ff @(posedge clk) begin
        r0_5  <= lut[mant4[M-1 -: LR]];
        mant5 <= mant4;
    end

    // 6-8: error = 2^(M+R) − mant·r0
    logic [MT_W+R0_W-1:0]   mr6, mr7;
    logic signed [E_W-1:0]  e8;
    logic signed [MT_W+R0_W+1:0] e_w;
    assign e_w = $signed((MT_W+R0_W+2)'(1) << (M + R)) - $signed({2'b00, mr7});
    always_ff @(posedge clk) begin
        mr6 <= mant5 * r0_5;
        mr7 <= mr6;
        e8  <= e_w[E_W-1:0];
    end

    // 9-12: r1 = r0 + rshift_round(r0·error, M + R)
    logic [R0_W-1:0] r0_8, r0_11;
    pipe_delay #(.WIDTH(R0_W), .DEPTH(3)) u_r0a (.clk(clk), .rst_n(1'b1), .d(r0_5), .q(r0_8));
    pipe_delay #(.WIDTH(R0_W), .DEPTH(3)) u_r0b (.clk(clk), .rst_n(1'b1), .d(r0_8), .q(r0_11));

    logic signed [RE_W-1:0] re9, re10;
    logic signed [RE_W-M-R-1:0] rr11;
    logic signed [RE_W-1:0] re_rnd;
    assign re_rnd = re10 + RE_W'(64'd1 << (M + R - 1));
    logic [R1_W-1:0] r1_12;
    always_ff @(posedge clk) begin
        re9   <= $signed({1'b0, r0_8}) * e8;
        re10  <= re9;
        rr11  <= re_rnd[RE_W-1:M+R];
        r1_12 <= R1_W'($signed({2'b00, r0_11}) + R1_W'(rr11));
    end

    // 13-14: q = mant·(2·r1 + 1)
    logic [MT_W-1:0] mant12, mant14;
    pipe_delay #(.WIDTH(MT_W), .DEPTH(7)) u_mant_a (.clk(clk), .rst_n(1'b1), .d(mant5), .q(mant12));
    pipe_delay #(.WIDTH(MT_W), .DEPTH(2)) u_mant_b (.clk(clk), .rst_n(1'b1), .d(mant12), .q(mant14));
    logic [Q_W-1:0] q13, q14;
    always_ff @(posedge clk) begin
        q13 <= Q_W'(mant12) * Q_W'({r1_12, 1'b1});
        q14 <= q13;
    end

    // 15: d ≥ 0 and d + 2·mant ≥ 0;  16: r
    logic signed [D_W-1:0] top, d_up, d_same;
    assign top    = $signed(D_W'(1) << (M + R + 1));
    assign d_up   = top - $signed(D_W'(q14));
    assign d_same = $signed(top | D_W'({mant14, 1'b0})) - $signed(D_W'(q14));   // top + 2·mant, no carry
    logic up15, same15;
    logic [R1_W-1:0] r1_15;
    pipe_delay #(.WIDTH(R1_W), .DEPTH(3)) u_r1 (.clk(clk), .rst_n(1'b1), .d(r1_12), .q(r1_15));
    always_ff @(posedge clk) begin
        up15   <= !d_up[D_W-1];
        same15 <= !d_same[D_W-1];
    end
    logic [R1_W-1:0] r_w;
    assign r_w = up15 ? r1_15 + R1_W'(1) : (same15 ? r1_15 : r1_15 - R1_W'(1));
    always_ff @(posedge clk) r <= r_w[R:0];

    pipe_delay #(.WIDTH(Z_W), .DEPTH(LATENCY - 3)) u_k (.clk(clk), .rst_n(1'b1), .d(k3), .q(k));

    logic unused_ok;
    assign unused_ok = &{1'b0, n4[S_W-MT_W-1:0], r_w[R1_W-1:R+1], e_w[MT_W+R0_W+1:E_W], re_rnd[M+R-1:0]};
endmodule
