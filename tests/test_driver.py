"""The host driver against the functional device model: a compiled tiny model runs every task with
one load, bit-exact with the golden model, and the driver refuses what it must refuse."""

from __future__ import annotations

import asyncio
import struct
import sys
import types

import numpy as np
import pytest

from m3vit.compiler import golden
from m3vit.compiler.from_torch import build_qgraph
from m3vit.compiler.lower import compile_qgraph
from m3vit.compiler.numerics import SatCounter
from m3vit.compiler.quantize import calibrate, calibration_images
from m3vit.errors import M3ViTError, UsageError
from m3vit.model.config import resolve_config
from m3vit.model.vit import build_model
from m3vit.rtl_sim.driver import REG, Driver, ModelDevice, PynqDevice
from m3vit.rtl_sim.hwconfig import HwConfig


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    cfg = resolve_config("tiny")
    model = build_model(cfg)
    graph = build_qgraph(model, calibrate(model, calibration_images(cfg.img_size, 4)))
    out = tmp_path_factory.mktemp("build")
    compile_qgraph(graph, HwConfig.default(), out)
    return graph, out


def _run(coro):
    return asyncio.run(coro)


def test_every_task_with_one_load_is_bit_exact(build):
    graph, out = build
    hw = HwConfig.default()
    dev = ModelDevice(hw)
    drv = Driver(dev, hw)

    async def session():
        await drv.check_bitstream()
        prog = await drv.load(out)
        results = []
        rng = np.random.default_rng(0)
        for task in (0, 1, 0):
            img = rng.standard_normal(graph.input.shape)
            x = golden.quantize_input(graph, img)
            res = await drv.run(prog, x, task)
            results.append((res, golden.run(graph, x, task, stats=SatCounter())[0]))
        return prog, results

    prog, results = _run(session())
    for res, want in results:
        assert res.status == "ok" and res.instructions == prog.header.n_instr
        assert np.array_equal(res.output, want)
    # the Program and weights were written once: task switches only touch TASK and the input
    assert len({r.output.tobytes() for r, _ in results}) == 3


def test_refusals(build, tmp_path):
    graph, out = build
    hw = HwConfig.default()
    other = hw.with_parallel("16x16")
    # a bitstream of another configuration
    with pytest.raises(M3ViTError, match="another configuration"):
        _run(Driver(ModelDevice(other), hw).check_bitstream())
    # a Program compiled for another configuration
    with pytest.raises(UsageError, match="another hardware configuration"):
        _run(Driver(ModelDevice(other), other).load(out))
    dev = ModelDevice(hw)
    drv = Driver(dev, hw)
    x = golden.quantize_input(graph, np.zeros(graph.input.shape))

    async def corrupt_then_run():
        prog = await drv.load(out)
        with pytest.raises(UsageError, match="out of range"):
            await drv.run(prog, x, 7)
        # the device itself refuses a Program whose magic was damaged in DDR
        await dev.write_mem(prog.addr["PROG"], struct.pack("<I", 0xDEADBEEF))
        return await drv.run(prog, x, 0)

    res = _run(corrupt_then_run())
    assert res.status == "bad_magic" and res.instructions == 0
    assert (_run(dev.read32(REG["CTRL"])) & 2) == 0, "done is clear on read"


# ---------------------------------------------------------------------------- PynqDevice

def _sync(coro):
    """Run a coroutine that never suspends (ModelDevice's methods) to completion."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the coroutine suspended")


class FakeBoard:
    """What a fake `pynq` module talks to: a ModelDevice behind an MMIO window and a DDR seen
    through non-coherent buffers. A start is held back until CTRL has been polled `latency`
    times or the interrupt is awaited, so the device's wait() is exercised."""

    BASE, SPAN, IP = 0xA000_0000, 0x10000, "m3v_accel_0"

    def __init__(self, hw, latency=3):
        self.model = ModelDevice(hw)
        self.latency, self.pending, self.polls = latency, False, 0
        self.freed, self.irq_waits = 0, 0

    def start(self):
        self.pending = False
        _sync(self.model.write32(REG["CTRL"], 1))

    def module(self):
        board = self

        class Overlay:
            def __init__(self, bitfile, download=True):
                assert bitfile.endswith(".bit") and download
                self.ip_dict = {board.IP: {"phys_addr": board.BASE, "addr_range": board.SPAN}}

        class MMIO:
            def __init__(self, base_addr, length):
                assert (base_addr, length) == (board.BASE, board.SPAN)

            def read(self, offset, length=4):
                assert length == 4
                if offset == REG["CTRL"] and board.pending:
                    board.polls += 1
                    if board.polls >= board.latency:
                        board.start()
                return _sync(board.model.read32(offset))

            def write(self, offset, data):
                if offset == REG["CTRL"] and data & 1:
                    board.pending, board.polls = True, 0
                else:
                    _sync(board.model.write32(offset, data))

        class Buffer(np.ndarray):
            """The CPU's view; the accelerator sees model.ddr, updated only by flush."""

            def flush(self):
                a = self.physical_address
                board.model.ddr[a:a + self.nbytes] = self.tobytes()

            def invalidate(self):
                a = self.physical_address
                self[:] = np.frombuffer(bytes(board.model.ddr[a:a + self.nbytes]), dtype=self.dtype)

            def freebuffer(self):
                board.freed += 1

        def allocate(shape, dtype="u4", **kwargs):
            buf = np.zeros(shape, dtype=dtype).view(Buffer)
            buf.physical_address = _sync(board.model.alloc(buf.nbytes))
            return buf

        class Interrupt:
            def __init__(self, pin):
                assert pin == f"{board.IP}/interrupt"

            async def wait(self):
                regs = board.model.regs
                assert regs[REG["GIE"]] & 1 and regs[REG["IER"]] & 1, "the done interrupt was not enabled"
                board.irq_waits += 1
                if board.pending:
                    board.start()
                regs[REG["ISR"]] = 1

        mod = types.ModuleType("pynq")
        mod.Overlay, mod.MMIO, mod.allocate, mod.Interrupt = Overlay, MMIO, allocate, Interrupt
        return mod


@pytest.mark.parametrize("interrupt", [False, True])
def test_pynq_device_matches_the_model(build, monkeypatch, interrupt):
    """The driver through PynqDevice over a fake pynq gets ModelDevice's bits for two tasks."""
    graph, out = build
    hw = HwConfig.default()
    board = FakeBoard(hw)
    monkeypatch.setitem(sys.modules, "pynq", board.module())
    rng = np.random.default_rng(3)
    images = [golden.quantize_input(graph, 0.5 * rng.standard_normal(graph.input.shape)) for _ in range(2)]

    async def session(dev):
        drv = Driver(dev, hw)
        await drv.check_bitstream()
        prog = await drv.load(out)
        return [await drv.run(prog, x, task) for task, x in enumerate(images)]

    dev = PynqDevice("m3v.bit", interrupt=interrupt, poll_s=0)
    got = _run(session(dev))
    want = _run(session(ModelDevice(hw)))
    for g, w in zip(got, want):
        assert g.status == w.status == "ok" and g.instructions == w.instructions
        assert np.array_equal(g.output, w.output)
    assert board.irq_waits == (2 if interrupt else 0)
    dev.close()
    assert board.freed == 5 and not dev.buffers


def test_pynq_device_refusals(monkeypatch):
    hw = HwConfig.default()
    board = FakeBoard(hw)
    monkeypatch.setitem(sys.modules, "pynq", board.module())
    with pytest.raises(M3ViTError, match="no IP 'accel'"):
        PynqDevice("m3v.bit", ip="accel")
    dev = PynqDevice("m3v.bit", addr_limit=1 << 13)
    addr = _run(dev.alloc(100))
    with pytest.raises(M3ViTError, match="not inside one buffer"):
        _run(dev.write_mem(addr + 4000, bytes(200)))
    with pytest.raises(M3ViTError, match="below 0x2000"):
        _run(dev.alloc(8192))
    assert board.freed == 1
    with pytest.raises(M3ViTError, match="outside"):
        _run(dev.read32(FakeBoard.SPAN))
    monkeypatch.setitem(sys.modules, "pynq", None)
    with pytest.raises(M3ViTError, match="needs the pynq package"):
        PynqDevice("m3v.bit")
