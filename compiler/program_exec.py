"""The Python Program executor: runs ``program.bin`` over byte memories, one per address space.

It is the reference for the HLS decoder and the RTL: every opcode is carried out with the
numeric contract's ops (``numerics``), reading and writing the encodings of docs/program.md
through NumPy views of the memories, so a refusal, a wrong address or a wrong element type shows
up here first. The array-level kernels (``k_*``) are shared with the lowered-IR executor of
``lower.run_lir``, which verifies each lowering pass before anything is encoded.

    res = execute(program_bin, weights_bin, image_q, task=0, hw_hash=hw.hash(), meta=program_json,
                  trace=True)
    res.output          # int64 [T, D], the `out` space
    res.trace           # canonical name -> int64 array, read back from the arena (needs meta)

A refused Program raises ``ProgramError`` (a ``UsageError``) whose ``status`` is the isa status
code the accelerator would leave in its STATUS register.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3vit.compiler import isa
from m3vit.compiler import numerics as nx
from m3vit.compiler.golden import single_thread_blas
from m3vit.compiler.numerics import Fmt, SatCounter
from m3vit.errors import UsageError

__all__ = ["ProgramError", "ProgramResult", "execute", "execute_build", "read_tensor", "queue_arrays",
           "row_maps", "X_FMT"]

# The activation container of the encoding. A GEMM's input format is not in the instruction, and
# the contract's GEMM only uses it to check containment and to bound the accumulator, which the
# compiler proved for this container (lower.py refuses a layer it cannot prove).
X_FMT = Fmt(16, 0)
DTYPES = {"int8": np.int8, "int16": np.int16, "int64": np.int64, "uint16": np.uint16}


class ProgramError(UsageError):
    """A Program the executor refuses; ``status`` is the isa.STATUS code."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = isa.STATUS[status]
        self.status_name = status


# ---- array kernels (shared with lower.run_lir) ---------------------------------------------------
def k_gemm(x, w, b, shift, fmt: Fmt, gelu_fmt: Fmt | None, stats, name):
    if gelu_fmt is not None:
        return nx.gemm_gelu(x, w, b, shift, fmt, gelu_fmt, X_FMT, stats, name)
    return nx.gemm(x, w, b, shift, fmt, X_FMT, stats, name)


def k_embed(x, cls, pos, a_shift, b_shift, fmt, stats, name):
    return nx.residual_add(nx.prepend_cls(x, cls), pos, a_shift, b_shift, fmt, stats, name)


def k_attention(qkv, heads, score_fmt, score_shift, out_shift, fmt, stats, name):
    d = qkv.shape[1] // 3
    return nx.attention(qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:], heads, score_shift, score_fmt, out_shift,
                        fmt, stats, name)


def k_gate(x, w, b, shift, k, fmt, stats, name):
    """Gate GEMM, top-k and scores, and the queue table (q_off, q_tok, q_dst)."""
    logits = nx.gemm(x, w, b, shift, fmt, X_FMT, stats, name)
    idx, score = nx.moe_gate(logits, k, fmt.frac, stats, name + ".score")
    qs = nx.expert_queues(idx, w.shape[1])
    q_off = np.cumsum([0] + [q.tokens.size for q in qs])
    q_tok = np.concatenate([q.tokens for q in qs])
    q_dst = np.concatenate([q.tokens * k + q.slots for q in qs])  # row of the [T·k, D] expert outputs
    return logits, idx, score, (q_off, q_tok, q_dst)


def k_combine(score, idx, y, shift, fmt, stats, name):
    t, k = score.shape
    return nx.moe_combine(score, y.reshape(t, k, -1), shift, fmt, idx, stats, name)


def k_residual(v, r, res_shifts: int, res_fmt: int, stats, name):
    """A fused residual add: residual_add(v, r) with the packed shifts and format of the instruction."""
    bits, frac, signed = isa.unpack_fmt(res_fmt)
    if not 1 <= bits <= (16 if signed else 15):
        raise ProgramError(f"{name}: residual format of {bits} bits does not fit the 16-bit activations",
                           "over_limit")
    a_shift, b_shift = isa.unpack_res_shifts(res_shifts)
    return nx.residual_add(v, r, a_shift, b_shift, Fmt(bits, frac, signed), stats, name + ".residual")


def row_maps(xmode: int, ymode: int, rows: int, queue, expert: int):
    """(src rows, dst rows) of a GEMM instruction: slices for direct/queue, index arrays else."""
    if xmode == 0 and ymode == 0:
        return slice(0, rows), slice(0, rows)
    q_off, q_tok, q_dst = queue
    lo, hi = int(q_off[expert]), int(q_off[expert + 1])
    src = {0: slice(0, hi - lo), 1: q_tok[lo:hi].astype(np.int64), 2: slice(lo, hi)}[xmode]
    dst = {0: slice(0, hi - lo), 1: slice(lo, hi), 2: q_dst[lo:hi].astype(np.int64)}[ymode]
    return src, dst


# ---- memories ------------------------------------------------------------------------------------
def queue_arrays(mem, off: int, experts: int, entries: int):
    """The queue table at byte ``off``: q_off [N+1], q_tok and q_dst [entries] (uint16 views)."""
    tok_off, dst_off, _ = isa.queue_layout(experts, entries, 1)
    q_off = np.frombuffer(mem, np.uint16, experts + 1, off)
    return q_off, np.frombuffer(mem, np.uint16, entries, off + tok_off), \
        np.frombuffer(mem, np.uint16, entries, off + dst_off)


class _Mem:
    def __init__(self, spaces: dict[str, bytearray]):
        self.spaces = spaces

    def out(self, r: int, dtype, count: int, where: str) -> np.ndarray:
        """A view to store into: only the arena and the output space are writable."""
        if isa.split_ref(r)[0] not in ("arena", "out"):
            raise ProgramError(f"{where}: a store into the read-only {isa.split_ref(r)[0]} space", "over_limit")
        return self.view(r, dtype, count, where)

    def view(self, r: int, dtype, count: int, where: str) -> np.ndarray:
        space, off = isa.split_ref(r)
        mem = self.spaces[space]
        n = np.dtype(dtype).itemsize * count
        if off + n > len(mem):
            raise ProgramError(f"{where}: {n} bytes at {space}+{off:#x} run past the {len(mem)}-byte {space} space",
                               "over_limit")
        return np.frombuffer(mem, dtype, count, off)

    def rows(self, r: int, dtype, ld: int, cols: int, where: str, rows: int | None = None) -> np.ndarray:
        """A [rows, cols] view with row stride ``ld``; ``rows`` None: as many as the space holds."""
        space, off = isa.split_ref(r)
        item = np.dtype(dtype).itemsize
        if rows is None:
            rows = (len(self.spaces[space]) - off) // (item * ld)
        flat = self.view(r, dtype, rows * ld, where) if rows else np.zeros(0, dtype)
        return flat.reshape(rows, ld)[:, :cols]


@dataclass
class ProgramResult:
    output: np.ndarray
    memories: dict[str, bytearray]
    stats: SatCounter
    trace: dict[str, np.ndarray] = field(default_factory=dict)
    executed: int = 0


def _fmt(w: int) -> Fmt:
    return Fmt(*isa.unpack_fmt(w))


def _header(program: bytes, hw_hash: str | None) -> isa.Header:
    if len(program) < isa.RECORD_BYTES:
        raise ProgramError(f"Program: {len(program)} bytes is too short for a header", "bad_magic")
    magic, version = struct.unpack_from("<2I", program)
    if magic != isa.MAGIC:
        raise ProgramError("the Program is not an m3vit Program (bad magic); compile it with m3vit compile",
                           "bad_magic")
    if version != isa.VERSION:
        raise ProgramError(f"the Program has format version {version}, this executor reads {isa.VERSION}; "
                           f"recompile it", "bad_version")
    digest = program[8:40]
    if hw_hash is not None and digest.hex() != hw_hash:
        raise ProgramError(f"the Program was compiled for another hardware configuration (hash {digest.hex()[:12]}, "
                           f"this one is {hw_hash[:12]}); recompile it with this hw.json", "hw_mismatch")
    try:
        return isa.decode_header(program, "Program")
    except UsageError as e:
        raise ProgramError(str(e), "over_limit") from None


def execute(program: bytes, weights: bytes, image_q, task: int = 0, *, hw_hash: str | None = None,
            meta: dict | None = None, trace: bool = False, arena: bytes | None = None) -> ProgramResult:
    """Run a Program. ``image_q``: the quantized input (int array [C, H, W] or its int16 bytes);
    ``task``: the TASK register; ``hw_hash``: the hex hash of the running hardware configuration
    (the Program must match it); ``meta``: program.json (needed for ``trace`` and the output shape);
    ``arena``: the arena's contents at the start (zero otherwise), to run a slice of a Program."""
    h = _header(program, hw_hash)
    if not isinstance(task, (int, np.integer)) or not 0 <= int(task) < h.n_tasks:
        raise ProgramError(f"task {task} is out of range: the Program has {h.n_tasks} task(s)", "bad_task")
    if len(weights) != h.weight_bytes:
        raise ProgramError(f"weights.bin has {len(weights)} bytes, the Program expects {h.weight_bytes}; "
                           f"use the weights.bin of the same build", "over_limit")
    image = image_q if isinstance(image_q, (bytes, bytearray)) else np.asarray(image_q).astype("<i2").tobytes()
    if len(image) != h.input_bytes:
        raise ProgramError(f"input has {len(image)} bytes, the Program takes {h.input_bytes}", "over_limit")
    if arena is not None and len(arena) != h.arena_bytes:
        raise ProgramError(f"the initial arena has {len(arena)} bytes, the Program's is {h.arena_bytes}", "over_limit")
    spaces = {"wgt": bytearray(weights), "arena": bytearray(arena if arena is not None else h.arena_bytes),
              "in": bytearray(image),
              "out": bytearray(h.output_bytes)}
    mem = _Mem(spaces)
    stats = SatCounter()
    executed = 0
    with single_thread_blas():
        for i in range(h.n_instr):
            rec = program[isa.RECORD_BYTES * (1 + i):isa.RECORD_BYTES * (2 + i)]
            code = rec[0]
            if code not in isa.OPCODE_NAMES:
                raise ProgramError(f"instruction {i}: unknown opcode {code}; the Program is corrupt or newer than "
                                   f"this executor", "bad_opcode")
            ins = isa.decode_instr(rec)
            executed += 1
            if ins.op == "end":
                break
            _step(mem, ins, int(task), stats, f"instruction {i} ({ins.op})")
    out = np.frombuffer(spaces["out"], "<i2").astype(np.int64)
    if meta is not None:
        out = out.reshape(meta["output"]["shape"])
    res = ProgramResult(out, spaces, stats, executed=executed)
    if trace:
        if meta is None:
            raise UsageError("a trace needs program.json (meta=) for the tensor map")
        res.trace = {name: read_tensor(spaces, meta, name) for name in meta["trace"]}
    return res


def _step(mem: _Mem, ins: isa.Instr, task: int, stats: SatCounter, where: str) -> None:
    f = ins.fields
    if ins.op == "patchify":
        c, hh, ww, p = f["channels"], f["height"], f["width"], f["patch"]
        img = mem.view(f["src_ref"], np.int16, c * hh * ww, where).reshape(c, hh, ww)
        out = nx.patchify(img, p)
        mem.out(f["dst_ref"], np.int16, out.size, where)[:] = out.reshape(-1)
    elif ins.op == "gemm":
        _gemm(mem, ins, stats, where)
    elif ins.op == "embed":
        n, d = f["patches"], f["dim"]
        x = mem.view(f["x_ref"], np.int16, n * d, where).reshape(n, d)
        cls = mem.view(f["cls_ref"], np.int16, d, where)
        pos = mem.view(f["pos_ref"], np.int16, (n + 1) * d, where).reshape(n + 1, d)
        y = k_embed(x, cls, pos, f["a_shift"], f["b_shift"], _fmt(f["fmt"]), stats, where)
        mem.out(f["y_ref"], np.int16, y.size, where)[:] = y.reshape(-1)
    elif ins.op == "layernorm":
        r, d = f["rows"], f["dim"]
        x = mem.view(f["x_ref"], np.int16, r * d, where).reshape(r, d)
        gamma = mem.view(f["gamma_ref"], np.int16, d, where)
        beta = mem.view(f["beta_ref"], "<i8", d, where)
        shift = mem.view(f["shift_ref"], np.int8, d, where)
        eps = f["eps_lo"] | (f["eps_hi"] << 32)
        y = nx.layernorm(x, gamma, beta, eps, f["beta_shift"], shift, _fmt(f["fmt"]), stats, where)
        mem.out(f["y_ref"], np.int16, y.size, where)[:] = y.reshape(-1)
    elif ins.op == "attention":
        t, d = f["tokens"], f["dim"]
        qkv = mem.view(f["qkv_ref"], np.int16, t * 3 * d, where).reshape(t, 3 * d)
        y = k_attention(qkv, f["heads"], _fmt(f["score_fmt"]), f["score_shift"], f["out_shift"], _fmt(f["fmt"]),
                        stats, where)
        mem.out(f["y_ref"], np.int16, y.size, where)[:] = y.reshape(-1)
    elif ins.op == "add":
        n = f["rows"] * f["cols"]
        a = mem.view(f["a_ref"], np.int16, n, where)
        b = mem.view(f["b_ref"], np.int16, n, where)
        y = nx.residual_add(a, b, f["a_shift"], f["b_shift"], _fmt(f["fmt"]), stats, where)
        mem.out(f["y_ref"], np.int16, n, where)[:] = y
    elif ins.op == "moe_gate":
        _gate(mem, ins, task, stats, where)
    elif ins.op == "moe_combine":
        t, k, d = f["tokens"], f["k"], f["dim"]
        score = mem.view(f["score_ref"], np.uint16, t * k, where).reshape(t, k)
        idx = mem.view(f["idx_ref"], np.uint16, t * k, where).reshape(t, k)
        y = mem.view(f["y_ref"], np.int16, t * k * d, where).reshape(t * k, d)
        shift = mem.view(f["shift_ref"], np.int8, int(idx.max(initial=0)) + 1, where)
        out = k_combine(score, idx, y, shift, _fmt(f["fmt"]), stats, where)
        if ins.has("residual"):
            r = mem.view(f["res_ref"], np.int16, t * d, where).reshape(t, d)
            out = k_residual(out, r, f["res_shifts"], f["res_fmt"], stats, where)
        mem.out(f["out_ref"], np.int16, out.size, where)[:] = out.reshape(-1)


def _gemm(mem: _Mem, ins: isa.Instr, stats: SatCounter, where: str) -> None:
    f = ins.fields
    k_in, n_out = f["in_dim"], f["out_dim"]
    xm, ym = ins.xmode, ins.ymode
    if xm > 2 or ym > 2:
        raise ProgramError(f"{where}: row modes ({xm}, {ym}) are not defined", "bad_opcode")
    fused = ins.has("residual")
    if fused and (xm or ym):
        raise ProgramError(f"{where}: flag residual needs direct row modes, not ({xm}, {ym})", "bad_opcode")
    queue = None
    if xm or ym:
        qs = f["queue_shape"]
        n_exp, entries = qs & 0xFFFF, qs >> 16
        if f["expert"] >= n_exp:
            raise ProgramError(f"{where}: expert {f['expert']} of a {n_exp}-expert queue table", "over_limit")
        space, off = isa.split_ref(f["queue_ref"])
        mem.view(f["queue_ref"], np.uint8, isa.queue_layout(n_exp, entries, 1)[2], where)
        queue = queue_arrays(mem.spaces[space], off, n_exp, entries)
    src, dst = row_maps(xm, ym, f["rows"], queue, f["expert"])
    bounded = None if (xm == 0 and ym == 0) else f["rows"]
    x_all = mem.rows(f["x_ref"], np.int16, f["x_ld"], k_in, where, f["rows"] if xm == 0 else None)
    x = x_all[src]
    if x.shape[0] == 0:
        return  # an idle expert fetches nothing and writes nothing
    if bounded is not None and x.shape[0] > bounded:
        raise ProgramError(f"{where}: the queue holds {x.shape[0]} rows, the instruction allows {bounded}",
                           "over_limit")
    w = mem.view(f["w_ref"], np.int16 if ins.has("w16") else np.int8, k_in * n_out, where).reshape(k_in, n_out)
    b = mem.view(f["bias_ref"], "<i8", n_out, where) if ins.has("bias") else None
    shift = mem.view(f["shift_ref"], np.int8, n_out, where)
    gelu_fmt = _fmt(f["gelu_fmt"]) if ins.has("gelu") else None
    y = k_gemm(x, w, b, shift, _fmt(f["fmt"]), gelu_fmt, stats, where)
    if fused:
        # the residual operand shares the output's row stride
        r = mem.rows(f["res_ref"], np.int16, f["y_ld"], n_out, where, f["rows"])
        y = k_residual(y, r, f["res_shifts"], f["res_fmt"], stats, where)
    mem.out(f["y_ref"], np.int16, 0, where)
    y_all = mem.rows(f["y_ref"], np.int16, f["y_ld"], n_out, where, f["rows"] if ym == 0 else None)
    if isinstance(dst, slice) and dst.stop > y_all.shape[0]:
        raise ProgramError(f"{where}: output rows run past the arena", "over_limit")
    y_all[dst] = y


def _gate(mem: _Mem, ins: isa.Instr, task: int, stats: SatCounter, where: str) -> None:
    f = ins.fields
    t, d = f["tokens"], f["dim"]
    n, k = f["experts_k"] & 0xFFFF, f["experts_k"] >> 16
    wdt = np.int16 if ins.has("w16") else np.int8
    x = mem.view(f["x_ref"], np.int16, t * d, where).reshape(t, d)
    w = mem.view(f["w_ref"] + task * f["w_stride"], wdt, d * n, where).reshape(d, n)
    b = mem.view(f["bias_ref"] + task * f["bias_stride"], "<i8", n, where)
    shift = mem.view(f["shift_ref"] + task * f["shift_stride"], np.int8, n, where)
    logits, idx, score, (q_off, q_tok, q_dst) = k_gate(x, w, b, shift, k, _fmt(f["fmt"]), stats, where)
    mem.out(f["logits_ref"], np.int16, logits.size, where)[:] = logits.reshape(-1)
    mem.out(f["idx_ref"], np.uint16, idx.size, where)[:] = idx.reshape(-1)
    mem.out(f["score_ref"], np.uint16, score.size, where)[:] = score.reshape(-1)
    space, off = isa.split_ref(f["queue_ref"])
    mem.out(f["queue_ref"], np.uint8, isa.queue_layout(n, t, k)[2], where)
    qo, qt, qd = queue_arrays(mem.spaces[space], off, n, t * k)
    qo[:], qt[:], qd[:] = q_off, q_tok, q_dst


# ---- traces ----------------------------------------------------------------------------------------
def read_tensor(spaces: dict[str, bytearray], meta: dict, name: str) -> np.ndarray:
    """One canonical tensor read back from the memories through program.json's tensor map."""
    t = meta["tensors"][name]
    space, off = isa.split_ref(t["ref"])
    mem = spaces[space]
    dt = DTYPES[t["dtype"]]
    rows_mode = t.get("rows", "all")
    if rows_mode == "all":
        n = int(np.prod(t["shape"]))
        return np.frombuffer(mem, dt, n, off).astype(np.int64).reshape(t["shape"])
    qspace, qoff = isa.split_ref(t["queue_ref"])
    q = queue_arrays(spaces[qspace], qoff, t["experts"], t["entries"])
    cols = t["shape"][-1]
    buf = np.frombuffer(mem, dt, t["entries"] * cols, off).reshape(t["entries"], cols)
    _, dst = row_maps(0, 1 if rows_mode == "queue" else 2, 0, q, t["expert"])
    return buf[dst].astype(np.int64)


def execute_build(build_dir: str | Path, image_q, task: int = 0, *, hw_hash: str | None = None,
                  trace: bool = False) -> ProgramResult:
    """``execute`` on the three files of a compiled build folder."""
    d = Path(build_dir)
    meta = json.loads((d / "program.json").read_text())
    return execute((d / "program.bin").read_bytes(), (d / "weights.bin").read_bytes(), image_q, task,
                   hw_hash=hw_hash, meta=meta, trace=trace)

