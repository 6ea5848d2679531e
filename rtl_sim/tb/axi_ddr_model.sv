// axi_ddr_model: the DDR behind the accelerator's AXI4 master ports, for simulation only.
//
// It is honest about what a ZCU104's PS DDR4 gives the fabric through the HP ports:
//   * PORTS AXI4 slave ports, DATA_W bits wide (128: 16 bytes per beat, at most one read beat and
//     one write beat per port per cycle);
//   * one bandwidth budget shared by every port, reads and writes: BW_NUM / BW_DEN bytes per cycle
//     (12.8 GB/s at 300 MHz = 128/3 ≈ 42.7 bytes per cycle), kept as a credit that grows by
//     BW_NUM every cycle (capped, so idle cycles cannot be saved up) and pays BW_DEN · DATA_W/8
//     per beat; the port served first rotates every cycle, so no port starves;
//   * LATENCY cycles at least from a read request's acceptance to its first data beat, and from a
//     write's last data beat to its response;
//   * at most MAX_OUT outstanding reads and MAX_OUT outstanding writes per port (arready/awready
//     drop beyond that);
//   * INCR bursts of full-width beats only. A burst that crosses a 4 KB boundary, an unaligned
//     address, a narrow size or a FIXED/WRAP burst is a protocol error: it is counted in
//     `errors`, reported with $display, and still served as a plain INCR burst;
//   * optional random stalls: with `stall_permille` > 0 every port skips a beat opportunity
//     with that probability (per-port LFSRs, seeded from the port number).
// Memory is MEM_WORDS words of DATA_W bits from address 0. Contents come from files: with
// +ddr_load=MANIFEST each line "<hex byte address> <file>" is read with $readmemh (one DATA_W
// hex word per line) at time 0; a pulse on `load` reads the lines of +ddr_reload=MANIFEST the
// same way at run time (the host writing DDR between runs); a pulse on `dump` writes every line
// "<hex byte address> <words> <file>" of +ddr_dump=MANIFEST with $writememh. Both manifests are
// opened at the pulse, so the harness may rewrite them between pulses. The testbench counts cycles and bytes itself
// from the handshakes; bytes_rd / bytes_wr here are the model's own count for cross-checking.
module axi_ddr_model #(
    parameter int PORTS     = 4,
    parameter int DATA_W    = 128,
    parameter int ADDR_W    = 32,
    parameter int ID_W      = 4,
    parameter int LATENCY   = 100,
    parameter int MAX_OUT   = 8,
    parameter int BW_NUM    = 128,
    parameter int BW_DEN    = 3,
    parameter int MEM_WORDS = 1 << 20
) (
    input  logic                     clk,
    input  logic                     rst_n,
    input  logic [9:0]               stall_permille,
    input  logic                     load,
    input  logic                     dump,
    // read address / data, PORTS channels packed side by side
    input  logic [PORTS-1:0]         arvalid,
    output logic [PORTS-1:0]         arready,
    input  logic [PORTS*ADDR_W-1:0]  araddr,
    input  logic [PORTS*8-1:0]       arlen,
    input  logic [PORTS*3-1:0]       arsize,
    input  logic [PORTS*2-1:0]       arburst,
    input  logic [PORTS*ID_W-1:0]    arid,
    output logic [PORTS-1:0]         rvalid,
    input  logic [PORTS-1:0]         rready,
    output logic [PORTS*DATA_W-1:0]  rdata,
    output logic [PORTS*ID_W-1:0]    rid,
    output logic [PORTS-1:0]         rlast,
    output logic [PORTS*2-1:0]       rresp,
    // write address / data / response
    input  logic [PORTS-1:0]         awvalid,
    output logic [PORTS-1:0]         awready,
    input  logic [PORTS*ADDR_W-1:0]  awaddr,
    input  logic [PORTS*8-1:0]       awlen,
    input  logic [PORTS*3-1:0]       awsize,
    input  logic [PORTS*2-1:0]       awburst,
    input  logic [PORTS*ID_W-1:0]    awid,
    input  logic [PORTS-1:0]         wvalid,
    output logic [PORTS-1:0]         wready,
    input  logic [PORTS*DATA_W-1:0]  wdata,
    input  logic [PORTS*DATA_W/8-1:0] wstrb,
    input  logic [PORTS-1:0]         wlast,
    output logic [PORTS-1:0]         bvalid,
    input  logic [PORTS-1:0]         bready,
    output logic [PORTS*ID_W-1:0]    bid,
    output logic [PORTS*2-1:0]       bresp,
    // the model's own counters
    output logic [63:0]              bytes_rd,
    output logic [63:0]              bytes_wr,
    output logic [31:0]              errors
);
    localparam int BEAT_BYTES = DATA_W / 8;
    localparam logic [63:0] BEAT64 = 64'(BEAT_BYTES);
    localparam int BEAT_COST  = BW_DEN * BEAT_BYTES;
    localparam int CREDIT_CAP = BW_NUM + BEAT_COST;   // carries fractions of a beat, never a saved-up burst
    localparam int SIZE_LOG2  = $clog2(BEAT_BYTES);
    localparam int IW         = $clog2(MAX_OUT);   // MAX_OUT is a power of two: ring indices wrap
    localparam int QW         = IW + 1;

    logic [DATA_W-1:0] mem [MEM_WORDS];

    // per-port request queues (ring buffers): byte address, beats left, id, cycle it was accepted
    logic [ADDR_W-1:0] rq_addr [PORTS][MAX_OUT];
    logic [8:0]        rq_len  [PORTS][MAX_OUT];
    logic [ID_W-1:0]   rq_id   [PORTS][MAX_OUT];
    logic [63:0]       rq_t    [PORTS][MAX_OUT];
    logic [IW-1:0]     rq_head [PORTS];
    logic [QW-1:0]     rq_count [PORTS];
    logic [ADDR_W-1:0] wq_addr [PORTS][MAX_OUT];
    logic [8:0]        wq_len  [PORTS][MAX_OUT];
    logic [ID_W-1:0]   wq_id   [PORTS][MAX_OUT];
    logic [IW-1:0]     wq_head [PORTS];
    logic [QW-1:0]     wq_count [PORTS];
    // write responses waiting for their latency
    logic [ID_W-1:0]   bq_id   [PORTS][MAX_OUT];
    logic [63:0]       bq_t    [PORTS][MAX_OUT];
    logic [IW-1:0]     bq_head [PORTS];
    logic [QW-1:0]     bq_count [PORTS];

    logic [63:0] now;
    logic [31:0] credit;
    logic [31:0] lfsr [PORTS];
    int          first_port;

    function automatic logic crosses_4k(input logic [11:0] page_offset, input logic [7:0] len);
        crosses_4k = ({20'd0, page_offset} + (32'(len) + 32'd1) * BEAT_BYTES) > 32'd4096;
    endfunction

    function automatic logic [ADDR_W-1:0] word_index(input logic [ADDR_W-1:0] addr);
        word_index = addr >> SIZE_LOG2;
    endfunction

    // ---- contents from files
    initial begin : initial_load
        string manifest, path;
        int fd, n;
        logic [63:0] addr;
        if ($value$plusargs("ddr_load=%s", manifest)) begin
            fd = $fopen(manifest, "r");
            if (fd == 0) $fatal(1, "axi_ddr_model: cannot open load manifest %s", manifest);
            while (!$feof(fd)) begin
                n = $fscanf(fd, "%h %s\n", addr, path);
                if (n == 2) begin
                    if (addr % BEAT64 != 0) $fatal(1, "axi_ddr_model: load address %h is not aligned", addr);
                    $readmemh(path, mem, int'(addr / BEAT64));
                end
            end
            $fclose(fd);
        end
    end

    always @(posedge clk) begin : load_files
        string manifest, path;
        int fd, n;
        logic [63:0] addr;
        // not at time 0: Verilator's random initial values can show a pulse there, before the
        // harness drives the pins
        if (load && $time != 0 && $value$plusargs("ddr_reload=%s", manifest)) begin
            fd = $fopen(manifest, "r");
            if (fd == 0) $fatal(1, "axi_ddr_model: cannot open reload manifest %s", manifest);
            while (!$feof(fd)) begin
                n = $fscanf(fd, "%h %s\n", addr, path);
                if (n == 2) begin
                    if (addr % BEAT64 != 0) $fatal(1, "axi_ddr_model: load address %h is not aligned", addr);
                    $readmemh(path, mem, int'(addr / BEAT64));
                end
            end
            $fclose(fd);
        end
    end

    always @(posedge clk) begin : dump_files
        string manifest, path;
        int fd, n;
        logic [63:0] addr, words;
        if (dump && $time != 0 && $value$plusargs("ddr_dump=%s", manifest)) begin
            fd = $fopen(manifest, "r");
            if (fd == 0) $fatal(1, "axi_ddr_model: cannot open dump manifest %s", manifest);
            while (!$feof(fd)) begin
                n = $fscanf(fd, "%h %d %s\n", addr, words, path);
                if (n == 3)
                    $writememh(path, mem, int'(addr / BEAT64), int'(addr / BEAT64 + words - 1));
            end
            $fclose(fd);
        end
    end

    // ---- the model, one clocked process: handshakes, credit, queues
    always_ff @(posedge clk) begin
        if (!rst_n) begin
            now <= 0;
            credit <= 0;
            first_port <= 0;
            bytes_rd <= 0;
            bytes_wr <= 0;
            errors <= 0;
            rvalid <= '0;
            bvalid <= '0;
            rlast <= '0;
            for (int p = 0; p < PORTS; p++) begin
                rq_head[p] <= 0; rq_count[p] <= 0;
                wq_head[p] <= 0; wq_count[p] <= 0;
                bq_head[p] <= 0; bq_count[p] <= 0;
                lfsr[p] <= 32'hACE1_0000 ^ (p * 32'h9E37_79B9 + 1);
            end
        end else begin : step
            logic [31:0] c;
            logic [63:0] brd, bwr;
            logic [31:0] err;
            c = credit + BW_NUM > CREDIT_CAP ? CREDIT_CAP : credit + BW_NUM;
            brd = bytes_rd;
            bwr = bytes_wr;
            err = errors;
            now <= now + 1;
            first_port <= (first_port + 1) % PORTS;
            for (int i = 0; i < PORTS; i++) begin : port
                int p;
                logic stall;
                logic [IW-1:0] rh, wh, bh;
                logic [QW-1:0] rc, wc, bc;
                p = (first_port + i) % PORTS;
                rh = rq_head[p]; rc = rq_count[p];
                wh = wq_head[p]; wc = wq_count[p];
                bh = bq_head[p]; bc = bq_count[p];
                lfsr[p] <= {lfsr[p][30:0], lfsr[p][31] ^ lfsr[p][21] ^ lfsr[p][1] ^ lfsr[p][0]};
                stall = stall_permille != 0 && (lfsr[p] % 1000) < {22'd0, stall_permille};

                // read request accepted
                if (arvalid[p] && arready[p]) begin : ar
                    logic [ADDR_W-1:0] a;
                    logic [7:0] l;
                    logic [IW-1:0] slot;
                    a = araddr[p*ADDR_W +: ADDR_W];
                    l = arlen[p*8 +: 8];
                    if (crosses_4k(a[11:0], l) || a[SIZE_LOG2-1:0] != 0 || arsize[p*3 +: 3] != 3'(SIZE_LOG2)
                        || arburst[p*2 +: 2] != 2'b01) begin
                        err = err + 1;
                        $display("axi_ddr_model: port %0d read burst at %h, len %0d violates AXI rules", p, a, l);
                    end
                    slot = rh + rc[IW-1:0];
                    rq_addr[p][slot] <= a;
                    rq_len[p][slot] <= {1'b0, l} + 9'd1;
                    rq_id[p][slot] <= arid[p*ID_W +: ID_W];
                    rq_t[p][slot] <= now;
                    rc = rc + 1'b1;
                end
                // read data: the head burst, once its latency has passed
                if (rvalid[p] && rready[p]) begin
                    rvalid[p] <= 1'b0;
                end
                if ((!rvalid[p] || rready[p]) && rq_count[p] != 0 && now >= rq_t[p][rh] + 64'(LATENCY)
                    && !stall && c >= BEAT_COST) begin
                    c = c - BEAT_COST;
                    brd = brd + BEAT64;
                    rvalid[p] <= 1'b1;
                    rdata[p*DATA_W +: DATA_W] <= mem[word_index(rq_addr[p][rh]) % MEM_WORDS];
                    rid[p*ID_W +: ID_W] <= rq_id[p][rh];
                    rlast[p] <= rq_len[p][rh] == 9'd1;
                    if (rq_len[p][rh] == 9'd1) begin
                        rh = rh + 1'b1;
                        rc = rc - 1'b1;
                    end else begin
                        rq_len[p][rh] <= rq_len[p][rh] - 9'd1;
                        rq_addr[p][rh] <= rq_addr[p][rh] + ADDR_W'(BEAT_BYTES);
                    end
                end
                // write request accepted
                if (awvalid[p] && awready[p]) begin : aw
                    logic [ADDR_W-1:0] a;
                    logic [7:0] l;
                    logic [IW-1:0] slot;
                    a = awaddr[p*ADDR_W +: ADDR_W];
                    l = awlen[p*8 +: 8];
                    if (crosses_4k(a[11:0], l) || a[SIZE_LOG2-1:0] != 0 || awsize[p*3 +: 3] != 3'(SIZE_LOG2)
                        || awburst[p*2 +: 2] != 2'b01) begin
                        err = err + 1;
                        $display("axi_ddr_model: port %0d write burst at %h, len %0d violates AXI rules", p, a, l);
                    end
                    slot = wh + wc[IW-1:0];
                    wq_addr[p][slot] <= a;
                    wq_len[p][slot] <= {1'b0, l} + 9'd1;
                    wq_id[p][slot] <= awid[p*ID_W +: ID_W];
                    wc = wc + 1'b1;
                end
                // write data: wready was offered for the head burst and paid for last cycle
                if (wvalid[p] && wready[p]) begin
                    // byte-wise stores: ports that write different bytes of one word in the same
                    // cycle all land (a whole-word read-modify-write would keep only the last port's)
                    for (int b = 0; b < BEAT_BYTES; b++)
                        if (wstrb[p*BEAT_BYTES + b])
                            mem[word_index(wq_addr[p][wh]) % MEM_WORDS][8*b +: 8] <= wdata[p*DATA_W + 8*b +: 8];
                    bwr = bwr + BEAT64;
                    if (wlast[p] != (wq_len[p][wh] == 9'd1)) begin
                        err = err + 1;
                        $display("axi_ddr_model: port %0d wlast does not match the burst length", p);
                    end
                    if (wq_len[p][wh] == 9'd1) begin
                        bq_id[p][bh + bc[IW-1:0]] <= wq_id[p][wh];
                        bq_t[p][bh + bc[IW-1:0]] <= now;
                        bc = bc + 1'b1;
                        wh = wh + 1'b1;
                        wc = wc - 1'b1;
                    end else begin
                        wq_len[p][wh] <= wq_len[p][wh] - 9'd1;
                        wq_addr[p][wh] <= wq_addr[p][wh] + ADDR_W'(BEAT_BYTES);
                    end
                end
                // offer wready for the next cycle if a burst is open and the budget allows a beat
                wready[p] <= 1'b0;
                if (wc != 0 && !stall && c >= BEAT_COST) begin
                    wready[p] <= 1'b1;
                    c = c - BEAT_COST;
                end
                // write response
                if (bvalid[p] && bready[p]) begin
                    bvalid[p] <= 1'b0;
                    bh = bh + 1'b1;
                    bc = bc - 1'b1;
                end else if (!bvalid[p] && bq_count[p] != 0 && now >= bq_t[p][bh] + 64'(LATENCY)) begin
                    // the registered count: a response queued this cycle has no time stamp yet
                    // (bq_t is written at the clock edge), and the slot's old one would let it
                    // skip its latency
                    bvalid[p] <= 1'b1;
                    bid[p*ID_W +: ID_W] <= bq_id[p][bh];
                end
                rq_head[p] <= rh; rq_count[p] <= rc;
                wq_head[p] <= wh; wq_count[p] <= wc;
                bq_head[p] <= bh; bq_count[p] <= bc;
            end
            credit <= c;
            bytes_rd <= brd;
            bytes_wr <= bwr;
            errors <= err;
        end
    end

    // The ready outputs follow a registered copy of the reset, not the reset input itself: a
    // top-level input in the combinational path to the accelerator's ready logic would make the
    // simulator re-evaluate all of that logic whenever the harness writes any input. The ports
    // open one cycle after reset, before any master can have a request.
    logic live;
    always_ff @(posedge clk) live <= rst_n;

    always_comb begin
        for (int p = 0; p < PORTS; p++) begin
            arready[p] = live && rq_count[p] < QW'(MAX_OUT);
            awready[p] = live && wq_count[p] < QW'(MAX_OUT);
        end
    end
    assign rresp = '0;
    assign bresp = '0;
endmodule
