// requant: y = saturate(rshift_round(x, shift), out_bits), the numeric contract's requantisation.
//
//   rshift_round(x, s) = (x + 2^(s-1)) >>> s   for s > 0   (round half up, arithmetic shift = floor)
//                      = x                      for s = 0
//                      = x << -s                for s < 0
//   saturate(v, n)     = clamp(v, -2^(n-1), 2^(n-1) - 1)
//
// x and shift are signed; out_bits is the runtime output width (1..OUT_W; 0 or more than OUT_W
// means OUT_W). y is the result sign-extended to the OUT_W container. With SATURATE = 0 the
// result is only truncated to OUT_W bits (the caller guarantees that it fits) and out_bits is
// ignored.
//
// Exact for every shift value: right shifts of IN_W or more give 0 (as the formula does), and left
// shifts are clamped to MAX_LSHIFT, which is exact under saturation when MAX_LSHIFT >= OUT_W (any
// non-zero x shifted that far saturates anyway). Callers that never shift left use MAX_LSHIFT = 0.
//
// How: x is placed MAX_LSHIFT + 1 bits up, so every shift becomes one arithmetic right shift by
// amount = clamp(shift) + MAX_LSHIFT that keeps the last bit shifted out (v[0]); then
// (x + 2^(s-1)) >>> s = (v >>> 1) + v[0]. For s <= 0 that bit is 0 and the result is x << -s.
//
// Pipeline (LATENCY = 5, no reset, one result per cycle):
//   1 clamp the shift into an amount  2 coarse shift (multiples of 8)  3 fine shift
//   4 round, saturation bounds        5 saturate
// Requires IN_W + MAX_LSHIFT >= 8.
module requant #(
    parameter int IN_W       = 48,
    parameter int OUT_W      = 16,
    parameter int SHIFT_W    = 7,
    parameter int OB_W       = 5,
    parameter int MAX_LSHIFT = OUT_W,
    parameter int SATURATE   = 1
) (
    input  logic               clk,
    input  logic [IN_W-1:0]    x,
    input  logic [SHIFT_W-1:0] shift,
    input  logic [OB_W-1:0]    out_bits,
    output logic [OUT_W-1:0]   y
);
    localparam int L    = MAX_LSHIFT + 1;        // pre-shift
    localparam int XW   = IN_W + L;              // width of the shifted value
    localparam int AMAX = IN_W + MAX_LSHIFT;     // largest shift amount
    localparam int AW   = $clog2(AMAX + 1);
    localparam int CW   = ((SHIFT_W > AW) ? SHIFT_W : AW) + 2;   // clamp arithmetic, never overflows
    localparam logic signed [CW-1:0] S_LO = CW'(-MAX_LSHIFT);
    localparam logic signed [CW-1:0] S_HI = CW'(IN_W);

    // Clamp the shift into [-MAX_LSHIFT, IN_W] (exact, see above) and turn it into a right shift.
    logic signed [CW-1:0] s_ext, s_cl, amt_w;
    logic [AW-1:0] amount;
    assign s_ext = {{(CW-SHIFT_W){shift[SHIFT_W-1]}}, shift};
    always_comb begin
        if (s_ext < S_LO)      s_cl = S_LO;
        else if (s_ext > S_HI) s_cl = S_HI;
        else                   s_cl = s_ext;
    end
    assign amt_w  = s_cl - S_LO;
    assign amount = amt_w[AW-1:0];

    logic [IN_W-1:0]      x1;
    logic [AW-1:0]        a1;
    logic signed [XW-1:0] xpos, x2, v3, r4;
    logic [2:0] af2;
    assign xpos = {x1, {L{1'b0}}};

    always_ff @(posedge clk) begin
        x1  <= x;
        a1  <= amount;
        x2  <= xpos >>> {a1[AW-1:3], 3'b000};
        af2 <= a1[2:0];
        v3  <= x2 >>> af2;
        r4  <= (v3 >>> 1) + $signed({{(XW-1){1'b0}}, v3[0]});   // all-signed: >>> stays arithmetic
    end

    generate
        if (SATURATE != 0) begin : g_sat
            logic [OB_W-1:0] ob1, ob2, ob3;
            localparam logic [OB_W-1:0] OB_MAX = OB_W'(OUT_W);   // OB_W must hold OUT_W
            logic [OB_W-1:0] ob_eff;
            logic signed [XW-1:0] hi4, lo4;
            assign ob_eff = (ob3 == '0 || ob3 > OB_MAX) ? OB_MAX : ob3;
            always_ff @(posedge clk) begin
                ob1 <= out_bits;
                ob2 <= ob1;
                ob3 <= ob2;
                hi4 <= ~({XW{1'b1}} << (ob_eff - 1'b1));   // 2^(n-1) - 1 without a carry chain
                if (r4 > hi4)      y <= hi4[OUT_W-1:0];
                else if (r4 < lo4) y <= lo4[OUT_W-1:0];
                else               y <= r4[OUT_W-1:0];
            end
            assign lo4 = ~hi4;   // -2^(n-1) = ~(2^(n-1) - 1)
            logic unused_ok;
            assign unused_ok = &{1'b0, amt_w[CW-1:AW]};
        end else begin : g_wrap
            always_ff @(posedge clk) y <= r4[OUT_W-1:0];
            logic unused_ok;
            assign unused_ok = &{1'b0, amt_w[CW-1:AW], out_bits, r4[XW-1:OUT_W]};
        end
    endgenerate
endmodule
