"""The quantized graph: a framework-neutral list of integer ops with formats and weights.

A ``QGraph`` is what the golden executor runs and what the HLS C-sim and the RTL simulation are
compared against, tensor by tensor, under the canonical names below. It holds no PyTorch object:
``from_torch`` builds one from the PyTorch model, the ONNX front end builds the same graph from
an ONNX file. docs/qgraph.md is the contract (op semantics, attributes, parameters, names).

Serialisation (``save`` / ``load``): ``<stem>.json`` (canonical JSON: the structure, formats and
scalar attributes) plus ``<stem>.npz`` (every parameter array, each in the narrowest integer dtype
that holds it, in a ZIP with fixed timestamps). Identical graphs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3vit.compiler.numerics import CONTRACT, Fmt, check_gemm_acc
from m3vit.errors import ConfigError, UsageError

FORMAT = "m3vit-qgraph-1"

# kind -> (number of inputs, required attrs, required params)
OP_KINDS: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {
    "patch_embed": (1, ("patch",), ("w", "b", "w_frac", "shift")),
    "embed": (1, ("pos_frac", "a_shift", "b_shift"), ("cls", "pos")),
    "layernorm": (1, ("eps_int", "beta_shift"), ("gamma", "beta", "gamma_frac", "out_shift")),
    "linear": (1, ("gelu",), ("w", "b", "w_frac", "shift")),
    "attention": (1, ("heads", "score_bits", "score_frac", "score_shift", "out_shift"), ()),
    "add": (2, ("a_shift", "b_shift"), ()),
    "moe": (1, ("experts", "top_k", "hidden", "mid_bits"),
            ("gate_w", "gate_b", "gate_w_frac", "gate_shift", "w1", "b1", "w1_frac", "shift1",
             "mid_frac", "w2", "b2", "w2_frac", "shift2", "combine_shift")),
}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and integer format: ``bits`` wide, value q * 2^-frac.

    ``frac`` is one integer, or a tuple of G integers for G equal column groups (the fused
    q|k|v tensor keeps one fraction each for q, k and v). A row count of -1 is data dependent
    (an expert's queue)."""

    shape: tuple[int, ...]
    bits: int
    frac: int | tuple[int, ...]
    signed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        fr = self.frac
        object.__setattr__(self, "frac", tuple(int(f) for f in fr) if isinstance(fr, (list, tuple)) else int(fr))
        Fmt(self.bits, 0, self.signed)  # validates the width
        if self.grouped and (not self.shape or self.shape[-1] % len(self.frac)):
            raise ConfigError(f"{len(self.frac)} fraction groups do not split shape {self.shape}")

    @property
    def grouped(self) -> bool:
        return isinstance(self.frac, tuple)

    @property
    def fmt(self) -> Fmt:
        """The format (for a grouped tensor: the container, with the first group's fraction)."""
        return Fmt(self.bits, self.frac[0] if self.grouped else self.frac, self.signed)

    def group_fmts(self) -> list[Fmt]:
        fracs = self.frac if self.grouped else (self.frac,)
        return [Fmt(self.bits, f, self.signed) for f in fracs]

    def col_frac(self, cols: int | None = None) -> np.ndarray:
        """The fraction of every column (last axis)."""
        cols = self.shape[-1] if cols is None else cols
        if not self.grouped:
            return np.full(cols, self.frac, np.int64)
        return np.repeat(np.asarray(self.frac, np.int64), cols // len(self.frac))

    def dequantize(self, q) -> np.ndarray:
        q = np.asarray(q)
        if not self.grouped:
            return self.fmt.dequantize(q)
        return np.ldexp(q.astype(np.float64), -self.col_frac(q.shape[-1]))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits,
                "frac": list(self.frac) if self.grouped else self.frac, "signed": self.signed}

    @classmethod
    def from_json(cls, d: dict) -> "TensorInfo":
        return cls(tuple(d["shape"]), int(d["bits"]), d["frac"], bool(d.get("signed", True)))


@dataclass
class QOp:
    """One integer op: ``kind`` (see OP_KINDS), canonical ``name`` (also the name of its output
    tensor), input tensor names, scalar ``attrs`` and int64 ``params``."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def sub_tensors(self) -> list[str]:
        """Names of the tensors an op traces besides its output (only the MoE has any)."""
        if self.kind != "moe":
            return []
        n = int(self.attrs["experts"])
        return moe_sub_tensors(self.name, n)


def moe_sub_tensors(name: str, experts: int) -> list[str]:
    out = [f"{name}.gate", f"{name}.topk", f"{name}.score"]
    for e in range(experts):
        out += [f"{name}.e{e}.fc1", f"{name}.e{e}.fc2"]
    return out


@dataclass
class QGraph:
    """config: the model's meta data (a ModelConfig dict or the ONNX front end's equivalent);
    tasks: task names, in task-index order; input: the image tensor [C, H, W];
    ops: in execution order; tensors: every traced tensor's info, by canonical name;
    output: the graph output's name; meta: provenance (precision, calibration)."""

    config: dict[str, Any]
    tasks: list[str]
    input: TensorInfo
    ops: list[QOp]
    tensors: dict[str, TensorInfo]
    output: str
    meta: dict[str, Any] = field(default_factory=dict)
    # proven accumulator bounds from validate(): GEMM label -> (bound, id(w), id(b)); not serialised
    bounds: dict[str, tuple[int, int, int]] = field(default_factory=dict, repr=False, compare=False)

    def gemm_bound(self, label: str, w, b) -> int | None:
        """The bound validate() proved for exactly these weight and bias arrays, else None."""
        got = self.bounds.get(label)
        return got[0] if got is not None and got[1] == id(w) and got[2] == id(b) else None

    def op(self, name: str) -> QOp:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def task_index(self, task: int | str) -> int:
        if isinstance(task, str) and task.strip().isdigit():
            task = int(task)
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            if 0 <= task < len(self.tasks):
                return int(task)
            raise UsageError(f"task index {task} is out of range: the graph has {len(self.tasks)} task(s)")
        if task in self.tasks:
            return self.tasks.index(task)
        raise UsageError(f"unknown task '{task}'; choose one of: {', '.join(self.tasks)}")

    def trace_names(self) -> list[str]:
        """Every name a full trace holds, in execution order."""
        names = ["input"]
        for o in self.ops:
            names += o.sub_tensors() + [o.output]
        return names

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> "QGraph":
        """Structure, shapes, shift consistency and the proven accumulator bound of every GEMM;
        raises ConfigError naming the first problem."""
        known = {"input"}
        if "input" not in self.tensors:
            raise ConfigError("graph: no 'input' tensor")
        n_tasks = len(self.tasks)
        for o in self.ops:
            if o.kind not in OP_KINDS:
                raise ConfigError(f"{o.name}: unknown op kind '{o.kind}'")
            n_in, attrs, params = OP_KINDS[o.kind]
            if len(o.inputs) != n_in:
                raise ConfigError(f"{o.name}: {o.kind} takes {n_in} input(s), got {len(o.inputs)}")
            for i in o.inputs:
                if i not in known:
                    raise ConfigError(f"{o.name}: input '{i}' is not produced before this op")
            missing = [a for a in attrs if a not in o.attrs] + [p for p in params if p not in o.params]
            if missing:
                raise ConfigError(f"{o.name}: missing {', '.join(missing)}")
            if o.output != o.name:
                raise ConfigError(f"{o.name}: an op's output carries the op's name, got '{o.output}'")
            for t in o.sub_tensors() + [o.output]:
                if t not in self.tensors:
                    raise ConfigError(f"{o.name}: no tensor info for '{t}'")
            for p in o.params.values():
                if np.asarray(p).dtype != np.int64:
                    raise ConfigError(f"{o.name}: parameters must be int64 arrays")
            _CHECKS[o.kind](self, o, n_tasks)
            known.add(o.output)
        if self.output not in known:
            raise ConfigError(f"graph output '{self.output}' is not produced")
        return self

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "config": self.config,
            "tasks": list(self.tasks),
            "input": self.input.to_json(),
            "output": self.output,
            "meta": self.meta,
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "ops": [{"kind": o.kind, "name": o.name, "inputs": list(o.inputs), "output": o.output,
                     "attrs": {k: _json_scalar(v) for k, v in o.attrs.items()},
                     "params": {k: list(np.asarray(v).shape) for k, v in o.params.items()}}
                    for o in self.ops],
        }


def _json_scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_json_scalar(x) for x in v]
    if isinstance(v, (str, float)):
        return v
    raise TypeError(f"attribute value {v!r} is not serialisable")


# ---- per-kind checks ------------------------------------------------------------------------


def _shape(a) -> tuple[int, ...]:
    return tuple(np.asarray(a).shape)


def _need(cond: bool, op: QOp, msg: str):
    if not cond:
        raise ConfigError(f"{op.name}: {msg}")


def _check_gemm(g: QGraph, op: QOp, x: TensorInfo, w, b, w_frac, shift, out_frac, label: str, ident=None):
    """``ident``: the arrays whose identity keys the proven bound (a stacked MoE matrix, when w
    and b are slices of it)."""
    _need(_shape(w)[0] == x.shape[-1], op, f"{label} weight has {_shape(w)[0]} inputs, x has {x.shape[-1]}")
    n_out = _shape(w)[1]
    _need(_shape(b) == (n_out,) and _shape(w_frac) == (n_out,) and _shape(shift) == (n_out,), op,
          f"{label}: b, w_frac and shift need one value per output channel")
    _need(np.array_equal(shift, x.fmt.frac + np.asarray(w_frac) - out_frac), op,
          f"{label}: shift must equal f_x + f_w - f_y")
    iw, ib = ident if ident is not None else (w, b)
    g.bounds[f"{op.name}{label}"] = (check_gemm_acc(x.fmt, w, b, f"{op.name}{label}"), id(iw), id(ib))


def _check_patch_embed(g, op, n_tasks):
    x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
    p = int(op.attrs["patch"])
    c, h, w = x.shape
    _need(h % p == 0 and w % p == 0, op, f"image {h}x{w} is not a multiple of patch {p}")
    _need(_shape(op.params["w"])[0] == c * p * p, op, "w must be [C*p*p, D]")
    flat = TensorInfo((h // p * (w // p), c * p * p), x.bits, x.frac, x.signed)
    _check_gemm(g, op, flat, op.params["w"], op.params["b"], op.params["w_frac"], op.params["shift"],
                y.col_frac(), "")


def _check_embed(g, op, n_tasks):
    x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
    _need(_shape(op.params["cls"]) == (x.shape[-1],), op, "cls must hold one value per channel")
    _need(_shape(op.params["pos"]) == (x.shape[0] + 1, x.shape[1]), op, "pos must be [tokens + 1, D]")
    _need(op.attrs["a_shift"] == x.fmt.frac - y.fmt.frac, op, "a_shift must be f_patch_embed - f_embed")
    _need(op.attrs["b_shift"] == op.attrs["pos_frac"] - y.fmt.frac, op, "b_shift must be pos_frac - f_embed")


def _check_layernorm(g, op, n_tasks):
    x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
    d = x.shape[-1]
    for k in ("gamma", "beta", "gamma_frac", "out_shift"):
        _need(_shape(op.params[k]) == (d,), op, f"{k} needs one value per channel")
    _need(x.bits <= 16, op, "LayerNorm input must fit 16 bits")
    _need(np.array_equal(op.params["out_shift"], CONTRACT.norm_frac + op.params["gamma_frac"] - y.fmt.frac),
          op, "out_shift must equal F_n + f_gamma - f_z")


def _check_linear(g, op, n_tasks):
    x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
    out_frac = op.attrs["mid_frac"] if op.attrs["gelu"] else y.col_frac()
    if op.attrs["gelu"]:
        _need("mid_bits" in op.attrs and "mid_frac" in op.attrs, op, "a GELU epilogue needs mid_bits and mid_frac")
        _need(not y.grouped, op, "a GELU output has one fraction")
    _check_gemm(g, op, x, op.params["w"], op.params["b"], op.params["w_frac"], op.params["shift"], out_frac, "")


def _check_attention(g, op, n_tasks):
    x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
    _need(x.grouped and len(x.frac) == 3, op, "input must be the q|k|v tensor with three fraction groups")
    d = y.shape[-1]
    _need(x.shape[-1] == 3 * d and d % int(op.attrs["heads"]) == 0, op, "q|k|v width must be 3 x output width")
    fq, fk, fv = x.frac
    _need(op.attrs["score_shift"] == fq + fk - op.attrs["score_frac"], op, "score_shift must be f_q + f_k - f_s")
    _need(op.attrs["out_shift"] == fv - y.fmt.frac, op, "out_shift must be f_v - f_o")
    _need(op.attrs["score_bits"] <= 16, op, "scores are at most 16 bits")


def _check_add(g, op, n_tasks):
    a, b, y = (g.tensors[n] for n in (*op.inputs, op.output))
    _need(a.shape == b.shape == y.shape, op, "add needs equal shapes")
    _need(op.attrs["a_shift"] == a.fmt.frac - y.fmt.frac and op.attrs["b_shift"] == b.fmt.frac - y.fmt.frac,
          op, "shifts must be f_a - f_z and f_b - f_z")


def _check_moe(g, op, n_tasks):
    x, y = g.tensors[op.inputs[0]], g.tensors[op.output]
    pr, n, k, h = op.params, int(op.attrs["experts"]), int(op.attrs["top_k"]), int(op.attrs["hidden"])
    d = x.shape[-1]
    _need(1 <= k <= n, op, f"top_k {k} with {n} experts")
    _need(_shape(pr["gate_w"]) == (n_tasks, d, n), op, "gate_w must be [tasks, D, experts]")
    _need(_shape(pr["w1"]) == (n, d, h) and _shape(pr["w2"]) == (n, h, d), op, "w1/w2 must be [N, D, H]/[N, H, D]")
    _need(_shape(pr["combine_shift"]) == (n,) and _shape(pr["mid_frac"]) == (n,), op,
          "combine_shift and mid_frac need one value per expert")
    logits = g.tensors[f"{op.name}.gate"]
    for t in range(n_tasks):
        _check_gemm(g, op, x, pr["gate_w"][t], pr["gate_b"][t], pr["gate_w_frac"][t], pr["gate_shift"][t],
                    logits.fmt.frac, f".gate[{g.tasks[t]}]", (pr["gate_w"], pr["gate_b"]))
    for e in range(n):
        f1, f2 = g.tensors[f"{op.name}.e{e}.fc1"], g.tensors[f"{op.name}.e{e}.fc2"]
        _check_gemm(g, op, x, pr["w1"][e], pr["b1"][e], pr["w1_frac"][e], pr["shift1"][e], pr["mid_frac"][e],
                    f".e{e}.fc1", (pr["w1"], pr["b1"]))
        _check_gemm(g, op, f1, pr["w2"][e], pr["b2"][e], pr["w2_frac"][e], pr["shift2"][e], f2.fmt.frac,
                    f".e{e}.fc2", (pr["w2"], pr["b2"]))
        _need(pr["combine_shift"][e] == CONTRACT.gate_frac + f2.fmt.frac - y.fmt.frac, op,
              "combine_shift must be F_g + f_y(e) - f_out")


_CHECKS = {"patch_embed": _check_patch_embed, "embed": _check_embed, "layernorm": _check_layernorm,
           "linear": _check_linear, "attention": _check_attention, "add": _check_add, "moe": _check_moe}


# ---- save / load ------------------------------------------------------------------------------


def _narrow(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.int64)
    if a.size == 0:
        return a.astype(np.int8)
    lo, hi = int(a.min()), int(a.max())
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return a.astype(dt)
    return a


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A standard .npz (np.load reads it) with fixed member timestamps and order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".npz") else p
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".npz")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, separators=(",", ": "), allow_nan=False) + "\n"


def save(graph: QGraph, path: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.npz`` (a path ending in .json or .npz names the stem)."""
    jpath, npath = _paths(path)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{o.name}/{k}": _narrow(v) for o in graph.ops for k, v in o.params.items()}
    blob = _npz_bytes(arrays)
    doc = graph.to_json()
    doc["params_file"] = npath.name
    doc["params_sha256"] = hashlib.sha256(blob).hexdigest()
    npath.write_bytes(blob)
    jpath.write_text(canonical_json(doc))
    return jpath, npath


def load(path: str | Path) -> QGraph:
    jpath, _ = _paths(path)
    try:
        doc = json.loads(jpath.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read quantized graph {jpath}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{jpath} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UsageError(f"{jpath} is not a quantized graph (expected format {FORMAT})")
    npath = jpath.with_name(doc["params_file"])
    try:
        blob = npath.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the graph's parameters {npath}: {exc.strerror or exc}") from None
    if hashlib.sha256(blob).hexdigest() != doc["params_sha256"]:
        raise UsageError(f"{npath} does not match {jpath} (sha256 differs)")
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k].astype(np.int64) for k in z.files}
    ops = []
    for d in doc["ops"]:
        params = {k: arrays[f"{d['name']}/{k}"] for k in d["params"]}
        ops.append(QOp(d["kind"], d["name"], list(d["inputs"]), d["output"], dict(d["attrs"]), params))
    tensors = {k: TensorInfo.from_json(v) for k, v in doc["tensors"].items()}
    return QGraph(doc["config"], list(doc["tasks"]), TensorInfo.from_json(doc["input"]), ops, tensors,
                  doc["output"], doc.get("meta", {}))


def graphs_equal(a: QGraph, b: QGraph) -> bool:
    if canonical_json(a.to_json()) != canonical_json(b.to_json()):
        return False
    return all(oa.params.keys() == ob.params.keys() and all(np.array_equal(oa.params[k], ob.params[k]) for k in oa.params)
               for oa, ob in zip(a.ops, b.ops))

