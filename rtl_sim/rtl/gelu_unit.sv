// gelu_unit: y = gelu(x, in_frac, Fmt(out_bits, out_frac)) of the numeric contract (numerics.md §9),
// bit-exact, on P lanes per beat.
//
//   a  = |x|;  tt = min(rshift_round(a, in_frac - G), N·2^Fi)          G = H + Fi
//   i  = tt >> Fi,  f = tt & (2^Fi - 1)
//   δ  = 0 if i >= N, else LUT[i] + rshift_round((LUT[i+1] - LUT[i])·f, Fi)
//   K  = max(in_frac, Fd)
//   g  = (max(x, 0) << (K - in_frac)) - (δ << (K - Fd))
//   y  = saturate(rshift_round(g, K - out_frac), out_bits)
//
// Ports (a valid/ready stream in and out; a beat is P values sharing one format):
//   x          P signed DATA_W containers (values must fit 16 bits signed, as in the contract)
//   in_frac    signed, supported range [-8, 24] (keeps g within 41 bits)
//   out_frac   signed, any value with K - out_frac in [-62, 62]
//   out_bits   output format width, 1..DATA_W (0 or more than DATA_W means DATA_W)
//   y          P results sign-extended to DATA_W
//
// Pipeline: LATENCY = 19 stages, one beat per cycle, at most one adder or one shift level group
// per stage (the depth budget of the compute unit, whose epilogue this is). The whole pipeline
// advances when its last stage is empty or accepted (en), so it tolerates any backpressure; with
// out_ready tied high it is a pure fixed-latency pipeline.
//   1 inputs  2 |x|, shift amounts  3-5 grid shift (coarse, fine, round)  6 clamp, addresses
//   7 table reads  8 difference  9-11 product (shift-and-add tree)  12 round  13 δ
//   14 alignments  15 g  16-18 output shift (coarse, fine, round)  19 saturate
// Shifts use the trick of requant.sv: the value sits L bits up and one right shift by amount
// = shift + L - 1 keeps the last bit out, so (v >> 1) + v[0] is the round-half-up result.
// The δ table is the contract's gelu_lut(), emitted by m3vit.rtl_sim.emit as LUT_FILE; N (the
// contract's T_max·2^H) is a power of two, so the range test is a test of high bits.
`include "m3v_hw_config.svh"

module gelu_unit #(
    parameter int P        = `M3V_P_OUT,
    parameter int DATA_W   = `M3V_ACT_W,
    parameter int FRAC_W   = 7,
    parameter int OB_W     = `M3V_OB_W,
    parameter     LUT_FILE = "m3v_gelu_lut.mem"
) (
    input  logic                    clk,
    input  logic                    rst_n,
    input  logic                    in_valid,
    output logic                    in_ready,
    input  logic [P*DATA_W-1:0]     x,
    input  logic [FRAC_W-1:0]       in_frac,
    input  logic [FRAC_W-1:0]       out_frac,
    input  logic [OB_W-1:0]         out_bits,
    output logic                    out_valid,
    input  logic                    out_ready,
    output logic [P*DATA_W-1:0]     y
);
    localparam int LATENCY = 19;
    localparam int H     = `M3V_GELU_H;
    localparam int FI    = `M3V_GELU_FI;
    localparam int FD    = `M3V_GELU_FD;
    localparam int N     = `M3V_GELU_N;
    localparam int LW    = `M3V_GELU_LUT_W;
    localparam int G     = H + FI;
    localparam int NB    = $clog2(N) + FI;         // tt >= 2^NB = N·2^Fi: beyond the table
    localparam int IW    = $clog2(N) + 1;          // table address (N + 1 entries)
    localparam int AW    = 17;                     // |x| of a 16-bit value
    localparam int GL    = 25;                     // grid pre-shift: left shifts up to 24
    localparam int GVW   = AW + GL;                // grid shift width
    localparam int GAW   = 6;                      // grid amount, sh_in + 24 in [0, 32]
    localparam int GW    = 41;                     // g: |g| < 2^40 over the supported in_frac
    localparam int MAXLO = DATA_W + 1;             // output left shifts beyond this saturate anyway
    localparam int YW    = GW + MAXLO + 1;         // output shift width
    localparam int OAW   = $clog2(GW + MAXLO + 1); // output amount
    localparam int SW    = 8;                      // shift arithmetic on formats
    localparam int PW    = LW + FI + 2;            // product width

    // ---------------------------------------------------------------- stall-all handshake
    logic [LATENCY-1:0] v;
    logic               en;
    assign en        = !v[LATENCY-1] || out_ready;
    assign in_ready  = en;
    assign out_valid = v[LATENCY-1];
    always_ff @(posedge clk) begin
        if (!rst_n)  v <= '0;
        else if (en) v <= {v[LATENCY-2:0], in_valid};
    end

    // ---------------------------------------------------------------- formats (shared by lanes)
    logic [FRAC_W-1:0] fin1, fout1;
    logic [OB_W-1:0]   ob1;
    always_ff @(posedge clk) if (en) begin
        fin1  <= in_frac;
        fout1 <= out_frac;
        ob1   <= out_bits;
    end

    logic signed [SW-1:0] fin, fout, kk, ga_w, sh_g, sh_d, sh_o, sh_oc, amt_w;
    assign fin  = SW'($signed(fin1));
    assign fout = SW'($signed(fout1));
    assign kk   = (fin > SW'(FD)) ? fin : SW'(FD);
    assign ga_w = fin - SW'(G) + SW'(GL - 1);      // grid amount
    assign sh_g = kk - fin;                        // relu alignment, in [0, 24]
    assign sh_d = kk - SW'(FD);                    // δ alignment, in [0, 8]
    assign sh_o = kk - fout;                       // output rounding shift
    // Output shifts clamp to [-MAXLO, GW]: larger right shifts give 0, larger left shifts of a
    // non-zero g saturate.
    always_comb begin
        if (sh_o < -SW'(MAXLO))   sh_oc = -SW'(MAXLO);
        else if (sh_o > SW'(GW))  sh_oc = SW'(GW);
        else                      sh_oc = sh_o;
    end
    assign amt_w = sh_oc + SW'(MAXLO);

    logic [OB_W-1:0] ob_eff;
    assign ob_eff = (ob1 == '0 || ob1 > OB_W'(DATA_W)) ? OB_W'(DATA_W) : ob1;

    // Stage 2 control, then a delay line: stage k (2..17) is ctl[(k-2)*CW +: CW].
    localparam int CW = GAW + 5 + 4 + OAW + OB_W;
    localparam int CN = 16;
    logic [CW-1:0]    ctl2;
    logic [CN*CW-1:0] ctl;
    assign ctl2 = {ga_w[GAW-1:0], sh_g[4:0], sh_d[3:0], amt_w[OAW-1:0], ob_eff};
    always_ff @(posedge clk) if (en) ctl <= {ctl[(CN-1)*CW-1:0], ctl2};

    logic [GAW-1:0]  ga2;
    logic [4:0]      shg13;
    logic [3:0]      shd13;
    logic [OAW-1:0]  amt15;
    logic [OB_W-1:0] ob17;
    logic            unused_ctl;
    assign ga2   = ctl[0*CW + OAW + OB_W + 9 +: GAW];
    assign shg13 = ctl[11*CW + OAW + OB_W + 4 +: 5];
    assign shd13 = ctl[11*CW + OAW + OB_W +: 4];
    assign amt15 = ctl[13*CW + OB_W +: OAW];
    assign ob17  = ctl[15*CW +: OB_W];
    assign unused_ctl = &{1'b0, ga_w[SW-1:GAW], sh_g[SW-1:5], sh_d[SW-1:4], amt_w[SW-1:OAW]};

    // ---------------------------------------------------------------- the δ table
    logic [LW-1:0] lut [0:N];
    initial $readmemh(LUT_FILE, lut);

    // ---------------------------------------------------------------- lanes
    genvar l;
    generate
        for (l = 0; l < P; l++) begin : g_lane
            // x travels to stage 14 (relu): stage k (1..14) is xs[(k-1)*DATA_W +: DATA_W].
            logic [14*DATA_W-1:0] xs;
            always_ff @(posedge clk) if (en) xs <= {xs[13*DATA_W-1:0], x[l*DATA_W +: DATA_W]};
            logic signed [DATA_W-1:0] x1, x13;
            assign x1  = xs[0 +: DATA_W];
            assign x13 = xs[12*DATA_W +: DATA_W];

            // 2: |x|
            logic [AW-1:0] a2;
            always_ff @(posedge clk) if (en) a2 <= x1[DATA_W-1] ? AW'(-$signed({x1[DATA_W-1], x1})) : AW'(x1);

            // 3-5: tt = rshift_round(a, in_frac - G), as one right shift of a placed GL bits up
            logic [GVW-1:0] gv3, gv4;
            logic [GVW-2:0] tt5;
            logic [2:0]     gaf3;
            always_ff @(posedge clk) if (en) begin
                gv3  <= {a2, {GL{1'b0}}} >> {ga2[GAW-1:3], 3'b000};
                gaf3 <= ga2[2:0];
                gv4  <= gv3 >> gaf3;
                tt5  <= gv4[GVW-1:1] + (GVW-1)'(gv4[0]);
            end

            // 6: clamp to the table, addresses of both interval ends
            logic          z6;
            logic [IW-1:0] ia6, ib6;
            logic [FI-1:0] f6;
            logic          beyond;
            assign beyond = |tt5[GVW-2:NB];
            always_ff @(posedge clk) if (en) begin
                z6  <= beyond;
                ia6 <= beyond ? IW'(N - 1) : IW'(tt5[NB-1:FI]);
                ib6 <= beyond ? IW'(N)     : IW'(tt5[NB-1:FI]) + IW'(1);
                f6  <= tt5[FI-1:0];
            end

            // 7: reads; 8: difference
            logic [LW-1:0] lo7, hi7, lo8, lo9, lo10, lo11, lo12;
            logic [FI-1:0] f7, f8;
            logic          z7, z8, z9, z10, z11, z12;
            logic signed [LW:0] diff8;
            always_ff @(posedge clk) if (en) begin
                lo7 <= lut[ia6];
                hi7 <= lut[ib6];
                f7  <= f6;
                z7  <= z6;
                diff8 <= $signed({1'b0, hi7}) - $signed({1'b0, lo7});
                f8 <= f7;    z8 <= z7;    lo8 <= lo7;
                z9 <= z8;    z10 <= z9;   z11 <= z10;  z12 <= z11;
                lo9 <= lo8;  lo10 <= lo9; lo11 <= lo10; lo12 <= lo11;
            end

            // 9-11: diff·f as shift-and-add (in LUTs: the compute unit's DSP budget is one per
            // MAC and one per combine lane): four groups of partial products, two sums, one sum.
            logic signed [PW-1:0] d_ext;
            logic signed [PW-1:0] pg0, pg1, pg2, pg3, ph0, ph1, prod11;
            assign d_ext = PW'(diff8);
            always_comb begin
                pg0 = '0; pg1 = '0; pg2 = '0; pg3 = '0;
                for (int b = 0; b < FI; b++) begin
                    if (f8[b]) begin
                        if (b % 4 == 0)      pg0 = pg0 + (d_ext <<< b);
                        else if (b % 4 == 1) pg1 = pg1 + (d_ext <<< b);
                        else if (b % 4 == 2) pg2 = pg2 + (d_ext <<< b);
                        else                 pg3 = pg3 + (d_ext <<< b);
                    end
                end
            end
            logic signed [PW-1:0] pg0r, pg1r, pg2r, pg3r;
            always_ff @(posedge clk) if (en) begin
                pg0r <= pg0;  pg1r <= pg1;  pg2r <= pg2;  pg3r <= pg3;
                ph0 <= pg0r + pg1r;
                ph1 <= pg2r + pg3r;
                prod11 <= ph0 + ph1;
            end

            // 12: rshift_round(prod, Fi); 13: δ
            logic signed [PW-1:0] prnd12;
            logic [LW-1:0]        d13;
            logic signed [LW+1:0] dlt;
            assign dlt = (LW+2)'(prnd12) + $signed({2'b00, lo12});
            always_ff @(posedge clk) if (en) begin
                prnd12 <= (prod11 + PW'(1 << (FI - 1))) >>> FI;
                d13    <= z12 ? '0 : dlt[LW-1:0];   // δ >= 0 and fits the table width
            end

            // 14: alignments to K fraction bits; 15: g
            logic signed [GW-1:0] relu14, dsh14, g15;
            always_ff @(posedge clk) if (en) begin
                relu14 <= x13[DATA_W-1] ? '0 : (GW'(x13) << shg13);
                dsh14  <= GW'({1'b0, d13}) << shd13;
                g15    <= relu14 - dsh14;
            end

            // 16-18: rshift_round(g, K - out_frac), g placed MAXLO + 1 bits up
            logic signed [YW-1:0] gs16, gs17, r18, hi18;
            logic [2:0]           amf16;
            always_ff @(posedge clk) if (en) begin
                gs16  <= $signed({g15, {(MAXLO + 1){1'b0}}}) >>> {amt15[OAW-1:3], 3'b000};
                amf16 <= amt15[2:0];
                gs17  <= gs16 >>> amf16;
                r18   <= (gs17 >>> 1) + $signed({{(YW-1){1'b0}}, gs17[0]});
                hi18  <= ~({YW{1'b1}} << (ob17 - 1'b1));     // 2^(n-1) - 1
            end

            // 19: saturate
            logic signed [YW-1:0] lo18;
            logic [DATA_W-1:0]    y19;
            assign lo18 = ~hi18;                     // -2^(n-1)
            always_ff @(posedge clk) if (en) begin
                if (r18 > hi18)      y19 <= hi18[DATA_W-1:0];
                else if (r18 < lo18) y19 <= lo18[DATA_W-1:0];
                else                 y19 <= r18[DATA_W-1:0];
            end
            assign y[l*DATA_W +: DATA_W] = y19;

            logic unused_lane;
            assign unused_lane = &{1'b0, prnd12[PW-1:LW+1], dlt[LW+1:LW], xs[14*DATA_W-1:13*DATA_W],
                                   xs[12*DATA_W-1:DATA_W]};
        end
    endgenerate

    logic unused_ok;
    assign unused_ok = &{1'b0, ctl[CN*CW-1:15*CW+OB_W]};
endmodule
