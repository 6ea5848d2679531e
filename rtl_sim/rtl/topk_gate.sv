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
// Tokens flow through four stages, each busy with one token at a time, so consecutive tokens
// overlap; at full rate a token is accepted every N + 1 cycles:
//   scan    N + 1 cycles: the N logits one a cycle into the top-k list, kept sorted (a strictly
//           larger logit moves ahead, so ties keep the lower index); the list and the logits are
//           handed to the issue stage with the last insertion, and the next token is accepted in
//           that cycle.
//   issue   N cycles: max - l_e for every expert into exp_unit (latency 10); the token's k
//           choices are appended (token-major) to the choice RAM and counted per expert.
//   collect as the p_e come out: their sum, and the chosen experts' p (a slot mask travels with
//           each term); with the last term the sum enters recip_unit (latency 16).
//   scores  k cycles from the reciprocal: the k score products, each rounded and saturated by
//           requant.sv (7 cycles), assembled and pushed into the output FIFO.
// A token's issue starts at least N cycles after the previous one's, so its reciprocal and its
// scores never overtake the previous token's (k <= N). The output FIFO (ODEPTH tokens) absorbs
// o_ready; a token enters the issue stage only while fewer than ODEPTH tokens are between there
// and the o beat, so nothing in the fixed-latency pipelines has to stall. The first token's o
// beat comes 2N + k + 36 cycles after it is accepted.
// Once the last token's choices are written: a prefix sum of the counts gives each expert's write
// pointer (MAX_E cycles), a pass over the choice RAM scatters (expert, token, slot) into the queue
// RAM (T·k cycles; a counting sort, which keeps tokens ascending within a queue); both overlap the
// last tokens' o beats. After the last o beat the queue RAM is read out through a small FIFO, one
// beat per cycle while q_ready is high. After the scatter the write pointers equal
// offsets[1..MAX_E]: they are q_offsets.
// Memories: choice RAM MAX_T·MAX_K × EW bits, queue RAM MAX_T·MAX_K × (EW + TAG_W + KW) bits,
// output FIFO ODEPTH × MAX_K·(EW + GW) bits.
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
    localparam int ODEPTH = 32;                                 // output FIFO (tokens): more than
                                                                // the pipeline holds at full rate
    localparam int OCW    = $clog2(ODEPTH + 1);
    localparam int OFW    = MAX_K * (EW + GW);                  // output FIFO entry: idx, score

    // queue side of a run: the choices are complete, then prefix sum, scatter, wait for the last o
    // beat, read-out
    localparam logic [2:0] Q_RUN = 3'd0, Q_PRE = 3'd1, Q_SCAT = 3'd2, Q_WAIT = 3'd3, Q_DRAIN = 3'd4;
    logic [2:0] qstate;

    // ---------------------------------------------------------------- run configuration
    logic [NW-1:0]     n_r;
    logic [KCW-1:0]    k_r;
    logic [TCW-1:0]    tlast;        // T - 1
    logic [FRAC_W-1:0] frac_r;
    logic              run_on;       // a run is open: its configuration is held
    logic [TCW-1:0]    acc_cnt;      // tokens of the run accepted
    logic [TCW-1:0]    iss_cnt;      // tokens of the run whose exp terms are all issued
    logic [TCW-1:0]    otok;         // tokens of the run delivered (o beats taken)
    logic [OCW-1:0]    inflight;     // tokens from the issue stage to the o beat
    logic              accept, handoff;

    // ---------------------------------------------------------------- scan (top-k list)
    logic [MAX_E*LOGIT_W-1:0]  lreg;
    logic                      a_busy;   // a token is in the scan stage
    logic [NW-1:0]             e;        // next expert to scan
    logic                      cur_v;    // cur_l/cur_e hold expert cur_e's logit
    logic signed [LOGIT_W-1:0] cur_l, lsel;
    logic [EW-1:0]             cur_e;
    logic                      a_scan, a_fin, b_free;
    assign a_scan = a_busy && (e < n_r);
    assign a_fin  = a_busy && !a_scan;          // the list is complete with this cycle's insertion
    assign handoff = a_fin && b_free && (inflight < OCW'(ODEPTH));
    assign in_ready = (!a_busy || handoff) && (!run_on || acc_cnt <= tlast);
    assign accept   = in_valid && in_ready;
    // Selects by a run-time index are AND-OR trees: an indexed part-select with a width that is not
    // a power of two becomes a multiplier and a wide shifter in yosys.
    always_comb begin
        lsel = '0;
        for (int i = 0; i < MAX_E; i++) if (e == NW'(i)) lsel = lsel | lreg[i*LOGIT_W +: LOGIT_W];
    end

    // Top-k list, sorted, slot 0 = the maximum. Insertion of cur: slot s takes cur when cur beats
    // it and not slot s-1, the old slot s-1 when both are beaten, else keeps its entry.
    logic [MAX_K*LOGIT_W-1:0] tv, tv_ins, tv_dn;
    logic [LOGIT_W-1:0]       tmax_fin;
    logic [MAX_K*EW-1:0]      ti, ti_ins, ti_dn, ti_fin;
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
    // the finished list: this cycle's insertion of the last logit, or the list already held
    assign tmax_fin = cur_v ? tv_ins[0 +: LOGIT_W] : tv[0 +: LOGIT_W];
    assign ti_fin = cur_v ? ti_ins : ti;

    // ---------------------------------------------------------------- issue of the exp terms
    logic [MAX_E*LOGIT_W-1:0]  lreg2;
    logic [MAX_K*EW-1:0]       ti2;
    logic signed [LOGIT_W-1:0] tmax2, lsel2;
    logic                      b_busy, b_last;
    logic [NW-1:0]             e2;
    assign b_last = b_busy && (e2 + 1'b1 == n_r);
    assign b_free = !b_busy || b_last;
    always_comb begin
        lsel2 = '0;
        for (int i = 0; i < MAX_E; i++) if (e2 == NW'(i)) lsel2 = lsel2 | lreg2[i*LOGIT_W +: LOGIT_W];
    end
    // slot mask of the issued expert: which of the k slots it fills
    logic [MAX_K-1:0] hit2;
    always_comb begin
        for (int s = 0; s < MAX_K; s++)
            hit2[s] = (KCW'(s) < k_r) && (ti2[s*EW +: EW] == EW'(e2));
    end

    // registered term: the maximum travels with it, so a hand-off in the issue stage cannot change it
    logic signed [LOGIT_W-1:0] bx_l, bx_max;
    logic                      bx_v, bx_first, bx_last;
    logic [MAX_K-1:0]          bx_hit;
    logic [MAX_K*EW-1:0]       bx_ti;
    logic signed [LOGIT_W:0]   tdiff;
    assign tdiff = $signed({bx_max[LOGIT_W-1], bx_max}) - $signed({bx_l[LOGIT_W-1], bx_l});
    always_ff @(posedge clk) begin
        bx_l     <= lsel2;
        bx_max   <= tmax2;
        bx_first <= (e2 == '0);
        bx_last  <= b_last;
        bx_hit   <= hit2;
        bx_ti    <= ti2;
    end

    // ---------------------------------------------------------------- exp of every expert
    localparam int XDW = MAX_K + 2 + MAX_K * EW;
    logic                ex_v, ex_first, ex_last;
    logic [MAX_K-1:0]    ex_hit;
    logic [MAX_K*EW-1:0] ex_ti;
    logic [P:0]          ex_p;
    // (ports are connected to plain signals: a part-select there makes yosys 0.23 reprocess
    // the module, which fails under hierarchy -chparam)
    logic [LOGIT_W-1:0] ex_t;
    logic [XDW-1:0]     xd_in, xd_out;
    assign ex_t  = tdiff[LOGIT_W-1:0];
    assign xd_in = {bx_first, bx_last, bx_hit, bx_ti};
    assign {ex_first, ex_last, ex_hit, ex_ti} = xd_out;
    exp_unit #(.T_W(LOGIT_W), .FRAC_W(FRAC_W)) u_exp (
        .clk(clk), .t(ex_t), .frac(frac_r), .p(ex_p));
    pipe_delay #(.WIDTH(1), .DEPTH(X_LAT), .RESET(1)) u_ex_v (
        .clk(clk), .rst_n(rst_n), .d(bx_v), .q(ex_v));
    pipe_delay #(.WIDTH(XDW), .DEPTH(X_LAT)) u_ex_d (
        .clk(clk), .rst_n(rst_n), .d(xd_in), .q(xd_out));

    // ---------------------------------------------------------------- sum, chosen p, reciprocal
    logic [SW-1:0]       psum, psum_n;
    logic [MAX_K*PW-1:0] psel, psel_n;       // p of the chosen experts, by slot
    assign psum_n = (ex_first ? SW'(0) : psum) + SW'(ex_p);
    always_comb begin
        for (int s = 0; s < MAX_K; s++)
            psel_n[s*PW +: PW] = ex_hit[s] ? ex_p : psel[s*PW +: PW];
    end
    always_ff @(posedge clk) begin
        if (ex_v) begin
            psum <= psum_n;
            psel <= psel_n;
        end
    end

    localparam int RDW = MAX_K * PW + MAX_K * EW;
    logic                rc_v, rc_in;
    logic [R:0]          rc_r, r_r;
    logic [RKW-1:0]      rc_k, kk_r;
    logic [RDW-1:0]      rd_in, rd_out;
    logic [MAX_K*PW-1:0] rc_psel, psel_r;
    logic [MAX_K*EW-1:0] rc_ti, ti_r;
    assign rc_in = ex_v && ex_last;
    assign rd_in = {psel_n, ex_ti};
    assign {rc_psel, rc_ti} = rd_out;
    recip_unit #(.S_W(SW)) u_recip (.clk(clk), .s(psum_n), .r(rc_r), .k(rc_k));
    pipe_delay #(.WIDTH(1), .DEPTH(R_LAT), .RESET(1)) u_rc_v (
        .clk(clk), .rst_n(rst_n), .d(rc_in), .q(rc_v));
    pipe_delay #(.WIDTH(RDW), .DEPTH(R_LAT)) u_rc_d (
        .clk(clk), .rst_n(rst_n), .d(rd_in), .q(rd_out));

    // ---------------------------------------------------------------- scores of the k slots
    logic                  d_busy, sc_in, sc_v, sc_last, sc_in_last;
    logic [KCW-1:0]        sc_iss;
    logic [KW-1:0]         sc_slot;
    logic [PW-1:0]         sa1, psel_s;
    logic [R:0]            sb1;
    logic [PW+R+1:0]       prod2;     // < 2^(P+R+1), one sign bit for requant
    logic [GW:0]           sc_y;
    logic signed [SHW-1:0] sc_shift, sh1, sh2;
    assign sc_in      = d_busy;
    assign sc_in_last = sc_iss + 1'b1 == k_r;
    always_comb begin
        psel_s = '0;
        for (int s = 0; s < MAX_K; s++) if (sc_iss == KCW'(s)) psel_s = psel_s | psel_r[s*PW +: PW];
    end
    assign sc_shift = SHW'(kk_r) + SHW'(R - FG);
    // the shift travels with its product: requant samples both together
    always_ff @(posedge clk) begin
        sa1   <= psel_s;
        sb1   <= r_r;
        sh1   <= sc_shift;
        prod2 <= (PW+R+2)'(sa1) * (PW+R+2)'(sb1);
        sh2   <= sh1;
    end
    localparam int SDW = KW + 1 + MAX_K * EW;
    logic [KW-1:0]       sc_iss_slot;
    logic [SDW-1:0]      sd_in, sd_out;
    logic [MAX_K*EW-1:0] sc_ti;
    assign sc_iss_slot = sc_iss[KW-1:0];
    assign sd_in = {sc_iss_slot, sc_in_last, ti_r};
    assign {sc_slot, sc_last, sc_ti} = sd_out;
    pipe_delay #(.WIDTH(1), .DEPTH(SC_LAT), .RESET(1)) u_sc_v (
        .clk(clk), .rst_n(rst_n), .d(sc_in), .q(sc_v));
    pipe_delay #(.WIDTH(SDW), .DEPTH(SC_LAT)) u_sc_d (
        .clk(clk), .rst_n(rst_n), .d(sd_in), .q(sd_out));
    // u16 saturation = 17-bit signed saturation of a value that is never negative
    logic [$clog2(GW + 2)-1:0] sc_ob;
    assign sc_ob = '0;
    requant #(.IN_W(PW + R + 2), .OUT_W(GW + 1), .SHIFT_W(SHW), .OB_W($clog2(GW + 2)),
              .MAX_LSHIFT(0), .SATURATE(1)) u_sc_rq (
        .clk(clk), .x(prod2), .shift(sh2), .out_bits(sc_ob), .y(sc_y));
    logic [MAX_K*GW-1:0] score_r, score_n;
    always_comb begin
        score_n = score_r;
        for (int s = 0; s < MAX_K; s++)
            if (sc_slot == KW'(s)) score_n[s*GW +: GW] = sc_y[GW-1:0];
    end
    always_ff @(posedge clk) if (sc_v) score_r <= score_n;

    // ---------------------------------------------------------------- output FIFO
    logic            of_push, of_pop;
    logic [OFW-1:0]  of_in, of_out;
    logic [MAX_K*EW-1:0] of_ti;
    logic [MAX_K*GW-1:0] of_score;
    logic [$clog2(ODEPTH):0] of_count;
    assign of_push = sc_v && sc_last;
    assign of_in   = {sc_ti, score_n};
    assign {of_ti, of_score} = of_out;
    stream_fifo #(.WIDTH(OFW), .DEPTH(ODEPTH)) u_ofifo (
        .clk(clk), .rst_n(rst_n), .push(of_push), .push_data(of_in),
        .out_valid(o_valid), .out_ready(o_ready), .out_data(of_out), .count(of_count));
    assign of_pop = o_valid && o_ready;

    // ---------------------------------------------------------------- choices and counts
    logic [EW-1:0]      ch_ram [0:ENT-1];
    logic [AW:0]        wptr;            // choices written in this run (= T·k at the end)
    logic [MAX_E*TCW-1:0] cnt;
    logic [EW-1:0]      ch_e;
    logic               ch_we;
    assign ch_we = b_busy && (e2 < NW'(k_r));
    always_comb begin
        ch_e = '0;
        for (int s = 0; s < MAX_K; s++) if (e2 == NW'(s)) ch_e = ch_e | ti2[s*EW +: EW];
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
    assign scat_rd = (qstate == Q_SCAT) && (rd < wptr);
    assign q_iss   = (qstate == Q_DRAIN) && (qj < wptr) &&
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
            run_on   <= 1'b0;
            a_busy   <= 1'b0;
            b_busy   <= 1'b0;
            bx_v     <= 1'b0;
            d_busy   <= 1'b0;
            cur_v    <= 1'b0;
            scat_v   <= 1'b0;
            qr_v     <= 1'b0;
            inflight <= '0;
            qstate   <= Q_RUN;
        end else begin
            cur_v  <= a_scan;
            bx_v   <= b_busy;
            scat_v <= scat_rd;
            qr_v   <= q_iss;
            inflight <= inflight + OCW'(handoff) - OCW'(of_pop);

            // scan stage
            if (a_scan) e <= e + 1'b1;
            if (cur_v) begin
                tv   <= tv_ins;
                ti   <= ti_ins;
                tval <= tval_ins;
            end
            if (handoff) a_busy <= 1'b0;
            if (accept) begin
                if (!run_on) begin
                    n_r     <= cfg_n;
                    k_r     <= cfg_k;
                    tlast   <= cfg_t - 1'b1;
                    frac_r  <= cfg_frac;
                    cnt     <= '0;
                    wptr    <= '0;
                    iss_cnt <= '0;
                    otok    <= '0;
                    acc_cnt <= TCW'(1);
                    run_on  <= 1'b1;
                    qstate  <= Q_RUN;
                end else begin
                    acc_cnt <= acc_cnt + 1'b1;
                end
                lreg   <= logits;
                e      <= '0;
                tval   <= '0;
                a_busy <= 1'b1;
            end

            // issue stage
            if (b_busy) begin
                e2 <= e2 + 1'b1;
                if (ch_we) begin
                    wptr <= wptr + 1'b1;
                    for (int i = 0; i < MAX_E; i++)
                        if (ch_e == EW'(i)) cnt[i*TCW +: TCW] <= cnt[i*TCW +: TCW] + 1'b1;
                end
                if (b_last) begin
                    b_busy  <= 1'b0;
                    iss_cnt <= iss_cnt + 1'b1;
                end
            end
            if (handoff) begin
                lreg2  <= lreg;
                ti2    <= ti_fin;
                tmax2  <= tmax_fin;
                e2     <= '0;
                b_busy <= 1'b1;
            end

            // scores stage: a new token's reciprocal may arrive with the previous one's last issue
            if (d_busy) begin
                sc_iss <= sc_iss + 1'b1;
                if (sc_in_last) d_busy <= 1'b0;
            end
            if (rc_v) begin
                r_r    <= rc_r;
                kk_r   <= rc_k;
                psel_r <= rc_psel;
                ti_r   <= rc_ti;
                sc_iss <= '0;
                d_busy <= 1'b1;
            end

            if (of_pop) otok <= otok + 1'b1;

            // queue table of the run
            case (qstate)
                Q_RUN: if (run_on && !b_busy && iss_cnt == tlast + 1'b1) begin
                    pe    <= '0;
                    acc   <= '0;
                    qstate <= Q_PRE;
                end
                Q_PRE: begin
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
                        qstate   <= Q_SCAT;
                    end
                end
                Q_SCAT: begin
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
                            qj     <= '0;
                            qstate <= Q_WAIT;
                        end
                    end
                end
                Q_WAIT: if (otok == tlast + 1'b1) qstate <= Q_DRAIN;
                Q_DRAIN: begin
                    if (q_iss) begin
                        qj      <= qj + 1'b1;
                        qr_last <= (qj == wlast);
                    end
                    if (q_pop && q_last) begin
                        run_on <= 1'b0;
                        qstate <= Q_RUN;
                    end
                end
                default: qstate <= Q_RUN;
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
    assign o_tag = TAG_W'(otok);
    always_comb begin
        for (int s = 0; s < MAX_K; s++) begin
            o_idx[s*EW +: EW]   = (KCW'(s) < k_r) ? of_ti[s*EW +: EW] : '0;
            o_score[s*GW +: GW] = (KCW'(s) < k_r) ? of_score[s*GW +: GW] : '0;
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, sc_y[GW], tdiff[LOGIT_W], pos_e, of_count};
endmodule
