"""The host driver of the accelerator, written once against an abstract device.

A device is anything with 32-bit control registers (the map of ``compiler/regmap.py``) and a
DDR the accelerator reads: on a board, ``PynqDevice`` here (PYNQ's MMIO and contiguous buffers,
docs/bringup.md); in simulation, the cocotb harness of the RTL top; and ``ModelDevice`` here, a
functional model that runs Programs with the Python Program executor (no timing). Every method of a device is a coroutine, so the same
driver code runs inside cocotb's scheduler and, through ``asyncio.run``, on a board.

    drv = Driver(device, hw)
    await drv.check_bitstream()                 # HW_HASH must be this hw.json's
    prog = await drv.load("build/")             # program.bin + weights.bin into DDR, checked
    res = await drv.run(prog, image_q, task=1)  # start, wait for done, read the output
    res.output, res.status, res.counters

Nothing is reloaded to switch tasks: ``run`` only writes TASK and the input.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from m3vit.compiler import isa
from m3vit.compiler.regmap import hw_hash32, registers
from m3vit.errors import M3ViTError, UsageError
from m3vit.rtl_sim.hwconfig import HwConfig

__all__ = ["Device", "Driver", "LoadedProgram", "RunResult", "ModelDevice", "PynqDevice", "REG"]

REG = {r.name: r.offset for r in registers()}
CTRL_START, CTRL_DONE, CTRL_IDLE = 1, 2, 4
STATUS_NAMES = {v: k for k, v in isa.STATUS.items()}
COUNTERS = ["CYCLES", "STALL_CYCLES", "DDR_RD_BYTES", "DDR_WR_BYTES"] + \
           [f"OP_CYCLES_{op.upper()}" for op, _ in sorted(isa.OPCODES.items(), key=lambda kv: kv[1])]


class Device(Protocol):
    async def read32(self, offset: int) -> int: ...
    async def write32(self, offset: int, value: int) -> None: ...
    async def alloc(self, nbytes: int) -> int: ...                  # a 4 KB-aligned DDR buffer's bus address
    async def write_mem(self, addr: int, data: bytes) -> None: ...
    async def read_mem(self, addr: int, nbytes: int) -> bytes: ...
    async def wait(self) -> None: ...                               # let the device run a while between polls


@dataclass
class LoadedProgram:
    header: isa.Header
    meta: dict
    addr: dict[str, int]            # PROG, WGT, ARENA, IN, OUT base addresses


@dataclass
class RunResult:
    output: np.ndarray              # int64 [T, D], the backbone output in its format
    status: str
    instructions: int
    counters: dict[str, int] = field(default_factory=dict)


class Driver:
    def __init__(self, device: Device, hw: HwConfig):
        self.dev, self.hw = device, hw

    async def _write64(self, name: str, value: int) -> None:
        await self.dev.write32(REG[name + "_LO"], value & 0xFFFFFFFF)
        await self.dev.write32(REG[name + "_HI"], value >> 32)

    async def _read64(self, name: str) -> int:
        lo = await self.dev.read32(REG[name + "_LO"])
        return lo | (await self.dev.read32(REG[name + "_HI"])) << 32

    async def check_bitstream(self) -> None:
        got = await self.dev.read32(REG["HW_HASH"])
        if got != hw_hash32(self.hw):
            raise M3ViTError(f"the accelerator reports hardware hash {got:08x}, this hw.json is "
                             f"{hw_hash32(self.hw):08x}: the bitstream was built from another configuration")

    async def load(self, build: str | Path | tuple[bytes, bytes, dict]) -> LoadedProgram:
        """Copy a compiled build's Program and weights into DDR and allocate its arena and I/O."""
        if isinstance(build, tuple):
            program, weights, meta = build
        else:
            d = Path(build)
            try:
                program, weights = (d / "program.bin").read_bytes(), (d / "weights.bin").read_bytes()
                meta = json.loads((d / "program.json").read_text())
            except OSError as exc:
                raise UsageError(f"{d} is not a compiled build (m3vit compile): {exc.strerror or exc}") from None
        header = isa.decode_header(program, "program.bin", self.hw.hash())
        if len(weights) != header.weight_bytes:
            raise UsageError(f"weights.bin has {len(weights)} bytes, program.bin expects {header.weight_bytes}")
        addr = {"PROG": await self.dev.alloc(len(program)), "WGT": await self.dev.alloc(len(weights)),
                "ARENA": await self.dev.alloc(header.arena_bytes), "IN": await self.dev.alloc(header.input_bytes),
                "OUT": await self.dev.alloc(header.output_bytes)}
        await self.dev.write_mem(addr["PROG"], program)
        await self.dev.write_mem(addr["WGT"], weights)
        return LoadedProgram(header, meta, addr)

    async def run(self, prog: LoadedProgram, image_q, task: int = 0, max_polls: int = 1_000_000) -> RunResult:
        """One frame: write the input and the registers, start, poll done, read the output."""
        h = prog.header
        if not 0 <= int(task) < h.n_tasks:
            raise UsageError(f"task {task} is out of range: the Program has {h.n_tasks} task(s)")
        image = np.asarray(image_q)
        data = image.astype("<i2").tobytes()
        if len(data) != h.input_bytes:
            raise UsageError(f"input {image.shape} has {len(data)} bytes, the Program takes {h.input_bytes}")
        await self.dev.write_mem(prog.addr["IN"], data)
        await self.dev.write32(REG["TASK"], int(task))
        for name, value in prog.addr.items():
            await self._write64(name, value)
        await self.dev.write32(REG["CTRL"], CTRL_START)
        for _ in range(max_polls):
            if await self.dev.read32(REG["CTRL"]) & CTRL_DONE:
                break
            await self.dev.wait()
        else:
            raise M3ViTError(f"the accelerator did not finish within {max_polls} polls")
        status = STATUS_NAMES.get(await self.dev.read32(REG["STATUS"]), "unknown")
        count = await self.dev.read32(REG["INSTR_COUNT"])
        counters = {name.lower(): await self._read64(name) for name in COUNTERS}
        out = np.frombuffer(await self.dev.read_mem(prog.addr["OUT"], h.output_bytes), "<i2").astype(np.int64)
        shape = prog.meta.get("output", {}).get("shape")
        return RunResult(out.reshape(shape) if shape else out, status, count, counters)


class ModelDevice:
    """A functional accelerator: registers and a DDR in Python, Programs run by the Python Program
    executor when CTRL.start is written. It has no timing: its counters stay zero."""

    def __init__(self, hw: HwConfig, ddr_bytes: int = 1 << 30):
        self.hw = hw
        self.ddr = bytearray()
        self.ddr_limit = ddr_bytes
        self.regs = {r.offset: 0 for r in registers()}
        self.regs[REG["HW_HASH"]] = hw_hash32(hw)
        self.regs[REG["CTRL"]] = CTRL_IDLE

    async def read32(self, offset: int) -> int:
        v = self.regs[offset]
        if offset == REG["CTRL"]:
            self.regs[offset] &= ~CTRL_DONE   # clear on read
        return v

    async def write32(self, offset: int, value: int) -> None:
        if offset not in self.regs:
            raise M3ViTError(f"no register at offset {offset:#x}")
        if offset == REG["CTRL"]:
            if value & CTRL_START:
                self._run()
            return
        self.regs[offset] = value & 0xFFFFFFFF

    async def alloc(self, nbytes: int) -> int:
        addr = (len(self.ddr) + 4095) // 4096 * 4096
        end = addr + (nbytes + 4095) // 4096 * 4096
        if end > self.ddr_limit:
            raise M3ViTError(f"out of device memory: {end:,} bytes needed, {self.ddr_limit:,} available")
        self.ddr.extend(bytes(end - len(self.ddr)))
        return addr

    async def write_mem(self, addr: int, data: bytes) -> None:
        self.ddr[addr:addr + len(data)] = data

    async def read_mem(self, addr: int, nbytes: int) -> bytes:
        return bytes(self.ddr[addr:addr + nbytes])

    async def wait(self) -> None:
        return None

    def _base(self, name: str) -> int:
        return self.regs[REG[name + "_LO"]] | self.regs[REG[name + "_HI"]] << 32

    def _run(self) -> None:
        from m3vit.compiler.program_exec import ProgramError, execute

        prog = self._base("PROG")
        # the sizes as the header states them; execute() checks magic, version, hash and task
        n_instr, w_bytes, a_bytes, _, i_bytes, o_bytes = struct.unpack_from("<6I", self.ddr, prog + 40)
        status, executed = "ok", 0
        try:
            program = bytes(self.ddr[prog:prog + isa.RECORD_BYTES * (1 + n_instr)])
            weights = bytes(self.ddr[self._base("WGT"):self._base("WGT") + w_bytes])
            image = bytes(self.ddr[self._base("IN"):self._base("IN") + i_bytes])
            res = execute(program, weights, image, self.regs[REG["TASK"]], hw_hash=self.hw.hash())
            out, arena = self._base("OUT"), self._base("ARENA")
            self.ddr[out:out + o_bytes] = res.memories["out"]
            self.ddr[arena:arena + a_bytes] = res.memories["arena"]
            executed = res.executed
        except ProgramError as exc:
            status = exc.status_name
        self.regs[REG["STATUS"]] = isa.STATUS[status]
        self.regs[REG["INSTR_COUNT"]] = executed
        self.regs[REG["CTRL"]] = CTRL_IDLE | CTRL_DONE


class PynqDevice:
    """The accelerator on a board, through PYNQ: the bitstream's overlay, the registers of its
    accelerator cell through an MMIO window, physically contiguous buffers for DDR.

    ``bitfile`` is the .bit with its .hwh beside it (vivado_bd.tcl's hand-off); ``ip`` is the
    cell's name in the block design. The buffers are not cache-coherent with the accelerator's HP
    ports: writes are flushed to DDR before it reads, and read-backs invalidate first. Bus
    addresses must lie below ``addr_limit`` (the DDR_LOW window vivado_bd.tcl maps, which the RTL
    top's 32-bit master addresses reach). With ``interrupt=True`` the device enables the done
    interrupt and ``wait`` sleeps on it (PYNQ serves pl_ps_irq0[0]); otherwise it polls every
    ``poll_s`` seconds. ``pynq`` is imported here only, so the rest of m3vit never needs it."""

    def __init__(self, bitfile: str | Path, ip: str = "m3v_accel_0", *, download: bool = True,
                 interrupt: bool = False, poll_s: float = 1e-4, addr_limit: int = 1 << 31):
        try:
            import pynq
        except ImportError:
            raise M3ViTError("PynqDevice needs the pynq package (a PYNQ board image)") from None
        self._pynq = pynq
        self.overlay = pynq.Overlay(str(bitfile), download=download)
        ips = self.overlay.ip_dict
        if ip not in ips:
            raise M3ViTError(f"{bitfile} has no IP '{ip}'; its IPs: {', '.join(sorted(ips)) or 'none'}")
        info = ips[ip]
        self.base, self.span = int(info["phys_addr"]), int(info["addr_range"])
        self.mmio = pynq.MMIO(self.base, self.span)
        self.poll_s, self.addr_limit = float(poll_s), int(addr_limit)
        self.buffers: list[tuple[int, int, object]] = []      # (bus address, bytes, pynq buffer)
        self._irq = None
        if interrupt:
            self._irq = pynq.Interrupt(f"{ip}/interrupt")
            self.mmio.write(REG["IER"], 1)
            self.mmio.write(REG["GIE"], 1)

    def _check_offset(self, offset: int) -> None:
        if not 0 <= offset < self.span or offset % 4:
            raise M3ViTError(f"register offset {offset:#x} is outside the accelerator's {self.span:#x}-byte window")

    async def read32(self, offset: int) -> int:
        self._check_offset(offset)
        return int(self.mmio.read(offset)) & 0xFFFFFFFF

    async def write32(self, offset: int, value: int) -> None:
        self._check_offset(offset)
        self.mmio.write(offset, int(value) & 0xFFFFFFFF)

    async def alloc(self, nbytes: int) -> int:
        # whole 4 KB pages: the accelerator's bursts never leave the buffer
        size = max(1, (int(nbytes) + 4095) // 4096) * 4096
        buf = self._pynq.allocate(shape=(size,), dtype=np.uint8)
        addr = int(buf.physical_address)
        if addr % 4096 or addr + size > self.addr_limit:
            buf.freebuffer()
            raise M3ViTError(f"pynq.allocate gave a buffer at {addr:#x} (+{size:#x}); the accelerator needs "
                             f"4 KB-aligned buffers below {self.addr_limit:#x}")
        self.buffers.append((addr, size, buf))
        return addr

    def _find(self, addr: int, nbytes: int):
        for base, size, buf in self.buffers:
            if base <= addr and addr + nbytes <= base + size:
                return buf, addr - base
        raise M3ViTError(f"{nbytes} bytes at {addr:#x} are not inside one buffer of this device")

    async def write_mem(self, addr: int, data: bytes) -> None:
        buf, off = self._find(addr, len(data))
        buf[off:off + len(data)] = np.frombuffer(bytes(data), dtype=np.uint8)
        buf.flush()

    async def read_mem(self, addr: int, nbytes: int) -> bytes:
        buf, off = self._find(addr, nbytes)
        buf.invalidate()
        return bytes(np.asarray(buf[off:off + nbytes], dtype=np.uint8))

    async def wait(self) -> None:
        if self._irq is None:
            await asyncio.sleep(self.poll_s)
            return
        await self._irq.wait()
        if int(self.mmio.read(REG["ISR"])) & 1:
            self.mmio.write(REG["ISR"], 1)      # toggle on write: clears the latched done

    def close(self) -> None:
        """Free the buffers (the overlay stays loaded)."""
        for _, _, buf in self.buffers:
            buf.freebuffer()
        self.buffers.clear()
