"""The host driver against the functional device model: a compiled tiny model runs every task with
one load, bit-exact with the golden model, and the driver refuses what it must refuse."""

from __future__ import annotations

import asyncio
import struct

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
from m3vit.rtl_sim.driver import REG, Driver, ModelDevice
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
