"""cocotb tests of the accelerator top (rtl_sim/rtl/m3v_accel.sv on the DDR model, through
rtl_sim/tb/accel_tb.sv), driven by the host Driver (rtl_sim/driver.py) through ``CocotbDevice``.

Programs of random ADD and EMBED instructions (odd sizes, random shifts and formats, saturation,
instructions reading earlier results) are encoded with compiler/isa.py and must give the bytes of
the Python Program executor (compiler/program_exec.py) in the output and the whole arena. Their
counters must agree with the testbench's own counts and with a traffic model of the Program.
Refused Programs must leave the executor's STATUS code. Each test writes a digest of its results
to M3V_TEST_DIR so the pytest side can compare Verilator seeds; power_up.txt records one
never-reset register, proving the seeds differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import struct
import time
from pathlib import Path

import numpy as np
from m3vit.rtl_sim.cocotb_device import CocotbDevice
from cocotb.triggers import RisingEdge

import cocotb
from m3vit.compiler import isa
from m3vit.compiler.program_exec import ProgramError, execute
from m3vit.compiler.regmap import ctrl_bits
from m3vit.rtl_sim.driver import CTRL_IDLE, REG, Driver
from m3vit.rtl_sim.hwconfig import HwConfig

CTRL_READY = {name: value for name, value, _ in ctrl_bits()}["CTRL_READY"]

HW = HwConfig.from_dict(json.loads(os.environ["M3V_HW_CONFIG"]), "M3V_HW_CONFIG") if "M3V_HW_CONFIG" in os.environ \
    else HwConfig()
TEST_DIR = Path(os.environ.get("M3V_TEST_DIR", "."))
BEAT = HW.axi_width_bits // 8
LANES = BEAT // 2
SCALE = int(os.environ.get("M3V_TB_SCALE", "1"))   # more random Programs in the long regression


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class Built:
    program: bytes
    weights: bytes
    image: np.ndarray
    meta: dict
    rd_bytes: int       # the traffic the Program must cause: header, instructions, operands
    wr_bytes: int
    beats: int          # beats through the elementwise datapath


def random_program(rng: random.Random, n_instr: int, with_end: bool = True, big: int = 0) -> Built:
    """ADD and EMBED instructions over the input, random weights and earlier results; the last one
    writes the output. ``big``: one ADD over this many elements instead."""
    weights = bytearray()
    arena = 0

    def wgt(n: int) -> int:
        nonlocal weights
        off = len(weights)
        weights += np.array([rng.randint(-32768, 32767) for _ in range(n)], "<i2").tobytes()
        weights += bytes(isa.align(len(weights)) - len(weights))
        return isa.ref("wgt", off)

    def new_arena(n: int) -> int:
        nonlocal arena
        off = arena
        arena += isa.align(2 * n)
        return isa.ref("arena", off)

    def fmt() -> int:
        if rng.random() < 0.25:  # wider than the int16 store: saturation bounds up to 2^62, then wrap
            return isa.pack_fmt(rng.randint(17, 63), rng.randint(-4, 8), signed=rng.random() < 0.7)
        if rng.random() < 0.2:
            return isa.pack_fmt(rng.randint(2, 16), rng.randint(-4, 8), signed=False)
        return isa.pack_fmt(rng.randint(3, 16), rng.randint(-4, 8))

    def shift() -> int:
        r = rng.random()
        if r < 0.15:
            return rng.randint(-46, -10)   # large left shifts (to the contract's int16 limit): cancellation, saturation
        if r < 0.3:
            return rng.randint(10, 62)     # large right shifts: the term rounds to 0
        return rng.randint(-4, 8)

    n_in = big or rng.randint(20, 300)
    image = np.array([rng.randint(-32768, 32767) for _ in range(n_in)], np.int64)
    pool = [(isa.ref("in", 0), n_in)]
    instrs, rd, wr, beats = [], 64, 0, 0
    for i in range(n_instr):
        last = i == n_instr - 1
        src, n_src = rng.choice(pool) if not big else pool[0]
        if big or rng.random() < 0.5:
            cols = n_src if big else rng.randint(1, min(n_src, 37))
            rows = 1 if big else rng.randint(1, n_src // cols)
            n = rows * cols
            others = [t for t in pool if t[1] >= n]
            b = rng.choice(others)[0] if rng.random() < 0.5 else wgt(n)
            y = isa.ref("out", 0) if last else new_arena(n)
            a_sh, b_sh = shift(), shift()
            instrs.append(isa.Instr("add", {"a_ref": src, "b_ref": b, "y_ref": y, "rows": rows, "cols": cols,
                                            "a_shift": a_sh, "b_shift": b_sh, "fmt": fmt()}))
            rd += 2 * ceil_div(2 * n, BEAT) * BEAT
        else:
            d = rng.randint(1, min(n_src, 29))
            patches = rng.randint(0, n_src // d)
            n = (patches + 1) * d
            y = isa.ref("out", 0) if last else new_arena(n)
            instrs.append(isa.Instr("embed", {"x_ref": src, "y_ref": y, "cls_ref": wgt(d), "pos_ref": wgt(n),
                                              "patches": patches, "dim": d, "a_shift": shift(),
                                              "b_shift": shift(), "fmt": fmt()}))
            rd += (ceil_div(2 * d, BEAT) + ceil_div(2 * patches * d, BEAT) + ceil_div(2 * n, BEAT)) * BEAT
        wr += ceil_div(2 * n, BEAT) * BEAT
        beats += ceil_div(n, LANES)
        pool.append((y, n))
        out_n = n
    if with_end:
        instrs.append(isa.Instr("end"))
    rd += 64 * len(instrs)
    header = isa.Header(bytes.fromhex(HW.hash()), len(instrs), len(weights), max(arena, 64), 1, 2 * n_in, 2 * out_n)
    program = header.encode() + b"".join(ins.encode() for ins in instrs)
    meta = {"output": {"shape": [out_n]}}
    return Built(program, bytes(weights), image, meta, rd, wr, beats)


async def start(dut, stall_permille: int = 0) -> tuple[CocotbDevice, Driver]:
    dev = CocotbDevice(dut, TEST_DIR)
    await dev.reset(stall_permille)
    power_up = TEST_DIR / "power_up.txt"
    if not power_up.exists():
        power_up.write_text(f"{dut.u_accel.u_elem.u_add.ta.value.to_unsigned():x}\n")
    drv = Driver(dev, HW)
    await drv.check_bitstream()
    return dev, drv


def digest(name: str, record: dict) -> None:
    text = json.dumps(record, sort_keys=True)
    (TEST_DIR / f"{name}.digest").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n" + text + "\n")


async def run_and_check(dut, dev: CocotbDevice, drv: Driver, built: Built, tag: str) -> dict:
    ddr_rd0, ddr_wr0 = int(dut.ddr_bytes_rd.value), int(dut.ddr_bytes_wr.value)
    prog = await drv.load((built.program, built.weights, built.meta))
    t0 = time.perf_counter()
    res = await drv.run(prog, built.image, task=0)
    wall = time.perf_counter() - t0
    ref = execute(built.program, built.weights, built.image, 0, hw_hash=HW.hash())
    assert res.status == "ok", f"{tag}: STATUS {res.status}"
    assert res.instructions == ref.executed, f"{tag}: INSTR_COUNT {res.instructions}, executor ran {ref.executed}"
    got_out = res.output.reshape(-1)
    want_out = ref.output.reshape(-1)
    bad = np.flatnonzero(got_out != want_out)
    assert bad.size == 0, (f"{tag}: {bad.size} output elements differ, first at {bad[0]}: "
                           f"{got_out[bad[0]]} != {want_out[bad[0]]}")
    arena = await dev.read_mem(prog.addr["ARENA"], prog.header.arena_bytes)
    assert arena == bytes(ref.memories["arena"]), f"{tag}: the arena differs from the executor's"
    c = res.counters
    tb = {"cycles": int(dut.tb_cycles.value), "rd": int(dut.tb_rd_bytes.value), "wr": int(dut.tb_wr_bytes.value)}
    assert c["cycles"] == tb["cycles"], f"{tag}: CYCLES {c['cycles']}, testbench counted {tb['cycles']}"
    assert c["ddr_rd_bytes"] == tb["rd"] == int(dut.ddr_bytes_rd.value) - ddr_rd0 == built.rd_bytes, \
        f"{tag}: DDR_RD_BYTES {c['ddr_rd_bytes']}, testbench {tb['rd']}, Program model {built.rd_bytes}"
    assert c["ddr_wr_bytes"] == tb["wr"] == int(dut.ddr_bytes_wr.value) - ddr_wr0 == built.wr_bytes, \
        f"{tag}: DDR_WR_BYTES {c['ddr_wr_bytes']}, testbench {tb['wr']}, Program model {built.wr_bytes}"
    assert c["cycles"] - c["stall_cycles"] == built.beats, \
        f"{tag}: CYCLES - STALL_CYCLES = {c['cycles'] - c['stall_cycles']}, {built.beats} beats computed"
    ops = {name[len('op_cycles_'):]: v for name, v in c.items() if name.startswith("op_cycles_")}
    used = {ins.op for ins in isa.decode_program(built.program)[1]}
    for op, v in ops.items():
        assert (v > 0) == (op in used), f"{tag}: OP_CYCLES_{op.upper()} = {v}"
    assert sum(ops.values()) < c["cycles"], f"{tag}: OP_CYCLES sum {sum(ops.values())} >= CYCLES {c['cycles']}"
    assert int(dut.ddr_errors.value) == 0, f"{tag}: the DDR model saw AXI rule violations"
    dut._log.info(f"{tag}: {c['cycles']} cycles, {built.beats} beats, "
                  f"{(c['ddr_rd_bytes'] + c['ddr_wr_bytes']) / c['cycles']:.2f} B/cycle, "
                  f"{c['cycles'] / max(wall, 1e-9):.0f} simulated cycles/s (with polling)")
    return {"addr": prog.addr, "out": hashlib.sha256(got_out.astype("<i2").tobytes()).hexdigest(),
            "arena": hashlib.sha256(arena).hexdigest(), "counters": c}


@cocotb.test()
async def add_and_embed_programs_are_bit_exact(dut):
    dev, drv = await start(dut)
    rng = random.Random(6 + SCALE)
    record = {}
    for k in range(6 * SCALE):
        built = random_program(rng, rng.randint(1, 5 + SCALE), with_end=k % 6 != 2)
        record[k] = await run_and_check(dut, dev, drv, built, f"program {k}")
    # the register file after a run: done was cleared by the driver's read, bases read back
    ctrl = await dev.read32(REG["CTRL"])
    assert ctrl == CTRL_IDLE | CTRL_READY, f"CTRL reads {ctrl:#x} after a run"
    last = record[len(record) - 1]["addr"]
    for name in ("PROG", "WGT", "ARENA", "IN", "OUT"):
        assert await dev.read32(REG[name + "_LO"]) == last[name], f"{name}_LO does not read back"
        assert await dev.read32(REG[name + "_HI"]) == 0, f"{name}_HI does not read back"
    await dev.write32(REG["TASK"], 0x1234_5678)
    assert await dev.read32(REG["TASK"]) == 0x1234_5678, "TASK does not read back"
    await dev.write32(REG["TASK"], 0)
    digest("programs", record)


@cocotb.test()
async def random_ddr_stalls_keep_the_bits(dut):
    dev, drv = await start(dut, stall_permille=300)
    rng = random.Random(61 + SCALE)
    record = {k: await run_and_check(dut, dev, drv, random_program(rng, 4), f"stalled program {k}")
              for k in range(2 * SCALE)}
    digest("stalls", record)


@cocotb.test()
async def large_add_streams_near_the_ddr_budget(dut):
    dev, drv = await start(dut)
    built = random_program(random.Random(7), 1, big=24 * 1024)
    rec = await run_and_check(dut, dev, drv, built, "large add")
    c = rec["counters"]
    rate = (c["ddr_rd_bytes"] + c["ddr_wr_bytes"]) / c["cycles"]
    (TEST_DIR / "throughput.txt").write_text(f"{c['cycles']} cycles {rate:.3f} B/cycle {built.beats} beats\n")
    # three 16-byte streams share the 128/3 B/cycle budget: at least 80 % of it must be used
    assert rate > 0.8 * 128 / 3, f"large add moved {rate:.2f} B/cycle"
    digest("large", rec)


async def refused(dut, dev: CocotbDevice, drv: Driver, program: bytes, weights: bytes, task: int, header=None):
    """Load a good Program, overwrite it with ``program`` in DDR, run; (STATUS, INSTR_COUNT)."""
    good = random_program(random.Random(1), 1)
    prog = await drv.load((good.program, good.weights, good.meta))
    await dev.write_mem(prog.addr["PROG"], program)
    await dev.write_mem(prog.addr["WGT"], weights)
    if header is not None:
        prog = dataclasses.replace(prog, header=header)
    res = await drv.run(prog, good.image, task=task)
    return res.status, res.instructions


def expected_status(program: bytes, weights: bytes, image, task: int) -> str:
    try:
        execute(program, weights, image, task, hw_hash=HW.hash())
    except ProgramError as exc:
        return exc.status_name
    return "ok"


@cocotb.test()
async def refusals_leave_the_executors_status(dut):
    dev, drv = await start(dut)
    good = random_program(random.Random(1), 1)
    hdr = isa.decode_header(good.program)
    cases = {}
    p = bytearray(good.program)
    p[0] ^= 0x01
    cases["bad_magic"] = (bytes(p), 0, None)
    p = bytearray(good.program)
    struct.pack_into("<I", p, 4, isa.VERSION + 1)
    cases["bad_version"] = (bytes(p), 0, None)
    p = bytearray(good.program)
    p[39] ^= 0x80                      # the last digest byte: the whole hash is compared
    cases["hw_mismatch"] = (bytes(p), 0, None)
    cases["bad_task"] = (good.program, 1, dataclasses.replace(hdr, n_tasks=2))
    for name, code in (("gemm", isa.OPCODES["gemm"]), ("unknown", 200)):
        p = bytearray(good.program)
        p[64] = code                   # the first instruction
        cases[f"opcode_{name}"] = (bytes(p), 0, None)
    p = bytearray(good.program)
    a_ref = struct.unpack_from("<I", p, 64 + 4)[0]
    struct.pack_into("<I", p, 64 + 4, a_ref + isa.align(hdr.input_bytes) + 64)   # past the input space
    cases["over_limit"] = (bytes(p), 0, None)
    p = bytearray(good.program)
    first = isa.decode_instr(good.program[64:128])
    y_word = 1 + isa.FIELDS[first.op].index("y_ref")
    struct.pack_into("<I", p, 64 + 4 * y_word, isa.ref("wgt", 0))            # a store into weights
    cases["store_to_wgt"] = (bytes(p), 0, None)
    record = {}
    for name, (program, task, header) in cases.items():
        got, count = await refused(dut, dev, drv, program, good.weights, task, header)
        want = expected_status(program, good.weights, good.image, task)
        if name.startswith("opcode_gemm"):
            want = "bad_opcode"        # a valid opcode whose engine this top does not have yet
        assert want != "ok" and got == want, f"{name}: STATUS {got}, expected {want}"
        assert count == 0, f"{name}: INSTR_COUNT {count} after a refusal"
        record[name] = got
    # a refused run leaves the next one unaffected
    record["after"] = await run_and_check(dut, dev, drv, random_program(random.Random(3), 2), "after refusals")
    digest("refusals", record)
    await RisingEdge(dut.clk)
