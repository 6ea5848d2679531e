"""The hardware configuration of every accelerator-level RTL test: a 4x4 array, 4 softmax lanes,
token blocks of 4, 64 tokens at most. One configuration means one Verilator build of accel_tb,
shared by every test that simulates the whole top."""

from m3vit.rtl_sim.hwconfig import HwConfig, Limits

HW = HwConfig().replace(p_in=4, p_out=4, token_block=4, softmax_lanes=4, limits=Limits(max_tokens=64)).validated()
