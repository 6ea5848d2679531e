// attn_buf: an on-chip buffer of 16-bit elements addressed by a dense element index f, spread
// over NB banks (bank f mod NB, word f / NB), so that any run of up to NB consecutive elements is
// one word per bank: a DMA beat of E lanes is written in one cycle whatever its alignment, and a
// run of RL elements (a P_IN chunk of a key or query row, SM_P lanes of a value row) is read in
// one cycle. The attention engine keeps one head's Q, K and V in three of these.
//
// Write: lanes [wlo, whi) of wdata, lane wlo going to element wflat (whi - wlo <= E <= NB).
// Read: rdata lane l = element rflat + l, combinational. Word addresses wrap at DEPTH (a power of
// two), so a run that reaches past the end reads stale elements, never out of range.
module attn_buf #(
    parameter int NB    = 8,
    parameter int DEPTH = 1024,
    parameter int E     = 8,
    parameter int RL    = 8,
    parameter int EW    = 16,
    parameter int LW    = $clog2(E + 1)
) (
    input  logic             clk,
    input  logic             we,
    input  logic [E*EW-1:0]  wdata,
    input  logic [LW-1:0]    wlo,
    input  logic [LW-1:0]    whi,
    input  logic [31:0]      wflat,
    input  logic [31:0]      rflat,
    output logic [RL*EW-1:0] rdata
);
    localparam int NBL = (NB > 1) ? $clog2(NB) : 1;
    localparam int DW_ = (DEPTH > 1) ? $clog2(DEPTH) : 1;
    localparam int XW  = (LW > NBL ? LW : NBL) + 1;

    logic [NB*EW-1:0] q;

    genvar b;
    generate
        for (b = 0; b < NB; b = b + 1) begin : g_bank
            logic [EW-1:0]  mem [0:DEPTH-1];
            logic [NBL-1:0] woff, roff;
            logic [XW-1:0]  lane;
            logic [31:0]    wf, rf;
            logic [LW-1:0]  lsel;
            assign woff = NBL'(b) - wflat[NBL-1:0];
            assign lane = XW'(wlo) + XW'(woff);
            assign lsel = (lane < XW'(E)) ? LW'(lane) : '0;
            assign wf   = wflat + 32'(woff);
            always_ff @(posedge clk) begin
                if (we && lane < XW'(whi))
                    mem[wf[NBL +: DW_]] <= wdata[lsel*EW +: EW];
            end
            assign roff = NBL'(b) - rflat[NBL-1:0];
            assign rf   = rflat + 32'(roff);
            assign q[b*EW +: EW] = mem[rf[NBL +: DW_]];
            logic unused_ok;
            assign unused_ok = &{1'b0, wf, rf};
        end
    endgenerate

    always_comb
        for (int l = 0; l < RL; l++)
            rdata[l*EW +: EW] = q[NBL'(rflat[NBL-1:0] + NBL'(l))*EW +: EW];
endmodule
