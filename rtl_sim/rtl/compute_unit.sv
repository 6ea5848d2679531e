// compute_unit: the unified GEMM / MoE-combine engine of the m3vit datapath.
//
// WHAT IT COMPUTES (integers, two's complement; see docs/hw_config.md and compiler/numerics.py)
//   GEMM    acc[t][o] = bias[o] + sum_i x[t][i] * w[i][o]                  (ACC_W-bit accumulator)
//   combine acc[t][o] = bias[o] + sum_e rshift_round(score[t][e] * y_e[t][o], comb_shift)
//   both    out[t][o] = epilogue(saturate(rshift_round(acc[t][o], shift[o]), out_bits))
// The MoE combine of the contract is bias = 0, shift = 0. The epilogue is a bypass or the fused
// GELU of the contract (gemm_gelu: requantise to the GELU input format, then GELU; epilogue.sv). Every format choice is a runtime input: shift per
// output channel, out_bits (<= ACT_W), comb_shift, the mode, and the sizes (K = beats x P_IN,
// outputs = tiles x P_OUT, tokens = rows); one build serves every model.
//
// STREAMS (valid/ready; a transfer happens on a rising edge with valid && ready; the sender holds
// its fields stable while valid is high and not yet accepted; gaps and backpressure are allowed)
//
//   w_*  parameter tile: loads the shadow tile register (one tile waits while another is in use)
//     w_weights     P_IN x P_OUT signed W_W-bit weights, w[i][o] at [(i*P_OUT + o)*W_W +: W_W]
//     w_bias        P_OUT signed ACC_W-bit biases in the accumulator format, [o*ACC_W +: ACC_W]
//     w_shift       P_OUT signed SHIFT_W-bit requantisation shifts, [o*SHIFT_W +: SHIFT_W]
//     w_out_bits    output width (1..ACT_W; 0 means ACT_W)
//     w_comb_shift  combine-term shift (unsigned)
//     w_combine     0 = GEMM beats, 1 = combine beats
//     w_gelu        epilogue select (0 = bypass, 1 = GELU)
//     w_raw         raw rows: a row's result is its exact ACC_W-bit accumulator on the o_raw_*
//                   stream (no requantisation, no epilogue; shift, out_bits and GELU unused)
//     w_gelu_in_frac, w_gelu_out_frac, w_gelu_out_bits
//                   GELU formats: input fraction (that of the requantised value, signed
//                   FRAC_W bits), output fraction (signed) and width (0 means ACT_W)
//
//   x_*  beats: one row chunk of one token
//     x_wnext   make the waiting shadow tile active before this beat (the beat waits for it)
//     x_act     GEMM: P_IN signed X_W-bit operands x[t][k*P_IN + i], [i*X_W +: X_W]; an
//               activation (ACT_W bits) sign-extended, or an attention probability (exp_frac + 1
//               bits unsigned): X_W = max(ACT_W, exp_frac + 2) still fits the DSP48E2's 27-bit port
//     x_eout    combine: P_OUT signed ACT_W-bit expert outputs y_e[t][o], [o*ACT_W +: ACT_W]
//     x_score   combine: unsigned SCORE_W-bit gate score of (token, expert)
//     x_slot    accumulator slot (0..SLOTS-1) holding this token's partial sums
//     x_first   start the slot's sum from the bias (first K chunk / first expert)
//     x_last    the row is complete: requantise the slot and emit one output
//     x_tag     token index, passed through to the output of the row's last beat
//   A row is first..last on one slot; rows on different slots may interleave freely, which is how
//   one weight tile is reused by up to SLOTS tokens (weight bandwidth / SLOTS). The active tile's
//   bias is used by first beats, its shift/out_bits/gelu by last beats, comb_shift/combine by all.
//
//   o_*  results of the requantised rows, in the order of their last beats
//     o_data    P_OUT signed ACT_W-bit values (out_bits wide, sign-extended), [o*ACT_W +: ACT_W]
//     o_tag     the token index of the row
//   o_raw_*  results of the raw rows (tiles with w_raw), in the order of their last beats
//     o_raw_acc P_OUT signed ACC_W-bit accumulators, [o*ACC_W +: ACC_W]
//     o_raw_tag the token index of the row
//   The two streams are independent; each row goes to exactly one of them.
//
// PIPELINE (no stall anywhere: the output FIFOs have room for every row in flight, so x_ready is
// a credit check on both and backpressure never reaches the DSP pipeline)
//   S1  A/B registers: beat fields, active tile (the DSP48E2 A/B registers)
//   S2  products (M register); GEMM: one adder tree level per cycle; combine: score x value,
//       then rshift_round (requant.sv, unsaturated); both padded to the same stage
//   SA  accumulate into the slot (the P register, bias-initialised), result registered on last
//   +5  requant (round + saturate, per-channel runtime shift), +19 epilogue (GELU), then the FIFO
//   A raw row skips requant and epilogue: its accumulator enters the raw FIFO right after SA.
//
// The parameter defaults come from m3v_hw_config.svh, generated from hw.json by rtl_sim/emit.py.
`include "m3v_hw_config.svh"

module compute_unit #(
    parameter int P_IN    = `M3V_P_IN,
    parameter int P_OUT   = `M3V_P_OUT,
    parameter int ACT_W   = `M3V_ACT_W,
    parameter int X_W     = `M3V_X_W,
    parameter int W_W     = `M3V_W_W,
    parameter int ACC_W   = `M3V_ACC_W,
    parameter int SCORE_W = `M3V_SCORE_W,
    parameter int SHIFT_W = `M3V_SHIFT_W,
    parameter int CSH_W   = `M3V_CSH_W,
    parameter int OB_W    = `M3V_OB_W,
    parameter int SLOTS   = `M3V_SLOTS,
    parameter int TAG_W   = `M3V_TAG_W,
    parameter int FRAC_W  = 7,
    parameter int SLOT_W  = $clog2(SLOTS)
) (
    input  logic                      clk,
    input  logic                      rst_n,

    input  logic                      w_valid,
    output logic                      w_ready,
    input  logic [P_IN*P_OUT*W_W-1:0] w_weights,
    input  logic [P_OUT*ACC_W-1:0]    w_bias,
    input  logic [P_OUT*SHIFT_W-1:0]  w_shift,
    input  logic [OB_W-1:0]           w_out_bits,
    input  logic [CSH_W-1:0]          w_comb_shift,
    input  logic                      w_combine,
    input  logic                      w_gelu,
    input  logic [FRAC_W-1:0]         w_gelu_in_frac,
    input  logic [FRAC_W-1:0]         w_gelu_out_frac,
    input  logic [OB_W-1:0]           w_gelu_out_bits,
    input  logic                      w_raw,

    input  logic                      x_valid,
    output logic                      x_ready,
    input  logic                      x_wnext,
    input  logic [P_IN*X_W-1:0]       x_act,
    input  logic [P_OUT*ACT_W-1:0]    x_eout,
    input  logic [SCORE_W-1:0]        x_score,
    input  logic [SLOT_W-1:0]         x_slot,
    input  logic                      x_first,
    input  logic                      x_last,
    input  logic [TAG_W-1:0]          x_tag,

    output logic                      o_valid,
    input  logic                      o_ready,
    output logic [P_OUT*ACT_W-1:0]    o_data,
    output logic [TAG_W-1:0]          o_tag,

    output logic                      o_raw_valid,
    input  logic                      o_raw_ready,
    output logic [P_OUT*ACC_W-1:0]    o_raw_acc,
    output logic [TAG_W-1:0]          o_raw_tag
);
    localparam int LEVELS   = (P_IN > 1) ? $clog2(P_IN) : 0;
    localparam int SUM_W    = X_W + W_W + LEVELS;          // exact GEMM chunk sum
    localparam int PW       = SCORE_W + 1 + ACT_W;         // exact score x value product
    localparam int RQ_LAT   = 5;                           // requant.sv pipeline depth
    localparam int EPI_LAT  = 19;                          // epilogue.sv (the GELU pipeline)
    localparam int GF_W     = 2*FRAC_W + OB_W;             // GELU formats {in_frac, out_frac, out_bits}
    localparam int T_LAT    = 1 + LEVELS;                  // S1 -> chunk sum
    localparam int C_LAT    = 1 + RQ_LAT;                  // S1 -> combine term
    localparam int A_LAT    = (T_LAT > C_LAT) ? T_LAT : C_LAT;   // S1 -> accumulate stage SA
    localparam int ROW_LAT  = 2 + A_LAT + RQ_LAT + EPI_LAT;      // accept edge -> FIFO push
    localparam int FIFO_DEPTH = 1 << $clog2(ROW_LAT + 3);
    localparam int FAW      = $clog2(FIFO_DEPTH);

    // ---------------------------------------------------------------- handshakes and credits
    logic x_fire, w_fire, swap, shadow_full, credit_ok, push, raw_push;
    logic [FAW:0] fifo_count, raw_count, inflight;
    logic [FAW+1:0] used;

    // one credit pool for both FIFOs: every row in flight has room in whichever it enters
    assign used      = {1'b0, fifo_count} + {1'b0, raw_count} + {1'b0, inflight};
    assign credit_ok = used < {2'b01, {FAW{1'b0}}};   // used < FIFO_DEPTH = 2^FAW
    assign x_ready   = rst_n && credit_ok && (!x_wnext || shadow_full);
    assign x_fire    = x_valid && x_ready;
    assign swap      = x_fire && x_wnext;
    assign w_ready   = rst_n && (!shadow_full || swap);
    assign w_fire    = w_valid && w_ready;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            shadow_full <= 1'b0;
            inflight    <= '0;
        end else begin
            shadow_full <= w_fire || (shadow_full && !swap);
            inflight    <= inflight + {{FAW{1'b0}}, x_fire && x_last} - {{FAW{1'b0}}, push}
                                      - {{FAW{1'b0}}, raw_push};
        end
    end

    // ---------------------------------------------------------------- parameter tiles
    logic [P_IN*P_OUT*W_W-1:0] sh_weights, ac_weights;
    logic [P_OUT*ACC_W-1:0]    sh_bias, ac_bias;
    logic [P_OUT*SHIFT_W-1:0]  sh_shift, ac_shift;
    logic [OB_W-1:0]           sh_out_bits, ac_out_bits;
    logic [CSH_W-1:0]          sh_comb_shift, ac_comb_shift;
    logic                      sh_combine, ac_combine, sh_gelu, ac_gelu, sh_raw, ac_raw;
    logic [GF_W-1:0]           sh_gfmt, ac_gfmt;

    always_ff @(posedge clk) begin
        if (w_fire) begin
            sh_weights    <= w_weights;
            sh_bias       <= w_bias;
            sh_shift      <= w_shift;
            sh_out_bits   <= w_out_bits;
            sh_comb_shift <= w_comb_shift;
            sh_combine    <= w_combine;
            sh_gelu       <= w_gelu;
            sh_raw        <= w_raw;
            sh_gfmt       <= {w_gelu_in_frac, w_gelu_out_frac, w_gelu_out_bits};
        end
        // The swap shares the edge that registers the beat, so at S1 the active tile is the beat's.
        if (swap) begin
            ac_weights    <= sh_weights;
            ac_bias       <= sh_bias;
            ac_shift      <= sh_shift;
            ac_out_bits   <= sh_out_bits;
            ac_comb_shift <= sh_comb_shift;
            ac_combine    <= sh_combine;
            ac_gelu       <= sh_gelu;
            ac_raw        <= sh_raw;
            ac_gfmt       <= sh_gfmt;
        end
    end

    // ---------------------------------------------------------------- S1: beat registers
    logic                    v1, first1, last1;
    logic [SLOT_W-1:0]       slot1;
    logic [TAG_W-1:0]        tag1;
    logic [P_IN*X_W-1:0]     act1;
    logic [P_OUT*ACT_W-1:0]  eout1;
    logic [SCORE_W-1:0]      score1;

    always_ff @(posedge clk) begin
        if (!rst_n) v1 <= 1'b0;
        else        v1 <= x_fire;
        first1 <= x_first;
        last1  <= x_last;
        slot1  <= x_slot;
        tag1   <= x_tag;
        act1   <= x_act;
        eout1  <= x_eout;
        score1 <= x_score;
    end

    // ---------------------------------------------------------------- GEMM: chunk sums
    logic [P_OUT*SUM_W-1:0] tree_sum, tree_a;

    mac_array #(
        .P_IN(P_IN), .P_OUT(P_OUT), .ACT_W(X_W), .W_W(W_W), .LEVELS(LEVELS), .SUM_W(SUM_W)
    ) u_mac (
        .clk(clk), .a(act1), .w(ac_weights), .sum(tree_sum)
    );

    pipe_delay #(.WIDTH(P_OUT*SUM_W), .DEPTH(A_LAT - T_LAT)) u_tree_pad (
        .clk(clk), .rst_n(rst_n), .d(tree_sum), .q(tree_a)
    );

    // ---------------------------------------------------------------- combine: rounded terms
    logic [CSH_W-1:0]    csh2;
    logic [P_OUT*PW-1:0] term, term_a;

    always_ff @(posedge clk) csh2 <= ac_comb_shift;

    genvar o;
    generate
        for (o = 0; o < P_OUT; o = o + 1) begin : g_comb
            logic signed [SCORE_W:0]  sc;
            logic signed [ACT_W-1:0]  ev;
            logic signed [PW-1:0]     cm_q;
            assign sc = {1'b0, score1};
            assign ev = eout1[o*ACT_W +: ACT_W];
            always_ff @(posedge clk) cm_q <= sc * ev;   // the M register of one DSP48E2
            requant #(
                .IN_W(PW), .OUT_W(PW), .SHIFT_W(CSH_W + 1), .OB_W(1), .MAX_LSHIFT(0), .SATURATE(0)
            ) u_round (
                .clk(clk), .x(cm_q), .shift({1'b0, csh2}), .out_bits(1'b0), .y(term[o*PW +: PW])
            );
        end
    endgenerate

    pipe_delay #(.WIDTH(P_OUT*PW), .DEPTH(A_LAT - C_LAT)) u_term_pad (
        .clk(clk), .rst_n(rst_n), .d(term), .q(term_a)
    );

    // ---------------------------------------------------------------- beat side-band to SA, SA+1
    localparam int CTRL_W = 4 + SLOT_W;
    localparam int ROW_W  = TAG_W + P_OUT*SHIFT_W + OB_W + 1 + GF_W;
    logic                     v_a, first_a, last_a, combine_a, raw_a;
    logic [SLOT_W-1:0]        slot_a;
    logic [P_OUT*ACC_W-1:0]   bias_a;
    logic [TAG_W-1:0]         tag_r;
    logic [P_OUT*SHIFT_W-1:0] shift_r;
    logic [OB_W-1:0]          ob_r;
    logic                     gelu_r;
    logic [GF_W-1:0]          gfmt_r;

    pipe_delay #(.WIDTH(1), .DEPTH(A_LAT), .RESET(1)) u_v_a (
        .clk(clk), .rst_n(rst_n), .d(v1), .q(v_a)
    );
    pipe_delay #(.WIDTH(CTRL_W), .DEPTH(A_LAT)) u_ctrl_a (
        .clk(clk), .rst_n(rst_n),
        .d({first1, last1, ac_combine, ac_raw, slot1}), .q({first_a, last_a, combine_a, raw_a, slot_a})
    );
    pipe_delay #(.WIDTH(P_OUT*ACC_W), .DEPTH(A_LAT)) u_bias_a (
        .clk(clk), .rst_n(rst_n), .d(ac_bias), .q(bias_a)
    );
    pipe_delay #(.WIDTH(ROW_W), .DEPTH(A_LAT + 1)) u_row_r (
        .clk(clk), .rst_n(rst_n),
        .d({tag1, ac_shift, ac_out_bits, ac_gelu, ac_gfmt}), .q({tag_r, shift_r, ob_r, gelu_r, gfmt_r})
    );

    // ---------------------------------------------------------------- SA: accumulate
    // Asynchronous read, synchronous write: a slot updated on one cycle is read back updated on
    // the next, so consecutive beats on the same slot need no forwarding.
    logic [P_OUT*ACC_W-1:0] acc_mem [0:SLOTS-1];
    logic [P_OUT*ACC_W-1:0] acc_rd, acc_new, res_q;
    logic                   res_v, raw_v;

    assign acc_rd = acc_mem[slot_a];

    generate
        for (o = 0; o < P_OUT; o = o + 1) begin : g_acc
            logic [ACC_W-1:0] base, addend;
            logic [SUM_W-1:0] ts;
            logic [PW-1:0]    cs;
            assign ts     = tree_a[o*SUM_W +: SUM_W];
            assign cs     = term_a[o*PW +: PW];
            assign base   = first_a ? bias_a[o*ACC_W +: ACC_W] : acc_rd[o*ACC_W +: ACC_W];
            assign addend = combine_a ? {{(ACC_W-PW){cs[PW-1]}}, cs}
                                      : {{(ACC_W-SUM_W){ts[SUM_W-1]}}, ts};
            assign acc_new[o*ACC_W +: ACC_W] = base + addend;
        end
    endgenerate

    always_ff @(posedge clk) begin
        if (v_a) acc_mem[slot_a] <= acc_new;
    end

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            res_v <= 1'b0;
            raw_v <= 1'b0;
        end else begin
            res_v <= v_a && last_a && !raw_a;
            raw_v <= v_a && last_a && raw_a;
        end
        res_q <= acc_new;
    end

    // ---------------------------------------------------------------- requantise, epilogue
    logic [P_OUT*ACT_W-1:0] rq, epi;
    logic                   v_q, v_e, gelu_q;
    logic [TAG_W-1:0]       tag_q, tag_e;
    logic [GF_W-1:0]        gfmt_q;

    generate
        for (o = 0; o < P_OUT; o = o + 1) begin : g_rq
            requant #(
                .IN_W(ACC_W), .OUT_W(ACT_W), .SHIFT_W(SHIFT_W), .OB_W(OB_W),
                .MAX_LSHIFT(ACT_W), .SATURATE(1)
            ) u_requant (
                .clk(clk), .x(res_q[o*ACC_W +: ACC_W]), .shift(shift_r[o*SHIFT_W +: SHIFT_W]),
                .out_bits(ob_r), .y(rq[o*ACT_W +: ACT_W])
            );
        end
    endgenerate

    pipe_delay #(.WIDTH(1), .DEPTH(RQ_LAT), .RESET(1)) u_v_q (
        .clk(clk), .rst_n(rst_n), .d(res_v), .q(v_q)
    );
    pipe_delay #(.WIDTH(TAG_W + 1 + GF_W), .DEPTH(RQ_LAT)) u_side_q (
        .clk(clk), .rst_n(rst_n), .d({tag_r, gelu_r, gfmt_r}), .q({tag_q, gelu_q, gfmt_q})
    );

    epilogue #(.P_OUT(P_OUT), .DATA_W(ACT_W), .OB_W(OB_W), .FRAC_W(FRAC_W), .LATENCY(EPI_LAT)) u_epilogue (
        .clk(clk), .sel(gelu_q), .in_frac(gfmt_q[GF_W-1 -: FRAC_W]),
        .out_frac(gfmt_q[OB_W +: FRAC_W]), .out_bits(gfmt_q[OB_W-1:0]), .d(rq), .q(epi)
    );

    pipe_delay #(.WIDTH(1), .DEPTH(EPI_LAT), .RESET(1)) u_v_e (
        .clk(clk), .rst_n(rst_n), .d(v_q), .q(v_e)
    );
    pipe_delay #(.WIDTH(TAG_W), .DEPTH(EPI_LAT)) u_tag_e (
        .clk(clk), .rst_n(rst_n), .d(tag_q), .q(tag_e)
    );

    // ---------------------------------------------------------------- output FIFO
    assign push = v_e;

    stream_fifo #(.WIDTH(TAG_W + P_OUT*ACT_W), .DEPTH(FIFO_DEPTH)) u_out (
        .clk(clk), .rst_n(rst_n),
        .push(push), .push_data({tag_e, epi}),
        .out_valid(o_valid), .out_ready(o_ready), .out_data({o_tag, o_data}),
        .count(fifo_count)
    );

    // ---------------------------------------------------------------- raw output FIFO
    assign raw_push = raw_v;

    stream_fifo #(.WIDTH(TAG_W + P_OUT*ACC_W), .DEPTH(FIFO_DEPTH)) u_raw (
        .clk(clk), .rst_n(rst_n),
        .push(raw_push), .push_data({tag_r, res_q}),
        .out_valid(o_raw_valid), .out_ready(o_raw_ready), .out_data({o_raw_tag, o_raw_acc}),
        .count(raw_count)
    );
endmodule
