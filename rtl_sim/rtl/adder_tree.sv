// adder_tree: sum of N signed IN_W-bit values, one register per level.
//
// Leaves are padded with zeros to the next power of two (synthesis removes the padded adders).
// Each level grows by one bit, so the sum is exact: OUT_W = IN_W + LEVELS.
// LATENCY = LEVELS cycles (0 when N = 1: the sum is the input, combinationally).
module adder_tree #(
    parameter int N      = 4,
    parameter int IN_W   = 24,
    parameter int LEVELS = (N > 1) ? $clog2(N) : 0,
    parameter int OUT_W  = IN_W + LEVELS
) (
    input  logic              clk,
    input  logic [N*IN_W-1:0] in_flat,   // element j at [j*IN_W +: IN_W]
    output logic [OUT_W-1:0]  sum
);
    localparam int NP = 1 << LEVELS;

    genvar l, j;
    generate
        for (l = 0; l <= LEVELS; l = l + 1) begin : g_lvl
            localparam int WL = IN_W + l;   // exact width of a partial sum at level l
            localparam int NL = NP >> l;    // nodes at level l
            logic [NL*WL-1:0] v;
            if (l == 0) begin : g_leaf
                for (j = 0; j < NP; j = j + 1) begin : g_in
                    if (j < N) begin : g_used
                        assign v[j*WL +: WL] = in_flat[j*IN_W +: IN_W];
                    end else begin : g_pad
                        assign v[j*WL +: WL] = '0;
                    end
                end
            end else begin : g_add
                for (j = 0; j < NL; j = j + 1) begin : g_node
                    always_ff @(posedge clk) begin
                        v[j*WL +: WL] <= $signed(g_lvl[l-1].v[2*j*(WL-1) +: WL-1])
                                       + $signed(g_lvl[l-1].v[(2*j+1)*(WL-1) +: WL-1]);
                    end
                end
            end
        end
        if (LEVELS == 0) begin : g_nolevels
            logic unused_ok;
            assign unused_ok = &{1'b0, clk};
        end
    endgenerate

    assign sum = g_lvl[LEVELS].v;
endmodule
