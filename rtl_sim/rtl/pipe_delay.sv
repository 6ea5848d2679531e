// pipe_delay: q is d delayed by DEPTH clock cycles (DEPTH = 0 is a plain wire).
//
// RESET = 1 clears every stage while rst_n is low; use it only for valid bits. Data delay lines
// are left without reset so that synthesis can pack them into shift-register LUTs (SRL16/SRLC32).
module pipe_delay #(
    parameter int WIDTH = 1,
    parameter int DEPTH = 1,
    parameter int RESET = 0
) (
    input  logic             clk,
    input  logic             rst_n,
    input  logic [WIDTH-1:0] d,
    output logic [WIDTH-1:0] q
);
    generate
        if (DEPTH == 0) begin : g_wire
            assign q = d;
            logic unused_ok;
            assign unused_ok = &{1'b0, clk, rst_n};
        end else begin : g_regs
            // Stage k (1..DEPTH) is sr[k*WIDTH-1 -: WIDTH]; the input enters at the bottom.
            logic [DEPTH*WIDTH-1:0] sr, sr_next;
            if (DEPTH == 1) begin : g_one
                assign sr_next = d;
            end else begin : g_many
                assign sr_next = {sr[(DEPTH-1)*WIDTH-1:0], d};
            end
            if (RESET != 0) begin : g_reset
                always_ff @(posedge clk) begin
                    if (!rst_n) sr <= '0;
                    else        sr <= sr_next;
                end
            end else begin : g_noreset
                always_ff @(posedge clk) sr <= sr_next;
                logic unused_ok;
                assign unused_ok = &{1'b0, rst_n};
            end
            assign q = sr[DEPTH*WIDTH-1 -: WIDTH];
        end
    endgenerate
endmodule
