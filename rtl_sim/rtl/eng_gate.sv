// eng_gate: the moe_gate instruction, bit-exact with compiler/program_exec._gate (k_gate):
//   logits [T, N] = requant(x [T, D] · w_task [D, N] + b_task, shift_task, fmt)   (int16, format fmt)
//   idx, score [T, k] = numerics.moe_gate(logits, k, fmt.frac)                     (uint16)
//   queue table = numerics.expert_queues(idx, N): q_off [N+1], q_tok [T·k], q_dst [T·k] (uint16,
//                 q_dst = token·k + slot, each part 64-byte aligned as isa.queue_layout)
// with w_task at w_ref + TASK·w_stride (int8, or int16 with flag w16), b_task (int64) at
// bias_ref + TASK·bias_stride and shift_task (int8) at shift_ref + TASK·shift_stride.
//
//   port 0 R: gate_chunk_reader ── w rows, bias, shifts ──> W RAM (P_IN banks), bias/shift registers
//   port 1 R: gate_chunk_reader ── x rows in P_IN chunks ──> row buffer (two tokens)
//   W RAM ── one P_IN x P_OUT tile per beat ──> compute_unit <── x beats (token-major: per token,
//            per P_OUT tile of experts, per P_IN chunk of D), all on slot 0
//   compute_unit ── P_OUT logits per row ──> logits row (N ≤ MAX_EXPERTS) ──┬──> topk_gate
//                                                                         └──> lane 0
//   topk_gate ── per token: idx ──> lane 1, score ──> lane 2; then the queue: token ──> lane 1,
//                token·k + slot ──> lane 2, and q_off ──> lane 0
//   lane l: serialiser (≤ DW/16 elements a beat) ─> elem_packer ─> axi_writer on port l; its two
//           commands are logits then q_off (lane 0), idx then q_tok (1), score then q_dst (2).
//
// Formats: the requantisation runs on the compute unit (signed out_bits = fmt bits); an unsigned
// fmt (bits < ACT_W) saturates to bits + 1 signed bits and then clamps negatives to 0, which is the
// unsigned saturation. Shifts are clamped into SHIFT_W bits and the logit fraction into the 7 bits
// of topk_gate; both are exact on everything the contract accepts (|shift| ≤ 62, and fractions
// whose exp_int shift the executor accepts). Biases keep their low ACC_W bits (the contract bounds
// |acc| below 2^(ACC_W-1)).
//
// Checks (done with STATUS over_limit, nothing stored): every operand inside its space as the
// executor reads it (x, w, bias, shift with the task offsets, which must not carry past bit 31),
// the four stores inside arena/out; and the hardware limits as the HLS kernel:
// 1 ≤ T ≤ MAX_TOKENS, 1 ≤ D ≤ MAX_DIM, 1 ≤ N ≤ MAX_EXPERTS, 1 ≤ k ≤ min(N, MAX_K), fmt signed with
// 1..ACT_W bits or unsigned with 1..ACT_W-1 bits, the weight width (w16 needs W_W ≥ 16).
// Reads may start at any byte; the four stores start at their refs, which must be beat-aligned
// (refs are 64-byte aligned).
// Ports: needs PORTS ≥ 3; ports 3.. stay idle.
`include "m3v_isa.svh"
`include "m3v_accel_cfg.svh"
`include "m3v_hw_config.svh"
`include "m3v_mem.svh"

module eng_gate #(
    parameter int DW        = `M3V_AXI_W,
    parameter int PORTS     = `M3V_AXI_PORTS,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 8,
    parameter int MAX_BURST = 16,
    parameter int SLOT_W    = $clog2(`M3V_SLOTS)
) (
    input  logic                    clk,
    input  logic                    rst_n,
    input  logic                    start,
    input  logic [511:0]            rec,
    input  logic [31:0]             task_idx,
    input  logic [63:0]             base_wgt, base_arena, base_in, base_out,
    input  logic [31:0]             sz_wgt, sz_arena, sz_in, sz_out,
    output logic                    done,
    output logic [3:0]              status,
    output logic                    active,
    output logic [PORTS-1:0]        m_arvalid,
    input  logic [PORTS-1:0]        m_arready,
    output logic [PORTS*ADDR_W-1:0] m_araddr,
    output logic [PORTS*8-1:0]      m_arlen,
    output logic [PORTS*3-1:0]      m_arsize,
    output logic [PORTS*2-1:0]      m_arburst,
    output logic [PORTS*ID_W-1:0]   m_arid,
    input  logic [PORTS-1:0]        m_rvalid,
    output logic [PORTS-1:0]        m_rready,
    input  logic [PORTS*DW-1:0]     m_rdata,
    input  logic [PORTS*ID_W-1:0]   m_rid,
    input  logic [PORTS-1:0]        m_rlast,
    input  logic [PORTS*2-1:0]      m_rresp,
    output logic [PORTS-1:0]        m_awvalid,
    input  logic [PORTS-1:0]        m_awready,
    output logic [PORTS*ADDR_W-1:0] m_awaddr,
    output logic [PORTS*8-1:0]      m_awlen,
    output logic [PORTS*3-1:0]      m_awsize,
    output logic [PORTS*2-1:0]      m_awburst,
    output logic [PORTS*ID_W-1:0]   m_awid,
    output logic [PORTS-1:0]        m_wvalid,
    input  logic [PORTS-1:0]        m_wready,
    output logic [PORTS*DW-1:0]     m_wdata,
    output logic [PORTS*DW/8-1:0]   m_wstrb,
    output logic [PORTS-1:0]        m_wlast,
    input  logic [PORTS-1:0]        m_bvalid,
    output logic [PORTS-1:0]        m_bready,
    input  logic [PORTS*ID_W-1:0]   m_bid,
    input  logic [PORTS*2-1:0]      m_bresp,
    output logic                                     cu_w_valid,
    input  logic                                     cu_w_ready,
    output logic [`M3V_P_IN*`M3V_P_OUT*`M3V_W_W-1:0] cu_w_weights,
    output logic [`M3V_P_OUT*`M3V_ACC_W-1:0]         cu_w_bias,
    output logic [`M3V_P_OUT*`M3V_SHIFT_W-1:0]       cu_w_shift,
    output logic [`M3V_OB_W-1:0]                     cu_w_out_bits,
    output logic [`M3V_CSH_W-1:0]                    cu_w_comb_shift,
    output logic                                     cu_w_combine,
    output logic                                     cu_w_gelu,
    output logic [6:0]                               cu_w_gelu_in_frac,
    output logic [6:0]                               cu_w_gelu_out_frac,
    output logic [`M3V_OB_W-1:0]                     cu_w_gelu_out_bits,
    output logic                                     cu_x_valid,
    input  logic                                     cu_x_ready,
    output logic                                     cu_x_wnext,
    output logic [`M3V_P_IN*`M3V_X_W-1:0]            cu_x_act,
    output logic [`M3V_P_OUT*`M3V_ACT_W-1:0]         cu_x_eout,
    output logic [`M3V_SCORE_W-1:0]                  cu_x_score,
    output logic [SLOT_W-1:0]                        cu_x_slot,
    output logic                                     cu_x_first,
    output logic                                     cu_x_last,
    output logic [`M3V_TAG_W-1:0]                    cu_x_tag,
    input  logic                                     cu_o_valid,
    output logic                                     cu_o_ready,
    input  logic [`M3V_P_OUT*`M3V_ACT_W-1:0]         cu_o_data,
    input  logic [`M3V_TAG_W-1:0]                    cu_o_tag,
    output logic                                     cu_w_raw,
    input  logic                                     cu_o_raw_valid,
    output logic                                     cu_o_raw_ready,
    input  logic [`M3V_P_OUT*`M3V_ACC_W-1:0]         cu_o_raw_acc,
    input  logic [`M3V_TAG_W-1:0]                    cu_o_raw_tag
);
    // raw compute-unit rows (w_raw) belong to the attention engine; this engine makes none
    assign cu_w_raw       = 1'b0;
    assign cu_o_raw_ready = 1'b0;
    logic unused_raw;
    assign unused_raw = &{1'b0, cu_o_raw_valid, cu_o_raw_acc, cu_o_raw_tag};
    localparam int BB     = DW / 8;
    localparam int LN     = DW / 16;                      // uint16 lanes of a write beat
    localparam int PI     = `M3V_P_IN;
    localparam int PO     = `M3V_P_OUT;
    localparam int AW     = `M3V_ACT_W;
    localparam int WW     = `M3V_W_W;
    localparam int ACC    = `M3V_ACC_W;
    localparam int SHW    = `M3V_SHIFT_W;
    localparam int OBW    = `M3V_OB_W;
    localparam int TGW    = `M3V_TAG_W;
    localparam int ME     = `M3V_MAX_EXPERTS;
    localparam int MK     = `M3V_MAX_K;
    localparam int MT     = `M3V_MAX_TOKENS;
    localparam int MD     = `M3V_MAX_DIM;
    localparam int KT     = (MD + PI - 1) / PI;           // P_IN chunks of the longest row
    localparam int KA     = (KT > 1) ? $clog2(KT) : 1;
    localparam int NOT    = (ME + PO - 1) / PO;           // P_OUT tiles of the most experts
    localparam int OTW    = (NOT > 1) ? $clog2(NOT) : 1;
    localparam int XA     = $clog2(2 * KT);               // row buffer address {token parity, chunk}
    // topk_gate's widths
    localparam int EW     = (ME > 1) ? $clog2(ME) : 1;
    localparam int NW     = $clog2(ME + 1);
    localparam int KW     = (MK > 1) ? $clog2(MK) : 1;
    localparam int KCW    = $clog2(MK + 1);
    localparam int TTW    = (MT > 1) ? $clog2(MT) : 1;
    localparam int TCW    = $clog2(MT + 1);
    localparam int QOW    = $clog2(MT * MK + 1);
    localparam int GW     = `M3V_GATE_BITS;
    localparam int DCW    = $clog2(MD + PI + 1);          // chunk positions along D
    localparam int NPW    = $clog2(ME + PO + 1);          // tile positions along N
    // chunk sizes of the two readers (bytes)
    localparam int CB0    = (2 * ME > 8) ? 2 * ME : 8;    // a w row, a bias, a shift
    localparam int CB1    = 2 * PI;                       // a P_IN chunk of an x row
    localparam int NB0    = $clog2(CB0 + 1);
    localparam int NB1    = $clog2(CB1 + 1);
    // write lanes: up to SE uint16 elements per load
    localparam int SE     = (ME + 1 > MK) ? ME + 1 : MK;
    localparam int SEW    = $clog2(SE + 1);
    localparam int LNW    = $clog2(LN + 1);
    localparam int SH_MAX = (1 << (SHW - 1)) - 1;
    localparam int SH_MIN = -(1 << (SHW - 1));

    function automatic logic [31:0] fw(input logic [511:0] r, input int k);
        fw = r[32*k +: 32];
    endfunction

    function automatic logic [35:0] align64(input logic [35:0] n);
        align64 = (n + 36'd63) & ~36'd63;
    endfunction

    function automatic logic [15:0] to16(input logic [AW-1:0] v);
        to16 = 16'($signed(v));
    endfunction

    // ---------------------------------------------------------------- control
    localparam logic [2:0] S_IDLE = 3'd0, S_CHK = 3'd1, S_DEC = 3'd2, S_RUN = 3'd3, S_FIN = 3'd4;
    logic [2:0] state;
    logic       run;
    assign run = state == S_RUN;

    // fields
    logic [31:0] f_x, f_lg, f_idx, f_sc, f_q, f_w, f_b, f_s, f_ws, f_bs, f_ss, f_t, f_d, f_nk, f_fmt, f_w0;
    assign f_w0  = fw(rec, 0);
    assign f_x   = fw(rec, `M3V_ISA_F_MOE_GATE_X_REF);
    assign f_lg  = fw(rec, `M3V_ISA_F_MOE_GATE_LOGITS_REF);
    assign f_idx = fw(rec, `M3V_ISA_F_MOE_GATE_IDX_REF);
    assign f_sc  = fw(rec, `M3V_ISA_F_MOE_GATE_SCORE_REF);
    assign f_q   = fw(rec, `M3V_ISA_F_MOE_GATE_QUEUE_REF);
    assign f_w   = fw(rec, `M3V_ISA_F_MOE_GATE_W_REF);
    assign f_b   = fw(rec, `M3V_ISA_F_MOE_GATE_BIAS_REF);
    assign f_s   = fw(rec, `M3V_ISA_F_MOE_GATE_SHIFT_REF);
    assign f_ws  = fw(rec, `M3V_ISA_F_MOE_GATE_W_STRIDE);
    assign f_bs  = fw(rec, `M3V_ISA_F_MOE_GATE_BIAS_STRIDE);
    assign f_ss  = fw(rec, `M3V_ISA_F_MOE_GATE_SHIFT_STRIDE);
    assign f_t   = fw(rec, `M3V_ISA_F_MOE_GATE_TOKENS);
    assign f_d   = fw(rec, `M3V_ISA_F_MOE_GATE_DIM);
    assign f_nk  = fw(rec, `M3V_ISA_F_MOE_GATE_EXPERTS_K);
    assign f_fmt = fw(rec, `M3V_ISA_F_MOE_GATE_FMT);

    logic        w16_c, fsig_c;
    logic [5:0]  fbits_c;
    logic [15:0] n_c, k_c;
    logic        lim_bad_c;
    assign w16_c   = f_w0[8 + `M3V_ISA_FLAG_W16];
    assign fbits_c = f_fmt[5:0];
    assign fsig_c  = f_fmt[16];
    assign n_c     = f_nk[15:0];
    assign k_c     = f_nk[31:16];
    assign lim_bad_c = f_t == 0 || f_t > 32'(MT) || f_d == 0 || f_d > 32'(MD) || n_c == 0 || n_c > 16'(ME) ||
                       k_c == 0 || k_c > n_c || k_c > 16'(MK) || fbits_c == 0 ||
                       (fsig_c ? 32'(fbits_c) > 32'(AW) : 32'(fbits_c) >= 32'(AW)) ||
                       (w16_c ? WW < 16 : WW < 8);

    // S_CHK registers: task-offset refs and byte counts (exact whenever the limits hold)
    logic        lim_bad, ref_ovf, w16, fsig;
    logic [5:0]  fbits;
    logic [7:0]  frac8;
    logic [31:0] r_w, r_b, r_s;
    logic [35:0] nb_x, nb_w, nb_b, nb_s, nb_lg, nb_tk, nb_q, q_tok_off, q_dst_off, nb_qoff;
    logic [TCW-1:0] t_r;
    logic [DCW-1:0] d_r;
    logic [NW-1:0]  n_r;
    logic [KCW-1:0] k_r;
    logic [63:0]    sum_w, sum_b, sum_s;
    assign sum_w = 64'(f_w) + 64'(task_idx) * 64'(f_ws);
    assign sum_b = 64'(f_b) + 64'(task_idx) * 64'(f_bs);
    assign sum_s = 64'(f_s) + 64'(task_idx) * 64'(f_ss);

    logic [35:0] t36, d36, n36, k36, tk36;
    assign t36  = 36'(f_t[15:0]);
    assign d36  = 36'(f_d[15:0]);
    assign n36  = 36'(n_c);
    assign k36  = 36'(k_c[7:0]);
    assign tk36 = t36 * k36;

    logic bad_c;
    assign bad_c = lim_bad || ref_ovf ||
        !m3v_fits(f_x, 65'(nb_x), sz_wgt, sz_arena, sz_in, sz_out) ||
        !m3v_fits(r_w, 65'(nb_w), sz_wgt, sz_arena, sz_in, sz_out) ||
        !m3v_fits(r_b, 65'(nb_b), sz_wgt, sz_arena, sz_in, sz_out) ||
        !m3v_fits(r_s, 65'(nb_s), sz_wgt, sz_arena, sz_in, sz_out) ||
        !m3v_writable(f_lg) || !m3v_fits(f_lg, 65'(nb_lg), sz_wgt, sz_arena, sz_in, sz_out) ||
        !m3v_writable(f_idx) || !m3v_fits(f_idx, 65'(nb_tk), sz_wgt, sz_arena, sz_in, sz_out) ||
        !m3v_writable(f_sc) || !m3v_fits(f_sc, 65'(nb_tk), sz_wgt, sz_arena, sz_in, sz_out) ||
        !m3v_writable(f_q) || !m3v_fits(f_q, 65'(nb_q), sz_wgt, sz_arena, sz_in, sz_out);

    // DDR addresses of the run
    logic [ADDR_W-1:0] a_x, a_w, a_b, a_s, a_lg, a_idx, a_sc, a_q;
    function automatic logic [ADDR_W-1:0] ddr(input logic [31:0] r, input logic [63:0] bw, ba, bi, bo);
        ddr = ADDR_W'(m3v_addr(r, bw, ba, bi, bo));
    endfunction

    // ---------------------------------------------------------------- parameter loading (port 0)
    logic              p0_cmd_valid, p0_cmd_ready, p0_valid, p0_ready, p0_pop;
    logic [ADDR_W-1:0] p0_cmd_addr;
    logic [31:0]       p0_cmd_bytes;
    logic [NB0-1:0]    p0_n;
    logic [CB0*8-1:0]  p0_data;
    logic [1:0]        p0_issue, p0_phase;         // commands issued; chunk phase: 0 w, 1 bias, 2 shift, 3 done
    logic [DCW-1:0]    wr_i;                       // w row being loaded
    logic [NW-1:0]     pe;                         // expert of the bias / shift chunk
    logic              params_done;

    assign params_done  = p0_phase == 2'd3;
    assign p0_cmd_valid = run && p0_issue != 2'd3;
    always_comb begin
        case (p0_issue)
            2'd0:    begin p0_cmd_addr = a_w; p0_cmd_bytes = nb_w[31:0]; end
            2'd1:    begin p0_cmd_addr = a_b; p0_cmd_bytes = nb_b[31:0]; end
            default: begin p0_cmd_addr = a_s; p0_cmd_bytes = nb_s[31:0]; end
        endcase
        case (p0_phase)
            2'd0:    p0_n = w16 ? NB0'(2 * 32'(n_r)) : NB0'(n_r);
            2'd1:    p0_n = NB0'(8);
            default: p0_n = NB0'(1);
        endcase
    end
    assign p0_ready = run && !params_done;
    assign p0_pop   = p0_valid && p0_ready;

    gate_chunk_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST),
                        .CB(CB0)) u_p0 (
        .clk, .rst_n, .cmd_valid(p0_cmd_valid), .cmd_ready(p0_cmd_ready), .cmd_addr(p0_cmd_addr),
        .cmd_bytes(p0_cmd_bytes), .chunk_n(p0_n), .out_valid(p0_valid), .out_ready(p0_ready), .out_data(p0_data),
        .arvalid(m_arvalid[0]), .arready(m_arready[0]), .araddr(m_araddr[0 +: ADDR_W]), .arlen(m_arlen[0 +: 8]),
        .arsize(m_arsize[0 +: 3]), .arburst(m_arburst[0 +: 2]), .arid(m_arid[0 +: ID_W]),
        .rvalid(m_rvalid[0]), .rready(m_rready[0]), .rdata(m_rdata[0 +: DW]), .rid(m_rid[0 +: ID_W]),
        .rlast(m_rlast[0]), .rresp(m_rresp[0 +: 2]));

    // a w row: N weights, zeros above (the chunk's bytes past N weights are 0)
    logic [ME*WW-1:0] w_row;
    always_comb begin
        for (int e = 0; e < ME; e++)
            w_row[e*WW +: WW] = w16 ? WW'($signed(p0_data[16*e +: 16])) : WW'($signed(p0_data[8*e +: 8]));
    end

    // the shift of a chunk, clamped into SHW bits
    logic [SHW-1:0] sh_in;
    logic signed [31:0] sh32;
    always_comb begin
        sh32 = 32'($signed(p0_data[7:0]));
        if (sh32 > SH_MAX) sh32 = SH_MAX;
        if (sh32 < SH_MIN) sh32 = SH_MIN;
        sh_in = sh32[SHW-1:0];
    end

    // W RAM: bank i holds rows i, i + P_IN, ... (async read: the tile of a beat in one cycle)
    logic [KA-1:0]           wr_k, kw;
    logic [$clog2(PI+1)-1:0] wr_r;
    logic [PI*NOT*PO*WW-1:0] wpad;
    genvar gi;
    generate
        for (gi = 0; gi < PI; gi = gi + 1) begin : g_wbank
            logic [ME*WW-1:0] wram [0:KT-1];
            always_ff @(posedge clk)
                if (p0_pop && p0_phase == 2'd0 && wr_r == ($clog2(PI+1))'(gi)) wram[wr_k] <= w_row;
            assign wpad[gi*NOT*PO*WW +: NOT*PO*WW] = (NOT*PO*WW)'(wram[kw]);
        end
    endgenerate

    logic [ME*ACC-1:0] bias_v;
    logic [ME*SHW-1:0] shift_v;
    logic [NOT*PO*ACC-1:0] bias_pad;
    logic [NOT*PO*SHW-1:0] shift_pad;
    assign bias_pad  = (NOT*PO*ACC)'(bias_v);
    assign shift_pad = (NOT*PO*SHW)'(shift_v);

    always_ff @(posedge clk) begin
        if (state == S_DEC) begin
            bias_v  <= '0;
            shift_v <= '0;
            p0_issue <= '0;
            p0_phase <= '0;
            wr_i <= '0;
            wr_k <= '0;
            wr_r <= '0;
            pe   <= '0;
        end else if (run) begin
            if (p0_cmd_valid && p0_cmd_ready) p0_issue <= p0_issue + 2'd1;
            if (p0_pop) begin
                case (p0_phase)
                    2'd0: begin
                        wr_i <= wr_i + 1'b1;
                        if (wr_r == ($clog2(PI+1))'(PI - 1)) begin
                            wr_r <= '0;
                            wr_k <= wr_k + 1'b1;
                        end else begin
                            wr_r <= wr_r + 1'b1;
                        end
                        if (wr_i + 1'b1 == d_r) p0_phase <= 2'd1;
                    end
                    2'd1: begin
                        for (int e = 0; e < ME; e++)
                            if (pe == NW'(e)) bias_v[e*ACC +: ACC] <= p0_data[ACC-1:0];
                        pe <= pe + 1'b1;
                        if (pe + 1'b1 == n_r) begin
                            pe <= '0;
                            p0_phase <= 2'd2;
                        end
                    end
                    default: begin
                        for (int e = 0; e < ME; e++)
                            if (pe == NW'(e)) shift_v[e*SHW +: SHW] <= sh_in;
                        pe <= pe + 1'b1;
                        if (pe + 1'b1 == n_r) p0_phase <= 2'd3;
                    end
                endcase
            end
        end
    end

    // ---------------------------------------------------------------- x rows (port 1)
    logic              p1_cmd_valid, p1_cmd_ready, p1_valid, p1_ready, p1_pop, p1_issued;
    logic [NB1-1:0]    p1_n;
    logic [CB1*8-1:0]  p1_data;
    logic [TCW-1:0]    ft;            // token being filled
    logic [KA-1:0]     fk;
    logic [DCW-1:0]    fkp;           // fk · P_IN
    logic [1:0]        full;          // row buffer halves holding a whole token
    logic              f_last;
    logic [PI*AW-1:0]  x_chunk;

    assign p1_cmd_valid = run && !p1_issued;
    assign f_last   = fkp + DCW'(PI) >= d_r;
    assign p1_n     = f_last ? NB1'(2 * 32'(d_r - fkp)) : NB1'(CB1);
    assign p1_ready = run && ft != t_r && !full[ft[0]];
    assign p1_pop   = p1_valid && p1_ready;
    always_comb
        for (int j = 0; j < PI; j++) x_chunk[j*AW +: AW] = AW'($signed(p1_data[16*j +: 16]));

    gate_chunk_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST),
                        .CB(CB1)) u_p1 (
        .clk, .rst_n, .cmd_valid(p1_cmd_valid), .cmd_ready(p1_cmd_ready), .cmd_addr(a_x),
        .cmd_bytes(nb_x[31:0]), .chunk_n(p1_n), .out_valid(p1_valid), .out_ready(p1_ready), .out_data(p1_data),
        .arvalid(m_arvalid[1]), .arready(m_arready[1]), .araddr(m_araddr[ADDR_W +: ADDR_W]),
        .arlen(m_arlen[8 +: 8]), .arsize(m_arsize[3 +: 3]), .arburst(m_arburst[2 +: 2]),
        .arid(m_arid[ID_W +: ID_W]), .rvalid(m_rvalid[1]), .rready(m_rready[1]), .rdata(m_rdata[DW +: DW]),
        .rid(m_rid[ID_W +: ID_W]), .rlast(m_rlast[1]), .rresp(m_rresp[2 +: 2]));

    logic [PI*AW-1:0] xbuf [0:2*KT-1];
    logic [XA-1:0]    fa, xa;
    assign fa = XA'(ft[0]) * XA'(KT) + XA'(fk);
    always_ff @(posedge clk) if (p1_pop) xbuf[fa] <= x_chunk;

    // ---------------------------------------------------------------- compute unit feed
    // Tiles (w side) and beats (x side) walk the same order, token / P_OUT tile / P_IN chunk; the
    // compute unit's shadow tile keeps them paired (each beat swaps in the next tile).
    logic [TCW-1:0] tw, tx;
    logic [OTW-1:0] ow, ox;
    logic [KA-1:0]  kx;
    logic [DCW-1:0] kwp, kxp;
    logic [NPW-1:0] owp, oxp;
    logic           w_klast, w_olast, x_klast, x_olast, w_fire, x_fire, x_row_done;
    assign w_klast = kwp + DCW'(PI) >= d_r;
    assign w_olast = owp + NPW'(PO) >= NPW'(n_r);
    assign x_klast = kxp + DCW'(PI) >= d_r;
    assign x_olast = oxp + NPW'(PO) >= NPW'(n_r);

    assign cu_w_valid = run && params_done && tw != t_r;
    assign w_fire     = cu_w_valid && cu_w_ready;
    always_comb begin
        for (int i = 0; i < PI; i++)
            for (int c = 0; c < PO; c++) begin
                cu_w_weights[(i*PO + c)*WW +: WW] = '0;
                for (int o = 0; o < NOT; o++)
                    if (ow == OTW'(o))
                        cu_w_weights[(i*PO + c)*WW +: WW] = wpad[i*NOT*PO*WW + (o*PO + c)*WW +: WW];
            end
        for (int c = 0; c < PO; c++) begin
            cu_w_bias[c*ACC +: ACC]  = '0;
            cu_w_shift[c*SHW +: SHW] = '0;
            for (int o = 0; o < NOT; o++)
                if (ow == OTW'(o)) begin
                    cu_w_bias[c*ACC +: ACC]  = bias_pad[(o*PO + c)*ACC +: ACC];
                    cu_w_shift[c*SHW +: SHW] = shift_pad[(o*PO + c)*SHW +: SHW];
                end
        end
    end
    assign cu_w_out_bits      = fsig ? OBW'(fbits) : OBW'(fbits) + OBW'(1);
    assign cu_w_comb_shift    = '0;
    assign cu_w_combine       = 1'b0;
    assign cu_w_gelu          = 1'b0;
    assign cu_w_gelu_in_frac  = '0;
    assign cu_w_gelu_out_frac = '0;
    assign cu_w_gelu_out_bits = '0;

    assign xa          = XA'(tx[0]) * XA'(KT) + XA'(kx);
    assign cu_x_valid  = run && params_done && tx != t_r && full[tx[0]];
    assign x_fire      = cu_x_valid && cu_x_ready;
    assign x_row_done  = x_fire && x_klast && x_olast;
    assign cu_x_wnext  = 1'b1;
    always_comb
        for (int i = 0; i < PI; i++)
            cu_x_act[i*`M3V_X_W +: `M3V_X_W] = `M3V_X_W'(signed'(xbuf[xa][i*AW +: AW]));
    assign cu_x_eout   = '0;
    assign cu_x_score  = '0;
    assign cu_x_slot   = '0;
    assign cu_x_first  = kx == '0;
    assign cu_x_last   = x_klast;
    assign cu_x_tag    = TGW'(tx);

    always_ff @(posedge clk) begin
        if (state == S_DEC) begin
            p1_issued <= 1'b0;
            ft <= '0; fk <= '0; fkp <= '0; full <= '0;
            tw <= '0; ow <= '0; kw <= '0; kwp <= '0; owp <= '0;
            tx <= '0; ox <= '0; kx <= '0; kxp <= '0; oxp <= '0;
        end else if (run) begin
            if (p1_cmd_valid && p1_cmd_ready) p1_issued <= 1'b1;
            if (p1_pop) begin
                if (f_last) begin
                    fk  <= '0;
                    fkp <= '0;
                    ft  <= ft + 1'b1;
                end else begin
                    fk  <= fk + 1'b1;
                    fkp <= fkp + DCW'(PI);
                end
            end
            // a half is set by its fill and cleared by its drain; never both in one cycle
            for (int h = 0; h < 2; h++)
                if (p1_pop && f_last && ft[0] == h[0])        full[h] <= 1'b1;
                else if (x_row_done && tx[0] == h[0])         full[h] <= 1'b0;
            if (w_fire) begin
                if (w_klast) begin
                    kw  <= '0;
                    kwp <= '0;
                    if (w_olast) begin
                        ow  <= '0;
                        owp <= '0;
                        tw  <= tw + 1'b1;
                    end else begin
                        ow  <= ow + 1'b1;
                        owp <= owp + NPW'(PO);
                    end
                end else begin
                    kw  <= kw + 1'b1;
                    kwp <= kwp + DCW'(PI);
                end
            end
            if (x_fire) begin
                if (x_klast) begin
                    kx  <= '0;
                    kxp <= '0;
                    if (x_olast) begin
                        ox  <= '0;
                        oxp <= '0;
                        tx  <= tx + 1'b1;
                    end else begin
                        ox  <= ox + 1'b1;
                        oxp <= oxp + NPW'(PO);
                    end
                end else begin
                    kx  <= kx + 1'b1;
                    kxp <= kxp + DCW'(PI);
                end
            end
        end
    end

    // ---------------------------------------------------------------- logits rows
    logic [ME*AW-1:0] lrow;
    logic [OTW-1:0]   oc;
    logic [NPW-1:0]   ocp;
    logic             need_tk, need_wr, lrow_busy, o_fire, o_last;
    logic [TCW-1:0]   lg_rows;        // rows handed to lane 0
    assign lrow_busy  = need_tk || need_wr;
    assign cu_o_ready = run && !lrow_busy;
    assign o_fire     = cu_o_valid && cu_o_ready;
    assign o_last     = ocp + NPW'(PO) >= NPW'(n_r);

    always_ff @(posedge clk) begin
        if (o_fire)
            for (int e = 0; e < ME; e++)
                if (oc == OTW'(e / PO)) begin
                    // unsigned formats: saturated to bits + 1 signed bits, negatives clamp to 0
                    if (!fsig && cu_o_data[(e % PO)*AW + AW - 1]) lrow[e*AW +: AW] <= '0;
                    else                                          lrow[e*AW +: AW] <= cu_o_data[(e % PO)*AW +: AW];
                end
    end

    // ---------------------------------------------------------------- top-k, scores, queues
    logic                 tk_in_valid, tk_in_ready, tk_o_valid, tk_o_ready, tk_q_valid, tk_q_ready, tk_q_last;
    logic [MK*EW-1:0]     tk_idx;
    logic [MK*GW-1:0]     tk_score;
    logic [TTW-1:0]       tk_tag, tk_q_token;
    logic [EW-1:0]        tk_q_expert;
    logic [KW-1:0]        tk_q_slot;
    logic [(ME+1)*QOW-1:0] tk_q_offsets;
    logic [6:0]           cfg_frac;
    always_comb begin
        logic signed [7:0] f8;
        f8 = $signed(frac8);
        if (f8 > 8'sd63)       cfg_frac = 7'd63;
        else if (f8 < -8'sd64) cfg_frac = 7'h40;
        else                   cfg_frac = frac8[6:0];
    end
    assign tk_in_valid = run && need_tk;

    topk_gate #(.MAX_E(ME), .MAX_K(MK), .MAX_T(MT), .LOGIT_W(AW), .FRAC_W(7), .GW(GW)) u_topk (
        .clk, .rst_n, .cfg_n(n_r), .cfg_k(k_r), .cfg_t(t_r), .cfg_frac(cfg_frac),
        .in_valid(tk_in_valid), .in_ready(tk_in_ready), .logits(lrow),
        .o_valid(tk_o_valid), .o_ready(tk_o_ready), .o_idx(tk_idx), .o_score(tk_score), .o_tag(tk_tag),
        .q_valid(tk_q_valid), .q_ready(tk_q_ready), .q_expert(tk_q_expert), .q_token(tk_q_token),
        .q_slot(tk_q_slot), .q_last(tk_q_last), .q_offsets(tk_q_offsets));

    // ---------------------------------------------------------------- write lanes
    logic [2:0]          ld_valid, ld_ready, ld_eos;
    logic [3*SE*16-1:0]  ld_data;
    logic [3*SEW-1:0]    ld_n;
    logic [2:0]          l_idle;
    logic [5:0]          l_stage;      // 2 bits per lane: commands accepted
    logic [3*ADDR_W-1:0] c1_addr, c2_addr;
    logic [3*32-1:0]     c1_bytes, c2_bytes;
    logic                q_fire, tko_fire;

    assign tk_o_ready = run && ld_ready[1] && ld_ready[2];
    assign tko_fire   = tk_o_valid && tk_o_ready;
    assign tk_q_ready = run && ld_ready[1] && ld_ready[2] && (!tk_q_last || (ld_ready[0] && !need_wr));
    assign q_fire     = tk_q_valid && tk_q_ready;

    always_comb begin
        ld_data = '0;
        // lane 0: a logits row, or q_off with the last queue entry
        ld_valid[0] = run && (need_wr || (q_fire && tk_q_last));
        if (need_wr) begin
            for (int e = 0; e < ME; e++) ld_data[e*16 +: 16] = to16(lrow[e*AW +: AW]);
            ld_n[0 +: SEW] = SEW'(n_r);
            ld_eos[0]      = lg_rows + 1'b1 == t_r;
        end else begin
            for (int e = 0; e <= ME; e++) ld_data[e*16 +: 16] = 16'(tk_q_offsets[e*QOW +: QOW]);
            ld_n[0 +: SEW] = SEW'(n_r) + SEW'(1);
            ld_eos[0]      = 1'b1;
        end
        // lanes 1, 2: a token's idx and score, or one queue entry's token and destination row
        ld_valid[1] = tko_fire || q_fire;
        ld_valid[2] = tko_fire || q_fire;
        if (tk_o_valid) begin
            for (int s = 0; s < MK; s++) begin
                ld_data[SE*16 + s*16 +: 16]   = 16'(tk_idx[s*EW +: EW]);
                ld_data[2*SE*16 + s*16 +: 16] = tk_score[s*GW +: GW];
            end
            ld_n[SEW +: SEW]   = SEW'(k_r);
            ld_n[2*SEW +: SEW] = SEW'(k_r);
            ld_eos[1] = 32'(tk_tag) + 1 == 32'(t_r);
            ld_eos[2] = 32'(tk_tag) + 1 == 32'(t_r);
        end else begin
            ld_data[SE*16 +: 16]   = 16'(tk_q_token);
            ld_data[2*SE*16 +: 16] = 16'(32'(tk_q_token) * 32'(k_r) + 32'(tk_q_slot));
            ld_n[SEW +: SEW]   = SEW'(1);
            ld_n[2*SEW +: SEW] = SEW'(1);
            ld_eos[1] = tk_q_last;
            ld_eos[2] = tk_q_last;
        end
    end

    assign c1_addr  = {a_sc, a_idx, a_lg};
    assign c1_bytes = {nb_tk[31:0], nb_tk[31:0], nb_lg[31:0]};
    assign c2_addr  = {a_q + ADDR_W'(q_dst_off), a_q + ADDR_W'(q_tok_off), a_q};
    assign c2_bytes = {nb_tk[31:0], nb_tk[31:0], nb_qoff[31:0]};

    genvar gl;
    generate
        for (gl = 0; gl < 3; gl = gl + 1) begin : g_lane
            localparam int PP = gl;
            logic [SE*16-1:0] hold;
            logic [SEW-1:0]   rem;
            logic             busy, eos, c_valid, c_ready, c_last, c_fire;
            logic [LN*16-1:0] c_data;
            logic [LNW-1:0]   c_n;
            logic             pk_valid, pk_ready;
            logic [DW-1:0]    pk_data;
            logic             cmd_valid, cmd_ready;
            logic [ADDR_W-1:0] cmd_addr;
            logic [31:0]      cmd_bytes;

            assign c_last  = rem <= SEW'(LN);
            assign c_valid = busy;
            assign c_fire  = c_valid && c_ready;
            assign c_n     = c_last ? LNW'(rem) : LNW'(LN);
            assign c_data  = hold[LN*16-1:0];
            assign ld_ready[gl] = !busy || (c_fire && c_last);

            always_ff @(posedge clk) begin
                if (!rst_n || state == S_DEC) begin
                    busy <= 1'b0;
                end else begin
                    if (c_fire) begin
                        hold <= (SE*16)'(hold >> (LN*16));
                        rem  <= rem - SEW'(c_n);
                        if (c_last) busy <= 1'b0;
                    end
                    if (ld_valid[gl] && ld_ready[gl]) begin
                        hold <= ld_data[gl*SE*16 +: SE*16];
                        rem  <= ld_n[gl*SEW +: SEW];
                        eos  <= ld_eos[gl];
                        busy <= 1'b1;
                    end
                end
            end

            elem_packer #(.P(LN), .EW(16)) u_pack (
                .clk, .rst_n, .in_valid(c_valid), .in_ready(c_ready), .in_data(c_data), .in_n(c_n),
                .in_eos(eos && c_last), .out_valid(pk_valid), .out_ready(pk_ready), .out_data(pk_data));

            assign cmd_valid = run && l_stage[2*gl +: 2] != 2'd2;
            assign cmd_addr  = (l_stage[2*gl +: 2] == 2'd0) ? c1_addr[gl*ADDR_W +: ADDR_W] : c2_addr[gl*ADDR_W +: ADDR_W];
            assign cmd_bytes = (l_stage[2*gl +: 2] == 2'd0) ? c1_bytes[gl*32 +: 32] : c2_bytes[gl*32 +: 32];
            assign l_idle[gl] = cmd_ready && l_stage[2*gl +: 2] == 2'd2;

            always_ff @(posedge clk) begin
                if (state == S_DEC)               l_stage[2*gl +: 2] <= 2'd0;
                else if (cmd_valid && cmd_ready)  l_stage[2*gl +: 2] <= l_stage[2*gl +: 2] + 2'd1;
            end

            axi_writer #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_wr (
                .clk, .rst_n, .cmd_valid, .cmd_ready, .cmd_addr, .cmd_bytes,
                .in_valid(pk_valid), .in_ready(pk_ready), .in_data(pk_data),
                .awvalid(m_awvalid[PP]), .awready(m_awready[PP]), .awaddr(m_awaddr[PP*ADDR_W +: ADDR_W]),
                .awlen(m_awlen[PP*8 +: 8]), .awsize(m_awsize[PP*3 +: 3]), .awburst(m_awburst[PP*2 +: 2]),
                .awid(m_awid[PP*ID_W +: ID_W]), .wvalid(m_wvalid[PP]), .wready(m_wready[PP]),
                .wdata(m_wdata[PP*DW +: DW]), .wstrb(m_wstrb[PP*BB +: BB]), .wlast(m_wlast[PP]),
                .bvalid(m_bvalid[PP]), .bready(m_bready[PP]), .bid(m_bid[PP*ID_W +: ID_W]),
                .bresp(m_bresp[PP*2 +: 2]));
        end
    endgenerate

    // ports: reads on 0 and 1 only, writes on 0..2; the rest idle
    assign m_arvalid[2] = 1'b0;
    assign m_araddr[2*ADDR_W +: ADDR_W] = '0;
    assign m_arlen[16 +: 8] = '0;
    assign m_arsize[6 +: 3] = '0;
    assign m_arburst[4 +: 2] = '0;
    assign m_arid[2*ID_W +: ID_W] = '0;
    assign m_rready[2] = 1'b0;
    generate
        if (PORTS > 3) begin : g_idle
            assign m_arvalid[PORTS-1:3] = '0;
            assign m_araddr[PORTS*ADDR_W-1:3*ADDR_W] = '0;
            assign m_arlen[PORTS*8-1:24] = '0;
            assign m_arsize[PORTS*3-1:9] = '0;
            assign m_arburst[PORTS*2-1:6] = '0;
            assign m_arid[PORTS*ID_W-1:3*ID_W] = '0;
            assign m_rready[PORTS-1:3] = '0;
            assign m_awvalid[PORTS-1:3] = '0;
            assign m_awaddr[PORTS*ADDR_W-1:3*ADDR_W] = '0;
            assign m_awlen[PORTS*8-1:24] = '0;
            assign m_awsize[PORTS*3-1:9] = '0;
            assign m_awburst[PORTS*2-1:6] = '0;
            assign m_awid[PORTS*ID_W-1:3*ID_W] = '0;
            assign m_wvalid[PORTS-1:3] = '0;
            assign m_wdata[PORTS*DW-1:3*DW] = '0;
            assign m_wstrb[PORTS*BB-1:3*BB] = '0;
            assign m_wlast[PORTS-1:3] = '0;
            assign m_bready[PORTS-1:3] = '0;
            logic unused_hi;
            assign unused_hi = &{1'b0, m_arready[PORTS-1:3], m_rvalid[PORTS-1:3], m_rdata[PORTS*DW-1:3*DW],
                                 m_rid[PORTS*ID_W-1:3*ID_W], m_rlast[PORTS-1:3], m_rresp[PORTS*2-1:6],
                                 m_awready[PORTS-1:3], m_wready[PORTS-1:3], m_bvalid[PORTS-1:3],
                                 m_bid[PORTS*ID_W-1:3*ID_W], m_bresp[PORTS*2-1:6]};
        end
    endgenerate

    // ---------------------------------------------------------------- sequencing
    always_ff @(posedge clk) begin
        if (!rst_n) begin
            state  <= S_IDLE;
            done   <= 1'b0;
            status <= '0;
        end else begin
            done <= 1'b0;
            case (state)
                S_IDLE: if (start) state <= S_CHK;
                S_CHK: begin
                    lim_bad <= lim_bad_c;
                    ref_ovf <= sum_w[63:32] != 0 || sum_b[63:32] != 0 || sum_s[63:32] != 0;
                    r_w     <= sum_w[31:0];
                    r_b     <= sum_b[31:0];
                    r_s     <= sum_s[31:0];
                    w16     <= w16_c;
                    fsig    <= fsig_c;
                    fbits   <= fbits_c;
                    frac8   <= f_fmt[15:8];
                    t_r     <= TCW'(f_t);
                    d_r     <= DCW'(f_d);
                    n_r     <= NW'(n_c);
                    k_r     <= KCW'(k_c);
                    nb_x    <= 36'd2 * t36 * d36;
                    nb_w    <= (w16_c ? 36'd2 : 36'd1) * d36 * n36;
                    nb_b    <= 36'd8 * n36;
                    nb_s    <= n36;
                    nb_lg   <= 36'd2 * t36 * n36;
                    nb_tk   <= 36'd2 * tk36;
                    nb_qoff <= 36'd2 * (n36 + 36'd1);
                    q_tok_off <= align64(36'd2 * (n36 + 36'd1));
                    q_dst_off <= align64(36'd2 * (n36 + 36'd1)) + align64(36'd2 * tk36);
                    nb_q    <= align64(36'd2 * (n36 + 36'd1)) + 36'd2 * align64(36'd2 * tk36);
                    state   <= S_DEC;
                end
                S_DEC: begin
                    a_x   <= ddr(f_x, base_wgt, base_arena, base_in, base_out);
                    a_w   <= ddr(r_w, base_wgt, base_arena, base_in, base_out);
                    a_b   <= ddr(r_b, base_wgt, base_arena, base_in, base_out);
                    a_s   <= ddr(r_s, base_wgt, base_arena, base_in, base_out);
                    a_lg  <= ddr(f_lg, base_wgt, base_arena, base_in, base_out);
                    a_idx <= ddr(f_idx, base_wgt, base_arena, base_in, base_out);
                    a_sc  <= ddr(f_sc, base_wgt, base_arena, base_in, base_out);
                    a_q   <= ddr(f_q, base_wgt, base_arena, base_in, base_out);
                    if (bad_c) begin
                        status <= 4'(`M3V_ISA_STATUS_OVER_LIMIT);
                        state  <= S_FIN;
                    end else begin
                        status <= 4'(`M3V_ISA_STATUS_OK);
                        state  <= S_RUN;
                    end
                end
                S_RUN: if (&l_idle) state <= S_FIN;
                S_FIN: begin
                    done  <= 1'b1;
                    state <= S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    // the logits row: filled by the compute unit, handed to topk_gate and lane 0
    always_ff @(posedge clk) begin
        if (state == S_DEC) begin
            oc <= '0;
            ocp <= '0;
            need_tk <= 1'b0;
            need_wr <= 1'b0;
            lg_rows <= '0;
        end else if (run) begin
            if (o_fire) begin
                if (o_last) begin
                    oc <= '0;
                    ocp <= '0;
                    need_tk <= 1'b1;
                    need_wr <= 1'b1;
                end else begin
                    oc <= oc + 1'b1;
                    ocp <= ocp + NPW'(PO);
                end
            end
            if (tk_in_valid && tk_in_ready) need_tk <= 1'b0;
            if (need_wr && ld_ready[0]) begin
                need_wr <= 1'b0;
                lg_rows <= lg_rows + 1'b1;
            end
        end
    end

    assign active = x_fire || (run && !tk_in_ready);

    logic unused_ok;
    assign unused_ok = &{1'b0, cu_o_tag, fbits, m_arready[2], m_rvalid[2], m_rdata[2*DW +: DW],
                         m_rid[2*ID_W +: ID_W], m_rlast[2], m_rresp[4 +: 2], tk_q_expert, f_w0, f_fmt, sz_wgt, wr_i, nb_x, nb_w, nb_b, nb_s,
                         nb_lg, nb_tk, nb_qoff, q_tok_off, q_dst_off, nb_q};
endmodule
