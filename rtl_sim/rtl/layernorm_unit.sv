// layernorm_unit: z = layernorm(x, γ, β, E, β_shift, out_shift, out_fmt) of the numeric contract
// (numerics.md §7), bit-exact, over rows of D = dim channels arriving as beats of P values:
//
//   S1 = Σ x_i,  S2 = Σ x_i²,  V = D·S2 - S1²,  (r, e) = rsqrt_int(V + E)       once per row
//   n_i = sat(rshift_round(d_i·r, R + e - F_n), norm_fmt),   d_i·r = x_i·(D·r) - S1·r
//   z_i = requant(n_i·γ_i + β'_i, out_shift_i, out_bits),     β'_i = rshift_round(β_i, β_shift)
//
// d_i·r is formed as x_i·(D·r) - S1·r (the same integer), so each lane needs one DSP48E2 for it
// (A = D·r, B = x, C = S1·r), one for x² and one for n·γ + β' (C = β').
//
// Ports
//   dim, eps_int, out_bits   runtime registers: D (1..MAX_DIM), E (1..2^61 - 1), output width
//                            (1..DATA_W; 0 = DATA_W). Hold them stable while rows are in flight.
//   tbl_*                    the per-channel table, written while out_en is low (rows may already
//                            be entering: only the read-out uses it): entry tbl_addr = b holds channels b·P .. b·P + P - 1, lane j
//                            at [j*W +: W]: γ (G_W bits signed), β' (B_W bits signed: β already
//                            aligned by rshift_round(β, β_shift), a compile-time constant), and
//                            out_shift (SHIFT_W bits signed, any value of the contract's [-62, 62]).
//   out_en                   rows are read out (normalised) only while out_en is high; lower it
//                            before the first table write and raise it after the last one.
//   in_*  (x)                a row is ceil(D/P) beats of P DATA_W-bit values (values must fit 16
//                            bits signed); the last beat's lanes beyond D are ignored.
//   out_* (y, out_last)      the same beats of z, lanes beyond D zero; out_last marks a row's end.
//   All streams are valid/ready and tolerate any gaps and backpressure.
//
// Dataflow: rows go into a buffer of NS row slots (block RAM, NS·2^BW beats). While a row
// arrives, its lanes are squared and summed (adder_tree) and accumulated into S1, S2; after its
// last beat the statistics pipeline (D·S2, S1², V + E, rsqrt_unit, D·r, S1·r) takes 4 + 17 + 2
// cycles, then the row is read back out of its slot through the normalising pipeline. The input
// and statistics of the following rows overlap the output of row r; the input waits only when
// all NS slots are taken, which at full rate happens only for rows of fewer than S/(NS - 2)
// beats (S = 26 + LV, the cycles from a row's last input beat to its first read).
//
// Output pipeline (OLAT = 15 cycles from the read to the output FIFO, never stalls):
//   1 row-buffer read  2 x·(D·r)  3 - S1·r  4-8 requant.sv to norm_fmt (shift R + e - F_n)
//   8 table read  9 n·γ  10 + β'  11-15 requant.sv (out_shift, out_bits)  then a FIFO of
//   2^ceil(log2(OLAT + 3)) beats; a beat is read only with a free FIFO place (credits), so
//   backpressure never reaches the pipeline.
// Latency with an idle unit: a row's first output beat is valid 41 + LV cycles after the clock edge
// that accepts its last input beat (LV = ceil(log2 P); the full-rate test checks it). With
// out_ready high and rows of B beats, NS rows take NS·B + max(0, S - (NS - 2)·B) cycles in the
// steady state: rows of S/(NS - 2) beats or more stream at one beat per cycle.
//
// P defaults to min(P_OUT, 8): 3·8 DSPs for the lanes plus 22 for the statistics and rsqrt (46 in
// all), and a 768-channel row takes 96 beats.
`include "m3v_hw_config.svh"

module layernorm_unit #(
    parameter int P        = (`M3V_P_OUT < 8) ? `M3V_P_OUT : 8,
    parameter int DATA_W   = `M3V_ACT_W,
    parameter int G_W      = `M3V_W_W,
    parameter int B_W      = `M3V_ACC_W,
    parameter int SHIFT_W  = `M3V_SHIFT_W,
    parameter int OB_W     = `M3V_OB_W,
    parameter int MAX_DIM  = `M3V_MAX_DIM,
    parameter     LUT_FILE = "m3v_rsqrt_lut.mem",
    parameter int DW       = $clog2(MAX_DIM + 1),
    parameter int NB       = (MAX_DIM + P - 1) / P,
    parameter int BW       = (NB > 1) ? $clog2(NB) : 1,
    parameter int NS       = 4,                            // row slots, a power of two >= 2
    parameter int SLW      = $clog2(NS)
) (
    input  logic                 clk,
    input  logic                 rst_n,
    input  logic [DW-1:0]        dim,
    input  logic [60:0]          eps_int,
    input  logic [OB_W-1:0]      out_bits,
    input  logic                 tbl_we,
    input  logic [BW-1:0]        tbl_addr,
    input  logic [P*G_W-1:0]     tbl_gamma,
    input  logic [P*B_W-1:0]     tbl_beta,
    input  logic [P*SHIFT_W-1:0] tbl_shift,
    input  logic                 out_en,
    input  logic                 in_valid,
    output logic                 in_ready,
    input  logic [P*DATA_W-1:0]  x,
    output logic                 out_valid,
    input  logic                 out_ready,
    output logic [P*DATA_W-1:0]  y,
    output logic                 out_last
);
    localparam int R     = `M3V_RSQRT_R;
    localparam int NW    = `M3V_NORM_W;
    localparam int NF    = `M3V_NORM_F;
    localparam int XW    = (DATA_W < 16) ? DATA_W : 16;        // the contract's 16-bit input
    localparam int LV    = (P > 1) ? $clog2(P) : 0;
    localparam int S1W   = XW + DW;                            // |S1| <= D·2^(XW-1)
    localparam int S2W   = 2*XW - 1 + DW;                      // S2 <= D·2^(2XW-2)
    localparam int VW    = 2*DW + 2*XW - 1;                    // V <= D·S2
    localparam int UW    = 62;                                 // V + E < 2^62
    localparam int EW    = 5;                                  // rsqrt_unit's e for UW = 62
    localparam int DRW   = $clog2((MAX_DIM << R) + 1) + 1;     // D·r, r <= 2^R, signed
    localparam int S1RW  = S1W + R + 2;                        // S1·r
    localparam int XPW   = XW + DRW;                           // x·(D·r)
    localparam int SUBW  = ((XPW > S1RW) ? XPW : S1RW) + 1;
    localparam int PW    = XW + DW + R + 1;                    // d·r: |d| < 2^(XW+DW)
    localparam int SHW   = 7;                                  // R + e - F_n in [R - F_n, 30 + R - F_n]
    localparam int TW    = G_W + B_W + SHIFT_W;                // one channel's table entry
    localparam int OLAT  = 15;
    localparam int FD    = 1 << $clog2(OLAT + 3);
    localparam int FAW   = $clog2(FD);

    // ================================================================ input: row buffer, S1, S2
    logic          in_fire, ifirst, ilast;
    logic [SLW-1:0] wslot;
    logic [DW:0]   irem, irem_eff;
    logic [BW-1:0] ib;
    logic [NS-1:0] busy;
    assign in_ready = rst_n && !busy[wslot];
    assign in_fire  = in_valid && in_ready;
    assign irem_eff = ifirst ? {1'b0, dim} : irem;
    assign ilast    = irem_eff <= (DW+1)'(P);

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ifirst <= 1'b1;
            ib     <= '0;
            wslot  <= '0;
        end else if (in_fire) begin
            ifirst <= ilast;
            ib     <= ilast ? '0 : ib + 1'b1;
            wslot  <= wslot + SLW'(ilast);
        end
    end
    always_ff @(posedge clk) if (in_fire) irem <= irem_eff - (DW+1)'(P);

    logic [P*DATA_W-1:0] rowmem [0:(NS << BW)-1];
    always_ff @(posedge clk) if (in_fire) rowmem[{wslot, ib}] <= x;

    // a1: lanes beyond D become 0 (they add nothing to S1, S2); a2: squares
    logic [P*XW-1:0]   xm1, xm2;
    logic [P*2*XW-1:0] sq2;
    logic              av1, afirst1, alast1;
    logic [SLW-1:0]    aslot1;
    always_ff @(posedge clk) begin
        for (int l = 0; l < P; l++)
            xm1[l*XW +: XW] <= ((DW+1)'(l) < irem_eff) ? x[l*DATA_W +: XW] : '0;
        afirst1 <= ifirst;
        alast1  <= ilast;
        aslot1  <= wslot;
        for (int l = 0; l < P; l++)
            sq2[l*2*XW +: 2*XW] <= $signed(xm1[l*XW +: XW]) * $signed(xm1[l*XW +: XW]);
        xm2 <= xm1;
    end
    pipe_delay #(.WIDTH(1), .DEPTH(1), .RESET(1)) u_av1 (.clk(clk), .rst_n(rst_n), .d(in_fire), .q(av1));

    logic [XW+LV-1:0]   sum1;
    logic [2*XW+LV-1:0] sum2;
    adder_tree #(.N(P), .IN_W(XW))   u_sum1 (.clk(clk), .in_flat(xm2), .sum(sum1));
    adder_tree #(.N(P), .IN_W(2*XW)) u_sum2 (.clk(clk), .in_flat(sq2), .sum(sum2));

    // the beat's flags, from a1 to the sums' stage (2 + LV)
    logic avs, afs, als;
    logic [SLW-1:0] ass;
    pipe_delay #(.WIDTH(1), .DEPTH(1 + LV), .RESET(1)) u_avs (.clk(clk), .rst_n(rst_n), .d(av1), .q(avs));
    pipe_delay #(.WIDTH(2 + SLW), .DEPTH(1 + LV)) u_afs (
        .clk(clk), .rst_n(rst_n), .d({afirst1, alast1, aslot1}), .q({afs, als, ass})
    );

    // accumulate; the row's S1, S2 are complete in s1acc, s2acc when stv is high
    logic signed [S1W-1:0] s1acc;
    logic [S2W-1:0]        s2acc;
    logic                  stv;
    logic [SLW-1:0]        stslot;
    always_ff @(posedge clk) begin
        if (avs) begin
            s1acc <= afs ? S1W'($signed(sum1)) : s1acc + S1W'($signed(sum1));
            s2acc <= afs ? S2W'(sum2) : s2acc + S2W'(sum2);
        end
        stslot <= ass;
    end
    pipe_delay #(.WIDTH(1), .DEPTH(1), .RESET(1)) u_stv (.clk(clk), .rst_n(rst_n), .d(avs && als), .q(stv));

    // ================================================================ statistics, once per row
    // t1: D·S2, S1²  t2: (DSP output registers)  t3: V  t4: V + E  t5-t21: rsqrt  t22: D·r, S1·r, shift
    logic [DW+S2W-1:0] ds2_1, ds2_2;
    logic [2*S1W-1:0]  s1sq1, s1sq2;
    logic [VW-1:0]     v3;
    logic [UW-1:0]     u4;
    always_ff @(posedge clk) begin
        ds2_1 <= (DW+S2W)'(dim) * (DW+S2W)'(s2acc);
        s1sq1 <= $signed(s1acc) * $signed(s1acc);
        ds2_2 <= ds2_1;
        s1sq2 <= s1sq1;
        v3    <= VW'(ds2_2) - VW'(s1sq2);        // V >= 0 and < 2^VW: exact modulo 2^VW
        u4    <= UW'(v3) + UW'(eps_int);
    end
    logic unused_sq;
    assign unused_sq = &{1'b0, s1sq2[2*S1W-1:VW]};   // S1² < 2^VW: V = D·S2 - S1² >= 0
    logic tv4;
    pipe_delay #(.WIDTH(1), .DEPTH(4), .RESET(1)) u_tv4 (.clk(clk), .rst_n(rst_n), .d(stv), .q(tv4));

    localparam int RSQ_LAT = 17;                               // rsqrt_unit
    logic          rv;
    logic [R:0]    rs_r;
    logic [EW-1:0] rs_e;
    rsqrt_unit #(.UW(UW), .LUT_FILE(LUT_FILE)) u_rsqrt (
        .clk(clk), .rst_n(rst_n), .in_valid(tv4), .u(u4), .out_valid(rv), .r(rs_r), .e(rs_e)
    );

    logic signed [S1W-1:0] rs_s1;
    logic [SLW-1:0]        rs_slot;
    pipe_delay #(.WIDTH(S1W + SLW), .DEPTH(4 + RSQ_LAT)) u_s1d (
        .clk(clk), .rst_n(rst_n), .d({s1acc, stslot}), .q({rs_s1, rs_slot})
    );

    logic [DRW-1:0]         new_dr;
    logic signed [S1RW-1:0] new_s1r;
    logic [SHW-1:0]         new_sh;
    logic [SLW-1:0]         new_slot;
    logic                   new_v;
    always_ff @(posedge clk) begin
        new_dr   <= DRW'(dim) * DRW'(rs_r);
        new_s1r  <= rs_s1 * $signed({1'b0, rs_r});
        new_sh   <= SHW'(rs_e) + SHW'(R - NF);
        new_slot <= rs_slot;
    end
    pipe_delay #(.WIDTH(1), .DEPTH(1), .RESET(1)) u_newv (.clk(clk), .rst_n(rst_n), .d(rv), .q(new_v));

    // per-slot row statistics
    logic [DRW-1:0]         st_dr  [0:NS-1];
    logic signed [S1RW-1:0] st_s1r [0:NS-1];
    logic [SHW-1:0]         st_sh  [0:NS-1];
    logic [NS-1:0]          sready;
    always_ff @(posedge clk) begin
        if (new_v) begin
            st_dr[new_slot]  <= new_dr;
            st_s1r[new_slot] <= new_s1r;
            st_sh[new_slot]  <= new_sh;
        end
    end

    // ================================================================ output sequencer and credits
    logic          issue, ofirst, olast, push;
    logic [SLW-1:0] rslot;
    logic [DW:0]   orem, orem_eff;
    logic [BW-1:0] ob;
    logic [FAW:0]  fifo_count, inflight;
    logic [FAW+1:0] used;
    assign used     = {1'b0, fifo_count} + {1'b0, inflight};
    assign issue    = rst_n && out_en && sready[rslot] && (used < (FAW+2)'(FD));
    assign orem_eff = ofirst ? {1'b0, dim} : orem;
    assign olast    = orem_eff <= (DW+1)'(P);

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            ofirst   <= 1'b1;
            ob       <= '0;
            rslot    <= '0;
            busy     <= '0;
            sready   <= '0;
            inflight <= '0;
        end else begin
            if (issue) begin
                ofirst <= olast;
                ob     <= olast ? '0 : ob + 1'b1;
                rslot  <= rslot + SLW'(olast);
            end
            for (int s = 0; s < NS; s++) begin
                if (in_fire && ilast && wslot == SLW'(s))      busy[s] <= 1'b1;
                else if (issue && olast && rslot == SLW'(s))   busy[s] <= 1'b0;
                if (new_v && new_slot == SLW'(s))              sready[s] <= 1'b1;
                else if (issue && olast && rslot == SLW'(s))   sready[s] <= 1'b0;
            end
            inflight <= inflight + (FAW+1)'(issue) - (FAW+1)'(push);
        end
    end
    always_ff @(posedge clk) if (issue) orem <= orem_eff - (DW+1)'(P);

    // o1: the beat, its lane mask and the row's statistics
    logic [P*DATA_W-1:0]    xq1;
    logic [DRW-1:0]         dr1;
    logic signed [S1RW-1:0] s1r1, s1r2;
    logic [SHW-1:0]         sh1, sh2, sh3;
    logic [P-1:0]           omask;
    always_ff @(posedge clk) begin
        xq1  <= rowmem[{rslot, ob}];
        dr1  <= st_dr[rslot];
        s1r1 <= st_s1r[rslot];
        sh1  <= st_sh[rslot];
        s1r2 <= s1r1;
        sh2  <= sh1;
        sh3  <= sh2;
    end
    always_comb for (int l = 0; l < P; l++) omask[l] = (DW+1)'(l) < orem_eff;

    logic             v15, last15;
    logic [P-1:0]     mask15;
    pipe_delay #(.WIDTH(1), .DEPTH(OLAT), .RESET(1)) u_ov (.clk(clk), .rst_n(rst_n), .d(issue), .q(v15));
    pipe_delay #(.WIDTH(P + 1), .DEPTH(OLAT)) u_om (
        .clk(clk), .rst_n(rst_n), .d({omask, olast}), .q({mask15, last15})
    );

    // the table: written through tbl_*, read at stage 8 (address = the beat index, 7 cycles late)
    logic [P*TW-1:0] tbl [0:(1 << BW)-1];
    logic [P*TW-1:0] tbl_w, tq8;
    logic [BW-1:0]   taddr7;
    always_comb for (int l = 0; l < P; l++)
        tbl_w[l*TW +: TW] = {tbl_gamma[l*G_W +: G_W], tbl_beta[l*B_W +: B_W], tbl_shift[l*SHIFT_W +: SHIFT_W]};
    always_ff @(posedge clk) if (tbl_we) tbl[tbl_addr] <= tbl_w;
    pipe_delay #(.WIDTH(BW), .DEPTH(7)) u_ta (.clk(clk), .rst_n(rst_n), .d(ob), .q(taddr7));
    always_ff @(posedge clk) tq8 <= tbl[taddr7];

    logic [P*DATA_W-1:0] z15;
    genvar l;
    generate
        for (l = 0; l < P; l++) begin : g_lane
            logic signed [XW-1:0]    xl1;
            logic signed [XPW-1:0]   prod2;
            logic signed [SUBW-1:0]  dsub;
            logic signed [PW-1:0]    dr3;
            logic [NW-1:0]           n8;
            assign xl1  = xq1[l*DATA_W +: XW];
            assign dsub = SUBW'(prod2) - SUBW'(s1r2);
            always_ff @(posedge clk) begin
                prod2 <= xl1 * $signed(dr1);
                dr3   <= PW'(dsub);                 // d·r fits PW bits
            end

            requant #(.IN_W(PW), .OUT_W(NW), .SHIFT_W(SHW), .OB_W(5), .MAX_LSHIFT(0)) u_norm (
                .clk(clk), .x(dr3), .shift(sh3), .out_bits(5'd0), .y(n8)
            );

            logic signed [G_W-1:0]     g8;
            logic signed [B_W-1:0]     b8, b9;
            logic [SHIFT_W-1:0]        os8, os9, os10;
            logic signed [NW+G_W-1:0]  gn9;
            logic signed [B_W-1:0]     acc10;
            assign {g8, b8, os8} = tq8[l*TW +: TW];
            always_ff @(posedge clk) begin
                gn9   <= $signed(n8) * g8;
                b9    <= b8;
                os9   <= os8;
                acc10 <= B_W'(gn9) + b9;            // |n·γ + β'| < 2^47, checked by the contract
                os10  <= os9;
            end

            requant #(.IN_W(B_W), .OUT_W(DATA_W), .SHIFT_W(SHIFT_W), .OB_W(OB_W), .MAX_LSHIFT(DATA_W)) u_out (
                .clk(clk), .x(acc10), .shift(os10), .out_bits(out_bits), .y(z15[l*DATA_W +: DATA_W])
            );

            logic unused_lane;
            assign unused_lane = &{1'b0, dsub[SUBW-1:PW]};
            if (DATA_W > XW) begin : g_wide
                logic unused_hi;
                assign unused_hi = &{1'b0, xq1[l*DATA_W + XW +: DATA_W - XW]};
            end
        end
    endgenerate

    // ================================================================ output FIFO
    logic [P*DATA_W-1:0] zm15;
    always_comb for (int j = 0; j < P; j++) zm15[j*DATA_W +: DATA_W] = mask15[j] ? z15[j*DATA_W +: DATA_W] : '0;
    assign push = v15;

    stream_fifo #(.WIDTH(1 + P*DATA_W), .DEPTH(FD)) u_fifo (
        .clk(clk), .rst_n(rst_n),
        .push(push), .push_data({last15, zm15}),
        .out_valid(out_valid), .out_ready(out_ready), .out_data({out_last, y}),
        .count(fifo_count)
    );
endmodule
