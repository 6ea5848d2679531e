"""Lowering: a QGraph and a hardware configuration to a Program (docs/program.md).

The lowered IR (``LIR``) is a list of ``Node``s, each either a QGraph op not lowered yet
(``op == "q.<kind>"``) or one instruction whose memory operands are still *names* (of tensors and
parameters). Passes in the style of ``passes.py`` (``apply(lir) -> (lir, changed)``, never
mutating their input) rewrite it to a fixed point:

* ``lower-ops``: every op but the MoE to instructions (patch_embed -> patchify + gemm, …);
* ``expand-moe``: patch reordering: a MoE op -> moe_gate, two queue-mode GEMMs per expert
  (fc1 gather/queue/gelu, fc2 queue/scatter) into shared buffers, moe_combine;
* ``fuse-residual``: a residual ``add`` into the direct GEMM or ``moe_combine`` producing one of
  its operands (flag ``residual``), so that intermediate never goes to DDR;
* ``plan-attention``: attention reordering: each attention's query tile from ``buffers.scores``
  and its staggered tile order, recorded for the cycle model;
* ``allocate``: arena, input and output refs for every tensor, and the packed ``weights.bin``.

``encode`` then writes ``program.bin`` and ``program.json``. Between passes the LIR can be run
(``run_lir``: unlowered ops through the golden executor, instructions through the Program
executor's kernels), and ``LoweringVerifier`` holds every pass to the golden trace bit for bit;
once allocated it runs the encoded bytes through ``program_exec``.

    summary = compile_qgraph(graph, hw, out_dir)     # program.bin, weights.bin, program.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3vit.compiler import golden, isa
from m3vit.compiler import numerics as nx
from m3vit.compiler import program_exec as px
from m3vit.compiler.numerics import Fmt, SatCounter
from m3vit.compiler.passes import PassVerificationError, run_to_fixed_point
from m3vit.compiler.qgraph import QGraph, QOp
from m3vit.errors import ConfigError, UsageError
from m3vit.rtl_sim.hwconfig import HwConfig

__all__ = ["LIR", "Node", "TensorDecl", "ParamDecl", "initial_lir", "lowering_passes", "lower", "encode",
           "compile_qgraph", "run_lir", "LoweringVerifier", "check_limits", "PROGRAM_FORMAT", "FuseResidual",
           "traced_names", "trace_subset"]

PROGRAM_FORMAT = "m3vit-program-1"
ITEM = {"int8": 1, "int16": 2, "uint16": 2, "int64": 8}
NP = {"int8": "<i1", "int16": "<i2", "uint16": "<u2", "int64": "<i8"}


# ---- the lowered IR ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDecl:
    """A tensor in memory. ``rows`` "all" is a dense [shape] array; "queue"/"scatter" is an
    expert's rows of the shared ``buffer`` [entries, cols], through the queue table ``queue``."""

    shape: tuple[int, ...]
    dtype: str = "int16"
    space: str = "arena"
    canonical: bool = True
    rows: str = "all"
    buffer: str | None = None
    queue: str | None = None
    expert: int = 0
    experts: int = 0
    entries: int = 0
    fmt: tuple | None = None   # (bits, frac or [fracs], signed) of a canonical tensor

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * ITEM[self.dtype]


@dataclass(frozen=True)
class ParamDecl:
    """A parameter in ``weights.bin``; ``tasks`` > 0: one slice per task, each at a fixed stride."""

    value: np.ndarray = field(compare=False)
    dtype: str
    tasks: int = 0

    @property
    def slice_bytes(self) -> int:
        n = self.value[0].size if self.tasks else self.value.size
        return n * ITEM[self.dtype]

    @property
    def stride(self) -> int:
        return isa.align(self.slice_bytes)


@dataclass(frozen=True)
class Node:
    op: str                          # an isa opcode, or "q.<kind>" for a QGraph op not lowered yet
    name: str                        # the canonical tensor (or buffer) it produces
    fields: dict = field(default_factory=dict)   # scalar fields
    refs: dict = field(default_factory=dict)     # ref field -> tensor or parameter name
    flags: dict = field(default_factory=dict)    # isa.make_flags keywords
    plan: dict | None = None         # schedule notes for the cycle model (attention tiles)
    fused: tuple = ()                # the canonical ops folded into this instruction (residual adds)
    origin: str | None = None        # before fusion: the tensor this instruction produced


@dataclass
class LIR:
    graph: QGraph
    hw: HwConfig
    nodes: list[Node]
    tensors: dict[str, TensorDecl]
    params: dict[str, ParamDecl]
    refs: dict[str, int] = field(default_factory=dict)      # tensor name -> ref
    wrefs: dict[str, int] = field(default_factory=dict)     # parameter name -> ref
    weights: bytes | None = None
    arena_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> "LIR":
        return dataclasses.replace(self, nodes=list(self.nodes), tensors=dict(self.tensors), params=dict(self.params),
                                   refs=dict(self.refs), wrefs=dict(self.wrefs), meta=dict(self.meta))

    @property
    def lowered(self) -> bool:
        return all(not n.op.startswith("q.") for n in self.nodes)

    @property
    def allocated(self) -> bool:
        return self.weights is not None


def _fmt_of(info) -> tuple:
    return (info.bits, list(info.frac) if info.grouped else info.frac, info.signed)


def initial_lir(graph: QGraph, hw: HwConfig) -> LIR:
    """One node per QGraph op; the canonical tensors that exist before lowering."""
    check_limits(graph, hw)
    tensors: dict[str, TensorDecl] = {}
    for name in graph.trace_names():
        info = graph.tensors[name]
        if -1 in info.shape:
            continue  # an expert's rows: declared when its MoE is expanded
        if info.bits > 16:
            raise ConfigError(f"tensor {name}: {info.bits}-bit values do not fit the Program's 16-bit activations")
        dtype = "int16" if info.signed else "uint16"
        space = "in" if name == "input" else "out" if name == graph.output else "arena"
        tensors[name] = TensorDecl(info.shape, dtype, space, fmt=_fmt_of(info))
    nodes = [Node("q." + op.kind, op.name) for op in graph.ops]
    return LIR(graph, hw, nodes, tensors, {}, meta={"passes": []})


# ---- limits --------------------------------------------------------------------------------------
def _limit(cond: bool, what: str, msg: str) -> None:
    if not cond:
        raise UsageError(f"{what}: {msg}; use a smaller model or a hw.json with a larger limit")


def check_limits(graph: QGraph, hw: HwConfig) -> None:
    """The model against hw.json's limits; one line naming the op and the limit."""
    lim = hw.limits
    _limit(len(graph.tasks) <= lim.max_tasks, "model", f"{len(graph.tasks)} tasks exceed limits.max_tasks = "
                                                        f"{lim.max_tasks}")
    for op in graph.ops:
        out = graph.tensors[op.output].shape
        if len(out) == 2:
            _limit(out[0] <= lim.max_tokens, op.name, f"{out[0]} tokens exceed limits.max_tokens = {lim.max_tokens}")
        if op.kind in ("patch_embed", "embed", "layernorm", "add", "attention", "moe"):
            _limit(out[-1] <= lim.max_dim, op.name, f"width {out[-1]} exceeds limits.max_dim = {lim.max_dim}")
        if op.kind in ("linear", "patch_embed"):
            w = op.params["w"]
            wide = max(lim.max_hidden, 3 * lim.max_dim)
            _limit(max(w.shape) <= wide, op.name, f"GEMM {w.shape[0]}x{w.shape[1]} exceeds max(limits.max_hidden, "
                                                  f"3 x limits.max_dim) = {wide}")
            if op.attrs.get("gelu"):
                _limit(w.shape[1] <= lim.max_hidden, op.name,
                       f"hidden width {w.shape[1]} exceeds limits.max_hidden = {lim.max_hidden}")
        if op.kind == "patch_embed":
            c, _, w = graph.tensors[op.inputs[0]].shape
            p = int(op.attrs["patch"])
            beats = hw.patch_band_beats(c, p, w)
            _limit(beats <= hw.patch_band_capacity, op.name,
                   f"a band of {c} channels x {p} rows x {w} pixels takes {beats} beats, more than the "
                   f"{hw.patch_band_capacity} of patchify's band buffer")
        if op.kind == "attention":
            h = int(op.attrs["heads"])
            _limit(h <= lim.max_heads, op.name, f"{h} heads exceed limits.max_heads = {lim.max_heads}")
        if op.kind == "moe":
            n, k, hid = int(op.attrs["experts"]), int(op.attrs["top_k"]), int(op.attrs["hidden"])
            _limit(n <= lim.max_experts, op.name, f"{n} experts exceed limits.max_experts = {lim.max_experts}")
            _limit(k <= lim.max_k, op.name, f"top-{k} exceeds limits.max_k = {lim.max_k}")
            _limit(hid <= lim.max_hidden, op.name, f"expert hidden width {hid} exceeds limits.max_hidden = "
                                                   f"{lim.max_hidden}")
            t = out[0]
            _limit(t * k < 1 << 16, op.name, f"{t} tokens x top-{k} do not fit the 16-bit queue entries")
            _limit(t * n * 2 <= hw.buffers.scores, op.name,
                   f"the gate's {t} x {n} 16-bit scores ({t * n * 2} bytes) exceed buffers.scores = "
                   f"{hw.buffers.scores}")


def _weight_tile_check(hw: HwConfig, name: str, in_dim: int, wdtype: str) -> None:
    # One weight tile is the whole K extent of p_out output channels (it stays on chip while
    # token_block rows stream through it); one row block is token_block rows of the input.
    tile = in_dim * hw.p_out * ITEM[wdtype]
    _limit(tile <= hw.buffers.weights, name, f"a {in_dim} x {hw.p_out} weight tile ({tile} bytes) exceeds "
                                             f"buffers.weights = {hw.buffers.weights}")
    block = hw.token_block * in_dim * 2
    _limit(block <= hw.buffers.activations, name, f"a block of {hw.token_block} input rows ({block} bytes) "
                                                  f"exceeds buffers.activations = {hw.buffers.activations}")


def _weight_dtype(hw: HwConfig, name: str, w: np.ndarray) -> str:
    """int8 when every value fits 8 bits, else int16 (flag w16); never wider than the container."""
    hi = max(int(w.max(initial=0)), -int(w.min(initial=0)) - 1, 0)
    width = hi.bit_length() + 1
    if width > hw.weight_bits:
        raise UsageError(f"{name}: weights need {width} bits, the hardware's weight container (weight_bits) has "
                         f"{hw.weight_bits}; quantize the layer to at most {hw.weight_bits} bits")
    return "int8" if width <= 8 else "int16"


def _as(name: str, a: np.ndarray, dtype: str) -> np.ndarray:
    info = np.iinfo(NP[dtype])
    a = np.asarray(a, np.int64)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise ConfigError(f"{name}: values {a.min()}..{a.max()} do not fit the Program's {dtype} encoding")
    return a


# ---- passes --------------------------------------------------------------------------------------
class LoweringPass:
    name = "lowering-pass"

    def rewrite(self, lir: LIR) -> bool:
        raise NotImplementedError

    def apply(self, lir: LIR) -> tuple[LIR, bool]:
        new = lir.copy()
        if not self.rewrite(new):
            return lir, False
        new.meta["passes"] = list(lir.meta.get("passes", [])) + [self.name]
        return new, True

    def __repr__(self) -> str:
        return f"<lowering pass {self.name}>"


def _fmtw(bits: int, frac, signed: bool = True) -> int:
    return isa.pack_fmt(int(bits), int(frac[0] if isinstance(frac, (list, tuple)) else frac), signed)


class LowerOps(LoweringPass):
    """Every QGraph op except the MoE to its instructions."""

    name = "lower-ops"

    def rewrite(self, lir: LIR) -> bool:
        out: list[Node] = []
        changed = False
        for node in lir.nodes:
            if not node.op.startswith("q.") or node.op == "q.moe":
                out.append(node)
                continue
            op = lir.graph.op(node.name)
            out += getattr(self, "_" + op.kind)(lir, op)
            changed = True
        lir.nodes = out
        return changed

    def _gemm(self, lir: LIR, op: QOp, x: str, rows: int) -> Node:
        g, hw = lir.graph, lir.hw
        p = op.params
        w = p["w"]
        wdt = _weight_dtype(hw, op.name, w)
        _weight_tile_check(hw, op.name, w.shape[0], wdt)
        nx.check_gemm_acc(px.X_FMT, w, p["b"], op.name)
        lir.params[f"{op.name}.w"] = ParamDecl(_as(op.name, w, wdt), wdt)
        lir.params[f"{op.name}.b"] = ParamDecl(np.asarray(p["b"], np.int64), "int64")
        lir.params[f"{op.name}.shift"] = ParamDecl(_as(op.name + " shift", p["shift"], "int8"), "int8")
        out = g.tensors[op.output]
        gelu = bool(op.attrs.get("gelu"))
        fields = {"rows": rows, "in_dim": w.shape[0], "out_dim": w.shape[1], "x_ld": w.shape[0],
                  "y_ld": w.shape[1]}
        if gelu:
            fields["fmt"] = _fmtw(op.attrs["mid_bits"], op.attrs["mid_frac"])
            fields["gelu_fmt"] = _fmtw(out.bits, out.frac, out.signed)
        else:
            fields["fmt"] = _fmtw(out.bits, out.frac, out.signed)
        refs = {"x_ref": x, "y_ref": op.output, "w_ref": f"{op.name}.w", "bias_ref": f"{op.name}.b",
                "shift_ref": f"{op.name}.shift"}
        return Node("gemm", op.output, fields, refs, {"gelu": gelu, "w16": wdt == "int16", "bias": True})

    def _patch_embed(self, lir: LIR, op: QOp) -> list[Node]:
        c, h, w = lir.graph.tensors[op.inputs[0]].shape
        p = int(op.attrs["patch"])
        n = (h // p) * (w // p)
        patches = f"{op.name}.patches"
        lir.tensors[patches] = TensorDecl((n, c * p * p), canonical=False)
        pn = Node("patchify", patches, {"channels": c, "height": h, "width": w, "patch": p},
                  {"src_ref": op.inputs[0], "dst_ref": patches})
        return [pn, self._gemm(lir, op, patches, n)]

    def _linear(self, lir: LIR, op: QOp) -> list[Node]:
        return [self._gemm(lir, op, op.inputs[0], lir.graph.tensors[op.inputs[0]].shape[0])]

    def _embed(self, lir: LIR, op: QOp) -> list[Node]:
        out = lir.graph.tensors[op.output]
        n, d = lir.graph.tensors[op.inputs[0]].shape
        lir.params[f"{op.name}.cls"] = ParamDecl(_as(op.name + ".cls", op.params["cls"], "int16"), "int16")
        lir.params[f"{op.name}.pos"] = ParamDecl(_as(op.name + ".pos", op.params["pos"], "int16"), "int16")
        a = op.attrs
        return [Node("embed", op.output, {"patches": n, "dim": d, "a_shift": int(a["a_shift"]),
                                          "b_shift": int(a["b_shift"]), "fmt": _fmtw(out.bits, out.frac, out.signed)},
                     {"x_ref": op.inputs[0], "y_ref": op.output, "cls_ref": f"{op.name}.cls",
                      "pos_ref": f"{op.name}.pos"})]

    def _layernorm(self, lir: LIR, op: QOp) -> list[Node]:
        out = lir.graph.tensors[op.output]
        rows, d = out.shape
        p = op.params
        lir.params[f"{op.name}.gamma"] = ParamDecl(_as(op.name + ".gamma", p["gamma"], "int16"), "int16")
        lir.params[f"{op.name}.beta"] = ParamDecl(np.asarray(p["beta"], np.int64), "int64")
        lir.params[f"{op.name}.shift"] = ParamDecl(_as(op.name + " shift", p["out_shift"], "int8"), "int8")
        eps = int(op.attrs["eps_int"])
        bs = np.asarray(op.attrs["beta_shift"])
        if bs.size != 1:
            raise ConfigError(f"{op.name}: a per-channel beta_shift has no Program encoding (one scalar field)")
        return [Node("layernorm", op.output, {"rows": rows, "dim": d, "eps_lo": eps & 0xFFFFFFFF, "eps_hi": eps >> 32,
                                              "beta_shift": int(bs), "fmt": _fmtw(out.bits, out.frac, out.signed)},
                     {"x_ref": op.inputs[0], "y_ref": op.output, "gamma_ref": f"{op.name}.gamma",
                      "beta_ref": f"{op.name}.beta", "shift_ref": f"{op.name}.shift"})]

    def _attention(self, lir: LIR, op: QOp) -> list[Node]:
        out = lir.graph.tensors[op.output]
        t, d = out.shape
        a = op.attrs
        heads = int(a["heads"])
        kv = 2 * t * (d // heads) * 2
        _limit(kv <= lir.hw.buffers.activations, op.name, f"one head's keys and values ({kv} bytes) exceed "
                                                          f"buffers.activations = {lir.hw.buffers.activations}")
        return [Node("attention", op.output, {"tokens": t, "dim": d, "heads": heads,
                                              "score_fmt": _fmtw(a["score_bits"], a["score_frac"]),
                                              "score_shift": int(a["score_shift"]), "out_shift": int(a["out_shift"]),
                                              "fmt": _fmtw(out.bits, out.frac, out.signed)},
                     {"qkv_ref": op.inputs[0], "y_ref": op.output})]

    def _add(self, lir: LIR, op: QOp) -> list[Node]:
        out = lir.graph.tensors[op.output]
        rows, cols = out.shape
        return [Node("add", op.output, {"rows": rows, "cols": cols, "a_shift": int(op.attrs["a_shift"]),
                                        "b_shift": int(op.attrs["b_shift"]),
                                        "fmt": _fmtw(out.bits, out.frac, out.signed)},
                     {"a_ref": op.inputs[0], "b_ref": op.inputs[1], "y_ref": op.output})]


class ExpandMoE(LoweringPass):
    """Patch reordering: gate + queues, per expert one fc1 over its gathered queue and one fc2 that
    scatters to the (token, slot) rows, then the combine. An expert's weights serve its whole queue."""

    name = "expand-moe"

    def rewrite(self, lir: LIR) -> bool:
        out: list[Node] = []
        changed = False
        for node in lir.nodes:
            if node.op != "q.moe":
                out.append(node)
                continue
            out += self._expand(lir, lir.graph.op(node.name))
            changed = True
        lir.nodes = out
        return changed

    def _expand(self, lir: LIR, op: QOp) -> list[Node]:
        g, hw, p = lir.graph, lir.hw, op.params
        n, k, hid = int(op.attrs["experts"]), int(op.attrs["top_k"]), int(op.attrs["hidden"])
        x = op.inputs[0]
        t, d = g.tensors[x].shape
        m = op.name
        queue, hidden, eout = f"{m}.queue", f"{m}.hidden", f"{m}.experts"
        lir.tensors[queue] = TensorDecl((isa.queue_layout(n, t, k)[2] // 2,), "uint16", canonical=False)
        lir.tensors[hidden] = TensorDecl((t * k, hid), canonical=False)
        lir.tensors[eout] = TensorDecl((t * k, d), canonical=False)
        # gate: every task's matrix in one parameter, one slice per task at a fixed stride
        gw = p["gate_w"]
        gdt = _weight_dtype(hw, m + ".gate", gw)
        _weight_tile_check(hw, m + ".gate", d, gdt)
        for ti in range(len(g.tasks)):
            nx.check_gemm_acc(px.X_FMT, gw[ti], p["gate_b"][ti], f"{m}.gate[{g.tasks[ti]}]")
        tasks = len(g.tasks)
        lir.params[f"{m}.gate.w"] = ParamDecl(_as(m + ".gate", gw, gdt), gdt, tasks)
        lir.params[f"{m}.gate.b"] = ParamDecl(np.asarray(p["gate_b"], np.int64), "int64", tasks)
        lir.params[f"{m}.gate.shift"] = ParamDecl(_as(m + ".gate shift", p["gate_shift"], "int8"), "int8", tasks)
        lg = g.tensors[f"{m}.gate"]
        fields = {"tokens": t, "dim": d, "experts_k": n | (k << 16), "fmt": _fmtw(lg.bits, lg.frac, lg.signed),
                  "w_stride": lir.params[f"{m}.gate.w"].stride, "bias_stride": lir.params[f"{m}.gate.b"].stride,
                  "shift_stride": lir.params[f"{m}.gate.shift"].stride}
        nodes = [Node("moe_gate", f"{m}.gate", fields,
                      {"x_ref": x, "logits_ref": f"{m}.gate", "idx_ref": f"{m}.topk", "score_ref": f"{m}.score",
                       "queue_ref": queue, "w_ref": f"{m}.gate.w", "bias_ref": f"{m}.gate.b",
                       "shift_ref": f"{m}.gate.shift"}, {"w16": gdt == "int16"})]
        qshape = n | ((t * k) << 16)
        for e in range(n):
            f1, f2 = g.tensors[f"{m}.e{e}.fc1"], g.tensors[f"{m}.e{e}.fc2"]
            for fc, info, buf, mode in (("fc1", f1, hidden, "queue"), ("fc2", f2, eout, "scatter")):
                lir.tensors[f"{m}.e{e}.{fc}"] = TensorDecl((-1, info.shape[-1]), rows=mode, buffer=buf, queue=queue,
                                                           expert=e, experts=n, entries=t * k, fmt=_fmt_of(info))
            specs = (("fc1", "w1", "b1", "shift1", x, hidden, "gather", "queue", True),
                     ("fc2", "w2", "b2", "shift2", hidden, eout, "queue", "scatter", False))
            for fc, wk, bk, sk, src, dst, xm, ym, gelu in specs:
                label = f"{m}.e{e}.{fc}"
                w = p[wk][e]
                wdt = _weight_dtype(hw, label, w)
                _weight_tile_check(hw, label, w.shape[0], wdt)
                nx.check_gemm_acc(px.X_FMT, w, p[bk][e], label)
                lir.params[f"{label}.w"] = ParamDecl(_as(label, w, wdt), wdt)
                lir.params[f"{label}.b"] = ParamDecl(np.asarray(p[bk][e], np.int64), "int64")
                lir.params[f"{label}.shift"] = ParamDecl(_as(label + " shift", p[sk][e], "int8"), "int8")
                info = f1 if fc == "fc1" else f2
                flds = {"rows": t, "in_dim": w.shape[0], "out_dim": w.shape[1], "x_ld": w.shape[0],
                        "y_ld": w.shape[1], "expert": e, "queue_shape": qshape}
                if gelu:
                    flds["fmt"] = _fmtw(op.attrs["mid_bits"], int(p["mid_frac"][e]))
                    flds["gelu_fmt"] = _fmtw(info.bits, info.frac, info.signed)
                else:
                    flds["fmt"] = _fmtw(info.bits, info.frac, info.signed)
                nodes.append(Node("gemm", label, flds,
                                  {"x_ref": src, "y_ref": dst, "w_ref": f"{label}.w", "bias_ref": f"{label}.b",
                                   "shift_ref": f"{label}.shift", "queue_ref": queue},
                                  {"gelu": gelu, "w16": wdt == "int16", "bias": True, "xmode": xm, "ymode": ym}))
        lir.params[f"{m}.combine_shift"] = ParamDecl(_as(m + ".combine_shift", p["combine_shift"], "int8"), "int8")
        out = g.tensors[op.output]
        nodes.append(Node("moe_combine", op.output, {"tokens": t, "k": k, "dim": d,
                                                     "fmt": _fmtw(out.bits, out.frac, out.signed)},
                          {"score_ref": f"{m}.score", "idx_ref": f"{m}.topk", "y_ref": eout,
                           "shift_ref": f"{m}.combine_shift", "out_ref": op.output}))
        return nodes


class FuseResidual(LoweringPass):
    """Residual fusion: ``y = add(a, b)`` whose operand v (a or b) comes from a direct-mode GEMM
    (with or without GELU) or a moe_combine becomes that instruction with flag ``residual``:
    it computes v, adds the other operand r on the way out (res_ref, res_shifts, res_fmt) and
    stores y; v itself no longer exists. Only when v has no other reader and is not the graph
    output, and r is written before v's instruction (so moving the add earlier reads the same r).
    residual_add(v, r) = residual_add(r, v) with the shifts swapped, so either operand can fuse."""

    name = "fuse-residual"

    def rewrite(self, lir: LIR) -> bool:
        if not lir.lowered or lir.allocated:
            return False
        nodes = list(lir.nodes)
        changed = False
        i = 0
        while i < len(nodes):
            node = nodes[i]
            j = self._producer(lir, nodes, i) if node.op == "add" else None
            if j is None:
                i += 1
                continue
            nodes[j] = self._fuse(nodes[j], node)
            del lir.tensors[nodes[j].origin]
            del nodes[i]
            changed = True
        lir.nodes = nodes
        return changed

    def _producer(self, lir: LIR, nodes: list[Node], i: int) -> int | None:
        add = nodes[i]
        a, b = add.refs["a_ref"], add.refs["b_ref"]
        if a == b:
            return None
        for v, r in ((a, b), (b, a)):
            j = _writer(nodes, v)
            if j is None or j >= i:
                continue
            prod = nodes[j]
            direct = prod.op == "gemm" and prod.flags.get("xmode", "direct") == "direct" and \
                prod.flags.get("ymode", "direct") == "direct"
            if not (direct or prod.op == "moe_combine") or prod.flags.get("residual") or _output_ref(prod) != v:
                continue
            if v == lir.graph.output or lir.tensors[v].space != "arena":
                continue
            if any(v in n.refs.values() for k, n in enumerate(nodes) if k not in (i, j)):
                continue  # another reader needs v in memory
            w = _writer(nodes, r)
            if r != "input" and (w is None or w >= j):
                continue  # r must exist when the producer runs
            return j
        return None

    @staticmethod
    def _fuse(prod: Node, add: Node) -> Node:
        f = add.fields
        v = _output_ref(prod)
        first = add.refs["a_ref"] == v
        r = add.refs["b_ref"] if first else add.refs["a_ref"]
        sv, sr = (f["a_shift"], f["b_shift"]) if first else (f["b_shift"], f["a_shift"])
        fields = {**prod.fields, "res_shifts": isa.pack_res_shifts(sv, sr), "res_fmt": f["fmt"]}
        out_key = "y_ref" if prod.op == "gemm" else "out_ref"
        refs = {**prod.refs, out_key: add.refs["y_ref"], "res_ref": r}
        return dataclasses.replace(prod, name=add.name, fields=fields, refs=refs,
                                   flags={**prod.flags, "residual": True}, fused=prod.fused + (add.name,),
                                   origin=prod.origin or v)


def _writer(nodes: list[Node], name: str) -> int | None:
    """Index of the first node that writes tensor ``name``."""
    for k, n in enumerate(nodes):
        if name in _written(n):
            return k
    return None


def _output_ref(node: Node) -> str | None:
    return node.refs.get("y_ref") if node.op == "gemm" else node.refs.get("out_ref") \
        if node.op == "moe_combine" else None


def _written(node: Node) -> set[str]:
    keys = {"patchify": ("dst_ref",), "moe_gate": ("logits_ref", "idx_ref", "score_ref", "queue_ref")}
    return {node.refs[k] for k in keys.get(node.op, ("y_ref", "out_ref")) if k in node.refs}


class PlanAttention(LoweringPass):
    """Attention reordering: the query tile is as many query rows as ``buffers.scores`` holds
    T 16-bit scores of (scores never go to DDR); each head visits its tiles rotated by the head
    index, so consecutive heads start on different tiles (the cycle model overlaps them)."""

    name = "plan-attention"

    def rewrite(self, lir: LIR) -> bool:
        changed = False
        for i, node in enumerate(lir.nodes):
            if node.op != "attention" or "q_tile" in node.fields:
                continue
            t, heads = node.fields["tokens"], node.fields["heads"]
            q_tile = min(t, lir.hw.buffers.scores // (2 * t))
            _limit(q_tile >= 1, node.name, f"one row of {t} 16-bit scores ({2 * t} bytes) exceeds buffers.scores = "
                                           f"{lir.hw.buffers.scores}")
            tiles = -(-t // q_tile)
            plan = {"q_tile": q_tile, "tiles_per_head": tiles, "heads": heads, "order": "rotated",
                    "first_tile": [h % tiles for h in range(heads)], "score_bytes": 2 * q_tile * t}
            lir.nodes[i] = dataclasses.replace(node, fields={**node.fields, "q_tile": q_tile}, plan=plan)
            changed = True
        return changed


class Allocate(LoweringPass):
    """Arena refs for every tensor (no reuse, 64-byte aligned, execution order), the input in
    space `in`, the output in `out`, and weights.bin (parameters in order of first use)."""

    name = "allocate"

    def rewrite(self, lir: LIR) -> bool:
        if lir.allocated or not lir.lowered:
            return False
        order: list[str] = []
        porder: list[str] = []
        for node in lir.nodes:
            for r in node.refs.values():
                (order if r in lir.tensors else porder).append(r)
        for name in lir.graph.trace_names():
            if name in lir.tensors:
                order.append(name)
        refs: dict[str, int] = {}
        top = 0
        for name in dict.fromkeys(order):
            t = lir.tensors[name]
            if t.rows != "all":
                continue
            if t.space == "arena":
                refs[name] = isa.ref("arena", top)
                top += isa.align(t.nbytes)
            else:
                refs[name] = isa.ref(t.space, 0)
        for name, t in lir.tensors.items():
            if t.rows != "all":
                refs[name] = refs[t.buffer]
        _limit(top < 1 << isa.OFFSET_BITS, "arena", f"{top} bytes exceed the 2^{isa.OFFSET_BITS}-byte ref range")
        blob = bytearray()
        wrefs: dict[str, int] = {}
        for name in dict.fromkeys(porder):
            prm = lir.params[name]
            wrefs[name] = isa.ref("wgt", len(blob))
            slices = list(prm.value) if prm.tasks else [prm.value]
            for s in slices:
                raw = np.ascontiguousarray(s, NP[prm.dtype]).tobytes()
                blob += raw + bytes(prm.stride - len(raw))
        _limit(len(blob) < 1 << isa.OFFSET_BITS, "weights", f"{len(blob)} bytes exceed the ref range")
        lir.refs, lir.wrefs, lir.weights, lir.arena_bytes = refs, wrefs, bytes(blob), top
        return True


def lowering_passes(fuse: bool = True) -> list[LoweringPass]:
    """The passes in order; ``fuse`` False leaves every residual add an instruction of its own."""
    return [LowerOps(), ExpandMoE()] + ([FuseResidual()] if fuse else []) + [PlanAttention(), Allocate()]


def lower(graph: QGraph, hw: HwConfig, verify=None, fuse: bool = True) -> LIR:
    """The QGraph lowered and allocated; ``verify(before, after, pass_name)`` checks each change."""
    return run_to_fixed_point(initial_lir(graph, hw), lowering_passes(fuse), verify)


def traced_names(lir: LIR) -> list[str]:
    """The canonical names the (partly) lowered IR still holds, in execution order: the graph's
    trace names less the intermediates that fusion removed."""
    gone = {n.origin for n in lir.nodes if n.fused}
    return [n for n in lir.graph.trace_names() if n not in gone]


def trace_subset(meta: dict, golden_names) -> list[str]:
    """The names of program.json's trace to compare with a golden trace of ``golden_names``.
    Refuses (ValueError) an empty trace, a traced name the golden model does not know, and a
    golden name missing from the trace unless it is an intermediate removed by fusion."""
    traced = list(meta.get("trace", []))
    golden_set = set(golden_names)
    if not traced:
        raise ValueError("program.json traces no tensor")
    unknown = [n for n in traced if n not in golden_set]
    if unknown:
        raise ValueError(f"program.json traces {unknown[0]}, which the golden model does not produce")
    fused_away = {i["intermediate"] for i in meta.get("instructions", []) if i.get("fused")}
    missing = [n for n in golden_names if n not in set(traced) and n not in fused_away]
    if missing:
        raise ValueError(f"program.json does not trace {missing[0]} (and it was not fused away)")
    return traced


# ---- encoding ------------------------------------------------------------------------------------
def _instructions(lir: LIR) -> list[isa.Instr]:
    out = []
    for node in lir.nodes:
        fields = dict(node.fields)
        for f, name in node.refs.items():
            fields[f] = lir.refs[name] if name in lir.tensors else lir.wrefs[name]
        out.append(isa.Instr(node.op, isa.Instr(node.op, fields).canonical_fields(), isa.make_flags(**node.flags),
                             node.name, node.origin or ""))
    out.append(isa.Instr("end", {}, 0, "end"))
    return out


def _tensor_entry(lir: LIR, name: str) -> dict:
    t = lir.tensors[name]
    space, off = isa.split_ref(lir.refs[name])
    e = {"ref": lir.refs[name], "space": space, "offset": off, "shape": list(t.shape), "dtype": t.dtype,
         "rows": t.rows}
    if t.fmt is not None:
        e["format"] = {"bits": t.fmt[0], "frac": t.fmt[1], "signed": t.fmt[2]}
    if t.rows != "all":
        e.update(buffer=t.buffer, queue_ref=lir.refs[t.queue], expert=t.expert, experts=t.experts,
                 entries=t.entries)
    return e


def program_meta(lir: LIR, instrs: list[isa.Instr], header: isa.Header) -> dict:
    g, hw = lir.graph, lir.hw
    decoded = []
    for i, (ins, node) in enumerate(zip(instrs, lir.nodes + [None])):
        d = {"index": i, "op": ins.op, "name": ins.name, "word0": ins.word0(),
             "flags": [f for f in isa.FLAGS if ins.has(f)], "fields": {k: ins.fields.get(k, 0)
                                                                      for k in isa.FIELDS[ins.op]}}
        if ins.op == "gemm":
            d["xmode"] = {v: k for k, v in isa.XMODES.items()}[ins.xmode]
            d["ymode"] = {v: k for k, v in isa.YMODES.items()}[ins.ymode]
        if ins.has("residual"):
            d["fields"].update({a: ins.fields.get(w, 0) for a, w in isa.ALIASES.get(ins.op, {}).items()})
        if node is not None:
            d["operands"] = dict(node.refs)
            if node.plan is not None:
                d["plan"] = node.plan
            if node.fused:
                d["fused"] = list(node.fused)
                d["intermediate"] = node.origin
        decoded.append(d)
    weights = {}
    for name, ref in lir.wrefs.items():
        p = lir.params[name]
        weights[name] = {"ref": ref, "offset": isa.split_ref(ref)[1], "dtype": p.dtype,
                         "shape": list(p.value.shape[1:] if p.tasks else p.value.shape),
                         "tasks": p.tasks, "stride": p.stride if p.tasks else 0,
                         "bytes": p.stride * max(p.tasks, 1)}
    inp, out = g.tensors["input"], g.tensors[g.output]
    return {
        "format": PROGRAM_FORMAT,
        "isa": {"version": isa.VERSION, "encoding_digest": isa.encoding_digest()},
        "hw": hw.to_dict(),
        "hw_hash": hw.hash(),
        "tasks": list(g.tasks),
        "input": {"name": "input", "shape": list(inp.shape), "dtype": "int16", "bits": inp.bits, "frac": inp.frac,
                  "bytes": header.input_bytes},
        "output": {"name": g.output, "shape": list(out.shape), "dtype": "int16", "bits": out.bits,
                   "frac": out.frac, "bytes": header.output_bytes},
        "header": {"n_instr": header.n_instr, "weight_bytes": header.weight_bytes,
                   "arena_bytes": header.arena_bytes, "n_tasks": header.n_tasks},
        "passes": list(lir.meta.get("passes", [])),
        "instructions": decoded,
        "trace": traced_names(lir),
        "tensors": {n: _tensor_entry(lir, n) for n in lir.tensors},
        "weights": weights,
    }


def encode(lir: LIR) -> tuple[bytes, bytes, dict]:
    """(program.bin, weights.bin, program.json as a dict) of an allocated LIR."""
    if not lir.allocated:
        raise ValueError("encode needs an allocated LIR (run the lowering passes first)")
    g = lir.graph
    instrs = _instructions(lir)
    inp, out = lir.tensors["input"], lir.tensors[g.output]
    header = isa.Header(bytes.fromhex(lir.hw.hash()), len(instrs), len(lir.weights), lir.arena_bytes, len(g.tasks),
                        inp.nbytes, out.nbytes)
    program = header.encode() + b"".join(i.encode() for i in instrs)
    return program, lir.weights, program_meta(lir, instrs, header)


def meta_json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, indent=1) + "\n"


def compile_qgraph(graph: QGraph, hw: HwConfig, out_dir: str | Path, verify=None, fuse: bool = True) -> dict:
    """Lower ``graph`` for ``hw`` and write program.bin, weights.bin and program.json into the
    existing folder ``out_dir``; ``fuse`` False keeps every residual add an instruction of its
    own. Returns a summary (sizes, counts, lowering time)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UsageError(f"{out}: no such directory; create the build folder first")
    start = time.perf_counter()
    lir = lower(graph, hw, verify, fuse)
    program, weights, meta = encode(lir)
    seconds = time.perf_counter() - start
    (out / "program.bin").write_bytes(program)
    (out / "weights.bin").write_bytes(weights)
    (out / "program.json").write_text(meta_json(meta))
    ops: dict[str, int] = {}
    for ins in meta["instructions"]:
        ops[ins["op"]] = ops.get(ins["op"], 0) + 1
    return {"instructions": meta["header"]["n_instr"], "program_bytes": len(program), "weights_bytes": len(weights),
            "arena_bytes": lir.arena_bytes, "input_bytes": meta["input"]["bytes"],
            "output_bytes": meta["output"]["bytes"], "ops": ops, "hw_hash": hw.hash(),
            "lower_seconds": round(seconds, 3), "passes": meta["passes"],
            "fused": sum(len(i.get("fused", ())) for i in meta["instructions"])}


# ---- the lowered IR executed, and pass verification ----------------------------------------------
def run_lir(lir: LIR, image_q: np.ndarray, task: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run a (partly) lowered IR on named arrays: QGraph ops through the golden executor,
    instructions through the Program executor's kernels. Returns (output, full trace)."""
    g = lir.graph
    stats = SatCounter()
    env: dict[str, Any] = {"input": np.asarray(image_q, np.int64)}
    tr: dict[str, np.ndarray] = {}

    def prm(name):
        p = lir.params[name]
        return p.value[task] if p.tasks else p.value

    with golden.single_thread_blas():
        for node in lir.nodes:
            if node.op.startswith("q."):
                qop = g.op(node.name)
                env[node.name] = golden._exec(g, qop, env, task, stats, tr)
                continue
            _run_node(lir, node, env, prm, stats)
    trace = {}
    for name in traced_names(lir):
        if name in tr:
            trace[name] = tr[name]
            continue
        t = lir.tensors.get(name)
        if t is not None and t.rows != "all":
            _, dst = px.row_maps(0, 1 if t.rows == "queue" else 2, 0, env[t.queue], t.expert)
            trace[name] = env[t.buffer][dst]
        else:
            trace[name] = env[name]
    return env[g.output], trace


def _run_node(lir: LIR, node: Node, env: dict, prm, stats) -> None:
    f, r = node.fields, node.refs
    fmt = Fmt(*isa.unpack_fmt(f["fmt"])) if "fmt" in f else None
    if node.op == "patchify":
        env[r["dst_ref"]] = nx.patchify(env[r["src_ref"]], f["patch"])
    elif node.op == "gemm":
        flags = isa.make_flags(**node.flags)
        xm, ym = flags >> isa.XMODE_SHIFT & 3, flags >> isa.YMODE_SHIFT & 3
        queue = env.get(r.get("queue_ref"))
        src, dst = px.row_maps(xm, ym, f["rows"], queue, f.get("expert", 0))
        x = env[r["x_ref"]][src]
        y_name = r["y_ref"]
        if y_name not in env:
            env[y_name] = np.zeros(lir.tensors[y_name].shape, np.int64)
        if x.shape[0] == 0:
            return
        gfmt = Fmt(*isa.unpack_fmt(f["gelu_fmt"])) if node.flags.get("gelu") else None
        y = px.k_gemm(x, prm(r["w_ref"]), prm(r["bias_ref"]), prm(r["shift_ref"]), fmt, gfmt, stats, node.name)
        if node.flags.get("residual"):
            y = px.k_residual(y, env[r["res_ref"]], f["res_shifts"], f["res_fmt"], stats, node.name)
        if xm == 0 and ym == 0:
            env[y_name] = y
        else:
            env[y_name][dst] = y
    elif node.op == "embed":
        env[r["y_ref"]] = px.k_embed(env[r["x_ref"]], prm(r["cls_ref"]), prm(r["pos_ref"]), f["a_shift"],
                                     f["b_shift"], fmt, stats, node.name)
    elif node.op == "layernorm":
        eps = f["eps_lo"] | (f["eps_hi"] << 32)
        env[r["y_ref"]] = nx.layernorm(env[r["x_ref"]], prm(r["gamma_ref"]), prm(r["beta_ref"]), eps,
                                       f["beta_shift"], prm(r["shift_ref"]), fmt, stats, node.name)
    elif node.op == "attention":
        env[r["y_ref"]] = px.k_attention(env[r["qkv_ref"]], f["heads"], Fmt(*isa.unpack_fmt(f["score_fmt"])),
                                         f["score_shift"], f["out_shift"], fmt, stats, node.name)
    elif node.op == "add":
        env[r["y_ref"]] = nx.residual_add(env[r["a_ref"]], env[r["b_ref"]], f["a_shift"], f["b_shift"], fmt,
                                          stats, node.name)
    elif node.op == "moe_gate":
        k = f["experts_k"] >> 16
        logits, idx, score, queue = px.k_gate(env[r["x_ref"]], prm(r["w_ref"]), prm(r["bias_ref"]),
                                              prm(r["shift_ref"]), k, fmt, stats, node.name)
        env[r["logits_ref"]], env[r["idx_ref"]], env[r["score_ref"]], env[r["queue_ref"]] = logits, idx, score, queue
    elif node.op == "moe_combine":
        out = px.k_combine(env[r["score_ref"]], env[r["idx_ref"]], env[r["y_ref"]], prm(r["shift_ref"]), fmt, stats,
                           node.name)
        if node.flags.get("residual"):
            out = px.k_residual(out, env[r["res_ref"]], f["res_shifts"], f["res_fmt"], stats, node.name)
        env[r["out_ref"]] = out
    else:
        raise ValueError(f"{node.name}: no executor for {node.op}")


def _first_mismatch(got: dict, ref: dict, names) -> str | None:
    for n in names:
        a, b = got.get(n), ref[n]
        if a is None or np.asarray(a).shape != b.shape or not np.array_equal(np.asarray(a, np.int64), b):
            return n
    return None


class LoweringVerifier:
    """Holds every lowering step to the golden trace, bit for bit, on (quantized image, task)
    cases: a partly lowered IR through ``run_lir``, an allocated one as encoded bytes through
    ``program_exec``. ``log`` records what was checked."""

    def __init__(self, graph: QGraph, cases: list[tuple[np.ndarray, int]]):
        self.graph = graph
        self.cases = [(np.asarray(img, np.int64), int(t)) for img, t in cases]
        self.golden = [golden.run(graph, img, t, trace=True, stats=SatCounter())[1] for img, t in self.cases]
        self.log: list[dict] = []

    def _check(self, lir: LIR, what: str) -> None:
        names = traced_names(lir)
        how = "lir"
        if lir.allocated:
            how = "program"
            program, weights, meta = encode(lir)
            meta = json.loads(meta_json(meta))
        for (img, task), ref in zip(self.cases, self.golden):
            if how == "program":
                res = px.execute(program, weights, img, task, hw_hash=lir.hw.hash(), meta=meta, trace=True)
                trace = res.trace
            else:
                trace = run_lir(lir, img, task)[1]
            bad = _first_mismatch(trace, ref, names)
            if bad is not None:
                raise PassVerificationError(f"{what}: tensor {bad} differs from the golden model "
                                            f"(task {self.graph.tasks[task]}, executed as {how})")
        self.log.append({"pass": what, "executed_as": how, "cases": len(self.cases), "tensors": len(names)})

    def check(self, lir: LIR, what: str) -> None:
        self._check(lir, what)

    def __call__(self, before: LIR, after: LIR, name: str) -> None:
        self._check(after, f"pass {name}")
