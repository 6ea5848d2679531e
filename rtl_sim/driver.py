"""The host driver of the accelerator, written once against an abstract device.

A device is anything with 32-bit control registers (the map of ``compiler/regmap.py``) and a
DDR the accelerator reads: on a board, PYNQ's MMIO and contiguous buffers; in simulation, the
cocotb harness of the RTL top; and ``ModelDevice`` here, a functional model that runs Programs
with the Python Program executor (no timing). Every method of a device is a coroutine, so the same
driver code runs inside cocotb's scheduler and, through ``asyncio.run``, on a board.

    drv = Driver(device, hw)
    await drv.check_bitstream()                 # HW_HASH must be this hw.json's
    prog = await drv.load("build/")             # program.bin + weights.bin into DDR, checked
    res = await drv.run(prog, image_q, task=1)  # start, wait for done, read the output
    res.output, res.status, res.counters

Nothing is reloaded to switch tasks: ``run`` only writes TASK and the input.
"""

from __future__ import annotations

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

__all__ = ["Device", "Driver", "LoadedProgram", "RunResult", "ModelDevice", "REG"]

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
