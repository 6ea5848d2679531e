// gate_chunk_reader: an AXI4 read stream cut into chunks of a run-time byte size.
//
// A command (any byte address, byte count >= 1) is read through axi_reader from the beat-aligned
// address below it; the leading bytes of its first beat are dropped, so the command's bytes form
// one dense byte stream, continuing the previous command's stream without a gap. The consumer
// takes it in chunks: it sets chunk_n (1..CB bytes, stable while out_valid is low or unaccepted),
// out_valid says that many bytes are buffered, out_data holds them in its low bytes (byte j at
// bits 8j) and zeros above. The consumer must take exactly the bytes its commands asked for.
// A new command is taken once axi_reader has delivered the previous one (cmd_ready); bytes still
// buffered stay in front of the new ones.
// The buffer holds CB + BB bytes; a beat is taken while at most CB bytes are buffered, so chunks
// of BB bytes or more come out at the full rate of one beat per cycle.
module gate_chunk_reader #(
    parameter int DW        = 128,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int MAX_OUT   = 8,
    parameter int MAX_BURST = 16,
    parameter int CB        = 16,
    parameter int NW        = $clog2(CB + 1)
) (
    input  logic              clk,
    input  logic              rst_n,
    input  logic              cmd_valid,
    output logic              cmd_ready,
    input  logic [ADDR_W-1:0] cmd_addr,
    input  logic [31:0]       cmd_bytes,
    input  logic [NW-1:0]     chunk_n,
    output logic              out_valid,
    input  logic              out_ready,
    output logic [CB*8-1:0]   out_data,
    // AXI4 read master
    output logic              arvalid,
    input  logic              arready,
    output logic [ADDR_W-1:0] araddr,
    output logic [7:0]        arlen,
    output logic [2:0]        arsize,
    output logic [1:0]        arburst,
    output logic [ID_W-1:0]   arid,
    input  logic              rvalid,
    output logic              rready,
    input  logic [DW-1:0]     rdata,
    input  logic [ID_W-1:0]   rid,
    input  logic              rlast,
    input  logic [1:0]        rresp
);
    localparam int BB   = DW / 8;
    localparam int BB_L = $clog2(BB);
    localparam int NB_W = BB_L + 1;
    localparam int CAP  = CB + BB;
    localparam int CW   = $clog2(CAP + 1);

    logic              rd_cmd_ready, b_valid, b_ready, b_eos, first;
    logic [DW-1:0]     b_data;
    logic [NB_W-1:0]   b_nbytes;
    logic [BB_L-1:0]   lead, cmd_lead;
    logic [ADDR_W-1:0] rd_addr;
    logic [31:0]       rd_bytes;

    assign cmd_lead  = cmd_addr[BB_L-1:0];
    assign rd_addr   = {cmd_addr[ADDR_W-1:BB_L], {BB_L{1'b0}}};
    assign rd_bytes  = cmd_bytes + 32'(cmd_lead);
    assign cmd_ready = rd_cmd_ready;

    axi_reader #(.DW(DW), .ADDR_W(ADDR_W), .ID_W(ID_W), .MAX_OUT(MAX_OUT), .MAX_BURST(MAX_BURST)) u_rd (
        .clk, .rst_n, .cmd_valid, .cmd_ready(rd_cmd_ready), .cmd_addr(rd_addr), .cmd_bytes(rd_bytes),
        .cmd_eos(1'b0), .out_valid(b_valid), .out_ready(b_ready), .out_data(b_data), .out_nbytes(b_nbytes),
        .out_eos(b_eos), .arvalid, .arready, .araddr, .arlen, .arsize, .arburst, .arid, .rvalid, .rready,
        .rdata, .rid, .rlast, .rresp);

    // ---- the byte buffer: bytes 0..cnt-1 are valid, byte 0 is the oldest
    logic [CAP*8-1:0] buf_q, buf_d, kept, ins, ins_mask, beat_w;
    logic [CW-1:0]    cnt, base, nin;
    logic [DW-1:0]    beat;
    logic             pop, take;

    // the first beat of a command starts `lead` bytes in
    assign beat  = first ? (b_data >> (8 * 32'(lead))) : b_data;
    assign nin   = first ? CW'(b_nbytes) - CW'(lead) : CW'(b_nbytes);

    assign out_valid = cnt >= CW'(chunk_n);
    assign pop       = out_valid && out_ready;
    always_comb
        for (int b = 0; b < CB; b++) out_data[b*8 +: 8] = (32'(b) < 32'(chunk_n)) ? buf_q[b*8 +: 8] : 8'd0;

    assign b_ready = cnt <= CW'(CB);
    assign take    = b_valid && b_ready;
    assign base    = pop ? cnt - CW'(chunk_n) : cnt;
    assign kept    = pop ? (buf_q >> (8 * 32'(chunk_n))) : buf_q;
    assign beat_w  = {{(CAP*8-DW){1'b0}}, beat};
    assign ins     = beat_w << (8 * 32'(base));
    always_comb
        for (int b = 0; b < CAP; b++)
            ins_mask[b*8 +: 8] = {8{take && 32'(b) >= 32'(base) && 32'(b) < 32'(base) + 32'(nin)}};
    assign buf_d = (kept & ~ins_mask) | (ins & ins_mask);

    always_ff @(posedge clk) begin
        buf_q <= buf_d;
        if (cmd_valid && rd_cmd_ready) lead <= cmd_lead;
        if (!rst_n) begin
            cnt   <= '0;
            first <= 1'b0;
        end else begin
            cnt <= base + (take ? nin : '0);
            if (cmd_valid && rd_cmd_ready) first <= 1'b1;
            else if (take)                 first <= 1'b0;
        end
    end

    logic unused_ok;
    assign unused_ok = &{1'b0, b_eos};
endmodule
