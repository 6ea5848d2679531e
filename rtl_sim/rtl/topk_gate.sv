// topk_gate: the MoE gate after the logits GEMM, bit-exact with numerics.moe_gate and
// numerics.expert_queues (numerics.md §10).
//
//   idx[t]      = the k experts with the largest l[t, e], ties to the lower expert index
//   p_e         = exp_int(max_e l[t, e] - l[t, e], frac)                 all N experts
//   (r, kk)     = recip_int(sum_e p_e)
//   score[t, s] = sat(rshift_round(p_idx[s]·r, R + kk - Fg), u16.15)       not renormalised
//   queue e     = the tokens that chose expert e, ascending, with their slot; offsets[e] = the
//                 number of entries of the experts before e (capacity = T, nothing is dropped)
//
// A run is T tokens. The configuration (cfg_n = N experts 1..MAX_E, cfg_k = k 1..N, cfg_t = T
// 1..MAX_T, cfg_frac = logit fraction, signed) is sampled with the first token of a run and held
// until its queue table has been read out; values outside those ranges are not supported.
//
// Streams (valid/ready; gaps and backpressure are arbitrary):
//   in  logits    one token per beat: MAX_E signed LOGIT_W logits, expert e at bits e·LOGIT_W
//                 (experts N..MAX_E-1 are ignored)
//   o   per token o_idx (MAX_K × EW, slot s at bits s·EW), o_score (MAX_K × GW), o_tag = the
//                 token's index in the run; slots k..MAX_K-1 are 0. Tokens leave in input order.
//   q   after the last token's o beat: the queue table, T·k beats in expert order, each
//                 (q_expert, q_token, q_slot), q_last on the final one. q_offsets holds the
//                 MAX_E + 1 offsets (offset e at bits e·OW; entries N..MAX_E equal T·k) and is
//                 stable from the first q beat until the next run's first token.
// A new run's first token is accepted once the last queue beat has been taken.
//
// Per token the unit works sequentially, 2N + k + 39 cycles at full rate: scan the N logits
// once, keeping the top-k list sorted (a strictly larger logit moves ahead, so ties keep the
// lower index); issue max - l_e for every expert into exp_unit (latency 10) and sum the p_e,
// keeping the chosen experts' p; recip_int of the sum (recip_unit, latency 16); k score
// products, each rounded and saturated by requant.sv; hold the result until o_ready. While the
// exp terms are issued, the token's k choices are appended (token-major) to the choice RAM and
// counted per expert.
// After the last token: a prefix sum of the counts gives each expert's write pointer (MAX_E
// cycles), a pass over the choice RAM scatters (expert, token, slot) into the queue RAM (T·k
// cycles; a counting sort, which keeps tokens ascending within a queue), and the queue RAM is
// read out through a small FIFO, one beat per cycle while q_ready is high. After the scatter the
// write pointers equal offsets[1..MAX_E]: they are q_offsets.
// Memories: choice RAM MAX_T·MAX_K × EW bits, queue RAM MAX_T·MAX_K × (EW + TAG_W + KW) bits.
`include "m3v_hw_config.svh"

module topk_gate #(
    parameter int MAX_E   = `M3V_MAX_EXPERTS,
    parameter int MAX_K   = `M3V_MAX_K,
    parameter int MAX_T   = `M3V_MAX_TOKENS,
    parameter int LOGIT_W = `M3V_ACT_W,
    parameter int FRAC_W  = 7,
    parameter int GW      = `M3V_GATE_BITS,
    // derived widths
    parameter int EW      = (MAX_E > 1) ? $clog2(MAX_E) : 1,    // expert index
    parameter int NW      = $clog2(MAX_E + 1),                   // expert count
    parameter int KW      = (MAX_K > 1) ? $clog2(MAX_K) : 1,    // slot
    parameter int KCW     = $clog2(MAX_K + 1),                   // k
    parameter int TAG_W   = (MAX_T > 1) ? $clog2(MAX_T) : 1,    // token index
    parameter int TCW     = $clog2(MAX_T + 1),                   // token count
    parameter int OW      = $clog2(MAX_T * MAX_K + 1)            // queue offsets
) (
    input  logic                       clk,
    input  logic                       rst_n,
    input  logic [NW-1:0]              cfg_n,
    input  logic [KCW-1:0]             cfg_k,
    input  logic [TCW-1:0]             cfg_t,
    input  logic [FRAC_W-1:0]          cfg_frac,
    input  logic                       in_valid,
    output logic                       in_ready,
    input  logic [MAX_E*LOGIT_W-1:0]   logits,
    output logic                       o_valid,
    input  logic                       o_ready,
    output logic [MAX_K*EW-1:0]        o_idx,
    output logic [MAX_K*GW-1:0]        o_score,
    output logic [TAG_W-1:0]           o_tag,
    output logic                       q_valid,
    input  logic                       q_ready,
    output logic [EW-1:0]              q_expert,
    output logic [TAG_W-1:0]           q_token,
    output logic [KW-1:0]              q_slot,
    output logic                       q_last,
    output logic [(MAX_E+1)*OW-1:0]    q_offsets
);
    localparam int P      = `M3V_EXP_P;
    localparam int R      = `M3V_RECIP_R;
    localparam int FG     = `M3V_GATE_FRAC;
    localparam int PW     = P + 1;                              // p_e <= 2^P
    localparam int SW     = P + 1 + $clog2(MAX_E + 1);          // sum of N p_e <= N·2^P
    localparam int RKW    = $clog2(SW);                         // recip exponent kk < SW
    localparam int X_LAT  = 10;                                 // exp_unit's latency
    localparam int R_LAT  = 16;                                 // recip_unit's latency
    localparam int SHW    = RKW + 2;                            // score shift, signed
    localparam int ENT    = MAX_T * MAX_K;                      // choices of a run
    localparam int AW     = (ENT > 1) ? $clog2(ENT) : 1;
    localparam int QW     = EW + TAG_W + KW;                    // queue entry
    localparam int QDEPTH = 4;                                  // read-out FIFO
    localparam int SC_LAT = 7;                                  // score: 2 product + 5 requant

    localparam logic [3:0] S_IDLE = 4'd0, S_SCAN = 4'd1, S_EXP = 4'd2, S_RCP = 4'd3, S_RCPW = 4'd4,
                           S_SC = 4'd5, S_OUT = 4'd6, S_PRE = 4'd7, S_SCAT = 4'd8, S_DRAIN = 4'd9;
    logic [3:0] state;

    // ---------------------------------------------------------------- run configuration
    logic [NW-1:0]     n_r;
    logic [KCW-1:0]    k_r;
    logic [TCW-1:0]    tlast;        // T - 1
    logic [FRAC_W-1:0] frac_r;
    logic [TCW-1:0]    tok;          // tokens of the run already delivered
    logic              accept;
    assign in_ready = (state == S_IDLE);
    assign accept   = in_valid && in_ready;

    // ---------------------------------------------------------------- logit scan and issue
    logic [MAX_E*LOGIT_W-1:0]  lreg;
    logic [NW-1:0]             e;        // next expert to issue
    logic                      cur_v;    // cur_l/cur_e hold expert cur_e's logit
    logic signed [LOGIT_W-1:0] cur_l, lsel;
    logic [EW-1:0]             cur_e;
    logic                      issuing;
    assign issuing = (state == S_SCAN || state == S_EXP) && (e < n_r);
    // Selects by a run-time index are AND-OR trees: an indexed part-select with a width that is not
    // a power of two becomes a multiplier and a wide shifter in yosys.
    always_comb begin
        lsel = '0;
        for (int i = 0; i < MAX_E; i++) if (e == NW'(i)) lsel = lsel | lreg[i*LOGIT_W +: LOGIT_W];
    end

    // Top-k list, sorted, slot 0 = the maximum. Insertion of cur: slot s takes cur when cur beats
    // it and not slot s-1, the old slot s-1 when both are beaten, else keeps its entry.
    logic [MAX_K*LOGIT_W-1:0] tv, tv_ins, tv_dn;
    logic [MAX_K*EW-1:0]      ti, ti_ins, ti_dn;
    logic [MAX_K-1:0]         tval, tval_ins, tval_dn, gt, gprev;
    assign tv_dn = tv << LOGIT_W;
    assign ti_dn = ti << EW;
    assign tval_dn = tval << 1;
    assign gprev = gt << 1;
    always_comb begin
        for (int s = 0; s < MAX_K; s++)
            gt[s] = !tval[s] || (cur_l > $signed(tv[s*LOGIT_W +: LOGIT_W]));
    end
    always_comb begin
        for (int s = 0; s < MAX_K; s++) begin
            if (!gt[s]) begin
                tv_ins[s*LOGIT_W +: LOGIT_W] = tv[s*LOGIT_W +: LOGIT_W];
                ti_ins[s*EW +: EW]           = ti[s*EW +: EW];
                tval_ins[s]                  = tval[s];
            end else if (gprev[s]) begin
                tv_ins[s*LOGIT_W +: LOGIT_W] = tv_dn[s*LOGIT_W +: LOGIT_W];
                ti_ins[s*EW +: EW]           = ti_dn[s*EW +: EW];
                tval_ins[s]                  = tval_dn[s];
            end else begin
                tv_ins[s*LOGIT_W +: LOGIT_W] = cur_l;
                ti_ins[s*EW +: EW]           = cur_e;
                tval_ins[s]                  = 1'b1;
            end
        end
    end

    // ---------------------------------------------------------------- exp of every expert
    logic signed [LOGIT_W:0] tdiff;
    logic                    ex_v;
    logic [EW-1:0]           ex_e;
    logic [P:0]              ex_p;
    logic [NW-1:0]           ex_cnt;
    assign tdiff = $signed({tv[LOGIT_W-1], tv[LOGIT_W-1:0]}) - $signed({cur_l[LOGIT_W-1], cur_l});
    // (ports are connected to plain signals: a part-select there makes yosys 0.23 reprocess
    // the module, which fails under hierarchy -chparam)
    logic [LOGIT_W-1:0] ex_t;
    logic               ex_in;
    assign ex_t  = tdiff[LOGIT_W-1:0];
    assign ex_in = cur_v && state == S_EXP;
    exp_unit #(.T_W(LOGIT_W), .FRAC_W(FRAC_W)) u_exp (
        .clk(clk), .t(ex_t), .frac(frac_r), .p(ex_p));
    pipe_delay #(.WIDTH(1), .DEPTH(X_LAT), .RESET(1)) u_ex_v (
        .clk(clk), .rst_n(rst_n), .d(ex_in), .q(ex_v));
    pipe_delay #(.WIDTH(EW), .DEPTH(X_LAT)) u_ex_e (
        .clk(clk), .rst_n(rst_n), .d(cur_e), .q(ex_e));

    logic [SW-1:0]       psum;
    logic [MAX_K*PW-1:0] psel;       // p of the chosen experts, by slot

    // ---------------------------------------------------------------- reciprocal of the sum
    logic             rc_v;
    logic [R:0]       rc_r, r_r;
    logic [RKW-1:0]   rc_k, kk_r;
    logic rc_in;
    assign rc_in = (state == S_RCP);
    recip_unit #(.S_W(SW)) u_recip (.clk(clk), .s(psum), .r(rc_r), .k(rc_k));
    pipe_delay #(.WIDTH(1), .DEPTH(R_LAT), .RESET(1)) u_rc_v (
        .clk(clk), .rst_n(rst_n), .d(rc_in), .q(rc_v));

    // ---------------------------------------------------------------- scores of the k slots
    logic [KCW-1:0]       sc_iss, sc_cnt;
    logic                 sc_in, sc_v;
    logic [KW-1:0]        sc_slot;
    logic [PW-1:0]        sa1, psel_s;
    logic [R:0]           sb1;
    logic [PW+R+1:0]      prod2;     // < 2^(P+R+1), one sign bit for requant
    logic [GW:0]          sc_y;
    logic signed [SHW-1:0] sc_shift;
    assign sc_in = (state == S_SC) && (sc_iss < k_r);
    always_comb begin
        psel_s = '0;
        for (int s = 0; s < MAX_K; s++) if (sc_iss == KCW'(s)) psel_s = psel_s | psel[s*PW +: PW];
    end
    assign sc_shift = SHW'(kk_r) + SHW'(R - FG);
    always_ff @(posedge clk) begin
        sa1   <= psel_s;
        sb1   <= r_r;
        prod2 <= (PW+R+2)'(sa1) * (PW+R+2)'(sb1);
    end
    pipe_delay #(.WIDTH(1), .DEPTH(SC_LAT), .RESET(1)) u_sc_v (
        .clk(clk), .rst_n(rst_n), .d(sc_in), .q(sc_v));
    logic [KW-1:0] sc_iss_slot;
    assign sc_iss_slot = sc_iss[KW-1:0];
    pipe_delay #(.WIDTH(KW), .DEPTH(SC_LAT)) u_sc_slot (
        .clk(clk), .rst_n(rst_n), .d(sc_iss_slot), .q(sc_slot));
    // u16 saturation = 17-bit signed saturation of a value that is never negative
    logic [$clog2(GW + 2)-1:0] sc_ob;
    assign sc_ob = '0;
    requant #(.IN_W(PW + R + 2), .OUT_W(GW + 1), .SHIFT_W(SHW), .OB_W($clog2(GW + 2)),
              .MAX_LSHIFT(0), .SATURATE(1)) u_sc_rq (
        .clk(clk), .x(prod2), .shift(sc_shift), .out_bits(sc_ob), .y(sc_y));
    logic [MAX_K*GW-1:0] score_r;

    // ---------------------------------------------------------------- choices and counts
    logic [EW-1:0]      ch_ram [0:ENT-1];
    logic [AW:0]        wptr;            // choices written in this run (= T·k at the end)
    logic [MAX_E*TCW-1:0] cnt;
    logic [EW-1:0]      ch_e;
    logic               ch_we;
    assign ch_we = (state == S_EXP) && issuing && (e < NW'(k_r));
    always_comb begin
        ch_e = '0;
        for (int s = 0; s < MAX_K; s++) if (e == NW'(s)) ch_e = ch_e | ti[s*EW +: EW];
    end
    always_ff @(posedge clk) if (ch_we) ch_ram[wptr[AW-1:0]] <= ch_e;

    // ---------------------------------------------------------------- counting sort, read-out
    logic [NW-1:0]        pe;            // prefix-sum position
    logic [OW-1:0]        acc;
    logic [MAX_E*OW-1:0]  pos;           // write pointers; offsets[1..MAX_E] after the scatter
    logic [AW:0]          rd, wr_cnt, qj, wlast;   // wlast = T·k - 1
    logic [TAG_W-1:0]     rd_tok, sc_tok1;
    logic [KW-1:0]        rd_slot, sc_slot1;
    logic                 scat_rd, scat_v;
    logic [EW-1:0]        ch_rd;
    logic [OW-1:0]        pos_e;
    logic [QW-1:0]        q_ram [0:ENT-1];
    logic [QW-1:0]        q_rd;
    logic                 q_iss, qr_v, qr_last, q_pop;
    logic [$clog2(QDEPTH):0] q_count;
    always_comb begin
        pos_e = '0;
        for (int i = 0; i < MAX_E; i++) if (ch_rd == EW'(i)) pos_e = pos_e | pos[i*OW +: OW];
    end
    assign scat_rd = (state == S_SCAT) && (rd < wptr);
    assign q_iss   = (state == S_DRAIN) && (qj < wptr) &&
                     (q_count + ($clog2(QDEPTH) + 1)'(qr_v) < ($clog2(QDEPTH) + 1)'(QDEPTH));
    always_ff @(posedge clk) begin
        if (scat_rd) ch_rd <= ch_ram[rd[AW-1:0]];
        if (scat_v)  q_ram[pos_e[AW-1:0]] <= {ch_rd, sc_tok1, sc_slot1};
        if (q_iss)   q_rd <= q_ram[qj[AW-1:0]];
    end
    logic [QW:0] qf_in, qf_out;
    assign qf_in = {qr_last, q_rd};
    assign {q_last, q_expert, q_token, q_slot} = qf_out;
    stream_fifo #(.WIDTH(QW + 1), .DEPTH(QDEPTH)) u_qfifo (
        .clk(clk), .rst_n(rst_n), .push(qr_v), .push_data(qf_in),
        .out_valid(q_valid), .out_ready(q_ready), .out_data(qf_out),
        .count(q_count));
    assign q_pop     = q_valid && q_ready;
    assign q_offsets = {pos, OW'(0)};

    // ---------------------------------------------------------------- control
    always_ff @(posedge clk) begin
        if (!rst_n) begin
            state  <= S_IDLE;
            tok    <= '0;
            cur_v  <= 1'b0;
            scat_v <= 1'b0;
            qr_v   <= 1'b0;
        end else begin
            cur_v  <= issuing;
            scat_v <= scat_rd;
            qr_v   <= q_iss;
            case (state)
                S_IDLE: if (accept) begin
                    if (tok == '0) begin
                        n_r    <= cfg_n;
                        k_r    <= cfg_k;
                        tlast  <= cfg_t - 1'b1;
                        frac_r <= cfg_frac;
                        cnt    <= '0;
                        wptr   <= '0;
                    end
                    lreg  <= logits;
                    e     <= '0;
                    tval  <= '0;
                    state <= S_SCAN;
                end
                S_SCAN: begin
                    if (issuing) e <= e + 1'b1;
                    if (cur_v) begin
                        tv   <= tv_ins;
                        ti   <= ti_ins;
                        tval <= tval_ins;
                    end else if (!issuing) begin    // the last logit is in the list
                        e      <= '0;
                        ex_cnt <= '0;
                        psum   <= '0;
                        state  <= S_EXP;
                    end
                end
                S_EXP: begin
                    if (issuing) e <= e + 1'b1;
                    if (ch_we) begin
                        wptr <= wptr + 1'b1;
                        for (int i = 0; i < MAX_E; i++)
                            if (ch_e == EW'(i)) cnt[i*TCW +: TCW] <= cnt[i*TCW +: TCW] + 1'b1;
                    end
                    if (ex_v) begin
                        psum   <= psum + SW'(ex_p);
                        ex_cnt <= ex_cnt + 1'b1;
                        for (int s = 0; s < MAX_K; s++)
                            if (ti[s*EW +: EW] == ex_e) psel[s*PW +: PW] <= ex_p;
                        if (ex_cnt + 1'b1 == n_r) state <= S_RCP;
                    end
                end
                S_RCP: state <= S_RCPW;
                S_RCPW: if (rc_v) begin
                    r_r    <= rc_r;
                    kk_r   <= rc_k;
                    sc_iss <= '0;
                    sc_cnt <= '0;
                    state  <= S_SC;
                end
                S_SC: begin
                    if (sc_in) sc_iss <= sc_iss + 1'b1;
                    if (sc_v) begin
                        for (int s = 0; s < MAX_K; s++)
                            if (sc_slot == KW'(s)) score_r[s*GW +: GW] <= sc_y[GW-1:0];
                        sc_cnt <= sc_cnt + 1'b1;
                        if (sc_cnt + 1'b1 == k_r) state <= S_OUT;
                    end
                end
                S_OUT: if (o_ready) begin
                    tok <= tok + 1'b1;
                    if (tok == tlast) begin
                        pe    <= '0;
                        acc   <= '0;
                        state <= S_PRE;
                    end else begin
                        state <= S_IDLE;
                    end
                end
                S_PRE: begin
                    // counts shift out at the bottom, offsets shift in at the top
                    pos <= (MAX_E*OW)'({acc, pos} >> OW);
                    acc <= acc + OW'(cnt[0 +: TCW]);
                    wlast <= wptr - 1'b1;
                    cnt <= cnt >> TCW;
                    pe  <= pe + 1'b1;
                    if (pe == NW'(MAX_E - 1)) begin
                        rd       <= '0;
                        wr_cnt   <= '0;
                        rd_tok   <= '0;
                        rd_slot  <= '0;
                        state    <= S_SCAT;
                    end
                end
                S_SCAT: begin
                    if (scat_rd) begin
                        rd <= rd + 1'b1;
                        if (rd_slot == KW'(k_r - 1'b1)) begin
                            rd_slot <= '0;
                            rd_tok  <= rd_tok + 1'b1;
                        end else begin
                            rd_slot <= rd_slot + 1'b1;
                        end
                    end
                    if (scat_v) begin
                        for (int i = 0; i < MAX_E; i++)
                            if (ch_rd == EW'(i)) pos[i*OW +: OW] <= pos[i*OW +: OW] + 1'b1;
                        wr_cnt <= wr_cnt + 1'b1;
                        if (wr_cnt == wlast) begin
                            qj    <= '0;
                            state <= S_DRAIN;
                        end
                    end
                end
                S_DRAIN: begin
                    if (q_iss) begin
                        qj      <= qj + 1'b1;
                        qr_last <= (qj == wlast);
                    end
                    if (q_pop && q_last) begin
                        tok   <= '0;
                        state <= S_IDLE;
                    end
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    always_ff @(posedge clk) begin
        cur_l    <= lsel;
        cur_e    <= EW'(e);
        sc_tok1  <= rd_tok;
        sc_slot1 <= rd_slot;
    end

    // ---------------------------------------------------------------- per-token result
    assign o_valid = (state == S_OUT);
    assign o_tag   = TAG_W'(tok);
    always_comb begin
        for (int s = 0; s < MAX_K; s++) begin
            o_idx[s*EW +: EW]   = (KCW'(s) < k_r) ? ti[s*EW +: EW] : '0;
            o_score[s*GW +: GW] = (KCW'(s) < k_r) ? score_r[s*GW +: GW] : '0;
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, sc_y[GW], tdiff[LOGIT_W], pos_e};
endmodule
