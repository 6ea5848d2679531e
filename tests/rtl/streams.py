"""A cycle-accurate valid/ready bench shared by the nonlinear units' cocotb tests.

One loop drives one input stream and checks one output stream. Each input item is presented
after a random gap and held until accepted; the output's ready toggles at random. Every output
is compared, in order, with the expected value, so nothing may be lost, duplicated or reordered.
A digest of (cycle, value) of all outputs lets the pytest driver compare Verilator seeds: the
results and their timing must not depend on power-up state.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

TEST_DIR = Path(os.environ.get("M3V_TEST_DIR", "."))
SCALE = float(os.environ.get("M3V_TB_SCALE", "1"))


def pack(values, width):
    mask = (1 << width) - 1
    word = 0
    for i, v in enumerate(values):
        word |= (int(v) & mask) << (i * width)
    return word


def unpack(word, width, n):
    mask, sign = (1 << width) - 1, 1 << (width - 1)
    out = []
    for i in range(n):
        v = (word >> (i * width)) & mask
        out.append(v - (1 << width) if v & sign else v)
    return out


async def reset(dut, idle: dict[str, int], power_up_signal: str, clock: bool = True) -> None:
    """Start the clock (once per test), hold reset for four cycles with the inputs idle, record
    power-up state."""
    if clock:
        cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst_n.value = 0
    for name, value in idle.items():
        getattr(dut, name).value = value
    for _ in range(4):
        await RisingEdge(dut.clk)
    # Evidence that power-up state is randomised (the driver compares it across seeds).
    power_up = TEST_DIR / "power_up.txt"
    if not power_up.exists():
        TEST_DIR.mkdir(parents=True, exist_ok=True)
        power_up.write_text(f"{getattr(dut, power_up_signal).value.to_unsigned():x}\n")
    dut.rst_n.value = 1
    await RisingEdge(dut.clk)


class StreamBench:
    def __init__(self, dut, rng: random.Random, *, gap_max: int = 2, ready_p: float = 0.7,
                 in_valid="in_valid", in_ready="in_ready", out_valid="out_valid", out_ready="out_ready"):
        self.dut, self.rng = dut, rng
        self.gap_max, self.ready_p = gap_max, ready_p
        self.names = (in_valid, in_ready, out_valid, out_ready)
        self.digest = hashlib.sha256()
        self.outputs = 0
        self.cycles = 0

    async def run(self, items: Sequence[dict[str, int]], expected: Sequence, read: Callable,
                  max_cycles: int | None = None, drain: int = 20, idle_ready: bool = True) -> None:
        """Drive items (signal name -> value), check read(dut) against expected at each output."""
        dut, rng = self.dut, self.rng
        in_valid, in_ready, out_valid, out_ready = (getattr(dut, n) for n in self.names)
        max_cycles = max_cycles or 50 + 20 * (len(items) + 1) * (self.gap_max + 2)
        nxt, got, gap = 0, 0, rng.randint(0, self.gap_max)
        idle_after = 0
        for cycle in range(max_cycles):
            await RisingEdge(dut.clk)
            present = nxt < len(items) and gap == 0
            in_valid.value = int(present)
            if present:
                for name, value in items[nxt].items():
                    getattr(dut, name).value = value
            rdy = rng.random() < self.ready_p
            out_ready.value = int(rdy)
            await ReadOnly()
            if present and int(in_ready.value):
                nxt += 1
                gap = rng.randint(0, self.gap_max)
            elif not present and gap > 0:
                gap -= 1
            done_before = got == len(expected)
            if int(out_valid.value) and rdy:
                assert not done_before, f"cycle {cycle}: output beyond the {len(expected)} expected"
                value = read(dut)
                assert value == expected[got], (
                    f"cycle {cycle}: output {got} is {value}, expected {expected[got]} "
                    f"(input {items[got]})")
                self.digest.update(f"{cycle}:{value};".encode())
                got += 1
            if done_before and nxt == len(items):
                idle_after += 1
                assert not int(out_valid.value), f"cycle {cycle}: an extra output"
                if idle_after >= drain:
                    break
        else:
            raise AssertionError(f"timeout: {nxt} of {len(items)} inputs accepted, "
                                 f"{got} of {len(expected)} outputs seen after {max_cycles} cycles")
        await RisingEdge(dut.clk)
        in_valid.value = 0
        out_ready.value = int(idle_ready)
        self.outputs += got
        self.cycles = cycle

    def save_digest(self, name: str) -> None:
        TEST_DIR.mkdir(parents=True, exist_ok=True)
        (TEST_DIR / f"{name}.digest").write_text(f"{self.outputs} {self.digest.hexdigest()}\n")
