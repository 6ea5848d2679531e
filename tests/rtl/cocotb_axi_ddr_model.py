"""cocotb tests of the DDR model (rtl_sim/tb/axi_ddr_model.sv): data, latency, bandwidth,
outstanding limits, AXI rule violations, random stalls, and the file load/dump path.

The pytest driver (tests/test_ddr_model.py) writes the memory image and the manifests before the
simulation starts and passes their paths in the environment: M3V_DDR_IMAGE (the hex file loaded
at byte address M3V_DDR_BASE) and M3V_DDR_DUMP (the file the dump manifest names).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

PORTS, DATA_W, ADDR_W, ID_W = 4, 128, 32, 4
BEAT = DATA_W // 8
LATENCY, MAX_OUT = 100, 8
BW = 128 / 3  # bytes per cycle, all ports together

IMAGE = Path(os.environ.get("M3V_DDR_IMAGE", "image.hex"))
BASE = int(os.environ.get("M3V_DDR_BASE", "0"), 0)
DUMP = Path(os.environ.get("M3V_DDR_DUMP", "dump.hex"))
DUMP_ADDR = int(os.environ.get("M3V_DDR_DUMP_ADDR", "0"), 0)
DUMP_WORDS = int(os.environ.get("M3V_DDR_DUMP_WORDS", "0"), 0)


def image_words() -> list[int]:
    return [int(line, 16) for line in IMAGE.read_text().split()]


def field(value: int, i: int, width: int) -> int:
    return (value >> (i * width)) & ((1 << width) - 1)


class Master:
    """Four AXI4 masters driven from one cycle loop. Reads and writes are queued per port as
    (address, beats); every handshake is recorded with its cycle."""

    def __init__(self, dut, rng: random.Random, rready_p: float = 1.0):
        self.dut, self.rng, self.rready_p = dut, rng, rready_p
        self.reads = [[] for _ in range(PORTS)]     # pending (addr, beats)
        self.writes = [[] for _ in range(PORTS)]    # pending (addr, [words], [strobes])
        self.issued = [[] for _ in range(PORTS)]    # (addr, beats, cycle accepted)
        self.beats = [[] for _ in range(PORTS)]     # (cycle, data, last)
        self.wbeats = [0] * PORTS
        self.wcur = [None] * PORTS                  # burst whose data is being sent
        self.wq = [[] for _ in range(PORTS)]        # accepted bursts waiting for their data
        self.aw_accepted = [0] * PORTS
        self.bresps = [0] * PORTS
        self.wends = [[] for _ in range(PORTS)]     # cycle of each burst's last data beat
        self.bcycles = [[] for _ in range(PORTS)]   # cycle of each write response
        self.cycle = 0

    def drive_idle(self):
        d = self.dut
        for name in ("arvalid", "awvalid", "wvalid", "araddr", "arlen", "awaddr", "awlen", "wdata", "wstrb",
                     "wlast", "arid", "awid"):
            getattr(d, name).value = 0
        d.arsize.value = sum(4 << (3 * p) for p in range(PORTS))
        d.awsize.value = d.arsize.value
        d.arburst.value = sum(1 << (2 * p) for p in range(PORTS))
        d.awburst.value = d.arburst.value
        d.rready.value = 0
        d.bready.value = (1 << PORTS) - 1
        d.dump.value = 0
        d.load.value = 0

    async def run(self, max_cycles: int, until_idle: bool = True):
        d = self.dut
        for _ in range(max_cycles):
            await RisingEdge(d.clk)
            self.cycle += 1
            arv = ara = arl = awv = awa = awl = wv = wd = ws = wl = 0
            rr = 0
            for p in range(PORTS):
                if self.reads[p]:
                    a, n = self.reads[p][0]
                    arv |= 1 << p
                    ara |= a << (p * ADDR_W)
                    arl |= (n - 1) << (p * 8)
                if self.writes[p]:
                    a, words, strobes = self.writes[p][0]
                    awv |= 1 << p
                    awa |= a << (p * ADDR_W)
                    awl |= (len(words) - 1) << (p * 8)
                if self.wcur[p] is None and self.wq[p]:
                    self.wcur[p] = [self.wq[p].pop(0), 0]
                if self.wcur[p] is not None:
                    (words, strobes), i = self.wcur[p]
                    wv |= 1 << p
                    wd |= words[i] << (p * DATA_W)
                    ws |= strobes[i] << (p * BEAT)
                    wl |= int(i == len(words) - 1) << p
                if self.rng.random() < self.rready_p:
                    rr |= 1 << p
            d.arvalid.value, d.araddr.value, d.arlen.value = arv, ara, arl
            d.awvalid.value, d.awaddr.value, d.awlen.value = awv, awa, awl
            d.wvalid.value, d.wdata.value, d.wstrb.value, d.wlast.value = wv, wd, ws, wl
            d.rready.value = rr
            await ReadOnly()
            arr, awr, wr = int(d.arready.value), int(d.awready.value), int(d.wready.value)
            rv, rl, rdata = int(d.rvalid.value), int(d.rlast.value), int(d.rdata.value)
            bv = int(d.bvalid.value)
            for p in range(PORTS):
                if arv >> p & 1 and arr >> p & 1:
                    a, n = self.reads[p].pop(0)
                    self.issued[p].append((a, n, self.cycle))
                if awv >> p & 1 and awr >> p & 1:
                    _, words, strobes = self.writes[p].pop(0)
                    self.wq[p].append((words, strobes))
                    self.aw_accepted[p] += 1
                if wv >> p & 1 and wr >> p & 1:
                    self.wbeats[p] += 1
                    self.wcur[p][1] += 1
                    if self.wcur[p][1] == len(self.wcur[p][0][0]):
                        self.wcur[p] = None
                        self.wends[p].append(self.cycle)
                if rv >> p & 1 and rr >> p & 1:
                    self.beats[p].append((self.cycle, field(rdata, p, DATA_W), rl >> p & 1))
                if bv >> p & 1:
                    self.bresps[p] += 1
                    self.bcycles[p].append(self.cycle)
            if until_idle and self.idle():
                return
        if until_idle:
            raise AssertionError(f"timeout after {max_cycles} cycles")

    def expected_beats(self, p: int) -> int:
        return sum(n for _, n, _ in self.issued[p])

    def idle(self) -> bool:
        reads_done = all(not self.reads[p] and len(self.beats[p]) == self.expected_beats(p) for p in range(PORTS))
        writes_done = all(not self.writes[p] and not self.wq[p] and self.wcur[p] is None
                          and self.bresps[p] == self.aw_accepted[p] for p in range(PORTS))
        return reads_done and writes_done

    def check_reads(self, mem: dict[int, int]):
        """Data of every burst, in order, with rlast on its last beat and its first beat at least
        LATENCY cycles after acceptance."""
        for p in range(PORTS):
            k = 0
            for a, n, t in self.issued[p]:
                assert self.beats[p][k][0] - t >= LATENCY, \
                    f"port {p}: first beat {self.beats[p][k][0] - t} cycles after the request"
                for j in range(n):
                    cyc, data, last = self.beats[p][k]
                    want = mem.get(a // BEAT + j, 0)
                    assert data == want, f"port {p} burst {a:#x} beat {j}: {data:#x} != {want:#x}"
                    assert last == (j == n - 1), f"port {p} burst {a:#x} beat {j}: rlast {last}"
                    k += 1
            cycles = [c for c, _, _ in self.beats[p]]
            assert len(cycles) == len(set(cycles)), f"port {p}: two read beats in one cycle"


async def start(dut, stall_permille: int = 0) -> None:
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst_n.value = 0
    dut.stall_permille.value = stall_permille
    m = Master(dut, random.Random(0))
    m.drive_idle()
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst_n.value = 1
    await RisingEdge(dut.clk)


def random_bursts(rng: random.Random, n: int, lo: int, hi: int, max_beats: int = 16):
    """n bursts inside [lo, hi) bytes that never cross a 4 KB boundary."""
    out = []
    while len(out) < n:
        beats = rng.randint(1, max_beats)
        a = rng.randrange(lo, hi - beats * BEAT, BEAT)
        if (a % 4096) + beats * BEAT <= 4096:
            out.append((a, beats))
    return out


def loaded_memory() -> dict[int, int]:
    return {BASE // BEAT + i: w for i, w in enumerate(image_words())}


@cocotb.test()
async def reads_return_the_loaded_file_after_the_latency(dut):
    await start(dut)
    mem = loaded_memory()
    m = Master(dut, random.Random(1), rready_p=0.8)
    lo, hi = BASE, BASE + len(mem) * BEAT
    for p in range(PORTS):
        m.reads[p] = random_bursts(random.Random(10 + p), 12, lo, hi)
    await m.run(20000)
    m.check_reads(mem)
    assert int(dut.errors.value) == 0


@cocotb.test()
async def bandwidth_is_shared_and_per_port_limited(dut):
    await start(dut)
    mem = loaded_memory()
    lo, hi = BASE, BASE + len(mem) * BEAT
    # one port alone: 16 B/cycle at most, and close to it with enough requests in flight
    m = Master(dut, random.Random(2))
    m.reads[0] = [(a, 16) for a in range(lo, lo + 64 * 256, 256)]
    await m.run(20000)
    m.check_reads(mem)
    cyc = [c for c, _, _ in m.beats[0]]
    rate = len(cyc) * BEAT / (cyc[-1] - cyc[0] + 1)
    dut._log.info(f"one port: {rate:.2f} bytes/cycle")
    assert 0.9 * BEAT <= rate <= BEAT
    # four ports together: the shared 12.8 GB/s budget (128/3 bytes per cycle) is the limit
    m = Master(dut, random.Random(3))
    for p in range(PORTS):
        m.reads[p] = [(a, 16) for a in range(lo + p * 4096, lo + p * 4096 + 48 * 256, 256)]
    await m.run(40000)
    m.check_reads(mem)
    first = max(m.beats[p][0][0] for p in range(PORTS))
    last = min(m.beats[p][-1][0] for p in range(PORTS))
    window = sum(1 for p in range(PORTS) for c, _, _ in m.beats[p] if first <= c <= last)
    assert last - first > 500, "the four ports' transfers did not overlap: the arbitration starves a port"
    rate = window * BEAT / (last - first + 1)
    dut._log.info(f"four ports: {rate:.2f} bytes/cycle (budget {BW:.2f})")
    assert 0.9 * BW <= rate <= BW * (1 + 4 / (last - first + 1))


@cocotb.test()
async def outstanding_reads_are_limited(dut):
    await start(dut)
    m = Master(dut, random.Random(4), rready_p=0.0)
    m.reads[1] = [(BASE + 256 * i, 16) for i in range(MAX_OUT + 3)]
    await m.run(LATENCY // 2, until_idle=False)
    assert len(m.issued[1]) == MAX_OUT, f"{len(m.issued[1])} reads accepted with none answered"
    m.rready_p = 1.0
    await m.run(20000)
    m.check_reads(loaded_memory())


@cocotb.test()
async def writes_land_with_strobes_and_dump_to_a_file(dut):
    await start(dut)
    rng = random.Random(5)
    mem = loaded_memory()
    m = Master(dut, rng)
    written = {}
    for p in range(PORTS):
        for a, n in random_bursts(random.Random(20 + p), 6, BASE + p * 8192, BASE + (p + 1) * 8192):
            words = [rng.getrandbits(DATA_W) for _ in range(n)]
            strobes = [rng.choice([(1 << BEAT) - 1, rng.getrandbits(BEAT)]) for _ in range(n)]
            m.writes[p].append((a, words, strobes))
            for j, (w, s) in enumerate(zip(words, strobes)):
                old = written.get(a // BEAT + j, mem.get(a // BEAT + j, 0))
                new = 0
                for b in range(BEAT):
                    src = w if s >> b & 1 else old
                    new |= ((src >> (8 * b)) & 0xFF) << (8 * b)
                written[a // BEAT + j] = new
    await m.run(40000)
    assert int(dut.bytes_wr.value) == sum(m.wbeats) * BEAT
    mem.update(written)
    # read everything back through the ports
    m2 = Master(dut, random.Random(6))
    for p in range(PORTS):
        m2.reads[p] = [(BASE + p * 8192 + 256 * i, 16) for i in range(32)]
    await m2.run(40000)
    m2.check_reads(mem)
    # and through the dump file
    await RisingEdge(dut.clk)
    dut.dump.value = 1
    await RisingEdge(dut.clk)
    dut.dump.value = 0
    await RisingEdge(dut.clk)
    dumped = [int(x, 16) for x in DUMP.read_text().split() if not x.startswith("//")]
    assert len(dumped) == DUMP_WORDS
    for i, w in enumerate(dumped):
        assert w == mem.get(DUMP_ADDR // BEAT + i, 0), f"dump word {i}"
    assert int(dut.errors.value) == 0


@cocotb.test()
async def write_responses_wait_their_latency(dut):
    """Each write response comes LATENCY cycles or more after its burst's last beat: one burst at
    a time, so the response queue is empty whenever a burst ends, over more bursts than the queue
    has slots (a reused slot must not lend its old time to the new response)."""
    await start(dut)
    rng = random.Random(9)
    m = Master(dut, rng)
    for i in range(3 * MAX_OUT * PORTS):
        p = i % PORTS
        m.writes[p].append((BASE + 64 * i, [rng.getrandbits(DATA_W)], [(1 << BEAT) - 1]))
        await m.run(4 * LATENCY)
    for p in range(PORTS):
        assert len(m.bcycles[p]) == len(m.wends[p]) == 3 * MAX_OUT
        for w, b in zip(m.wends[p], m.bcycles[p]):
            assert b - w >= LATENCY, f"port {p}: a write response {b - w} cycles after its last beat"
    assert int(dut.errors.value) == 0


@cocotb.test()
async def ports_writing_one_word_together_all_land(dut):
    """Every port writes its own bytes (byte b belongs to port b mod PORTS) of the same words at
    the same time: stores that meet in one cycle must merge, none may be lost."""
    await start(dut)
    rng = random.Random(9)
    m = Master(dut, rng)
    base = BASE + 3 * 4096
    words = 8
    want = {}
    for p in range(PORTS):
        strobe = sum(1 << b for b in range(BEAT) if b % PORTS == p)
        for rep in range(4):
            data = [rng.getrandbits(DATA_W) for _ in range(words)]
            m.writes[p].append((base, data, [strobe] * words))
            for j, w in enumerate(data):
                mask = sum(0xFF << (8 * b) for b in range(BEAT) if strobe >> b & 1)
                want[j] = (want.get(j, 0) & ~mask) | (w & mask)
    await m.run(20000)
    m2 = Master(dut, random.Random(10))
    m2.reads[0] = [(base, words)]
    await m2.run(5000)
    got = [data for _, data, _ in m2.beats[0]]
    assert got == [want[j] for j in range(words)], "bytes written by different ports in one cycle were lost"
    assert int(dut.errors.value) == 0


@cocotb.test()
async def a_burst_across_4k_is_a_counted_error(dut):
    await start(dut)
    before = int(dut.errors.value)
    m = Master(dut, random.Random(7))
    m.reads[2] = [(BASE + 4096 - 2 * BEAT, 4)]
    await m.run(2000)
    assert int(dut.errors.value) == before + 1


@cocotb.test()
async def random_stalls_slow_down_but_keep_the_data(dut):
    await start(dut, stall_permille=300)
    mem = loaded_memory()
    m = Master(dut, random.Random(8))
    untouched = BASE + 40960   # beyond what the write test changes
    m.reads[0] = [(a, 16) for a in range(untouched, untouched + 32 * 256, 256)]
    await m.run(40000)
    m.check_reads(mem)
    cyc = [c for c, _, _ in m.beats[0]]
    rate = len(cyc) * BEAT / (cyc[-1] - cyc[0] + 1)
    dut._log.info(f"one port with 30 % stalls: {rate:.2f} bytes/cycle")
    assert rate < 0.8 * BEAT
