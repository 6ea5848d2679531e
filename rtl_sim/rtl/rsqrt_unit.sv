// rsqrt_unit: (r, e) = rsqrt_int(u) of the numeric contract (numerics.md §6), bit-exact, one input
// per cycle, for 1 <= u < 2^UW:
//
//   e    = (bit_length(u) - 1) >> 1                       the highest non-zero bit pair of u
//   mant = u >> (2e - M)  (floor, a left shift when 2e < M), in [2^M, 2^(M+2))
//   y0   = SLUT[(mant >> (M - Ls)) - 2^Ls]
//   y1   = y0 + rshift_round(y0·(2^(M+2R) - mant·y0²), M + 2R + 1)
//   r    = y1 + 1 if (2y1 + 1)²·mant <= 2^(M+2R+2), else y1 if (2y1 - 1)²·mant <= 2^(M+2R+2),
//          else y1 - 1
//
// The ±1 tests use (2y1 ± 1)²·mant = (4·mant·y1² + mant) ± 4·mant·y1, so one square serves both.
// Ports: in_valid/u in, out_valid/r (R+1 bits unsigned, in [2^(R-1), 2^R]) and e (EW bits) out.
// u = 0 is outside the contract (the LayerNorm feeds V + E with E >= 1). No handshake: the pipeline
// never stalls; the caller delays its side data by LATENCY (pipe_delay).
//
// Pipeline (LATENCY = 17, valid bits reset, data not):
//   1 input  2 per group of 8 bit pairs: non-zero, highest pair  3 e  4 coarse normalising shift
//   5 fine shift, mant  6 table address  7 SLUT read (the contract's rsqrt_lut(), LUT_FILE)
//   8 y0²  9 mant·y0²  10 error term  11 y0·err  12 y1  13 y1², mant·y1  14 mant·y1²
//   15 A = 4·mant·y1² + mant, B = 4·mant·y1  16 A + B, A - B  17 r (the tests against
//   T = 2^(M+2R+2) are tests of high bits, no carry chain)
// Every product has a register after it; the wide ones span two or three DSP48E2.
`include "m3v_hw_config.svh"

module rsqrt_unit #(
    parameter int UW       = 62,               // u width (even): V + E < 2^62 in the LayerNorm
    parameter int M        = `M3V_RSQRT_M,
    parameter int R        = `M3V_RSQRT_R,
    parameter int LS       = `M3V_RSQRT_LS,
    parameter     LUT_FILE = "m3v_rsqrt_lut.mem",
    parameter int NGRP     = (UW / 2 + 7) / 8,   // groups of 8 bit pairs
    parameter int EW       = $clog2(NGRP) + 3
) (
    input  logic          clk,
    input  logic          rst_n,
    input  logic          in_valid,
    input  logic [UW-1:0] u,
    output logic          out_valid,
    output logic [R:0]    r,
    output logic [EW-1:0] e
);
    localparam int LATENCY = 17;
    localparam int MW  = M + 2;                // mantissa width
    localparam int AW  = LS + 2;               // table address: 3·2^LS entries
    localparam int NE  = 3 << LS;
    localparam int GPW = NGRP * 16;            // u padded to whole groups
    localparam int SAW = $clog2(UW - 1);       // normalising shift amount, 0..UW-2
    localparam int ERW = 2*R + M + 2;          // mant·y0² and the error term, signed
    localparam int PEW = ERW + R;              // y0·err
    localparam int YW  = R + 2;                // y1, signed (y1 <= 2^R)
    localparam int CW  = MW + 2*YW + 4;        // the comparisons
    localparam logic [ERW-1:0] ONE_E = ERW'(1) << (M + 2*R);

    pipe_delay #(.WIDTH(1), .DEPTH(LATENCY), .RESET(1)) u_v (
        .clk(clk), .rst_n(rst_n), .d(in_valid), .q(out_valid)
    );

    localparam int SLUT_W = R;                 // seeds are in [2^(R-1), 2^R)
    logic [SLUT_W-1:0] lut [0:NE-1];
    initial $readmemh(LUT_FILE, lut);

    // 1-3: e = index of the highest non-zero bit pair
    logic [UW-1:0]     u1, u2, u3;
    logic [GPW-1:0]    upad;
    logic [NGRP-1:0]   nz2;
    logic [NGRP*3-1:0] loc2;
    logic [EW-1:0]     e3;
    assign upad = GPW'(u1);
    always_ff @(posedge clk) begin
        u1 <= u;
        u2 <= u1;
        u3 <= u2;
        for (int g = 0; g < NGRP; g++) begin
            nz2[g] <= |upad[16*g +: 16];
            loc2[3*g +: 3] <= 3'd0;
            for (int p = 0; p < 8; p++)
                if (|upad[16*g + 2*p +: 2]) loc2[3*g +: 3] <= 3'(p);
        end
        e3 <= '0;
        for (int g = 0; g < NGRP; g++)
            if (nz2[g]) e3 <= EW'(8*g) + EW'(loc2[3*g +: 3]);
    end

    // 4-5: w = u << (UW - 2 - 2e) has its top pair in [UW-1:UW-2]; mant is its top MW bits
    logic [SAW-1:0] sa;
    logic [UW-1:0]  w4, w5;
    logic [2:0]     saf4;
    logic [EW-1:0]  e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15, e16;
    logic [MW-1:0]  mant5, mant6, mant7, mant8, mant9, mant10, mant11, mant12, mant13, mant14;
    assign sa    = SAW'(UW - 2) - SAW'({e3, 1'b0});
    assign w5    = w4 << saf4;
    always_ff @(posedge clk) begin
        w4    <= u3 << {sa[SAW-1:3], 3'b000};
        saf4  <= sa[2:0];
        mant5 <= w5[UW-1 -: MW];
        e4 <= e3;   e5 <= e4;   e6 <= e5;   e7 <= e6;   e8 <= e7;   e9 <= e8;
        e10 <= e9;  e11 <= e10; e12 <= e11; e13 <= e12; e14 <= e13; e15 <= e14; e16 <= e15;
        mant6 <= mant5;  mant7 <= mant6;  mant8 <= mant7;  mant9 <= mant8;  mant10 <= mant9;
        mant11 <= mant10; mant12 <= mant11; mant13 <= mant12; mant14 <= mant13;
    end

    // 6-7: the seed
    logic [AW-1:0]     addr6;
    logic [SLUT_W-1:0] y0_7, y0_8, y0_9, y0_10, y0_11;
    always_ff @(posedge clk) begin
        addr6 <= mant5[MW-1 -: AW] - AW'(1 << LS);
        y0_7  <= lut[addr6];
        y0_8  <= y0_7;
        y0_9  <= y0_8;
        y0_10 <= y0_9;
        y0_11 <= y0_10;
    end

    // 8-12: one Newton step
    logic [2*R-1:0]         y0sq8;
    logic [ERW-1:0]         my9;
    logic signed [ERW-1:0]  err10;
    logic signed [PEW-1:0]  pe11, pe_rnd;
    logic signed [YW-1:0]   y1_12, y1_13, y1_14, y1_15;
    assign pe_rnd = (pe11 + (PEW'(1) <<< (M + 2*R))) >>> (M + 2*R + 1);
    always_ff @(posedge clk) begin
        y0sq8 <= y0_7 * y0_7;
        my9   <= ERW'(mant8) * ERW'(y0sq8);
        err10 <= $signed(ONE_E - my9);
        pe11  <= $signed({1'b0, y0_10}) * err10;
        y1_12 <= $signed({2'b00, y0_11}) + YW'(pe_rnd);
    end

    // 13-17: correct rounding; A ± B = (2y1 ± 1)²·mant > 0
    logic [2*YW-1:0]      sq13;
    logic [MW+YW-1:0]     my13, my14;
    logic [CW-1:0]        a14, ca15, cb15, up16, same16;
    logic                 up_le, same_le;
    logic signed [YW-1:0] y1_16;
    logic [R:0]           r17;
    // v <= T = 2^TB: nothing above bit TB, and bit TB only in T itself
    localparam int TB = M + 2*R + 2;
    assign up_le   = ~|up16[CW-1:TB+1]   && (!up16[TB]   || ~|up16[TB-1:0]);
    assign same_le = ~|same16[CW-1:TB+1] && (!same16[TB] || ~|same16[TB-1:0]);
    always_ff @(posedge clk) begin
        sq13   <= $unsigned(y1_12) * $unsigned(y1_12);
        my13   <= (MW+YW)'(mant12) * (MW+YW)'($unsigned(y1_12));
        y1_13  <= y1_12;
        a14    <= CW'(mant13) * CW'(sq13);
        my14   <= my13;
        y1_14  <= y1_13;
        ca15   <= (a14 << 2) + CW'(mant14);
        cb15   <= CW'(my14) << 2;
        y1_15  <= y1_14;
        up16   <= ca15 + cb15;
        same16 <= ca15 - cb15;
        y1_16  <= y1_15;
        if (up_le)        r17 <= (R+1)'(y1_16 + YW'(1));
        else if (same_le) r17 <= (R+1)'(y1_16);
        else              r17 <= (R+1)'(y1_16 - YW'(1));
    end
    assign r = r17;

    always_ff @(posedge clk) e <= e16;   // stage 17

    logic unused_ok;
    assign unused_ok = &{1'b0, w5[UW-MW-1:0], pe_rnd[PEW-1:YW]};   // |y1 - y0| is small
endmodule
