// m3v_mem.svh: address arithmetic on Program refs (docs/program.md), shared by the top and the
// engines. A ref holds the address space in bits 31:30 and a byte offset in bits 29:0.
`ifndef M3V_MEM_SVH
`define M3V_MEM_SVH

// DDR byte address of a ref: the space's base register plus the offset
function automatic logic [63:0] m3v_addr(input logic [31:0] r, input logic [63:0] bw, input logic [63:0] ba,
                                         input logic [63:0] bi, input logic [63:0] bo);
    logic [63:0] b;
    case (r[31:30])
        2'd0: b = bw;
        2'd1: b = ba;
        2'd2: b = bi;
        default: b = bo;
    endcase
    m3v_addr = b + {34'd0, r[29:0]};
endfunction

// nbytes from the ref stay inside its space (the sizes the Program header states)
function automatic logic m3v_fits(input logic [31:0] r, input logic [64:0] nbytes, input logic [31:0] sw,
                                  input logic [31:0] sa, input logic [31:0] si, input logic [31:0] so);
    logic [31:0] s;
    case (r[31:30])
        2'd0: s = sw;
        2'd1: s = sa;
        2'd2: s = si;
        default: s = so;
    endcase
    m3v_fits = 66'(r[29:0]) + 66'(nbytes) <= 66'(s);
endfunction

// only the arena and the output space take stores
/* verilator lint_off UNUSEDSIGNAL */
function automatic logic m3v_writable(input logic [31:0] r);
    m3v_writable = r[31:30] == 2'd1 || r[31:30] == 2'd3;
endfunction
/* verilator lint_on UNUSEDSIGNAL */

`endif
