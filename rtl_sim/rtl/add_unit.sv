// add_unit: the contract's residual_add on P int16 lanes per beat (compiler/numerics.py,
// hls/include/m3v_prim.h add_aligned):
//     z = sat(rshift_round(a, a_shift) + rshift_round(b, b_shift), fmt)
// rshift_round(x, s) is (x + 2^(s-1)) >> s for s > 0 (round half up) and x << -s for s <= 0.
// The format saturates to [-2^(bits-1), 2^(bits-1)-1] (signed) or [0, 2^bits-1] (unsigned), any
// width up to 63; the low 16 bits are stored, as the executor's int16 store does.
//
// Exact for every shift the contract accepts, in narrow arithmetic: a right shift of an int16 by
// 16 or more gives 0, so right shifts clamp at 16 (17-bit terms). The left shifts la, lb are
// split into their common part lmin = min(la, lb) and the difference d: S = (big << d) + small,
// where the contract's refusal of terms reaching 2^62 bounds S to 65 bits. S << lmin is never
// formed: S·2^lmin > max  <=>  S > floor(max / 2^lmin), S·2^lmin < min  <=>  S < ceil(min / 2^lmin),
// bounds shared by every lane, and the stored low 16 bits are those of S[15:0] << lmin.
// The shifts and format are per instruction: the values derived from them are registered (two
// cycles), so they must be set two cycles before the instruction's first beat and stay stable
// while its beats flow (the controller sets them at decode, a DDR latency ahead of the data).
// Three stages (right shifts; left shift of one term; add, saturate) under one stall signal.
module add_unit #(
    parameter int P  = 8,
    parameter int EW = 16
) (
    input  logic            clk,
    input  logic            rst_n,
    input  logic [31:0]     a_shift,
    input  logic [31:0]     b_shift,
    input  logic [5:0]      fmt_bits,
    input  logic            fmt_signed,
    input  logic            in_valid,
    output logic            in_ready,
    input  logic [P*EW-1:0] a_data,
    input  logic [P*EW-1:0] b_data,
    output logic            out_valid,
    input  logic            out_ready,
    output logic [P*EW-1:0] out_data
);
    localparam int TW = EW + 1;   // a term after its right shift (the rounding carry)

    function automatic logic [4:0] right_amount(input logic [31:0] s);
        right_amount = 5'd0;
        if (!s[31] && s != 0) right_amount = s > 32'd16 ? 5'd16 : 5'(s);
    endfunction

    function automatic logic [5:0] left_amount(input logic [31:0] s);
        logic [32:0] neg;
        neg = 33'd0 - {s[31], s};
        left_amount = 6'd0;
        if (s[31]) left_amount = neg > 33'd63 ? 6'd63 : 6'(neg);
    endfunction

    function automatic logic [TW-1:0] right_term(input logic [EW-1:0] x, input logic [4:0] r);
        logic signed [TW-1:0] e, half;
        e = TW'(signed'(x));
        half = r == 0 ? '0 : TW'(1) << (r - 5'd1);
        right_term = r != 0 ? TW'((e + half) >>> r) : e;
    endfunction

    // ---- per-instruction values, shared by the lanes, registered twice (off the beat path)
    logic [4:0]         a_r, b_r;
    logic [5:0]         a_l, b_l, lmin, d;
    logic               a_big;          // a is the term shifted by d
    logic signed [64:0] zmax, zmin, hi_b, lo_b;
    always_ff @(posedge clk) begin
        a_r   <= right_amount(a_shift);
        b_r   <= right_amount(b_shift);
        a_l   <= left_amount(a_shift);
        b_l   <= left_amount(b_shift);
        a_big <= a_l > b_l;
        lmin  <= a_l > b_l ? b_l : a_l;
        d     <= a_l > b_l ? a_l - b_l : b_l - a_l;
        if (fmt_signed) begin
            zmax <= (65'sd1 <<< (fmt_bits - 6'd1)) - 65'sd1;
            zmin <= -(65'sd1 <<< (fmt_bits - 6'd1));
        end else begin
            zmax <= (65'sd1 <<< fmt_bits) - 65'sd1;
            zmin <= 65'sd0;
        end
        hi_b  <= zmax >>> (a_l > b_l ? b_l : a_l);           // floor(max / 2^lmin)
        lo_b  <= -((-zmin) >>> (a_l > b_l ? b_l : a_l));     // ceil(min / 2^lmin)
    end

    logic            v1, v2, v3, adv;
    logic [P*TW-1:0] ta, tb, sml;
    logic [P*65-1:0] big;
    logic [P*EW-1:0] z;

    assign adv       = !v3 || out_ready;
    assign in_ready  = adv;
    assign out_valid = v3;
    assign out_data  = z;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            v1 <= 1'b0;
            v2 <= 1'b0;
            v3 <= 1'b0;
        end else if (adv) begin
            v1 <= in_valid;
            v2 <= v1;
            v3 <= v2;
        end
    end

    always_ff @(posedge clk) begin
        if (adv) begin
            for (int i = 0; i < P; i++) begin
                ta[i*TW +: TW] <= right_term(a_data[i*EW +: EW], a_r);
                tb[i*TW +: TW] <= right_term(b_data[i*EW +: EW], b_r);
                big[i*65 +: 65] <= 65'(signed'(a_big ? ta[i*TW +: TW] : tb[i*TW +: TW])) <<< d;
                sml[i*TW +: TW] <= a_big ? tb[i*TW +: TW] : ta[i*TW +: TW];
            end
            for (int i = 0; i < P; i++) begin : lane
                logic signed [64:0] s;
                logic [EW-1:0] low;
                s = signed'(big[i*65 +: 65]) + 65'(signed'(sml[i*TW +: TW]));
                low = lmin >= 6'(EW) ? '0 : s[EW-1:0] << lmin;
                if (s > hi_b) z[i*EW +: EW] <= zmax[EW-1:0];
                else if (s < lo_b) z[i*EW +: EW] <= zmin[EW-1:0];
                else z[i*EW +: EW] <= low;
            end
        end
    end
endmodule
