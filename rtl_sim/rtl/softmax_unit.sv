// softmax_unit: the A·V pass of the contract's fused, order-independent attention softmax
// (numerics.md §8; numerics.attention, softmax_av_partial + softmax_av_finish), bit-exact.
//
// Per query row i, over its keys j (in ANY order) and the P value lanes c:
//   p_j  = exp_int(m − s_j, score_frac)                   exp_unit.sv, one per key
//   S    = Σ_j p_j          A_c = Σ_j p_j·v_jc             exact sums (order-independent)
//   (r, k) = recip_int(S)                                  recip_unit.sv, once per row
//   o_c  = requant(A_c·r, R + k + out_shift, Fmt(out_bits))
// m is the row maximum over all keys, taken during QKᵀ by whoever produces the scores: it is an
// input of the row here (the unit does not see the scores twice).
//
// Ports. in_*: a valid/ready stream of keys, one key per beat; rows follow one another (a row's
// beats are contiguous; rows of different queries are not interleaved).
//   in_score      the key's score s_j, signed SCORE_W bits (score_fmt integer, sign-extended)
//   in_v          the key's value row, P signed DATA_W-bit lanes, v[c] at [c*DATA_W +: DATA_W]
//   The following are sampled on the row's first beat only (ignored on the others):
//   in_max        m, signed SCORE_W bits; it must be ≥ every score of the row (the contract's m
//                 is their maximum, which makes S ≥ 2^P)
//   in_keys       number of keys of the row, 1..MAX_KEYS (0 counts as 1); the unit counts beats
//   in_score_frac f_s, signed FRAC_W bits, every value exact
//   in_out_shift  f_v − f_o, signed SHIFT_W bits
//   in_out_bits   output width 1..DATA_W (0 or more than DATA_W means DATA_W)
//   in_dh         head dimension: lanes c ≥ dh give 0 (0 or more than P means P). A head wider
//                 than P is processed as column passes of P lanes over the same scores.
// out_*: one beat per row, in row order: out_y, P signed DATA_W-bit results sign-extended.
//
// Pipeline (free running: in_ready is a credit check against the output FIFO, so backpressure
// never reaches the datapath). Stage numbers count from the accepting clock edge:
//   1      input registers; row parameters from the inputs (first beat) or the held row
//   2-11   exp_unit on t = m − s (LATENCY 10)
//   12     p·v per lane (DSP M); 13 accumulate A and S (the DSP P register, cleared by the first
//          beat of a row); 14 capture the finished row
//   15-30  recip_unit on S (LATENCY 16); A waits in a delay line
//   31-32  A·r per lane as two DSP products (low 26 bits unsigned, high part signed); 33 sum
//   34-38  requant.sv (round half up, saturate to out_bits); 38 the output FIFO push
// A row's result is in the FIFO ROW_LAT = 38 cycles after its last beat was accepted. Keys
// stream at one per cycle; the FIFO (FIFO_DEPTH rows) sustains that for rows of at least
// ceil(ROW_LAT / FIFO_DEPTH) keys, shorter rows wait for credits.
// Widths (MAX_KEYS = 4096, 16-bit v): p 17 unsigned, p·v 33, A 44 signed, S 29 unsigned,
// A·r 61 signed, total shift 9 signed (its range is −48..107).
`include "m3v_hw_config.svh"

module softmax_unit #(
    parameter int P          = `M3V_SM_P,
    parameter int DATA_W     = `M3V_ACT_W,
    parameter int SCORE_W    = `M3V_SCORE_W,
    parameter int FRAC_W     = 7,
    parameter int SHIFT_W    = `M3V_SHIFT_W,
    parameter int OB_W       = `M3V_OB_W,
    parameter int MAX_KEYS   = `M3V_MAX_KEYS,
    parameter int FIFO_DEPTH = 16,
    parameter int KEY_W      = $clog2(MAX_KEYS + 1),
    parameter int DH_W       = $clog2(P + 1)
) (
    input  logic                    clk,
    input  logic                    rst_n,
    input  logic                    in_valid,
    output logic                    in_ready,
    input  logic [SCORE_W-1:0]      in_score,
    input  logic [P*DATA_W-1:0]     in_v,
    input  logic [SCORE_W-1:0]      in_max,
    input  logic [KEY_W-1:0]        in_keys,
    input  logic [FRAC_W-1:0]       in_score_frac,
    input  logic [SHIFT_W-1:0]      in_out_shift,
    input  logic [OB_W-1:0]         in_out_bits,
    input  logic [DH_W-1:0]         in_dh,
    output logic                    out_valid,
    input  logic                    out_ready,
    output logic [P*DATA_W-1:0]     out_y
);
    localparam int PF      = `M3V_EXP_P;
    localparam int R       = `M3V_RECIP_R;
    localparam int X_LAT   = 10;                         // exp_unit
    localparam int R_LAT   = 16;                         // recip_unit
    localparam int RQ_LAT  = 5;                          // requant
    localparam int ROW_LAT = 14 + R_LAT + 3 + RQ_LAT;    // 38
    localparam int KLOG    = $clog2(MAX_KEYS);
    localparam int E_W     = PF + 1;                     // p
    localparam int PV_W    = E_W + DATA_W;               // p·v
    localparam int A_W     = PF + DATA_W + KLOG;         // A, |A| ≤ MAX_KEYS·2^P·2^(DATA_W−1)
    localparam int S_W     = PF + 1 + KLOG;              // S ≤ MAX_KEYS·2^P
    localparam int Z_W     = $clog2(S_W);                // k
    localparam int BL      = 26;                         // A = AH·2^BL + AL, AL unsigned
    localparam int AH_W    = A_W - BL;
    localparam int Y_W     = A_W + R + 1;                // A·r
    localparam int SH_W    = 9;                          // R + k + out_shift
    localparam int FAW     = $clog2(FIFO_DEPTH);

    // ---------------------------------------------------------------- handshake and credits
    logic fire, push;
    logic [FAW:0]   fifo_count, inflight;
    logic [FAW+1:0] used;
    assign used     = {1'b0, fifo_count} + {1'b0, inflight};
    assign in_ready = rst_n && (used < (FAW+2)'(FIFO_DEPTH));
    assign fire     = in_valid && in_ready;

    // ---------------------------------------------------------------- rows
    logic [KEY_W-1:0]   cnt, row_keys, keys_cur;
    logic [SCORE_W-1:0] row_max;
    logic [FRAC_W-1:0]  row_frac;
    logic [SHIFT_W-1:0] row_osh;
    logic [OB_W-1:0]    row_ob;
    logic [DH_W-1:0]    row_dh, dh_cur, dh_eff;
    logic first_in, last_in;
    assign first_in = (cnt == '0);
    assign keys_cur = first_in ? in_keys : row_keys;
    assign dh_cur   = first_in ? in_dh : row_dh;
    assign dh_eff   = (dh_cur == '0 || dh_cur > DH_W'(P)) ? DH_W'(P) : dh_cur;
    assign last_in  = ({1'b0, cnt} + (KEY_W+1)'(1)) >= {1'b0, keys_cur};

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            cnt      <= '0;
            inflight <= '0;
        end else begin
            if (fire) cnt <= last_in ? '0 : cnt + KEY_W'(1);
            inflight <= inflight + {{FAW{1'b0}}, fire && last_in} - {{FAW{1'b0}}, push};
        end
    end
    always_ff @(posedge clk) begin
        if (fire && first_in) begin
            row_max  <= in_max;
            row_keys <= in_keys;
            row_frac <= in_score_frac;
            row_osh  <= in_out_shift;
            row_ob   <= in_out_bits;
            row_dh   <= in_dh;
        end
    end

    // ---------------------------------------------------------------- 1: input registers
    logic                      val1;
    logic                      first1, last1;
    logic signed [SCORE_W-1:0] s1, m1;
    logic [FRAC_W-1:0]         f1;
    logic [SHIFT_W-1:0]        osh1;
    logic [OB_W-1:0]           ob1;
    logic [P*DATA_W-1:0]       v1;
    always_ff @(posedge clk) begin
        if (!rst_n) val1 <= 1'b0;
        else        val1 <= fire;
    end
    always_ff @(posedge clk) begin
        first1 <= first_in;
        last1  <= last_in;
        s1     <= in_score;
        m1     <= first_in ? in_max : row_max;
        f1     <= first_in ? in_score_frac : row_frac;
        osh1   <= first_in ? in_out_shift : row_osh;
        ob1    <= first_in ? in_out_bits : row_ob;
        for (int l = 0; l < P; l++)
            v1[l*DATA_W +: DATA_W] <= (DH_W'(l) < dh_eff) ? in_v[l*DATA_W +: DATA_W] : '0;
    end

    // ---------------------------------------------------------------- 2-11: p = exp_int(m − s)
    logic [SCORE_W:0]   t_w;
    logic [E_W-1:0]     p11;
    assign t_w = {m1[SCORE_W-1], m1} - {s1[SCORE_W-1], s1};   // ≥ 0 and < 2^SCORE_W
    exp_unit #(.T_W(SCORE_W), .FRAC_W(FRAC_W)) u_exp (
        .clk(clk), .t(t_w[SCORE_W-1:0]), .frac(f1), .p(p11)
    );
    logic unused_ok;
    assign unused_ok = &{1'b0, t_w[SCORE_W]};

    // Control of a beat at stages 12 and 13: {valid, first, last}; the row formats ride along.
    logic [2:0] ctl12;
    logic [1:0] ctl13;   // {valid, last}
    pipe_delay #(.WIDTH(1), .DEPTH(11), .RESET(1)) u_val12 (
        .clk(clk), .rst_n(rst_n), .d(val1), .q(ctl12[2])
    );
    pipe_delay #(.WIDTH(2), .DEPTH(11)) u_fl12 (
        .clk(clk), .rst_n(rst_n), .d({first1, last1}), .q(ctl12[1:0])
    );
    always_ff @(posedge clk) begin
        if (!rst_n) ctl13[1] <= 1'b0;
        else        ctl13[1] <= ctl12[2];
        ctl13[0] <= ctl12[0];
    end
    logic [SHIFT_W+OB_W-1:0] fmt13;
    pipe_delay #(.WIDTH(SHIFT_W + OB_W), .DEPTH(12)) u_fmt13 (
        .clk(clk), .rst_n(rst_n), .d({osh1, ob1}), .q(fmt13)
    );

    // ---------------------------------------------------------------- 12-14: sums per row
    logic [P*DATA_W-1:0] v11;
    pipe_delay #(.WIDTH(P * DATA_W), .DEPTH(X_LAT)) u_v11 (
        .clk(clk), .rst_n(rst_n), .d(v1), .q(v11)
    );

    logic [E_W-1:0] p12;
    logic [S_W-1:0] ssum13, s14;
    logic           row14;
    logic [SHIFT_W+OB_W-1:0] fmt14;
    always_ff @(posedge clk) begin
        p12 <= p11;
        if (ctl12[2]) ssum13 <= (ctl12[1] ? '0 : ssum13) + S_W'(p12);
        if (!rst_n) row14 <= 1'b0;
        else        row14 <= ctl13[1] && ctl13[0];
        if (ctl13[1] && ctl13[0]) begin
            s14   <= ssum13;
            fmt14 <= fmt13;
        end
    end

    logic [P*A_W-1:0] a14;
    genvar c;
    generate
        for (c = 0; c < P; c++) begin : g_acc
            logic signed [PV_W-1:0] pv12;
            logic signed [A_W-1:0]  acc13;
            always_ff @(posedge clk) begin
                pv12 <= $signed({1'b0, p11}) * $signed(v11[c*DATA_W +: DATA_W]);
                if (ctl12[2]) acc13 <= (ctl12[1] ? '0 : acc13) + A_W'(pv12);
                if (ctl13[1] && ctl13[0]) a14[c*A_W +: A_W] <= acc13;
            end
        end
    endgenerate

    // ---------------------------------------------------------------- 15-30: (r, k) = recip_int(S)
    logic [R:0]     r30;
    logic [Z_W-1:0] k30;
    recip_unit #(.S_W(S_W)) u_recip (.clk(clk), .s(s14), .r(r30), .k(k30));

    logic [P*A_W-1:0] a30;
    pipe_delay #(.WIDTH(P * A_W), .DEPTH(R_LAT)) u_a30 (
        .clk(clk), .rst_n(rst_n), .d(a14), .q(a30)
    );
    logic [SHIFT_W+OB_W-1:0] fmt30;
    pipe_delay #(.WIDTH(SHIFT_W + OB_W), .DEPTH(R_LAT)) u_fmt30 (
        .clk(clk), .rst_n(rst_n), .d(fmt14), .q(fmt30)
    );

    // 31: total shift R + k + out_shift; it meets the sum at stage 33
    logic signed [SH_W-1:0] sh31, sh33;
    logic [OB_W-1:0]        ob31, ob33;
    always_ff @(posedge clk) begin
        sh31 <= SH_W'(R) + SH_W'(k30) + SH_W'($signed(fmt30[OB_W +: SHIFT_W]));
        ob31 <= fmt30[OB_W-1:0];
    end
    pipe_delay #(.WIDTH(SH_W + OB_W), .DEPTH(2)) u_sh33 (
        .clk(clk), .rst_n(rst_n), .d({sh31, ob31}), .q({sh33, ob33})
    );

    // ---------------------------------------------------------------- 31-38: o = requant(A·r)
    logic [P*DATA_W-1:0] y38;
    generate
        for (c = 0; c < P; c++) begin : g_out
            logic signed [A_W-1:0] a;
            assign a = a30[c*A_W +: A_W];
            logic signed [BL+R+1:0]   pl31, pl32;   // AL (BL bits) · r (R + 1 bits), unsigned
            logic signed [AH_W+R:0]   ph31, ph32;
            logic signed [Y_W-1:0]    y33;
            always_ff @(posedge clk) begin
                pl31 <= $signed({1'b0, a[BL-1:0]}) * $signed({1'b0, r30});
                ph31 <= $signed(a[A_W-1:BL]) * $signed({1'b0, r30});
                pl32 <= pl31;
                ph32 <= ph31;
                y33  <= (Y_W'(ph32) <<< BL) + Y_W'(pl32);
            end
            requant #(.IN_W(Y_W), .OUT_W(DATA_W), .SHIFT_W(SH_W), .OB_W(OB_W), .MAX_LSHIFT(DATA_W)) u_rq (
                .clk(clk), .x(y33), .shift(sh33), .out_bits(ob33), .y(y38[c*DATA_W +: DATA_W])
            );
        end
    endgenerate

    // ---------------------------------------------------------------- 38: output FIFO
    pipe_delay #(.WIDTH(1), .DEPTH(ROW_LAT - 14), .RESET(1)) u_push (
        .clk(clk), .rst_n(rst_n), .d(row14), .q(push)
    );
    stream_fifo #(.WIDTH(P * DATA_W), .DEPTH(FIFO_DEPTH)) u_out (
        .clk(clk), .rst_n(rst_n), .push(push), .push_data(y38),
        .out_valid(out_valid), .out_ready(out_ready), .out_data(out_y), .count(fifo_count)
    );
endmodule
