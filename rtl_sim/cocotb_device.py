"""The RTL accelerator as a Driver device (rtl_sim/driver.py ``Device``), inside cocotb.

``CocotbDevice(dut, workdir)`` drives the testbench rtl_sim/tb/accel_tb.sv: register reads and
writes are real AXI4-Lite transactions on the top's control slave; ``write_mem`` / ``read_mem``
go through the DDR model's ``load`` / ``dump`` pulses with hex files and manifests in ``workdir``
(the simulation must run with the ``plusargs`` below); ``alloc`` hands out 4 KB-aligned, zeroed
buffers, as ``ModelDevice`` does; ``wait`` lets ``wait_cycles`` clock cycles pass.

Interrupts: ``reset`` enables GIE and IER so the testbench can time each run up to the
interrupt, and a CTRL read that shows done acknowledges it (ISR write), as an interrupt handler
would. Every method returns right after a rising edge, where the next one may drive signals.
"""

from __future__ import annotations

from pathlib import Path

from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge, Timer

import cocotb
from m3vit.errors import M3ViTError
from m3vit.rtl_sim.driver import CTRL_DONE, REG

BEAT = 16   # bytes per DDR word of the model (the AXI width of the configurations tested)
PERIOD_NS = 10   # the clock the harness drives


def plusargs(workdir: str | Path) -> list[str]:
    d = Path(workdir)
    return [f"+ddr_reload={d / 'reload.txt'}", f"+ddr_dump={d / 'dump.txt'}"]


class CocotbDevice:
    def __init__(self, dut, workdir: str | Path, wait_cycles: int = 64, mem_bytes: int = (1 << 18) * BEAT,
                 beat: int = BEAT):
        self.dut, self.dir = dut, Path(workdir)
        self.wait_cycles, self.mem_bytes, self.beat = wait_cycles, mem_bytes, beat
        self.next_free = 0
        self.transfers = 0

    # ---- bring-up
    async def reset(self, stall_permille: int = 0) -> None:
        d = self.dut
        cocotb.start_soon(Clock(d.clk, PERIOD_NS, unit="ns").start())
        d.rst_n.value = 0
        d.stall_permille.value = stall_permille
        d.load.value = 0
        d.dump.value = 0
        for name in ("s_awvalid", "s_awaddr", "s_wvalid", "s_wdata", "s_wstrb", "s_arvalid", "s_araddr"):
            getattr(d, name).value = 0
        d.s_bready.value = 1
        d.s_rready.value = 1
        for _ in range(4):
            await RisingEdge(d.clk)
        d.rst_n.value = 1
        await RisingEdge(d.clk)
        await self.write32(REG["GIE"], 1)
        await self.write32(REG["IER"], 1)

    # ---- registers
    async def _until(self, name: str) -> None:
        for _ in range(1000):
            await ReadOnly()
            if int(getattr(self.dut, name).value):
                return
            await RisingEdge(self.dut.clk)
        raise M3ViTError(f"AXI4-Lite: {name} stayed low for 1000 cycles")

    async def write32(self, offset: int, value: int) -> None:
        d = self.dut
        d.s_awvalid.value, d.s_awaddr.value = 1, offset
        d.s_wvalid.value, d.s_wdata.value, d.s_wstrb.value = 1, value & 0xFFFFFFFF, 0xF
        await self._until("s_awready")
        await RisingEdge(d.clk)
        d.s_awvalid.value, d.s_wvalid.value = 0, 0
        await self._until("s_bvalid")
        await RisingEdge(d.clk)

    async def read32(self, offset: int) -> int:
        d = self.dut
        d.s_arvalid.value, d.s_araddr.value = 1, offset
        await self._until("s_arready")
        await RisingEdge(d.clk)
        d.s_arvalid.value = 0
        await self._until("s_rvalid")
        value = int(d.s_rdata.value)
        await RisingEdge(d.clk)
        if offset == REG["CTRL"] and value & CTRL_DONE:
            await self.write32(REG["ISR"], 1)
        return value

    # ---- DDR
    async def alloc(self, nbytes: int) -> int:
        addr = (self.next_free + 4095) // 4096 * 4096
        end = addr + (max(nbytes, 1) + 4095) // 4096 * 4096
        if end > self.mem_bytes:
            raise M3ViTError(f"out of simulated DDR: {end:,} bytes needed, {self.mem_bytes:,} available")
        self.next_free = end
        await self.write_mem(addr, bytes(end - addr))
        return addr

    async def _pulse(self, name: str) -> None:
        getattr(self.dut, name).value = 1
        await RisingEdge(self.dut.clk)
        getattr(self.dut, name).value = 0
        await RisingEdge(self.dut.clk)

    async def write_mem(self, addr: int, data: bytes) -> None:
        if not data:
            return
        lo, hi = addr // self.beat * self.beat, -(-(addr + len(data)) // self.beat) * self.beat
        if lo != addr or hi != addr + len(data):   # ragged ends keep the bytes around them
            old = bytearray(await self.read_mem(lo, hi - lo))
            old[addr - lo:addr - lo + len(data)] = data
            data = bytes(old)
        self.transfers += 1
        image = self.dir / f"load{self.transfers}.hex"
        image.write_text("".join(f"{int.from_bytes(data[i:i + self.beat], 'little'):0{2 * self.beat}x}\n"
                                 for i in range(0, len(data), self.beat)))
        (self.dir / "reload.txt").write_text(f"{lo:x} {image}\n")
        await self._pulse("load")

    async def read_mem(self, addr: int, nbytes: int) -> bytes:
        if nbytes == 0:
            return b""
        lo, hi = addr // self.beat * self.beat, -(-(addr + nbytes) // self.beat) * self.beat
        words = (hi - lo) // self.beat
        self.transfers += 1
        out = self.dir / f"dump{self.transfers}.hex"
        (self.dir / "dump.txt").write_text(f"{lo:x} {words} {out}\n")
        await self._pulse("dump")
        vals = [int(t, 16) for t in out.read_text().split() if not t.startswith("//") and not t.startswith("@")]
        if len(vals) != words:
            raise M3ViTError(f"DDR dump of {words} words at {lo:#x} returned {len(vals)}")
        blob = b"".join(v.to_bytes(self.beat, "little") for v in vals)
        return blob[addr - lo:addr - lo + nbytes]

    async def wait(self) -> None:
        # One timer to half a period before the last edge, then that edge: the same wait_cycles
        # rising edges as counting them, without waking Python on each one (ClockCycles does,
        # and that cost as much as simulating the accelerator between polls).
        await Timer(self.wait_cycles * PERIOD_NS - PERIOD_NS // 2, unit="ns")
        await RisingEdge(self.dut.clk)
