#!/usr/bin/env python3
"""Engine benchmark: single instructions of a model's shapes on the RTL accelerator, each checked
byte for byte against the Python executor, with the schedule model's estimate beside the RTL's
cycles.

    scripts/bench_engines.py [--op gemm|attention|gate|layernorm] [--spread] [--hw rtl_sim/hw.json]
                             [--case NAME ...] [--json]

Every case is one instruction (plus END) with random operands (seed 0); all cases run in one
simulation of one Verilator build of the accelerator for the hardware configuration (hw.json by
default). Per case: RTL cycles of the instruction (OP_CYCLES), schedule.estimate's cycles for the
same instruction, their ratio, and the DDR bytes read and written. The cases are a registry of
op -> builders (``CASES``); ``--op`` picks one op, the default runs all.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3vit.compiler import isa, schedule
from m3vit.compiler.program_exec import execute
from m3vit.rtl_sim import rtlsim
from m3vit.rtl_sim.hwconfig import HwConfig, load_hw_config

TOKENS = 197        # the shapes of a 224x224 image in 16x16 patches plus CLS
DIM = 384
MLP = 1536
EXPERTS = 16
TOP_K = 2
EXPERT_HIDDEN = 384


@dataclass
class Bench:
    name: str
    op: str
    instr: isa.Instr
    weights: bytes
    image: bytes
    arena_bytes: int
    output_bytes: int
    context: list      # instructions the schedule model needs before this one (the MoE gate)
    queue_lengths: list | None = None


class Space:
    """A growing byte space of 64-byte aligned tensors."""

    def __init__(self, name: str):
        self.name, self.data = name, bytearray()

    def put(self, blob: bytes) -> int:
        off = len(self.data)
        self.data += blob
        self.data += bytes(isa.align(len(self.data)) - len(self.data))
        return isa.ref(self.name, off)


def _rand(rng: np.random.Generator, bits: int, n: int) -> np.ndarray:
    return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=n, dtype=np.int64)


def _queue(rng: np.random.Generator, tokens: int, experts: int, k: int):
    """A routing table (top-k distinct experts per token) as the queue table moe_gate writes."""
    idx = np.array([rng.choice(experts, size=k, replace=False) for _ in range(tokens)], np.int64)
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(experts + 1))
    tok, slot = np.divmod(order, k)
    tok_off, dst_off, size = isa.queue_layout(experts, tokens, k)
    blob = bytearray(size)
    blob[0:2 * (experts + 1)] = bounds.astype("<u2").tobytes()
    blob[tok_off:tok_off + 2 * tokens * k] = tok.astype("<u2").tobytes()
    blob[dst_off:dst_off + 2 * tokens * k] = (tok * k + slot).astype("<u2").tobytes()
    return bytes(blob), np.diff(bounds).tolist(), idx


def _gemm(name: str, rows: int, k: int, n: int, *, w16=False, bias=False, gelu=False, residual=False,
          xmode="direct", ymode="direct", seed=0) -> Bench:
    rng = np.random.default_rng(seed)
    a_bits, w_bits, out_bits = 12, 16 if w16 else 8, 16
    wgt, inp = Space("wgt"), Space("in")
    fields = {"in_dim": k, "out_dim": n, "x_ld": k, "y_ld": n, "rows": rows}
    x_rows = y_rows = rows
    context, lengths = [], None
    if xmode != "direct" or ymode != "direct":
        table, lengths, _ = _queue(rng, TOKENS, EXPERTS, TOP_K)
        q_ref = wgt.put(table)
        # a typical expert: the queue closest to the mean T·k / E
        expert = int(np.argmin(np.abs(np.array(lengths) - TOKENS * TOP_K / EXPERTS)))
        fields.update(queue_ref=q_ref, expert=expert, queue_shape=EXPERTS | (TOKENS * TOP_K) << 16, rows=TOKENS)
        x_rows = {"direct": TOKENS, "gather": TOKENS, "queue": TOKENS * TOP_K}[xmode]
        y_rows = {"direct": TOKENS, "queue": TOKENS * TOP_K, "scatter": TOKENS * TOP_K}[ymode]
        context = [isa.Instr("moe_gate", {"tokens": TOKENS, "dim": DIM, "experts_k": EXPERTS | TOP_K << 16,
                                          "queue_ref": q_ref})]
    fields["x_ref"] = inp.put(_rand(rng, a_bits, x_rows * k).astype("<i2").tobytes())
    fields["w_ref"] = wgt.put(_rand(rng, w_bits, k * n).astype("<i2" if w16 else "i1").tobytes())
    if bias:
        fields["bias_ref"] = wgt.put(_rand(rng, a_bits + w_bits, n).astype("<i8").tobytes())
    base = a_bits + w_bits + k.bit_length() // 2 - out_bits
    fields["shift_ref"] = wgt.put(rng.integers(base - 1, base + 2, size=n).astype(np.int8).tobytes())
    fields["fmt"] = isa.pack_fmt(out_bits, 8)
    if gelu:
        fields["gelu_fmt"] = isa.pack_fmt(16, 8)
    flags = isa.make_flags(gelu=gelu, w16=w16, bias=bias, residual=residual, xmode=xmode, ymode=ymode)
    if residual:
        fields.update(res_ref=inp.put(_rand(rng, 14, y_rows * n).astype("<i2").tobytes()),
                      res_shifts=isa.pack_res_shifts(0, 0), res_fmt=isa.pack_fmt(16, 8))
    fields["y_ref"] = isa.ref("out", 0)
    return Bench(name, "gemm", isa.Instr("gemm", fields, flags), bytes(wgt.data), bytes(inp.data), 64,
                 isa.align(2 * y_rows * n), context, [lengths] if lengths else None)


def _combine(name: str, tokens: int, k: int, dim: int, residual=True, seed=0) -> Bench:
    rng = np.random.default_rng(seed)
    wgt, inp = Space("wgt"), Space("in")
    table, lengths, idx = _queue(rng, tokens, EXPERTS, k)
    q_ref = wgt.put(table)
    score = rng.integers(0, 1 << 15, size=tokens * k)
    fields = {"score_ref": wgt.put(score.astype("<u2").tobytes()),
              "idx_ref": wgt.put(idx.reshape(-1).astype("<u2").tobytes()),
              "y_ref": inp.put(_rand(rng, 14, tokens * k * dim).astype("<i2").tobytes()),
              "shift_ref": wgt.put(np.full(EXPERTS, 15, np.int8).tobytes()),
              "tokens": tokens, "k": k, "dim": dim, "fmt": isa.pack_fmt(16, 8), "out_ref": isa.ref("out", 0)}
    flags = 0
    if residual:
        flags |= 1 << isa.FLAGS["residual"]
        fields.update(res_ref=inp.put(_rand(rng, 14, tokens * dim).astype("<i2").tobytes()),
                      res_shifts=isa.pack_res_shifts(0, 0), res_fmt=isa.pack_fmt(16, 8))
    context = [isa.Instr("moe_gate", {"tokens": tokens, "dim": dim, "experts_k": EXPERTS | k << 16,
                                      "queue_ref": q_ref})]
    return Bench(name, "moe_combine", isa.Instr("moe_combine", fields, flags), bytes(wgt.data), bytes(inp.data),
                 64, isa.align(2 * tokens * dim), context, [lengths])


def _attention(name: str, tokens: int, dim: int, heads: int, hw: HwConfig, seed: int = 0) -> Bench:
    """Multi-head attention on a [T, 3D] qkv in the input space; q_tile as the compiler plans it
    (as many queries as half the score buffer holds)."""
    rng = np.random.default_rng(seed)
    q_tile = min(tokens, hw.buffers.scores // (2 * tokens))
    qkv = rng.integers(-3000, 3001, size=(tokens, 3 * dim)).astype("<i2").tobytes()
    fields = dict(qkv_ref=isa.ref("in", 0), y_ref=isa.ref("out", 0), tokens=tokens, dim=dim, heads=heads,
                  score_fmt=isa.pack_fmt(16, 4), score_shift=14, out_shift=2, fmt=isa.pack_fmt(16, 10), q_tile=q_tile)
    return Bench(name, "attention", isa.Instr("attention", fields), bytes(64), qkv, 64,
                 isa.align(2 * tokens * dim), [])


def _gate(name: str, tokens: int, dim: int, experts: int, k: int, *, w16=False, seed=0) -> Bench:
    """One moe_gate of task 0 on random x, gate weights, biases and shifts; the logits, top-k
    indices and scores and the queue table go to the output space one after the other."""
    rng = np.random.default_rng(seed)
    wgt, inp, out = Space("wgt"), Space("in"), Space("out")
    xmag, wmag = 3000, 32767 if w16 else 127
    acc = max(1.0, xmag * wmag * np.sqrt(dim) / 2)
    shift = int(np.log2(acc)) - 13           # logits near the top of 16 bits, a few saturating
    fields = {"x_ref": inp.put(rng.integers(-xmag, xmag + 1, size=tokens * dim).astype("<i2").tobytes()),
              "w_ref": wgt.put(rng.integers(-wmag, wmag + 1, size=dim * experts)
                               .astype("<i2" if w16 else "i1").tobytes()),
              "bias_ref": wgt.put(rng.integers(-int(acc), int(acc) + 1, size=experts).astype("<i8").tobytes()),
              "shift_ref": wgt.put((shift + rng.integers(-2, 3, size=experts)).astype(np.int8).tobytes()),
              "w_stride": 0, "bias_stride": 0, "shift_stride": 0,
              "tokens": tokens, "dim": dim, "experts_k": experts | k << 16, "fmt": isa.pack_fmt(16, 8)}
    for ref, nbytes in (("logits_ref", 2 * tokens * experts), ("idx_ref", 2 * tokens * k),
                        ("score_ref", 2 * tokens * k), ("queue_ref", isa.queue_layout(experts, tokens, k)[2])):
        fields[ref] = out.put(bytes(nbytes))
    return Bench(name, "moe_gate", isa.Instr("moe_gate", fields, isa.make_flags(w16=w16)), bytes(wgt.data),
                 bytes(inp.data), 64, len(out.data), [])


def _layernorm(name: str, rows: int, dim: int, seed=0) -> Bench:
    """One LayerNorm of rows x dim with gamma, beta and per-column shifts that keep y in range."""
    rng = np.random.default_rng(seed)
    wgt, inp = Space("wgt"), Space("in")
    fields = {"x_ref": inp.put(rng.integers(-3000, 3001, size=rows * dim).astype("<i2").tobytes()),
              "gamma_ref": wgt.put(rng.integers(-32768, 32768, size=dim).astype("<i2").tobytes()),
              "beta_ref": wgt.put(rng.integers(-(1 << 40), 1 << 40, size=dim).astype("<i8").tobytes()),
              "shift_ref": wgt.put(rng.integers(8, 26, size=dim).astype("i1").tobytes()),
              "y_ref": isa.ref("out", 0), "rows": rows, "dim": dim, "eps_lo": 1, "eps_hi": 0, "beta_shift": 4,
              "fmt": isa.pack_fmt(16, 8)}
    return Bench(name, "layernorm", isa.Instr("layernorm", fields), bytes(wgt.data), bytes(inp.data), 64,
                 isa.align(2 * rows * dim), [])


def _gate_spread() -> list:
    """Gate shapes over T x D with N, k and the weight width rotating so that every value of each
    occurs at every T; k <= N."""
    cases = []
    for i, t in enumerate((1, 8, 129, 197, 1025)):
        for j, d in enumerate((64, 192, 384)):
            for r in range(2):
                n = (4, 8, 16)[(i + j + r) % 3]
                k = min(n, (1, 2, 4)[(2 * i + j + 2 * r) % 3])
                w16 = (i + j + r) % 2 == 1
                cases.append((f"g{t}x{d}n{n}k{k}{'w' if w16 else 'b'}", t, d, n, k, w16))
    return cases


LN_SPREAD = [(r, d) for r in (1, 5, 129, 197, 1025) for d in (48, 100, 192, 384, 768)]

# op -> case builders (hw -> Bench); each engine's author adds its own op here
CASES = {
    "gemm": [
        lambda hw: _gemm("qkv", TOKENS, DIM, 3 * DIM, w16=True, bias=True),
        lambda hw: _gemm("proj", TOKENS, DIM, DIM, bias=True, residual=True),
        lambda hw: _gemm("mlp_fc1", TOKENS, DIM, MLP, bias=True, gelu=True),
        lambda hw: _gemm("mlp_fc2", TOKENS, MLP, DIM, bias=True, residual=True),
        lambda hw: _gemm("expert_fc1", TOKENS, DIM, EXPERT_HIDDEN, bias=True, gelu=True, xmode="gather",
                      ymode="queue"),
        lambda hw: _gemm("expert_fc2", TOKENS, EXPERT_HIDDEN, DIM, bias=True, xmode="queue", ymode="scatter"),
        lambda hw: _combine("moe_combine", TOKENS, TOP_K, DIM),
    ],
    "attention": [
        lambda hw: _attention("attention", TOKENS, DIM, DIM // 64, hw),
        # one head of 32 at longer sequences: the score buffer holds fewer queries per group
        lambda hw: _attention("attn_t257", 257, 32, 1, hw),
        lambda hw: _attention("attn_t513", 513, 32, 1, hw),
        lambda hw: _attention("attn_t1025", 1025, 32, 1, hw),
        lambda hw: _attention("attn_t513_h2", 513, 64, 2, hw),
    ],
    "gate": [
        lambda hw: _gate("gate", TOKENS, DIM, EXPERTS, TOP_K),
        lambda hw: _gate("gate_edge", 129, 192, EXPERTS, TOP_K, w16=True),
        lambda hw: _gate("gate_small", 8, 64, 4, 1),
        lambda hw: _gate("gate_long", 1025, 384, 8, 4, w16=True),
    ],
    "layernorm": [
        lambda hw: _layernorm("layernorm", TOKENS, DIM),
        lambda hw: _layernorm("ln_edge", 129, 192),
        lambda hw: _layernorm("ln_one", 1, 48),
        lambda hw: _layernorm("ln_odd", 5, 100),
    ],
}
# --spread: the shapes the gate and LayerNorm models were fitted (even positions) and checked (odd) on;
# attention at the small shapes of scripts/bench_schedule_fit.py's configurations and a little
# beyond (5-64 tokens, 1-4 heads of 8-32: rows crossing 4 KB lines, one and two query groups)
ATTN_SPREAD = [(t, h, d) for t in (5, 8, 13, 16, 26, 32, 40, 48, 64)
               for h, d in ((1, 8), (2, 16), (1, 24), (3, 24), (1, 32), (4, 32))]
SPREAD = {
    "attention": [lambda hw, c=c: _attention(f"attn_t{c[0]}_{c[1]}x{c[2]}", c[0], c[1] * c[2], c[1], hw)
                  for c in ATTN_SPREAD],
    "gate": [lambda hw, c=c: _gate(*c[:5], w16=c[5]) for c in _gate_spread()],
    "layernorm": [lambda hw, rd=rd: _layernorm(f"ln{rd[0]}x{rd[1]}", *rd) for rd in LN_SPREAD],
}


def _program(b: Bench, hw: HwConfig) -> bytes:
    return rtlsim.program_bytes([b.instr, isa.Instr("end")], hw, weight_bytes=len(b.weights),
                                arena_bytes=b.arena_bytes, input_bytes=len(b.image), output_bytes=b.output_bytes)


def _estimate(b: Bench, hw: HwConfig) -> dict:
    est = schedule.estimate(b.context + [b.instr], hw, queue_lengths=b.queue_lengths)
    return est["instructions"][len(b.context)] if "instructions" in est else est["rows"][len(b.context)]


def _fits(ins: isa.Instr, lim) -> bool:
    """Whether the instruction's shape is within the hardware's limits (a small --hw drops the rest)."""
    f = ins.fields
    if ins.op == "moe_gate":
        return (f["tokens"] <= lim.max_tokens and f["dim"] <= lim.max_dim
                and (f["experts_k"] & 0xFFFF) <= lim.max_experts and f["experts_k"] >> 16 <= lim.max_k)
    if ins.op == "layernorm":
        return f["rows"] <= lim.max_tokens and f["dim"] <= lim.max_dim
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=sorted(CASES), help="only this op's cases")
    ap.add_argument("--case", nargs="*", help="only these cases (by name)")
    ap.add_argument("--hw", help="hw.json (default: rtl_sim/hw.json)")
    ap.add_argument("--spread", action="store_true",
                    help="the long gate, LayerNorm and small-attention shape lists instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    hw = load_hw_config(args.hw) if args.hw else HwConfig.default()
    reg = SPREAD if args.spread else CASES
    ops = [args.op] if args.op else sorted(reg)
    benches = [make(hw) for op in ops if op in reg for make in reg[op]]
    lim = hw.limits
    benches = [b for b in benches if _fits(b.instr, lim)]
    if args.case:
        benches = [b for b in benches if b.name in args.case]
    progs = [_program(b, hw) for b in benches]
    t0 = time.perf_counter()
    results = rtlsim.simulate([rtlsim.Job(b.name, p, b.weights, b.image) for b, p in zip(benches, progs)], hw,
                              run_name="bench-engines")
    seconds = time.perf_counter() - t0
    rows, bad = [], []
    for b, p, r in zip(benches, progs, results):
        ref = execute(p, b.weights, b.image, 0, hw_hash=hw.hash())
        exact = r.status == 0 and r.output == bytes(ref.memories["out"]) and r.arena == bytes(ref.memories["arena"])
        if not exact:
            bad.append(b.name)
        est = _estimate(b, hw)
        cyc = r.counters.get(f"op_cycles_{b.op}", r.cycles)
        rows.append({"name": b.name, "op": b.op, "rtl_cycles": cyc, "schedule_cycles": est["cycles"],
                     "ratio": round(cyc / est["cycles"], 3) if est["cycles"] else None,
                     "rd_bytes": r.rd_bytes, "wr_bytes": r.wr_bytes,
                     "schedule_bytes": est["ddr_read"] + est["ddr_write"], "rows": est["rows"],
                     "bit_exact": exact, "status": r.status_name})
    if args.json:
        print(json.dumps({"hw": hw.to_dict(), "seconds": round(seconds, 1), "cases": rows}, indent=1))
    else:
        print(f"{'case':<12} {'rows':>5} {'RTL cycles':>11} {'schedule':>9} {'ratio':>6} {'DDR rd':>10} "
              f"{'DDR wr':>9} {'exact':>5}")
        for x in rows:
            print(f"{x['name']:<12} {x['rows']:>5} {x['rtl_cycles']:>11,} {x['schedule_cycles']:>9,} "
                  f"{x['ratio']:>6} {x['rd_bytes']:>10,} {x['wr_bytes']:>9,} {'yes' if x['bit_exact'] else 'NO':>5}")
        errs = [x["schedule_cycles"] / x["rtl_cycles"] - 1 for x in rows if x["rtl_cycles"]]
        if errs:
            print(f"schedule model: {sum(abs(e) <= 0.02 for e in errs)} of {len(errs)} within 2 %, "
                  f"worst {100 * max(errs, key=abs):+.1f} %")
        print(f"simulation {seconds:.0f} s")
    if bad:
        print(f"not bit-exact: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
