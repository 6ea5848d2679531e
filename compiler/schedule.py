"""The schedule model: an analytic cycle estimate of a Program on the accelerator.

``estimate(instrs, hw, queue_lengths)`` walks a Program (decoded ``isa.Instr`` records, a
``program.json``/``program.bin`` or its parsed JSON) and charges every instruction the larger of
its compute time on its unit and its DDR time, plus the DDR latency it cannot hide. Expert
GEMMs take their row counts from the running task's queue lengths (a golden run's
``blocks.i.moe.topk``, or a uniform spread). The assumptions are the fields of ``Assumptions``;
docs/schedule.md states them with the formulas and the figures for the presets.

    result = estimate(instrs, HwConfig.default(), queue_lengths=trace)
    print(format_table(result))
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3vit.compiler import isa
from m3vit.compiler.isa import Instr
from m3vit.errors import UsageError
from m3vit.rtl_sim.hwconfig import HwConfig

FILL_DRAIN = ("pass", "tile", "instruction")
CLASSES = ("patchify", "patch_embed", "embed", "layernorm", "qkv", "attention", "proj", "add", "mlp", "gate",
           "experts", "combine", "gemm")
BOUNDS = ("compute", "ddr", "latency")

BIAS_BYTES = 8      # int64 accumulator-format biases
SHIFT_BYTES = 1     # int8 per-channel shifts
INDEX_BYTES = 2     # uint16 top-k indices, scores and queue entries
GAMMA_BYTES = 2     # int16 LayerNorm gamma
EPILOGUE_LATENCY = 19   # the GELU epilogue's fixed depth (compute_unit.sv EPI_LAT), always in the path
REQUANT_LATENCY = 5


@dataclass(frozen=True)
class Assumptions:
    """The model's free parameters (docs/schedule.md). ``None`` derives the value from hw.json."""

    ddr_peak_gbps: float = 12.8         # shared by reads and writes; the AXI ports' sum caps it too
    ddr_latency: int = 100              # cycles from a request to its first beat
    pipeline_latency: int | None = None  # compute unit, last beat -> output FIFO
    fill_drain: str = "tile"            # charged per weight pass, per P_out-output tile, or once
    tile_load_cycles: int = 1           # weight buffer -> shadow tile register, per P_in x P_out tile
    vector_lanes: int | None = None     # elements/cycle of LayerNorm, add, embed, patchify (p_out)
    softmax_lanes: int | None = None    # exp evaluations/cycle of the softmax unit (hw.softmax_lanes)
    layernorm_passes: int = 2           # statistics, then normalise (the row stays on chip)
    topk_cycles_per_token: int | None = None  # gate top-k unit: one maximum per cycle (k)
    weight_buffer_share: float = 0.5    # of buffers.weights usable by one instruction (ping-pong)
    act_buffer_share: float = 0.5       # of buffers.activations for a resident GEMM input

    def validated(self) -> "Assumptions":
        if self.fill_drain not in FILL_DRAIN:
            raise UsageError(f"fill_drain must be one of {', '.join(FILL_DRAIN)}, got {self.fill_drain!r}")
        if not self.ddr_peak_gbps > 0:
            raise UsageError(f"ddr_peak_gbps must be positive, got {self.ddr_peak_gbps}")
        for name, lo in (("ddr_latency", 0), ("pipeline_latency", 0), ("tile_load_cycles", 1), ("vector_lanes", 1),
                         ("softmax_lanes", 1), ("layernorm_passes", 1), ("topk_cycles_per_token", 0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("weight_buffer_share", "act_buffer_share"):
            if not 0 < getattr(self, name) <= 1:
                raise UsageError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        return self


def compute_unit_latency(hw: HwConfig) -> int:
    """Cycles from accepting a row's last beat to its output FIFO push (compute_unit.sv ROW_LAT):
    A/B and M registers, the adder tree or the combine term, accumulate, requant, epilogue."""
    tree = 1 + max(0, math.ceil(math.log2(hw.p_in)))
    return 2 + max(tree, 1 + REQUANT_LATENCY) + REQUANT_LATENCY + EPILOGUE_LATENCY


@dataclass(frozen=True)
class _Machine:
    hw: HwConfig
    a: Assumptions
    bw: float           # DDR bytes per cycle
    pipe: int
    lanes: int
    sm_lanes: int
    ab: int             # activation bytes

    @classmethod
    def of(cls, hw: HwConfig, a: Assumptions) -> "_Machine":
        axi = hw.axi_ports * hw.axi_width_bits / 8
        ddr = a.ddr_peak_gbps * 1e9 / (hw.clock_mhz * 1e6)
        return cls(hw, a, min(axi, ddr),
                   compute_unit_latency(hw) if a.pipeline_latency is None else a.pipeline_latency,
                   a.vector_lanes or hw.p_out, a.softmax_lanes or hw.softmax_lanes, (hw.act_bits + 7) // 8)


@dataclass
class _Cost:
    compute: float = 0.0
    read: int = 0
    write: int = 0
    macs: int = 0
    rows: int = 0


# ---------------------------------------------------------------------------- instruction costs
def _passes(rows: int, block: int) -> list[int]:
    full, rem = divmod(rows, block)
    return [block] * full + ([rem] if rem else [])


def _stream(m: _Machine, rows: int, k: int, n: int, block: int) -> tuple[int, int, int]:
    """MAC-array beats of rows x [k -> n] with one weight tile held over ``block`` rows:
    (cycles, P_out tiles, weight passes). A K chunk lasts at least one tile load."""
    ks, ot = -(-k // m.hw.p_in), -(-n // m.hw.p_out)
    blocks = _passes(rows, block)
    per_tile = ks * sum(max(b, m.a.tile_load_cycles) for b in blocks)
    return ot * per_tile, ot, ot * len(blocks)


def _fill(m: _Machine, tiles: int, passes: int) -> int:
    if m.a.fill_drain == "pass":
        return passes * m.pipe
    if m.a.fill_drain == "tile":
        return tiles * m.pipe
    return m.pipe


def _gemm_cost(m: _Machine, rows: int, k: int, n: int, w16: bool, bias: bool) -> _Cost:
    if rows <= 0:
        return _Cost()
    hw, wb = m.hw, 2 if w16 else 1
    beats, tiles, passes = _stream(m, rows, k, n, hw.token_block)
    weights = k * n * wb + n * SHIFT_BYTES + (n * BIAS_BYTES if bias else 0)
    x = rows * k * m.ab
    # A resident input is read once; otherwise once per group of output tiles whose weights fit.
    if x <= hw.buffers.activations * m.a.act_buffer_share:
        x_reads = 1
    else:
        group = max(1, int(hw.buffers.weights * m.a.weight_buffer_share // (k * hw.p_out * wb)))
        x_reads = -(-tiles // group)
    return _Cost(beats + _fill(m, tiles, passes), weights + x * x_reads, rows * n * m.ab, rows * k * n, rows)


def _cost_gemm(m: _Machine, ins: Instr, rows: int) -> _Cost:
    f = ins.fields
    c = _gemm_cost(m, rows, f["in_dim"], f["out_dim"], ins.has("w16"), ins.has("bias"))
    if rows > 0:
        # gather reads q_tok, scatter reads q_dst: one index per row
        c.read += INDEX_BYTES * rows * ((ins.xmode == isa.XMODES["gather"]) + (ins.ymode == isa.YMODES["scatter"]))
        if ins.has("residual"):
            # the fused add reads its other operand beside the output tile; the epilogue adds it
            c.read += rows * f["out_dim"] * m.ab
    return c


def _cost_attention(m: _Machine, ins: Instr, notes: list[str]) -> _Cost:
    f, hw = ins.fields, m.hw
    T, D, h = f["tokens"], f["dim"], max(1, f["heads"])
    d = D // h
    qt = min(T, f.get("q_tile") or hw.token_block)
    block = min(qt, hw.token_block)
    qk = _stream(m, T, d, T, block)[0]         # K as weights: d -> T keys
    av = _stream(m, T, T, d, block)[0]         # V as weights: T keys -> d
    softmax = -(-T * T // m.sm_lanes)
    # Staggered query tiles (rotated per head): the MAC array interleaves QK of the next tile with
    # A.V of the current one, so only the first fill and the last drain are exposed.
    compute = h * (qk + max(av, softmax)) + (m.pipe if m.a.fill_drain == "instruction" else 2 * m.pipe)
    kv_head = 2 * T * d * m.ab
    # One head's K and V stay in the activation buffer for all its query tiles; otherwise they
    # are streamed again for every tile.
    kv_reads = 1 if kv_head <= hw.buffers.activations else -(-T // qt)
    if qt * T * INDEX_BYTES > hw.buffers.scores:
        notes.append(f"{ins.name or 'attention'}: a {qt}-query score tile ({qt * T * INDEX_BYTES} bytes) exceeds "
                     f"buffers.scores")
    return _Cost(compute, T * D * m.ab + h * kv_head * kv_reads, T * D * m.ab, 2 * h * T * T * d, T)


def _cost_gate(m: _Machine, ins: Instr) -> _Cost:
    f = ins.fields
    T, D = f["tokens"], f["dim"]
    N, k = f["experts_k"] & 0xFFFF, f["experts_k"] >> 16
    g = _gemm_cost(m, T, D, N, ins.has("w16"), True)
    topk = T * (m.a.topk_cycles_per_token if m.a.topk_cycles_per_token is not None else k)
    # top-k follows the logits token by token; the queue placement needs every count first
    g.compute = max(g.compute, topk) + T * k
    g.write += T * k * 2 * INDEX_BYTES + isa.queue_layout(N, T, k)[2]
    return g


def _cost_combine(m: _Machine, ins: Instr, experts: int) -> _Cost:
    f, hw = ins.fields, m.hw
    T, k, D = f["tokens"], f["k"], f["dim"]
    beats, tiles, passes = _stream(m, T * k, hw.p_in, D, hw.token_block)   # one beat per (token, expert)
    read = T * k * (2 * INDEX_BYTES + D * m.ab) + experts * SHIFT_BYTES
    if ins.has("residual"):
        read += T * D * m.ab
    return _Cost(beats + _fill(m, tiles, passes), read, T * D * m.ab, 0, T)


def _cost_vector(m: _Machine, ins: Instr) -> _Cost:
    f, ab = ins.fields, m.ab
    if ins.op == "layernorm":
        rows, D = f["rows"], f["dim"]
        return _Cost(m.a.layernorm_passes * rows * -(-D // m.lanes),
                     rows * D * ab + D * (GAMMA_BYTES + BIAS_BYTES + SHIFT_BYTES), rows * D * ab, 0, rows)
    if ins.op == "add":
        rows, cols = f["rows"], f["cols"]
        return _Cost(rows * -(-cols // m.lanes), 2 * rows * cols * ab, rows * cols * ab, 0, rows)
    if ins.op == "embed":
        n, D = f["patches"], f["dim"]
        return _Cost((n + 1) * -(-D // m.lanes), (n + (n + 1) + 1) * D * ab, (n + 1) * D * ab, 0, n + 1)
    if ins.op == "patchify":
        C, H, W, p = f["channels"], f["height"], f["width"], max(1, f["patch"])
        out = C * (H // p * p) * (W // p * p)
        return _Cost(-(-out // m.lanes), C * H * W * ab, out * ab, 0, (H // p) * (W // p))
    raise UsageError(f"the schedule model has no cost for opcode '{ins.op}'")


# ---------------------------------------------------------------------------- names and classes
_MOE_RE = re.compile(r"^(blocks\.\d+\.moe)(\..*)?$")
_EXPERT_RE = re.compile(r"\.moe\.e\d+\.fc[12]$")


def layer_of(ins: Instr, index: int) -> str:
    """The QGraph op (canonical name) an instruction belongs to; a fused instruction belongs to
    the op it computed before fusion (its residual add is charged there)."""
    name = ins.origin or ins.name
    if not name:
        return f"{ins.op}#{index}"
    hit = _MOE_RE.match(name)
    if hit:
        return hit.group(1)
    if name.startswith("patch_embed"):
        return "patch_embed"
    return name


def class_of(ins: Instr) -> str:
    name = ins.origin or ins.name or ""
    if ins.op == "gemm":
        if ins.xmode or ins.ymode or _EXPERT_RE.search(name):
            return "experts"
        for suffix, cls in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.fc1", "mlp"), ("mlp.fc2", "mlp"),
                            ("patch_embed", "patch_embed")):
            if name.endswith(suffix):
                return cls
        return "gemm"
    return {"moe_gate": "gate", "moe_combine": "combine"}.get(ins.op, ins.op)


_INPUTS = {"gemm": ("x_ref",), "attention": ("qkv_ref",), "layernorm": ("x_ref",), "add": ("a_ref", "b_ref"),
           "embed": ("x_ref",), "patchify": ("src_ref",), "moe_gate": ("x_ref",),
           "moe_combine": ("score_ref", "idx_ref", "y_ref")}
_OUTPUTS = {"gemm": ("y_ref",), "attention": ("y_ref",), "layernorm": ("y_ref",), "add": ("y_ref",),
            "embed": ("y_ref",), "patchify": ("dst_ref",), "moe_gate": ("logits_ref", "idx_ref", "score_ref",
                                                                         "queue_ref"),
            "moe_combine": ("out_ref",)}


def _reads(ins: Instr) -> set[int]:
    refs = {ins.fields.get(k) for k in _INPUTS.get(ins.op, ())}
    if ins.op == "gemm" and (ins.xmode or ins.ymode):
        refs.add(ins.fields.get("queue_ref"))
    if ins.has("residual"):
        refs.add(ins.fields.get("queue_ref" if ins.op == "gemm" else "res_ref"))
    return refs - {None}


def _writes(ins: Instr) -> set[int]:
    return {ins.fields.get(k) for k in _OUTPUTS.get(ins.op, ())} - {None}


# ---------------------------------------------------------------------------- routing
@dataclass
class _MoeLayer:
    name: str
    tokens: int
    experts: int
    k: int


def _moe_layers(instrs: list[Instr]) -> tuple[list[_MoeLayer], dict[int, int]]:
    """The MoE layers in program order, and for every instruction index its layer (experts and
    combine: the gate whose queue table they read, else the latest gate)."""
    layers: list[_MoeLayer] = []
    by_queue: dict[int, int] = {}
    owner: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        if ins.op == "moe_gate":
            f = ins.fields
            name = layer_of(ins, i)
            layers.append(_MoeLayer(name if _MOE_RE.match(name) else f"moe{len(layers)}", f["tokens"],
                                    f["experts_k"] & 0xFFFF, f["experts_k"] >> 16))
            by_queue[f.get("queue_ref", -1)] = len(layers) - 1
            owner[i] = len(layers) - 1
        elif ins.op == "gemm" and (ins.xmode or ins.ymode) or ins.op == "moe_combine":
            j = by_queue.get(ins.fields.get("queue_ref", -1), len(layers) - 1)
            if j < 0:
                raise UsageError(f"instruction {i} ({ins.name or ins.op}) reads expert queues before any moe_gate")
            owner[i] = j
    return layers, owner


def uniform_queues(tokens: int, experts: int, k: int) -> list[int]:
    """T·k token slots spread as evenly as possible: every expert active (the most weight traffic)."""
    base, extra = divmod(tokens * k, experts)
    return [base + (e < extra) for e in range(experts)]


def queue_lengths_from_trace(trace: Mapping[str, Any], experts: int | None = None) -> dict[str, list[int]]:
    """Per MoE layer (``blocks.i.moe``) the tokens routed to each expert, from a trace's
    ``blocks.i.moe.topk`` tables."""
    out = {}
    for key in sorted((k for k in trace if k.endswith(".moe.topk")), key=lambda s: int(s.split(".")[1])):
        idx = np.asarray(trace[key]).astype(np.int64).ravel()
        n = experts if experts is not None else int(idx.max(initial=-1)) + 1
        out[key[:-len(".topk")]] = np.bincount(idx, minlength=n).tolist()
    return out


def _resolve_queues(layers: list[_MoeLayer], given) -> tuple[list[list[int]], str]:
    if given is None:
        return [uniform_queues(L.tokens, L.experts, L.k) for L in layers], "uniform"
    if isinstance(given, Mapping):
        if any(str(k).endswith(".topk") for k in given):
            given = {k: v for k, v in given.items() if str(k).endswith(".moe.topk")}
            counts = {k[:-len(".topk")]: v for k, v in given.items()}
        else:
            counts = dict(given)
        names = [L.name for L in layers]
        if all(n in counts for n in names):
            seq = [counts[n] for n in names]
        elif len(counts) == len(layers) and all(re.fullmatch(r"moe\d+", n) for n in names):
            # a Program without names (program.bin): its MoE layers in block order
            seq = [counts[k] for k in sorted(counts, key=lambda s: [int(t) if t.isdigit() else t
                                                                      for t in re.split(r"(\d+)", str(s))])]
        else:
            missing = [n for n in names if n not in counts]
            raise UsageError(f"queue lengths: no entry for MoE layer {missing[0]} (have {', '.join(map(str, counts))})")
    else:
        seq = list(given)
        if len(seq) != len(layers):
            raise UsageError(f"queue lengths: {len(seq)} layers given, the Program has {len(layers)} MoE layers")
    out = []
    for L, q in zip(layers, seq):
        arr = np.asarray(q)
        if arr.ndim == 2:           # a [T, k] top-k table
            arr = np.bincount(arr.astype(np.int64).ravel(), minlength=L.experts)
        q = [int(v) for v in arr.ravel()]
        if len(q) != L.experts or min(q, default=0) < 0 or max(q, default=0) > L.tokens or sum(q) != L.tokens * L.k:
            raise UsageError(f"queue lengths of {L.name}: need {L.experts} counts, each 0..{L.tokens}, summing to "
                             f"T·k = {L.tokens * L.k}; got {q}")
        out.append(q)
    return out, "given"


# ---------------------------------------------------------------------------- Programs
def load_program(src) -> list[Instr]:
    """Instructions from a list of ``Instr``, a program.json / program.bin path, its bytes, or the
    parsed JSON (``{"instructions": [...]}`` or the list itself)."""
    if isinstance(src, (list, tuple)) and all(isinstance(i, Instr) for i in src):
        return list(src)
    if isinstance(src, (str, Path)):
        p = Path(src)
        if p.is_dir():
            p = p / "program.json" if (p / "program.json").is_file() else p / "program.bin"
        if p.suffix == ".bin":
            return isa.decode_program(p.read_bytes(), str(p))[1]
        try:
            src = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{p}: cannot read the Program: {exc}") from None
    if isinstance(src, (bytes, bytearray)):
        return isa.decode_program(bytes(src))[1]
    if isinstance(src, Mapping):
        src = src.get("instructions", src.get("program"))
    if not isinstance(src, (list, tuple)):
        raise UsageError("a Program must be a list of instructions or a program.json object with 'instructions'")
    return [_instr_from_json(d, i) for i, d in enumerate(src)]


def _instr_from_json(d: Any, i: int) -> Instr:
    if isinstance(d, Instr):
        return d
    if not isinstance(d, Mapping) or "op" not in d:
        raise UsageError(f"program.json instruction {i}: expected an object with 'op'")
    op = d["op"]
    if op not in isa.FIELDS:
        raise UsageError(f"program.json instruction {i}: unknown op {op!r}")
    src = d.get("fields", d)
    fields = {n: int(src[n]) for n in isa.FIELDS[op] if n in src and isinstance(src[n], (int, np.integer))}
    flags = d.get("flags", 0)
    if not isinstance(flags, int):
        names = [k for k, v in flags.items() if v] if isinstance(flags, Mapping) else list(flags)
        flags = isa.make_flags(**{n: True for n in names if n in isa.FLAGS})
    for key, shift, table in (("xmode", isa.XMODE_SHIFT, isa.XMODES), ("ymode", isa.YMODE_SHIFT, isa.YMODES)):
        if isinstance(d.get(key), str):
            flags = (flags & ~(3 << shift)) | (table[d[key]] << shift)
    return Instr(op, fields, flags, str(d.get("name", "")), str(d.get("intermediate") or ""))


# ---------------------------------------------------------------------------- the estimate
def estimate(instrs, hw: HwConfig | None = None, queue_lengths=None, assumptions: Assumptions | None = None,
             **overrides) -> dict[str, Any]:
    """Cycles, MACs and DDR traffic of a Program, per instruction, layer and class, and in total.

    ``queue_lengths``: None (uniform spread), ``{"blocks.i.moe": [count per expert]}``, a list of
    per-layer counts in program order, or a golden trace (its ``blocks.i.moe.topk`` tables).
    ``overrides`` replace single fields of ``assumptions``."""
    prog = load_program(instrs)
    hw = hw or HwConfig.default()
    a = dataclasses.replace(assumptions or Assumptions(), **overrides).validated()
    m = _Machine.of(hw, a)
    layers, owner = _moe_layers(prog)
    queues, routing = _resolve_queues(layers, queue_lengths)
    notes: list[str] = []
    rows_out: list[dict[str, Any]] = []
    prev_writes: set[int] | None = None
    for i, ins in enumerate(prog):
        if ins.op == "end":
            break
        if ins.op == "gemm" and (ins.xmode or ins.ymode):
            j = owner[i]
            e = ins.fields.get("expert", 0)
            if not 0 <= e < layers[j].experts:
                raise UsageError(f"instruction {i} ({ins.name or 'gemm'}): expert {e} of {layers[j].experts}")
            c = _cost_gemm(m, ins, queues[j][e])
        elif ins.op == "gemm":
            c = _cost_gemm(m, ins, ins.fields["rows"])
        elif ins.op == "attention":
            c = _cost_attention(m, ins, notes)
        elif ins.op == "moe_gate":
            c = _cost_gate(m, ins)
        elif ins.op == "moe_combine":
            c = _cost_combine(m, ins, layers[owner[i]].experts)
        else:
            c = _cost_vector(m, ins)
        ddr = (c.read + c.write) / m.bw
        active = c.compute > 0 or c.read + c.write > 0
        # Weights are prefetched during the previous instruction; an input it just wrote is not.
        exposed = a.ddr_latency if active and (prev_writes is None or _reads(ins) & prev_writes) else 0
        body = max(c.compute, ddr)
        cycles = math.ceil(body + exposed) if active else 0
        bound = "latency" if exposed > body else ("compute" if c.compute >= ddr else "ddr")
        if active:
            prev_writes = _writes(ins)
        rows_out.append({"index": i, "op": ins.op, "name": ins.name, "layer": layer_of(ins, i), "class": class_of(ins),
                         "rows": c.rows, "cycles": cycles, "compute_cycles": math.ceil(c.compute),
                         "ddr_cycles": math.ceil(ddr), "latency_cycles": exposed, "macs": c.macs,
                         "ddr_read": c.read, "ddr_write": c.write, "bound": bound if active else "idle"})
    return _summarise(rows_out, hw, a, m, layers, queues, routing, notes)


def _agg(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"instructions": len(rows), "active": sum(r["bound"] != "idle" for r in rows),
           "cycles": sum(r["cycles"] for r in rows), "macs": sum(r["macs"] for r in rows),
           "ddr_read": sum(r["ddr_read"] for r in rows), "ddr_write": sum(r["ddr_write"] for r in rows),
           "compute_cycles": sum(r["compute_cycles"] for r in rows), "ddr_cycles": sum(r["ddr_cycles"] for r in rows)}
    out["by_bound"] = {b: sum(r["cycles"] for r in rows if r["bound"] == b) for b in BOUNDS}
    return out


def _summarise(rows, hw, a, m, layers, queues, routing, notes) -> dict[str, Any]:
    peak = hw.p_in * hw.p_out
    total = _agg(rows)
    cycles = total["cycles"]
    total["ddr_bytes"] = total["ddr_read"] + total["ddr_write"]
    total["latency_ms"] = cycles / (hw.clock_mhz * 1e3)
    total["fps"] = hw.clock_mhz * 1e6 / cycles if cycles else None
    total["utilisation"] = total["macs"] / (peak * cycles) if cycles else 0.0
    by_layer: dict[str, list] = {}
    by_class: dict[str, list] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
        by_class.setdefault(r["class"], []).append(r)
    classes = {c: _agg(by_class[c]) for c in sorted(by_class, key=lambda c: CLASSES.index(c) if c in CLASSES else 99)}
    for v in classes.values():
        v["utilisation"] = v["macs"] / (peak * v["cycles"]) if v["cycles"] else 0.0
        v["share"] = v["cycles"] / cycles if cycles else 0.0
    return {
        "total_cycles": cycles,
        "latency_ms": total["latency_ms"],
        "hw": {"p_in": hw.p_in, "p_out": hw.p_out, "clock_mhz": hw.clock_mhz, "token_block": hw.token_block,
               "ddr_bytes_per_cycle": m.bw, "ddr_latency": a.ddr_latency, "pipeline_latency": m.pipe,
               "vector_lanes": m.lanes, "softmax_lanes": m.sm_lanes, "hash": hw.hash()},
        "assumptions": dataclasses.asdict(a),
        "routing": routing,
        "queue_lengths": {L.name: q for L, q in zip(layers, queues)},
        "instructions": rows,
        "layers": {k: _agg(v) for k, v in by_layer.items()},
        "classes": classes,
        "total": total,
        "notes": notes,
    }


# ---------------------------------------------------------------------------- text
def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The total and one line per instruction class."""
    t, hw = result["total"], result["hw"]
    fps = f"{t['fps']:.1f}" if t["fps"] else "-"
    lines = [f"schedule estimate: {t['cycles']:,} cycles = {t['latency_ms']:.3f} ms at {hw['clock_mhz']} MHz "
             f"({fps} frames/s), MAC utilisation {100 * t['utilisation']:.1f} %, "
             f"DDR {_mb(t['ddr_bytes'])} MB ({result['routing']} routing)"]
    lines.append(f"  {'class':<12}{'instr':>6}{'cycles':>12}{'share':>8}{'GMAC':>8}{'util':>7}"
                 f"{'read MB':>9}{'write MB':>9}{'compute':>10}{'ddr':>10}{'latency':>9}")
    for c, v in result["classes"].items():
        b = v["by_bound"]
        lines.append(f"  {c:<12}{v['active']:>6}{v['cycles']:>12,}{100 * v['share']:>7.1f}%{v['macs'] / 1e9:>8.3f}"
                     f"{100 * v['utilisation']:>6.1f}%{_mb(v['ddr_read']):>9}{_mb(v['ddr_write']):>9}"
                     f"{b['compute']:>10,}{b['ddr']:>10,}{b['latency']:>9,}")
    return lines


def format_table(result: dict[str, Any], layers: bool = False) -> str:
    """Text summary: machine and assumptions, per-class lines and the total (per layer with
    ``layers``); the last three columns split each class's cycles by what bounds them."""
    hw, a = result["hw"], result["assumptions"]
    head = (f"{hw['p_in']}x{hw['p_out']} MACs at {hw['clock_mhz']} MHz, token_block {hw['token_block']}, "
            f"DDR {hw['ddr_bytes_per_cycle']:.1f} B/cycle, latency {hw['ddr_latency']} cycles, "
            f"pipeline {hw['pipeline_latency']} cycles (fill/drain per {a['fill_drain']})")
    lines = [head] + summary_lines(result)
    if layers:
        lines.append(f"  {'layer':<28}{'cycles':>12}{'GMAC':>8}{'read MB':>9}{'write MB':>9}")
        for name, v in result["layers"].items():
            lines.append(f"  {name:<28}{v['cycles']:>12,}{v['macs'] / 1e9:>8.3f}{_mb(v['ddr_read']):>9}"
                         f"{_mb(v['ddr_write']):>9}")
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines)
