"""ONNX -> accelerator IR: load, check, fold constants, and raise the graph into ViT / MoE ops.

The raiser is an abstract interpreter. It walks the nodes in order and gives every tensor a
meaning instead of a value:

* a constant (folded with NumPy), or a per-task constant (evaluated for every `task_id`);
* a *view* of an IR value: which element of a 2-D ``[tokens, channels]`` IR value sits at each
  position of the ONNX tensor (an index array), times a scalar factor. Reshape, Transpose,
  Gather, Slice, Split, Squeeze ... act on the index array, so any head split, any layout order
  and any scalar scale placement is recognised by what it computes, not by how it is spelt;
* an elementwise expression of one tensor (classified numerically as GELU, a constant affine map,
  a LayerNorm statistic ...), or a labelled partial result (attention scores, MoE gate, routing,
  expert activations) that only becomes an IR op when its pattern completes.

Nothing depends on node names or on our exporter's order of operations. Every node must end up
in some IR op's provenance or be constant; anything else is one clear UsageError.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from m3vit.compiler.ir import IMAGE, IR, IRError, Op, infer_shape, model_meta
from m3vit.errors import M3ViTError, UsageError

LIMIT_KEYS = ("max_tokens", "max_dim", "max_hidden", "max_experts", "max_k", "max_tasks", "max_heads")
_MAX_CONST_ELEMENTS = 1 << 27  # a folded shape-driven tensor larger than this is a corrupt graph
SUPPORTED = ("supported: Conv patch embedding (kernel = stride), LayerNormalization or its ReduceMean "
             "decomposition, MatMul/Gemm linears, Gelu or its Erf/Tanh form, Softmax attention, "
             "TopK MoE routing, residual Add, CLS Concat, and Reshape/Transpose/Gather/Slice/Split/"
             "Squeeze/Unsqueeze/Flatten layout ops")
_SPATIAL_OPS = {"Conv", "ConvTranspose", "Resize", "Upsample", "BatchNormalization", "Relu", "MaxPool",
                "AveragePool", "InstanceNormalization"}


# ---- public API --------------------------------------------------------------------------------
def import_onnx(source: str | Path | bytes, *, limits: dict[str, int] | None = None, clean: bool = True,
                verify: Any = False, host_head: bool = False) -> IR:
    """Import an ONNX file (path or bytes) as the accelerator IR.

    clean: run the clean-up flow (fusion, q/k/v packing, dead ops) so that only canonical op kinds
    remain. verify: False, True (check every pass against ONNX Runtime on one random image per
    task), or a callable/Verifier from m3vit.compiler.passes. host_head: for a graph with a
    dense-prediction head, return the backbone and list the head's nodes in ir.meta['host_nodes']
    instead of failing. limits: hardware limits (see LIMIT_KEYS) checked on the raised model.
    """
    start = time.perf_counter()
    _check_limit_keys(limits)
    data, label = _read(source)
    model = _parse(data, label)
    try:
        ir = _Raiser(model, label, host_head).run()
        ir.meta["raise_seconds"] = round(time.perf_counter() - start, 4)
        if clean:
            from m3vit.compiler import passes

            verifier = passes.Verifier.for_model(ir, data) if verify is True else verify
            ir = passes.require_clean(passes.cleanup_flow().run(ir, verify=verifier or None), label)
    except M3ViTError:
        raise
    except Exception as exc:  # a malformed graph that passed the checker (MemoryError included)
        raise UsageError(f"{label}: cannot import this graph: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    ir.meta["model"] = model_meta(ir)
    check_limits(ir, limits)
    ir.meta["import_seconds"] = round(time.perf_counter() - start, 4)
    return ir


def check_limits(ir: IR, limits: dict[str, int] | None) -> None:
    """UsageError listing every hardware limit the model exceeds."""
    if not limits:
        return
    _check_limit_keys(limits)
    dims = model_dims(ir)
    have = {"max_tokens": ("tokens", dims["tokens"]), "max_dim": ("model dim", dims["dim"]),
            "max_hidden": ("hidden width", dims["hidden"]), "max_experts": ("experts", dims["num_experts"]),
            "max_k": ("top-k", dims["top_k"]), "max_tasks": ("tasks", dims["tasks"]),
            "max_heads": ("heads", dims["heads"])}
    over = [f"{what} {value} > {key} {limits[key]}" for key, (what, value) in have.items()
            if key in limits and value > limits[key]]
    if over:
        raise UsageError(f"the model does not fit the hardware limits: {'; '.join(over)}")


def model_dims(ir: IR) -> dict[str, int]:
    """Sizes the hardware limits apply to, read from the IR."""
    m = model_meta(ir)
    return {key: m[key] for key in ("tokens", "dim", "hidden", "num_experts", "top_k", "tasks", "heads")}


def _check_limit_keys(limits) -> None:
    if limits is None:
        return
    if not isinstance(limits, dict):
        raise UsageError(f"hardware limits must be a mapping of {', '.join(LIMIT_KEYS)}")
    unknown = sorted(set(limits) - set(LIMIT_KEYS))
    if unknown:
        raise UsageError(f"unknown hardware limit(s) {', '.join(unknown)}; known: {', '.join(LIMIT_KEYS)}")
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"hardware limit {key} must be a positive integer, got {value!r}")


# ---- loading and checking ----------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(source) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "ONNX model"
    if not isinstance(source, (str, Path)):
        raise UsageError(f"import_onnx takes a path or bytes, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise UsageError(f"ONNX file {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not an ONNX file")
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(data: bytes, label: str):
    import onnx

    if not data:
        raise UsageError(f"{label} is empty")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as exc:
        raise UsageError(f"{label} is not a valid ONNX model (truncated or corrupt file?): {_first_line(exc)}") from None
    graph = model.graph
    if not graph.node or not graph.output:
        raise UsageError(f"{label} is not a valid ONNX model (truncated or corrupt file?): the graph is empty")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise UsageError(f"{label} keeps its weights in external data files; save it as one file "
                         "(onnx.save(model, path, save_as_external_data=False))")
    try:
        onnx.checker.check_model(data, full_check=True)  # bytes: no re-serialisation of the weights
    except Exception as exc:
        raise UsageError(f"{label} fails the ONNX checker: {_first_line(exc)}") from None
    if model.functions:
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as exc:
            raise UsageError(f"{label}: cannot inline its local functions: {_first_line(exc)}") from None
    return model


def _metadata(model) -> dict[str, str]:
    return {p.key[len("m3vit."):]: p.value for p in model.metadata_props if p.key.startswith("m3vit.")}


# ---- symbolic values ---------------------------------------------------------------------------
class Sym:
    """A tensor that is not a constant; `nodes` are the ONNX nodes folded into it so far."""

    shape: tuple[int, ...]
    nodes: frozenset

    def describe(self) -> str:
        return type(self).__name__.lower()


class ImageSym(Sym):
    def __init__(self, shape, nodes=frozenset()):
        self.shape, self.nodes = tuple(shape), frozenset(nodes)

    def describe(self):
        return "the input image"


class TaskInput:
    """The task_id graph input; only constants may be computed from it (one value per task)."""


@dataclass
class TaskConst:
    values: list[np.ndarray]


class View(Sym):
    """ONNX tensor = factor * src.flat[idx]: a rearrangement of the 2-D IR value `src` [rows, cols]."""

    def __init__(self, src: str, src_shape, shape, idx=None, factor=1.0, nodes=frozenset()):
        self.src, self.src_shape = src, tuple(src_shape)
        self.shape = tuple(int(s) for s in shape)
        self._idx = idx  # None: the identity layout (src reshaped)
        self.factor = float(factor)
        self.nodes = frozenset(nodes)
        self.plain: str | None = None  # the IR value this view materialises to, once it has

    @property
    def idx(self) -> np.ndarray:
        if self._idx is None:
            self._idx = np.arange(int(np.prod(self.src_shape)), dtype=np.int64).reshape(self.shape)
        return self._idx

    @property
    def identity(self) -> bool:
        if self._idx is None:
            return True
        n = int(np.prod(self.src_shape))
        return self._idx.size == n and bool(np.array_equal(self._idx.reshape(-1), np.arange(n)))

    def moved(self, idx, nodes) -> "View":
        return View(self.src, self.src_shape, idx.shape, idx, self.factor, self.nodes | nodes)

    def scaled(self, f, nodes) -> "View":
        return View(self.src, self.src_shape, self.shape, self._idx, self.factor * f, self.nodes | nodes)

    def key(self):
        return ("view", self.src, self.shape, None if self.identity else self.idx.tobytes())

    def describe(self):
        return f"a token tensor {list(self.shape)}"


class Elem(Sym):
    """expr(base), elementwise; expr is a tuple tree over ('x',) and ('c', array)."""

    def __init__(self, base: Sym, expr, shape, nodes):
        self.base, self.expr, self.shape, self.nodes = base, expr, tuple(shape), frozenset(nodes)
        self.settled = None  # what it became, so that every consumer shares one IR op

    def describe(self):
        return f"an elementwise function of {self.base.describe()}"


class Stat(Sym):
    """LayerNorm decomposition pieces over the IR value x: mean, centered, var, normalized."""

    def __init__(self, kind: str, x: str, shape, nodes, eps: float | None = None):
        self.kind, self.x, self.shape, self.nodes, self.eps = kind, x, tuple(shape), frozenset(nodes), eps

    def key(self):
        return ("stat", self.kind, self.x, self.eps)

    def describe(self):
        return f"a LayerNorm {self.kind} of {self.x}"


class Lab(Sym):
    """A partial result whose axes carry labels: attention scores/probs ('q', 'k', batch 'b*'), the
    MoE gate and routing ('t', 'n', 'k'), expert activations ('n', 't', 'h' / 'c'). '1' = size 1."""

    def __init__(self, kind: str, labels, shape, data: dict, nodes):
        self.kind, self.labels, self.shape = kind, tuple(labels), tuple(int(s) for s in shape)
        self.data, self.nodes = data, frozenset(nodes)
        assert len(self.labels) == len(self.shape)

    def relabel(self, labels, shape, nodes) -> "Lab":
        return Lab(self.kind, labels, shape, self.data, self.nodes | nodes)

    def axis(self, label: str) -> int:
        return self.labels.index(label)

    def key(self):
        return ("lab", id(self.data))

    def describe(self):
        return {"scores": "attention scores", "probs": "attention probabilities", "gate": "MoE gate logits",
                "gate_probs": "MoE gate probabilities", "route_idx": "MoE routing indices",
                "route_scores": "MoE routing scores", "route_logits": "MoE top-k logits",
                "onehot": "a one-hot of MoE routing indices", "combine_k": "MoE routing weights per slot",
                "combine": "the MoE score matrix", "experts": "expert-batched activations",
                "weighted": "score-weighted expert outputs"}.get(self.kind, self.kind)


class Cls(Sym):
    """Token 0 of the IR value src (optionally LayerNorm'd): the input of a classification head."""

    def __init__(self, src: str, dim: int, shape, ln, nodes):
        self.src, self.dim, self.shape, self.ln, self.nodes = src, dim, tuple(shape), ln, frozenset(nodes)

    def describe(self):
        return "the CLS token"


class _Unsupported(UsageError):
    pass


# ---- constant folding --------------------------------------------------------------------------
def _attrs(node) -> dict[str, Any]:
    import onnx

    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[a.name] = v
    return out


def _np_dtype(onnx_type: int):
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(onnx_type)


def _reshape_target(in_shape, shape, allowzero=0) -> tuple[int, ...]:
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    out = []
    for i, s in enumerate(shape):
        out.append(in_shape[i] if s == 0 and not allowzero and i < len(in_shape) else s)
    total = int(np.prod(in_shape))
    if out.count(-1) > 1:
        raise ValueError(f"Reshape to {shape} has more than one -1")
    if -1 in out:
        rest = int(np.prod([s for s in out if s != -1]))
        if rest == 0 or total % rest:
            raise ValueError(f"cannot reshape {list(in_shape)} to {shape}")
        out[out.index(-1)] = total // rest
    if int(np.prod(out)) != total or any(s < 0 for s in out):
        raise ValueError(f"cannot reshape {list(in_shape)} to {shape}")
    return tuple(out)


def _axes(node, ins, a, opset, default=None):
    """Axes of Squeeze/Unsqueeze/Reduce*: an attribute before opset 13 (18 for Reduce*), else input 1."""
    if len(ins) > 1 and ins[1] is not None:
        return [int(v) for v in np.asarray(ins[1]).reshape(-1)]
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    return default


def _slice(x, node, ins, a):
    if len(ins) > 1:
        starts, ends = np.asarray(ins[1]).reshape(-1), np.asarray(ins[2]).reshape(-1)
        axes = np.asarray(ins[3]).reshape(-1) if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
        steps = np.asarray(ins[4]).reshape(-1) if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), int)
    else:
        starts, ends = a["starts"], a["ends"]
        axes = a.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    sl = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if int(st) == 0:
            raise ValueError("Slice step 0")
        sl[int(ax) % x.ndim] = slice(int(max(min(s, 2**62), -2**62)), int(max(min(e, 2**62), -2**62)), int(st))
    return x[tuple(sl)]


def _split(x, node, ins, a, opset):
    axis = int(a.get("axis", 0)) % x.ndim
    if len(ins) > 1 and ins[1] is not None:
        sizes = [int(v) for v in np.asarray(ins[1]).reshape(-1)]
    elif "split" in a:
        sizes = [int(v) for v in a["split"]]
    else:
        n = len(node.output)
        if "num_outputs" in a:
            n = int(a["num_outputs"])
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    if sum(sizes) != x.shape[axis] or len(sizes) != len(node.output):
        raise ValueError(f"Split sizes {sizes} do not cover axis {axis} of {list(x.shape)}")
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def _guard(shape) -> None:
    n = int(np.prod([max(int(s), 0) for s in shape])) if len(shape) else 1
    if n > _MAX_CONST_ELEMENTS:
        raise UsageError(f"a constant of shape {list(shape)} is far larger than any ViT needs (corrupt graph?)")


def _gemm(A, B, C, a):
    A = A.T if a.get("transA", 0) else A
    B = B.T if a.get("transB", 0) else B
    y = a.get("alpha", 1.0) * (A @ B)
    return y + a.get("beta", 1.0) * C if C is not None else y


def _move(op_type: str, node, ins: list, a: dict, opset: int) -> list[np.ndarray] | None:
    """Layout ops, shared by constants and by the index arrays of views. None: not a layout op."""
    x = ins[0]
    if op_type in ("Identity", "Dropout"):
        return [x]
    if op_type == "Reshape":
        return [x.reshape(_reshape_target(x.shape, ins[1], a.get("allowzero", 0)))]
    if op_type == "Transpose":
        perm = a.get("perm", list(range(x.ndim))[::-1])
        return [np.transpose(x, [int(p) for p in perm])]
    if op_type == "Squeeze":
        axes = _axes(node, ins, a, opset)
        if axes is None:
            return [np.squeeze(x)]
        return [np.squeeze(x, axis=tuple(int(ax) % x.ndim for ax in axes))]
    if op_type == "Unsqueeze":
        axes = sorted(int(ax) % (x.ndim + len(_axes(node, ins, a, opset))) for ax in _axes(node, ins, a, opset))
        for ax in axes:
            x = np.expand_dims(x, ax)
        return [x]
    if op_type == "Flatten":
        axis = int(a.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
        return [x.reshape(int(np.prod(x.shape[:axis])), -1)]
    if op_type == "Gather":
        return [np.take(x, np.asarray(ins[1]).astype(np.int64), axis=int(a.get("axis", 0)))]
    if op_type == "Slice":
        return [_slice(x, node, ins, a)]
    if op_type == "Split":
        return _split(x, node, ins, a, opset)
    if op_type == "Expand":
        shape = np.broadcast_shapes(x.shape, tuple(int(s) for s in np.asarray(ins[1]).reshape(-1)))
        _guard(shape)
        return [np.broadcast_to(x, shape).copy()]
    if op_type == "Tile":
        reps = [int(r) for r in np.asarray(ins[1]).reshape(-1)]
        _guard([s * r for s, r in zip(x.shape, reps)])
        return [np.tile(x, reps)]
    return None


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power, "Equal": np.equal,
           "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
           "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or, "Max": np.maximum,
           "Min": np.minimum}
_UNARY = {"Sqrt": np.sqrt, "Neg": np.negative, "Abs": np.abs, "Exp": np.exp, "Log": np.log, "Tanh": np.tanh,
          "Relu": lambda x: np.maximum(x, 0), "Not": np.logical_not, "Floor": np.floor, "Ceil": np.ceil,
          "Reciprocal": lambda x: np.reciprocal(x.astype(np.float64)).astype(x.dtype),
          "Sigmoid": lambda x: (1 / (1 + np.exp(-x))).astype(x.dtype)}


def _erf(x):
    from scipy.special import erf

    return erf(x)


def fold_node(node, ins: list, opset: int) -> list[np.ndarray]:
    """Evaluate one node on constant inputs (NumPy; onnx.reference for anything rarer)."""
    from onnx import numpy_helper

    t, a = node.op_type, _attrs(node)
    with np.errstate(all="ignore"):
        if t == "Constant":
            if "value" in a:
                return [numpy_helper.to_array(a["value"])]
            for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                               ("value_int", np.int64), ("value_ints", np.int64)):
                if key in a:
                    return [np.array(a[key], dtype=dtype)]
            raise ValueError(f"Constant with attributes {sorted(a)}")
        moved = _move(t, node, ins, a, opset) if ins and ins[0] is not None else None
        if moved is not None:
            return moved
        if t == "Shape":
            dims = list(np.shape(ins[0]))
            return [np.array(dims[a.get("start", 0):a.get("end", len(dims))], dtype=np.int64)]
        if t == "Size":
            return [np.array(np.size(ins[0]), dtype=np.int64)]
        if t == "Cast":
            return [np.asarray(ins[0]).astype(_np_dtype(a["to"]))]
        if t == "Concat":
            return [np.concatenate([np.asarray(v) for v in ins if v is not None], axis=int(a["axis"]))]
        if t == "ConstantOfShape":
            shape = [int(s) for s in np.asarray(ins[0]).reshape(-1)]
            _guard(shape)
            value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
            return [np.full(shape, value.reshape(-1)[0], dtype=value.dtype)]
        if t == "Range":
            start, limit, delta = (np.asarray(v).reshape(()) for v in ins)
            if delta == 0:
                raise ValueError("Range with delta 0")
            _guard([max(0, int(np.ceil((limit - start) / delta)))])
            return [np.arange(start, limit, delta, dtype=np.result_type(start, limit, delta))]
        if t in _BINARY:
            return [np.asarray(_BINARY[t](ins[0], ins[1]))]
        if t == "Div":
            x, y = np.asarray(ins[0]), np.asarray(ins[1])
            if np.issubdtype(x.dtype, np.integer):
                return [np.trunc(x / y).astype(x.dtype)]
            return [(x / y).astype(np.result_type(x, y))]
        if t in _UNARY:
            return [np.asarray(_UNARY[t](np.asarray(ins[0])))]
        if t == "Erf":
            return [_erf(ins[0]).astype(np.asarray(ins[0]).dtype)]
        if t == "Where":
            return [np.where(ins[0], ins[1], ins[2])]
        if t == "MatMul":
            return [np.matmul(ins[0], ins[1])]
        if t == "Gemm":
            return [_gemm(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a).astype(ins[0].dtype)]
        if t in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"):
            axes = _axes(node, ins, a, opset)
            if not axes and a.get("noop_with_empty_axes", 0):
                return [ins[0]]
            fn = {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min,
                  "ReduceProd": np.prod}[t]
            ax = None if not axes else tuple(int(v) % ins[0].ndim for v in axes)
            return [np.asarray(fn(ins[0], axis=ax, keepdims=bool(a.get("keepdims", 1)))).astype(ins[0].dtype)]
        if t == "OneHot":
            idx, depth, values = np.asarray(ins[0]), int(np.asarray(ins[1]).reshape(-1)[0]), np.asarray(ins[2])
            _guard(list(idx.shape) + [depth])
            axis = int(a.get("axis", -1))
            oh = (np.expand_dims(idx % depth, -1) == np.arange(depth))
            oh = np.where(oh, values[1], values[0])
            return [np.moveaxis(oh, -1, axis if axis >= 0 else oh.ndim + axis)]
    from onnx.reference import ReferenceEvaluator

    if t in ("ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Pad"):
        raise ValueError(f"cannot fold {t}")
    feeds = {name: v for name, v in zip(node.input, ins) if name}
    return [np.asarray(v) for v in ReferenceEvaluator(node).run(None, feeds)]


# ---- elementwise expressions -------------------------------------------------------------------
_EXPR_FN: dict[str, Callable] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power,
    "sqrt": np.sqrt, "erf": _erf, "tanh": np.tanh, "neg": np.negative, "recip": np.reciprocal,
}
_EXPR_OPS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Sqrt": "sqrt", "Erf": "erf",
             "Tanh": "tanh", "Neg": "neg", "Reciprocal": "recip"}
X = ("x",)


def _ev(expr, x):
    if expr[0] == "x":
        return x
    if expr[0] == "c":
        return expr[1]
    return _EXPR_FN[expr[0]](*(_ev(e, x) for e in expr[1:]))


def _consts(expr) -> list[np.ndarray]:
    if expr[0] == "c":
        return [expr[1]]
    if expr[0] == "x":
        return []
    return [c for e in expr[1:] for c in _consts(e)]


def _probe(expr, xs, rank):
    x = np.asarray(xs, dtype=np.float64).reshape((-1,) + (1,) * rank)
    with np.errstate(all="ignore"):
        return np.asarray(_ev(expr, x), dtype=np.float64) * np.ones_like(x)


def _gelu_ref(x, approx):
    if approx == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


_GRID = np.linspace(-8, 8, 321)


def classify(expr, rank: int) -> tuple[str, Any]:
    """What an elementwise expression of x computes: ('gelu', approx), ('affine', (a, b)), or
    ('other', None). Constants are float32 in the graph, so matches are within 1e-5."""
    scalar = all(np.size(c) == 1 for c in _consts(expr))
    if scalar:
        y = _probe(expr, _GRID, 0).reshape(-1)
        for approx in ("erf", "tanh"):
            ref = _gelu_ref(_GRID, approx)
            if np.all(np.isfinite(y)) and np.max(np.abs(y - ref)) <= 1e-5 * (1 + np.max(np.abs(ref))):
                return "gelu", approx
    f0, f1 = _probe(expr, [0.0], rank)[0], _probe(expr, [1.0], rank)[0]
    a, b = f1 - f0, f0
    xs = np.array([-3.0, -0.5, 2.0, 7.5])
    y = _probe(expr, xs, rank)
    ref = a[None] * xs.reshape((-1,) + (1,) * a.ndim) + b[None]
    if np.all(np.isfinite(y)) and np.all(np.abs(y - ref) <= 1e-6 * (1 + np.abs(ref))):
        return "affine", (a, b)
    return "other", None


def _is_square(expr) -> bool:
    if not all(np.size(c) == 1 for c in _consts(expr)):
        return False
    xs = np.array([-3.0, -0.5, 0.0, 1.0, 2.5])
    y = _probe(expr, xs, 0).reshape(-1)
    return y.shape == xs.shape and bool(np.allclose(y, xs**2, rtol=1e-6, atol=1e-9))


def _as_rsqrt(expr) -> tuple[float, float] | None:
    """(eps, power) when expr(v) = (v + eps) ** power with power = +-1/2."""
    if not all(np.size(c) == 1 for c in _consts(expr)):
        return None
    vs = np.array([0.0, 0.25, 1.0, 4.0, 9.0])
    y = _probe(expr, vs, 0).reshape(-1)
    if y.shape != vs.shape or not np.all(np.isfinite(y)) or y[0] <= 0:
        return None
    for power in (0.5, -0.5):
        eps = y[0] ** (1 / power)
        if np.allclose(y, (vs + eps) ** power, rtol=1e-5, atol=0):
            return float(eps), power
    return None


def _strip_ones(shape) -> tuple[int, ...]:
    """The shape without its leading 1s."""
    shape = tuple(shape)
    return shape[next((i for i, d in enumerate(shape) if d != 1), len(shape)):]


# ---- the raiser --------------------------------------------------------------------------------
class _Raiser:
    def __init__(self, model, label: str, host_head: bool):
        self.model, self.label, self.host_head = model, label, host_head
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.meta_in = _metadata(model)
        self.ops: list[Op] = []
        self.by_name: dict[str, Op] = {}
        self.removed: set[str] = set()
        self.env: dict[str, Any] = {}
        self.node = None
        self.folded: set[str] = set()
        self.n_tasks = 1
        self.task_input: str | None = None
        self.gates: dict[str, Lab] = {}
        self.tensor_of: dict[str, str] = {}  # IR value -> the ONNX tensor it was raised at
        self._counter = 0

    # ---- errors ----
    def _label(self, node) -> str:
        name = node.name
        if isinstance(name, bytes):  # a name that is not valid UTF-8 comes back as bytes
            name = name.decode("utf-8", "replace")
        return name or f"#{self.index_of[id(node)]} -> {node.output[0] if node.output else '?'}"

    def fail(self, reason: str, node=None) -> UsageError:
        node = node or self.node
        if node is None:
            return UsageError(f"{self.label}: {reason}")
        return _Unsupported(f"{self.label}: cannot map {node.op_type} node '{self._label(node)}' onto the "
                            f"accelerator: {reason}")

    # ---- IR building ----
    def emit(self, kind: str, inputs: list[str], syms=(), attrs=None, params=None, shape=None) -> Op:
        for i in inputs:
            if i in self.removed:
                raise self.fail(f"value {i} was folded into an MoE gate but is used elsewhere")
        self._counter += 1
        nodes = set().union(*(s.nodes for s in syms if isinstance(s, Sym))) if syms else set()
        nodes.add(self._label(self.node))
        op = Op(kind, f"%{self._counter}", list(inputs), (), dict(attrs or {}), dict(params or {}),
                tuple(sorted(nodes)))
        ins = [self.shape_of(i) for i in inputs]
        op.shape = tuple(shape) if shape is not None else infer_shape(op, ins)
        self.ops.append(op)
        self.by_name[op.name] = op
        self.tensor_of[op.name] = self.node.output[0] if self.node is not None else ""
        return op

    def shape_of(self, value: str) -> tuple[int, ...]:
        if value == IMAGE:
            return tuple(self.image_shape)
        return tuple(self.by_name[value].shape)

    def view_of(self, op: Op, shape=None) -> View:
        return View(op.name, op.shape, shape if shape is not None else op.shape)

    def users(self, value: str) -> list[Op]:
        return [op for op in self.ops if value in op.inputs]

    # ---- main loop ----
    def run(self) -> IR:
        from onnx import numpy_helper

        graph = self.graph
        # One list of node objects for the whole run: ids stay valid as long as it holds them.
        self.nodes = list(graph.node)
        self.index_of = {id(n): i for i, n in enumerate(self.nodes)}
        for init in graph.initializer:
            self.env[init.name] = numpy_helper.to_array(init)
        self._inputs()
        live = self._live_nodes()
        remaining = Counter(i for n in live for i in n.input if i)
        for o in graph.output:
            remaining[o.name] += 1
        self._find_task_count(live)
        cut = None
        self.onnx_shape: dict[str, tuple] = {}  # IR value -> the ONNX shape it first appeared in
        self.processed: list = []
        for node in live:
            self.node = node
            self.processed.append(node)
            ins = [self.env[i] if i else None for i in node.input]
            try:
                outs = self._step(node, ins)
            except _Unsupported as exc:
                cut = self._head_cut(node, exc)
                break
            for name, value in zip(node.output, outs):
                if name:
                    self.env[name] = value
                    if isinstance(value, View) and value.src in self.by_name:
                        self.onnx_shape.setdefault(value.src, value.shape)
            for i in node.input:  # drop what no later node reads (index arrays can be large)
                if i:
                    remaining[i] -= 1
                    if remaining[i] == 0 and i not in self._initializers:
                        self.env.pop(i, None)
        if cut is None:
            name = graph.output[0].name
            self.node = self._producer_of(name)
            sym = self.env.get(name)
        else:
            name = self.tensor_of[cut.name]
            self.node = self._producer_of(name)
            sym = self.view_of(cut, self.onnx_shape.get(cut.name, cut.shape))
        self._finish_output(sym, name)
        return self._build_ir(live, None if cut is None else name)

    def _step(self, node, ins):
        t = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Unsupported(f"{self.label}: unsupported op {node.domain}.{node.op_type} (node "
                               f"'{self._label(node)}'): only the standard ONNX domain; {SUPPORTED}")
        if t == "Constant" or all(v is None or isinstance(v, np.ndarray) for v in ins):
            self.folded.add(self._label(node))
            try:
                return fold_node(node, ins, self.opset)
            except UsageError:
                raise
            except Exception as exc:
                raise self.fail(f"cannot evaluate it on its constant inputs ({_first_line(exc)})") from None
        if all(v is None or isinstance(v, (np.ndarray, TaskConst, TaskInput)) for v in ins):
            self.folded.add(self._label(node))
            return self._fold_per_task(node, ins)
        if t in ("Shape", "Size"):
            self.folded.add(self._label(node))
            return fold_node(node, [np.broadcast_to(np.float32(0), ins[0].shape)], self.opset)
        handler = getattr(self, f"_op_{t}", None)
        if handler is None:
            if any(isinstance(v, (TaskConst, TaskInput)) for v in ins):
                raise self.fail("task-dependent values may only select or bias the MoE gate")
            raise _Unsupported(f"{self.label}: unsupported op {t} (node '{self._label(node)}'); {SUPPORTED}")
        outs = handler(node, ins, _attrs(node))
        return outs if isinstance(outs, list) else [outs]

    def _fold_per_task(self, node, ins):
        """A node whose inputs depend only on the task id, evaluated for every task. Floats are
        evaluated in float64 (a Cast to a float type keeps float64): these values become
        parameters (the per-task gate bias), which the PyTorch path folds in float64 too, so both
        front ends quantize the same numbers."""
        per_task = []
        widen = node.op_type == "Cast" and _np_dtype(_attrs(node)["to"]) in (np.float16, np.float32, np.float64)
        for t in range(self.n_tasks):
            vals = []
            for v in ins:
                if isinstance(v, TaskInput):
                    vals.append(np.array(t, dtype=_np_dtype(self.task_dtype)).reshape(self.task_shape))
                elif isinstance(v, TaskConst):
                    vals.append(v.values[t])
                else:
                    vals.append(v)
            vals = [v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype in (np.float16, np.float32) else v
                    for v in vals]
            try:
                if widen:
                    per_task.append([np.asarray(vals[0]).astype(np.float64)])
                    continue
                per_task.append(fold_node(node, vals, self.opset))
            except UsageError:
                raise
            except Exception as exc:
                raise self.fail(f"cannot evaluate it for task {t} ({_first_line(exc)})") from None
        outs = []
        for j in range(len(per_task[0])):
            values = [np.asarray(p[j]) for p in per_task]
            same = all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values[1:])
            outs.append(values[0] if same else TaskConst(values))
        return outs

    # ---- inputs, liveness, tasks ----
    def _inputs(self):
        import onnx

        self._initializers = {i.name for i in self.graph.initializer}
        inputs = [i for i in self.graph.input if i.name not in self._initializers]
        image = None
        for vi in inputs:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                raise UsageError(f"{self.label}: input '{vi.name}' is not a tensor")
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            if tt.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
                if image is not None:
                    raise UsageError(f"{self.label}: two image inputs ('{image.name}', '{vi.name}'); "
                                     "the accelerator takes one image (and optionally a task id)")
                if not tt.HasField("shape") or len(dims) != 4:
                    raise UsageError(f"{self.label}: input '{vi.name}' must be an image N x C x H x W, got "
                                     f"{dims if tt.HasField('shape') else 'an unknown shape'}")
                symbolic = [str(d) for d in dims if not isinstance(d, int) or d <= 0]
                if symbolic:
                    raise UsageError(f"{self.label}: input '{vi.name}' has dynamic dimension(s) "
                                     f"{', '.join(symbolic)} (shape {dims}); the accelerator needs static shapes "
                                     "with batch 1: re-export with a fixed 1 x C x H x W input")
                if dims[0] != 1:
                    raise UsageError(f"{self.label}: input '{vi.name}' has batch {dims[0]}; the accelerator "
                                     "runs batch 1: re-export with a 1 x C x H x W input")
                image = vi
                self.image_shape = tuple(dims[1:])
                self.env[vi.name] = ImageSym(dims)
            elif tt.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                if self.task_input is not None:
                    raise UsageError(f"{self.label}: two integer inputs; only one task id is supported")
                if not tt.HasField("shape") or any(not isinstance(d, int) or d != 1 for d in dims):
                    raise UsageError(f"{self.label}: task input '{vi.name}' must be a scalar (or [1]), "
                                     f"got shape {dims}")
                self.task_input = vi.name
                self.task_shape = tuple(dims)
                self.task_dtype = tt.elem_type
                self.env[vi.name] = TaskInput()
            else:
                raise UsageError(f"{self.label}: input '{vi.name}' has element type "
                                 f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; expected a float image "
                                 "(and an int64 task id)")
        if image is None:
            raise UsageError(f"{self.label}: the graph has no float image input (N x C x H x W)")
        if len(self.graph.output) != 1:
            raise UsageError(f"{self.label}: the graph has {len(self.graph.output)} outputs; the accelerator "
                             "computes one (the backbone features or the classification logits)")

    def _live_nodes(self):
        """Nodes on some path to the output (the rest cannot change it and is dropped, counted in meta)."""
        producer = {o: n for n in self.nodes for o in n.output if o}
        live, stack = set(), [self.graph.output[0].name]
        while stack:
            n = producer.get(stack.pop())
            if n is None or id(n) in live:
                continue
            live.add(id(n))
            stack.extend(i for i in n.input if i)
        self.dead_nodes = [self._label(n) for n in self.nodes if id(n) not in live]
        return [n for n in self.nodes if id(n) in live]

    def _find_task_count(self, live):
        if self.task_input is None:
            return
        config = self.meta_in.get("config")
        if config:
            try:
                self.n_tasks = len(json.loads(config)["tasks"])
                return
            except (ValueError, KeyError, TypeError):
                pass
        # Otherwise read it off the graph: what indexes, compares or one-hots the task id.
        derived, consts = {self.task_input}, dict(self.env)
        found = []
        for node in live:
            if node.op_type == "Constant":
                try:
                    consts[node.output[0]] = fold_node(node, [], self.opset)[0]
                except Exception:
                    pass
            if not any(i in derived for i in node.input):
                continue
            if node.op_type == "Gather" and node.input[0] in consts and node.input[1] in derived:
                axis = _attrs(node).get("axis", 0)
                found.append(np.shape(consts[node.input[0]])[axis])
            elif node.op_type == "Equal":
                other = [i for i in node.input if i not in derived and i in consts]
                if other:
                    found.append(int(np.size(consts[other[0]])))
            elif node.op_type == "OneHot" and node.input[1] in consts:
                found.append(int(np.asarray(consts[node.input[1]]).reshape(-1)[0]))
            if node.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Cast", "Gather", "Identity", "Equal",
                                "OneHot", "Flatten"):
                derived.update(o for o in node.output if o)
        if not found:
            raise UsageError(f"{self.label}: cannot tell how many tasks the input '{self.task_input}' selects "
                             "(no Gather, Equal or OneHot on it)")
        self.n_tasks = int(min(found))

    # ---- materialisation ----
    def plain(self, sym) -> str:
        """The IR value a tensor stands for, emitting scale/select/gelu ops where needed."""
        if isinstance(sym, Elem):
            sym = self.settle(sym)
        if isinstance(sym, View):
            if sym.plain is not None:
                return sym.plain
            rows, cols = self.rows_cols(sym)
            if rows is None or sym.shape[-1] != len(cols) or not np.array_equal(rows, np.arange(sym.src_shape[0])):
                raise self.fail(f"{sym.describe()} is a rearrangement of tokens that no accelerator op "
                                "produces (only head splits and channel selections are supported)")
            value = sym.src
            if not np.array_equal(cols, np.arange(sym.src_shape[1])):
                value = self.emit("select", [value], [sym], {"cols": cols.tolist()}).name
            if sym.factor != 1.0:
                value = self.emit("scale", [value], [sym], params={"s": np.array(sym.factor)}).name
            elif value == sym.src and sym.nodes:
                # A pure relayout: its nodes still need an owner, so record them on the producer.
                self._credit(value, sym.nodes)
            sym.plain = value
            return value
        if isinstance(sym, ImageSym):
            raise self.fail("the image feeds an op other than the patch-embedding Conv")
        raise self.fail(f"its input is {sym.describe()}, which the accelerator cannot use here")

    def _credit(self, value: str, nodes) -> None:
        op = self.by_name.get(value)
        if op is not None:
            op.source = tuple(sorted(set(op.source) | set(nodes)))

    def rows_cols(self, view: View):
        """(rows, cols) when the view is src[rows][:, cols] laid out as [..., len(rows), len(cols)]."""
        if view.identity:
            r, c = view.src_shape
            if view.shape[-1:] == (c,) and int(np.prod(view.shape[:-1])) == r:
                return np.arange(r), np.arange(c)
        if not view.shape:
            return None, None
        c_src = view.src_shape[1]
        idx2 = view.idx.reshape(-1, view.shape[-1])
        rows, cols = idx2[:, 0] // c_src, idx2[0] % c_src
        if not np.array_equal(idx2, rows[:, None] * c_src + cols[None, :]):
            return None, None
        return rows, cols

    def settle(self, sym):
        """Turn a finished elementwise expression into IR ops (or into a scale of its base)."""
        if not isinstance(sym, Elem):
            return sym
        if sym.settled is None:
            sym.settled = self._settle(sym)
        return sym.settled

    def _settle(self, sym: Elem):
        base, rank = sym.base, len(sym.shape)
        kind, value = classify(sym.expr, rank)
        if isinstance(base, View):
            if kind == "gelu":
                op = self.emit("gelu", [self.plain(base)], [base, sym], {"approx": value})
                return self.view_of(op, sym.shape)
            if kind == "affine":
                a, b = value
                v = self.expand_view(base, sym.shape)
                if a.size == 1:
                    v = base.scaled(float(a.reshape(-1)[0]), sym.nodes)
                else:
                    v = self.scale_view(base, a, sym)
                if np.any(b != 0):
                    v = self.add_const(v, b, sym)
                return v
        elif isinstance(base, Lab) and base.kind == "experts":
            if kind == "gelu" and base.data["stage"] == "h" and base.data["approx"] is None:
                return Lab("experts", base.labels, base.shape, dict(base.data, approx=value), base.nodes | sym.nodes)
        elif isinstance(base, Lab) and base.kind == "scores":
            if kind == "affine" and value[0].size == 1 and not np.any(value[1]):
                return Lab("scores", base.labels, base.shape,
                           dict(base.data, scale=base.data["scale"] * float(value[0].reshape(-1)[0])),
                           base.nodes | sym.nodes)
        elif isinstance(base, Stat) and base.kind == "normalized":
            if kind == "affine":
                d = self.shape_of(base.x)[1]
                gamma, beta = (np.broadcast_to(v, np.broadcast_shapes(v.shape, (d,))) for v in value)
                if gamma.shape != (d,) and gamma.reshape(-1, d).shape[0] != 1 or \
                        beta.shape != (d,) and beta.reshape(-1, d).shape[0] != 1:
                    raise self.fail("the LayerNorm scale or shift varies across tokens")
                op = self.emit("layernorm", [base.x], [base, sym], {"eps": base.eps},
                               {"gamma": gamma.reshape(-1, d)[0].copy(), "beta": beta.reshape(-1, d)[0].copy()})
                return self.view_of(op, sym.shape)
        ops = sorted({n for n in sym.nodes})
        raise self.fail(f"the elementwise function of {base.describe()} computed by nodes {', '.join(ops[:6])} "
                        "is not GELU (erf or tanh form), a constant scale/shift, or a LayerNorm")

    def expand_view(self, view: View, shape) -> View:
        """The view in a broadcast shape that only adds leading 1s (a [T, D] tensor read as [1, T, D])."""
        shape = tuple(int(s) for s in shape)
        if shape == view.shape:
            return view
        if _strip_ones(shape) != _strip_ones(view.shape):
            raise self.fail(f"broadcasting {view.describe()} to {list(shape)} would copy it")
        return view.moved(view.idx.reshape(shape), frozenset())

    def scale_view(self, view: View, s: np.ndarray, owner) -> View:
        view, s = self.per_channel(view, s, "scale")
        op = self.emit("scale", [self.plain(view)], [view, owner], params={"s": s})
        return self.view_of(op, view.shape)

    def add_const(self, view: View, c: np.ndarray, owner) -> View:
        view, c = self.per_channel(view, c, "bias")
        op = self.emit("add", [self.plain(view)], [view, owner], params={"bias": c})
        return self.view_of(op, view.shape)

    def per_channel(self, view: View, c: np.ndarray, what: str) -> tuple[View, np.ndarray]:
        """A constant broadcast onto a token tensor, as [C] (or [T, C] when it varies by token); the
        view comes back in the broadcast shape."""
        c = np.asarray(c, dtype=np.float64)
        try:
            view = self.expand_view(view, np.broadcast_shapes(c.shape, view.shape))
        except ValueError:
            raise self.fail(f"a {what} of shape {list(c.shape)} does not broadcast onto {view.describe()}") from None
        rows, cols = self.rows_cols(view)
        if rows is None:
            raise self.fail(f"{view.describe()} is not a token-major tensor")
        full = np.broadcast_to(c, view.shape).reshape(len(rows), len(cols))
        return view, (full[0].copy() if np.all(full == full[:1]) else full.copy())

    def nodes_here(self) -> frozenset:
        return frozenset([self._label(self.node)])

    # ---- layout ops ----
    def _layout(self, node, ins, a):
        x = ins[0]
        if isinstance(x, Elem):
            x = self.settle(x)
        if any(isinstance(v, Sym) for v in ins[1:]):
            raise self.fail("its shape/index inputs are not constants")
        if isinstance(x, View):
            outs = _move(node.op_type, node, [x.idx] + ins[1:], a, self.opset)
            return [x.moved(o, self.nodes_here()) for o in outs]
        if isinstance(x, ImageSym) and node.op_type in ("Identity", "Dropout"):
            return [x]
        if isinstance(x, Lab):
            return [self.lab_move(x, node, ins, a)]
        if isinstance(x, Cls) and node.op_type in ("Identity", "Dropout", "Reshape", "Squeeze", "Unsqueeze",
                                                   "Flatten"):
            shape = _move(node.op_type, node, [np.zeros(x.shape, np.int8)] + ins[1:], a, self.opset)[0].shape
            if int(np.prod(shape)) != int(np.prod(x.shape)):
                raise self.fail("it changes the size of the CLS token")
            return [Cls(x.src, x.dim, shape, x.ln, x.nodes | self.nodes_here())]
        raise self.fail(f"it rearranges {x.describe()}, which is supported only through this op's pattern")

    _op_Reshape = _op_Transpose = _op_Squeeze = _op_Unsqueeze = _op_Flatten = _layout
    _op_Identity = _op_Dropout = _op_Slice = _op_Split = _op_Expand = _op_Tile = _op_Gather = _layout

    def as_cls(self, sym):
        """A view that holds only token 0 (all its channels) is the CLS token."""
        if isinstance(sym, View) and sym.factor == 1.0 and sym.src_shape[0] > 1:
            rows, cols = self.rows_cols(sym)
            if rows is not None and len(rows) == 1 and rows[0] == 0 and \
                    np.array_equal(cols, np.arange(sym.src_shape[1])):
                return Cls(sym.src, sym.src_shape[1], sym.shape, None, sym.nodes)
        return sym

    def _op_Cast(self, node, ins, a):
        import onnx

        if a.get("to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            raise self.fail("only casts between float types are supported on activations")
        x = self.settle(ins[0])
        if isinstance(x, View):
            return View(x.src, x.src_shape, x.shape, x._idx, x.factor, x.nodes | self.nodes_here())
        if isinstance(x, ImageSym):
            return ImageSym(x.shape, x.nodes | self.nodes_here())
        if isinstance(x, Lab):
            return x.relabel(x.labels, x.shape, self.nodes_here())
        raise self.fail(f"a cast of {x.describe()}")

    def lab_move(self, x: Lab, node, ins, a) -> Lab:
        t, nodes = node.op_type, self.nodes_here()
        labels, shape = list(x.labels), list(x.shape)
        if t in ("Identity", "Dropout"):
            return x.relabel(labels, shape, nodes)
        if t == "Transpose":
            perm = [int(p) for p in a.get("perm", list(range(len(labels)))[::-1])]
            return x.relabel([labels[p] for p in perm], [shape[p] for p in perm], nodes)
        if t in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
            new_shape = list(_move(t, node, [np.zeros(shape, np.int8)] + ins[1:], a, self.opset)[0].shape)
            old = [(lb, s) for lb, s in zip(labels, shape) if s != 1]
            new = [s for s in new_shape if s != 1]
            if [s for _, s in old] != new:
                if x.kind in ("scores", "probs") and new_shape[-2:] == shape[-2:]:
                    # merging or splitting the leading (batch, head) axes keeps heads in order
                    lead = [f"b{i}" for i in range(len(new_shape) - 2)]
                    return x.relabel(lead + labels[-2:], new_shape, nodes)
                raise self.fail(f"it reshapes {x.describe()} {shape} -> {new_shape}, which mixes its axes")
            it = iter(lb for lb, _ in old)
            return x.relabel([next(it) if s != 1 else "1" for s in new_shape], new_shape, nodes)
        raise self.fail(f"it rearranges {x.describe()}, which is supported only through this op's pattern")

    # ---- Concat: CLS token ----
    def _op_Concat(self, node, ins, a):
        axis = int(a["axis"])
        vals = [self.settle(v) for v in ins]
        if all(isinstance(v, View) for v in vals) and len({(v.src, v.factor) for v in vals}) == 1:
            idx = np.concatenate([v.idx for v in vals], axis=axis)
            return View(vals[0].src, vals[0].src_shape, idx.shape, idx, vals[0].factor,
                        frozenset().union(*(v.nodes for v in vals)) | self.nodes_here())
        if len(vals) == 2 and isinstance(vals[0], np.ndarray) and isinstance(vals[1], View):
            cls, x = vals
            ax = axis % len(x.shape)
            rows, cols = self.rows_cols(x)
            if rows is None or ax != len(x.shape) - 2 or cls.shape[ax] != 1 or \
                    cls.shape[:ax] + cls.shape[ax + 1:] != x.shape[:ax] + x.shape[ax + 1:]:
                raise self.fail("only a constant CLS token prepended along the token axis is supported")
            value = self.plain(x)
            op = self.emit("embed", [value], [x], params={"cls": cls.reshape(-1).copy()})
            shape = list(x.shape)
            shape[ax] += 1
            return self.view_of(op, tuple(shape))
        raise self.fail("only a constant CLS token prepended to the patch tokens, or a re-join of pieces of "
                        "one tensor, is supported")

    # ---- elementwise ----
    def _expr_of(self, sym):
        if isinstance(sym, np.ndarray):
            return ("c", sym.astype(np.float64))
        if isinstance(sym, Elem):
            return sym.expr
        if isinstance(sym, View) and sym.factor != 1.0:
            return ("mul", X, ("c", np.array(sym.factor)))
        return X

    def _base(self, sym):
        if isinstance(sym, Elem):
            return sym.base
        if isinstance(sym, View) and sym.factor != 1.0:
            return View(sym.src, sym.src_shape, sym.shape, sym._idx, 1.0, sym.nodes)
        return sym

    def _key(self, sym):
        base = self._base(sym)
        return base.key() if hasattr(base, "key") else ("id", id(base))

    def _elem(self, node, ins, name: str):
        """Extend (or start) an elementwise expression over the one dynamic tensor among ins."""
        dyn = [v for v in ins if isinstance(v, Sym)]
        base = self._base(dyn[0])
        exprs = [self._expr_of(v) for v in ins]
        shape = np.broadcast_shapes(*[np.shape(v) if isinstance(v, np.ndarray) else v.shape for v in ins])
        nodes = frozenset().union(*(v.nodes for v in dyn)) | self.nodes_here()
        return Elem(base, (name, *exprs), shape, nodes)

    def _binary(self, node, ins, a):
        t = node.op_type
        x, y = ins[0], ins[1]
        if isinstance(x, (TaskConst, TaskInput)) or isinstance(y, (TaskConst, TaskInput)):
            return self._task_binary(node, x, y)
        dx, dy = isinstance(x, Sym), isinstance(y, Sym)
        if dx and dy:
            return self._two_dynamic(node, x, y)
        d, c = (x, y) if dx else (y, x)
        c = np.asarray(c)
        if isinstance(d, View):
            if t in ("Add", "Sub") and not (t == "Sub" and dy):
                return self.add_const(d, c if t == "Add" else -c, d)
            if t == "Mul" or (t == "Div" and dx):
                f = c if t == "Mul" else 1.0 / c.astype(np.float64)
                if np.size(f) == 1:
                    return d.scaled(float(np.asarray(f).reshape(-1)[0]), self.nodes_here())
                return self.scale_view(d, f, d)
        if isinstance(d, Lab) and t == "Add":
            if d.kind == "experts":
                return self._expert_bias(d, c)
            if d.kind == "gate":
                return self._gate_bias(d, [c] * self.n_tasks)
        if isinstance(d, Lab) and d.kind not in ("experts", "scores"):
            raise self.fail(f"arithmetic on {d.describe()} is not part of a supported MoE pattern")
        return self._elem(node, ins, _EXPR_OPS[t])

    _op_Add = _op_Sub = _op_Mul = _op_Div = _op_Pow = _binary

    def _unary(self, node, ins, a):
        x = ins[0]
        if isinstance(x, View) and node.op_type == "Neg":
            return x.scaled(-1.0, self.nodes_here())
        if isinstance(x, Lab) and x.kind not in ("experts", "scores"):
            raise self.fail(f"arithmetic on {x.describe()} is not part of a supported MoE pattern")
        return self._elem(node, ins, _EXPR_OPS[node.op_type])

    _op_Erf = _op_Tanh = _op_Sqrt = _op_Neg = _op_Reciprocal = _unary

    def _op_Gelu(self, node, ins, a):
        approx = "tanh" if a.get("approximate", "none") == "tanh" else "erf"
        x = self.settle(ins[0])
        if isinstance(x, Lab) and x.kind == "experts" and x.data["stage"] == "h" and x.data["approx"] is None:
            return Lab("experts", x.labels, x.shape, dict(x.data, approx=approx), x.nodes | self.nodes_here())
        if not isinstance(x, View):
            raise self.fail(f"GELU of {x.describe()}")
        op = self.emit("gelu", [self.plain(x)], [x], {"approx": approx})
        return self.view_of(op, x.shape)

    def _two_dynamic(self, node, x, y):
        t = node.op_type
        kx, ky = self._key(x), self._key(y)
        if kx == ky and not (isinstance(x, Stat) or isinstance(y, Stat)):
            return self._elem(node, [x, y], _EXPR_OPS[t])
        sx, sy = (x.base if isinstance(x, Elem) else x), (y.base if isinstance(y, Elem) else y)
        if isinstance(sx, Stat) and isinstance(sy, Stat) and kx == ky:
            return self._elem(node, [x, y], _EXPR_OPS[t])
        # LayerNorm decomposition: x - mean(x); centered / sqrt(var + eps) or centered * rsqrt(...)
        if t == "Sub" and isinstance(y, Stat) and y.kind == "mean" and isinstance(self.settle(x), View):
            xv = self.plain(x)
            if xv != y.x:
                raise self.fail("it subtracts the mean of a different tensor")
            return Stat("centered", xv, np.broadcast_shapes(x.shape, y.shape), x.nodes | y.nodes | self.nodes_here())
        if t in ("Div", "Mul"):
            cen, den = (x, y) if isinstance(x, Stat) and x.kind == "centered" else (y, x) if t == "Mul" else (None, None)
            if isinstance(cen, Stat) and cen.kind == "centered" and isinstance(den, (Stat, Elem)):
                base = den.base if isinstance(den, Elem) else den
                if isinstance(base, Stat) and base.kind == "var" and base.x == cen.x:
                    fit = _as_rsqrt(den.expr if isinstance(den, Elem) else X)
                    want = 0.5 if t == "Div" else -0.5
                    if fit is not None and fit[1] == want:
                        return Stat("normalized", cen.x, np.broadcast_shapes(cen.shape, den.shape),
                                    cen.nodes | den.nodes | self.nodes_here(), eps=fit[0])
                raise self.fail("it divides the centered tensor by something other than sqrt(var + eps)")
        if t == "Mul" and isinstance(x, Lab) and isinstance(y, Lab):
            return self._lab_mul(x, y)
        if t == "Add":
            x, y = self.settle(x), self.settle(y)
            if isinstance(x, View) and isinstance(y, View):
                try:
                    shape = np.broadcast_shapes(x.shape, y.shape)
                except ValueError:
                    raise self.fail(f"it adds tensors of shapes {list(x.shape)} and {list(y.shape)}") from None
                x, y = self.expand_view(x, shape), self.expand_view(y, shape)
                a_, b_ = self.plain(x), self.plain(y)
                op = self.emit("add", [a_, b_], [x, y])
                return self.view_of(op, x.shape)
        raise self.fail(f"it combines {x.describe()} with {y.describe()}; of two computed tensors only a "
                        "residual Add, attention and MoE products, and LayerNorm statistics are supported")

    def _task_binary(self, node, x, y):
        t = node.op_type
        dyn = x if isinstance(x, Sym) else y
        tc = y if dyn is x else x
        if t == "Add" and isinstance(tc, TaskConst):
            if isinstance(dyn, View):
                dyn = self.gate_from(dyn)
            if isinstance(dyn, Lab) and dyn.kind == "gate":
                return self._gate_bias(dyn, tc.values)
        raise self.fail("task-dependent values may only select or bias the MoE gate")

    # ---- reductions: LayerNorm statistics, MoE sums ----
    def _op_ReduceMean(self, node, ins, a):
        x = ins[0]
        axes = _axes(node, ins, a, self.opset)
        rank = len(x.shape)
        if axes is None or [ax % rank for ax in axes] != [rank - 1] or not a.get("keepdims", 1):
            raise self.fail("only a mean over the last axis with keepdims (a LayerNorm statistic) is supported")
        base = x.base if isinstance(x, Elem) else x
        if isinstance(base, Stat) and base.kind == "centered":
            if isinstance(x, Elem) and _is_square(x.expr):
                return Stat("var", base.x, x.shape, x.nodes | self.nodes_here())
            raise self.fail("the mean of the centered tensor is not its square (a variance)")
        x = self.settle(x)
        if isinstance(x, View):
            return Stat("mean", self.plain(x), x.shape[:-1] + (1,), x.nodes | self.nodes_here())
        raise self.fail(f"a mean of {x.describe()}")

    def _op_ReduceSum(self, node, ins, a):
        x = ins[0]
        axes = _axes(node, ins, a, self.opset)
        if not isinstance(x, Lab) or axes is None or len(axes) != 1:
            raise self.fail("only the sum over experts (or top-k slots) of an MoE combine is supported")
        ax = axes[0] % len(x.shape)
        keep = a.get("keepdims", 1)
        labels = list(x.labels)
        shape = list(x.shape)
        if x.kind == "combine_k" and labels[ax] == "k":
            kind = "combine"
        elif x.kind == "weighted" and labels[ax] == "n":
            kind = "moe"
        else:
            raise self.fail(f"a sum over axis '{labels[ax]}' of {x.describe()}")
        if keep:
            labels[ax], shape[ax] = "1", 1
        else:
            del labels[ax], shape[ax]
        if kind == "combine":
            return Lab("combine", labels, shape, x.data, x.nodes | self.nodes_here())
        return self._emit_moe(x.data["combine"], x.data["experts"], labels, shape, x.nodes)

    # ---- LayerNormalization ----
    def _op_LayerNormalization(self, node, ins, a):
        x = self.as_cls(self.settle(ins[0]))
        rank = len(x.shape)
        if int(a.get("axis", -1)) % rank != rank - 1:
            raise self.fail("only normalisation over the last (channel) axis is supported")
        if len(node.output) > 1 and any(node.output[1:]):
            raise self.fail("the mean / inverse-std outputs (training mode) are not supported")
        eps = float(a.get("epsilon", 1e-5))
        d = x.shape[-1]
        gamma = np.asarray(ins[1], dtype=np.float64) if isinstance(ins[1], np.ndarray) else None
        beta = np.asarray(ins[2], dtype=np.float64) if len(ins) > 2 and isinstance(ins[2], np.ndarray) else np.zeros(d)
        if gamma is None or (len(ins) > 2 and ins[2] is not None and not isinstance(ins[2], np.ndarray)):
            raise self.fail("its scale and bias must be constants")
        gamma, beta = np.broadcast_to(gamma, (d,)).copy(), np.broadcast_to(beta, (d,)).copy()
        if isinstance(x, Cls):
            if x.ln is not None:
                raise self.fail("two LayerNorms on the CLS token")
            return Cls(x.src, x.dim, x.shape, (gamma, beta, eps), x.nodes | self.nodes_here())
        if not isinstance(x, View):
            raise self.fail(f"LayerNorm of {x.describe()}")
        op = self.emit("layernorm", [self.plain(x)], [x], {"eps": eps}, {"gamma": gamma, "beta": beta})
        return self.view_of(op, x.shape)

    # ---- Conv: patch embedding ----
    def _op_Conv(self, node, ins, a):
        x, w = ins[0], ins[1]
        b = ins[2] if len(ins) > 2 else None
        if not isinstance(x, ImageSym):
            raise self.fail("only the patch-embedding Conv on the input image runs on the accelerator "
                            "(a convolution after the backbone belongs to a dense-prediction head)")
        if not isinstance(w, np.ndarray) or (b is not None and not isinstance(b, np.ndarray)):
            raise self.fail("its weight and bias must be constants")
        d, c, kh, kw = w.shape
        strides = list(a.get("strides", [1, 1]))
        if kh != kw or strides != [kh, kw] or any(a.get("pads", [0] * 4)) or a.get("group", 1) != 1 or \
                any(v != 1 for v in a.get("dilations", [1, 1])) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise self.fail(f"only a square kernel = stride patch embedding without padding, groups or dilation "
                            f"is supported (kernel {kh}x{kw}, strides {strides})")
        _, cin, h, wd = x.shape
        if cin != c or h % kh or wd % kh:
            raise self.fail(f"image {list(x.shape)} does not split into {kh}x{kh} patches of {c} channels")
        params = {"w": np.ascontiguousarray(w.reshape(d, c * kh * kw).T)}
        if b is not None:
            params["b"] = np.asarray(b, np.float64).reshape(d)
        op = self.emit("patch_embed", [IMAGE], [x], {"patch": kh}, params)
        gh, gw = h // kh, wd // kh
        # The Conv output [1, D, gh, gw] as a view of the [gh*gw, D] token matrix.
        idx = (np.arange(gh * gw).reshape(1, 1, gh, gw) * d + np.arange(d).reshape(1, d, 1, 1)).astype(np.int64)
        return View(op.name, op.shape, idx.shape, idx)

    # ---- linear layers ----
    def _op_Gemm(self, node, ins, a):
        x, w = self.settle(ins[0]), ins[1]
        c = ins[2] if len(ins) > 2 else None
        if a.get("transA", 0) or not isinstance(w, np.ndarray) or (c is not None and not isinstance(c, np.ndarray)):
            raise self.fail("only Gemm(activation, constant weight[, constant bias]) without transA is supported")
        weight = np.ascontiguousarray(w.T if a.get("transB", 0) else w)
        if a.get("alpha", 1.0) != 1.0:
            weight = a["alpha"] * weight.astype(np.float64)
        bias = None if c is None else a.get("beta", 1.0) * np.asarray(c, np.float64)
        return self._linear(x, weight, bias)

    def _op_MatMul(self, node, ins, a):
        x, y = self.settle(ins[0]), self.settle(ins[1])
        if isinstance(x, (View, Cls)) and isinstance(y, np.ndarray):
            if y.ndim == 2:
                return self._linear(x, y, None)
            if y.ndim >= 3 and isinstance(x, View):
                return self._experts_fc1(x, y)
        if isinstance(x, View) and isinstance(y, TaskConst):
            return self._gate_matmul(x, y)
        if isinstance(x, View) and isinstance(y, View):
            return self._scores(x, y)
        if isinstance(x, Lab) and x.kind == "probs" and isinstance(y, View):
            return self._attention(x, y)
        if isinstance(x, Lab) and x.kind == "experts" and isinstance(y, np.ndarray):
            return self._experts_fc2(x, y)
        if isinstance(x, Lab) and isinstance(y, Lab) and {x.kind, y.kind} == {"combine", "experts"}:
            return self._combine_matmul(x, y)
        what = lambda v: "a constant" if isinstance(v, np.ndarray) else "task-dependent constants" \
            if isinstance(v, TaskConst) else v.describe()
        raise self.fail(f"a product of {what(x)} and {what(y)} is not a linear layer, attention or MoE pattern")

    def _linear(self, x, w: np.ndarray, bias):
        if w.ndim != 2:
            raise self.fail(f"the weight has shape {list(w.shape)}; a linear layer needs a matrix")
        if isinstance(x, Cls):
            return self._cls_head(x, w, bias)
        if not isinstance(x, View):
            raise self.fail(f"a linear layer on {x.describe()}")
        rows, cols = self.rows_cols(x)
        if rows is None or x.shape[-1] != w.shape[0]:
            raise self.fail(f"its input {list(x.shape)} is not a token-major tensor with {w.shape[0]} channels")
        if len(rows) == 1 and rows[0] == 0 and x.src_shape[0] > 1:
            cls = Cls(x.src, x.src_shape[1], x.shape, None, x.nodes)
            return self._cls_head(cls, self._scaled(self._gather_weight(w, cols, x.src_shape[1]), x.factor), bias)
        if not np.array_equal(rows, np.arange(x.src_shape[0])):
            raise self.fail(f"{x.describe()} selects or reorders tokens before a linear layer")
        weight = self._scaled(self._gather_weight(w, cols, x.src_shape[1]), x.factor)
        params = {"w": weight}
        if bias is not None:
            params["b"] = self._bias_vector(bias, w.shape[1])
        op = self.emit("linear", [x.src], [x], {"gelu": False, "approx": "erf"}, params)
        return self.view_of(op, x.shape[:-1] + (w.shape[1],))

    def _bias_vector(self, bias, out: int) -> np.ndarray:
        b = np.asarray(bias, np.float64).reshape(-1)
        if b.size not in (1, out):
            raise self.fail(f"its bias {list(np.shape(bias))} is not one value per output channel")
        return np.broadcast_to(b, (out,)).copy()

    @staticmethod
    def _gather_weight(w, cols, n_src):
        """x[:, cols] @ w == x @ w_full: a channel selection folds into the weight's rows."""
        if len(cols) == n_src and np.array_equal(cols, np.arange(n_src)):
            return w
        full = np.zeros((n_src, w.shape[1]))
        np.add.at(full, cols, w)
        return full

    def _cls_head(self, x: Cls, w, bias):
        if x.dim != w.shape[0]:
            raise self.fail(f"the head weight {list(w.shape)} does not take {x.dim} channels")
        params = {"w": w}
        attrs = {}
        if x.ln is not None:
            params["ln_gamma"], params["ln_beta"] = x.ln[0], x.ln[1]
            attrs["ln_eps"] = x.ln[2]
        if bias is not None:
            params["b"] = self._bias_vector(bias, w.shape[1])
        op = self.emit("cls_head", [x.src], [x], attrs, params)
        return self.view_of(op, x.shape[:-1] + (w.shape[1],))

    # ---- attention ----
    def _head_view(self, v: View, transposed: bool):
        """(cols [H, dh], batch shape) when v is [batch..., T, dh] (or [..., dh, T]) of one source."""
        if len(v.shape) < 2:
            return None
        t_ax, c_ax = (-1, -2) if transposed else (-2, -1)
        batch = v.shape[:-2]
        H = int(np.prod(batch))
        idx = v.idx.reshape(H, v.shape[-2], v.shape[-1])
        if transposed:
            idx = idx.transpose(0, 2, 1)
        c_src = v.src_shape[1]
        rows, cols = idx // c_src, idx % c_src
        T = v.src_shape[0]
        if idx.shape[1] != T or not np.array_equal(rows, np.broadcast_to(np.arange(T)[None, :, None], rows.shape)):
            return None
        if not np.array_equal(cols, np.broadcast_to(cols[:, :1, :], cols.shape)):
            return None
        return cols[:, 0, :], batch

    def _scores(self, q: View, k: View):
        hq, hk = self._head_view(q, False), self._head_view(k, True)
        if hq is None or hk is None:
            raise self.fail("it multiplies two token tensors that are not per-head queries and transposed keys "
                            "over all tokens")
        (cq, bq), (ck, bk) = hq, hk
        if bq != bk or cq.shape != ck.shape:
            raise self.fail(f"queries {list(q.shape)} and keys {list(k.shape)} do not pair head by head")
        labels = tuple(f"b{i}" for i in range(len(bq))) + ("q", "k")
        data = {"q": (q, cq), "k": (k, ck), "scale": q.factor * k.factor}
        return Lab("scores", labels, q.shape[:-1] + (k.shape[-1],), data, q.nodes | k.nodes | self.nodes_here())

    def _op_Softmax(self, node, ins, a):
        x = self.settle(ins[0])
        rank = len(x.shape)
        axis = int(a.get("axis", -1 if self.opset >= 13 else 1)) % rank
        if axis != rank - 1:
            raise self.fail("only a softmax over the last axis is supported")
        if isinstance(x, Lab) and x.kind == "scores":
            return Lab("probs", x.labels, x.shape, x.data, x.nodes | self.nodes_here())
        if isinstance(x, View):
            x = self.gate_from(x)
        if isinstance(x, Lab) and x.kind == "gate":
            return Lab("gate_probs", x.labels, x.shape, x.data, x.nodes | self.nodes_here())
        raise self.fail(f"a softmax of {x.describe()}; supported: attention scores and MoE gate logits "
                        "(top-k weights are not renormalised)")

    def _attention(self, probs: Lab, v: View):
        hv = self._head_view(v, False)
        q, cq = probs.data["q"]
        k, ck = probs.data["k"]
        if hv is None or hv[0].shape != cq.shape or tuple(hv[1]) != tuple(probs.shape[:-2]):
            raise self.fail("the values are not per-head token tensors that pair with the attention heads")
        cv = hv[0]
        H, dh = cq.shape
        D = H * dh
        srcs = [(q, cq), (k, ck), (v, cv)]
        nodes = [q, k, v, probs]
        if len({s.src for s, _ in srcs}) == 1 and q.src_shape[1] == 3 * D and all(
                np.array_equal(c.reshape(-1), j * D + np.arange(D)) for j, (_, c) in enumerate(srcs)):
            inputs = [q.src]
        else:
            inputs = []
            for s, c in srcs:
                if np.array_equal(c.reshape(-1), np.arange(s.src_shape[1])):
                    inputs.append(s.src)
                else:
                    inputs.append(self.emit("select", [s.src], [s], {"cols": c.reshape(-1).tolist()}).name)
        op = self.emit("attention", inputs, nodes,
                       {"heads": H, "head_dim": dh, "scale": float(probs.data["scale"])})
        T = q.src_shape[0]
        batch = probs.shape[:-2]
        idx = (np.arange(T)[None, :, None] * D + (np.arange(H) * dh)[:, None, None]
               + np.arange(dh)[None, None, :]).reshape(tuple(batch) + (T, dh))
        return View(op.name, op.shape, idx.shape, idx, v.factor)

    # ---- MoE ----
    def gate_from(self, view: View) -> Lab:
        """MoE gate logits: the linear (+ constant bias) chain that produced `view`, taken out of the IR."""
        if not isinstance(view, View):
            raise self.fail(f"MoE routing on {view.describe()}")
        if view.factor != 1.0 or not view.identity:
            raise self.fail("MoE routing on a rearranged or scaled tensor")
        if view.src in self.gates:
            return self.gates[view.src]
        chain, bias, op = [], 0.0, self.by_name.get(view.src)
        while op is not None and op.is_bias_add:
            chain.append(op)
            bias = bias + op.params["bias"]
            op = self.by_name.get(op.inputs[0])
        if op is None or op.kind != "linear" or op.attrs.get("gelu"):
            raise self.fail("MoE routing on a tensor that is not a gate projection (a constant matrix product)")
        chain.append(op)
        bias = bias + op.params.get("b", 0.0)
        for c in chain:
            if any(u not in chain for u in self.users(c.name)):
                raise self.fail(f"the MoE gate projection {c.name} is also used outside the MoE")
        n = op.shape[1]
        b = np.broadcast_to(np.asarray(bias, np.float64), (n,)).copy() if np.ndim(bias) <= 1 else None
        if b is None:
            raise self.fail("the MoE gate bias varies across tokens")
        for c in chain:
            self.ops.remove(c)
            self.removed.add(c.name)
        nodes = frozenset().union(*(c.source for c in chain)) | view.nodes
        data = {"x": op.inputs[0], "w": [op.params["w"]], "b": [b] if np.any(b) else None}
        lab = Lab("gate", ["1"] * (len(view.shape) - 2) + ["t", "n"], view.shape, data, nodes)
        self.gates[view.src] = lab
        return lab

    def _gate_matmul(self, x: View, w: TaskConst) -> Lab:
        if any(v.ndim != 2 for v in w.values):
            raise self.fail("per-task gate weights must be one matrix per task")
        rows, cols = self.rows_cols(x)
        if rows is None or not np.array_equal(rows, np.arange(x.src_shape[0])):
            raise self.fail(f"{x.describe()} is not the MoE input tokens")
        ws = [self._scaled(self._gather_weight(v, cols, x.src_shape[1]), x.factor) for v in w.values]
        data = {"x": x.src, "w": ws, "b": None}
        shape = x.shape[:-1] + (ws[0].shape[1],)
        return Lab("gate", ["1"] * (len(shape) - 2) + ["t", "n"], shape, data, x.nodes | self.nodes_here())

    def _gate_bias(self, gate: Lab, biases: list) -> Lab:
        n = gate.shape[-1]
        for b in biases:
            if np.size(b) not in (1, n) or len(np.shape(b)) > len(gate.shape) or \
                    np.broadcast_shapes(np.shape(b), gate.shape) != gate.shape:
                raise self.fail(f"the MoE gate bias {list(np.shape(b))} is not one value per expert")
        bs = [np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (n,)) for b in biases]
        old = gate.data["b"] or [np.zeros(n)]
        if len(old) == 1 and len(bs) > 1:
            old = old * len(bs)
        if len(bs) == 1 and len(old) > 1:
            bs = bs * len(old)
        data = dict(gate.data, b=[o + b for o, b in zip(old, bs)])
        return Lab("gate", gate.labels, gate.shape, data, gate.nodes | self.nodes_here())

    def _op_TopK(self, node, ins, a):
        x, kk = self.settle(ins[0]), ins[1]
        if isinstance(x, View):
            x = self.gate_from(x)
        if not isinstance(x, Lab) or x.kind not in ("gate", "gate_probs"):
            raise self.fail(f"top-k of {x.describe()}; supported: MoE gate logits or probabilities")
        rank = len(x.shape)
        if int(a.get("axis", -1)) % rank != rank - 1 or not a.get("largest", 1) or not isinstance(kk, np.ndarray):
            raise self.fail("only the k largest over the expert axis, with a constant k, are supported")
        k = int(np.asarray(kk).reshape(-1)[0])
        if not 1 <= k <= x.shape[-1]:
            raise self.fail(f"k = {k} with {x.shape[-1]} experts")
        data = dict(x.data, k=k)
        labels = x.labels[:-1] + ("k",)
        shape = x.shape[:-1] + (k,)
        nodes = x.nodes | self.nodes_here()
        vals = Lab("route_scores" if x.kind == "gate_probs" else "route_logits", labels, shape, data, nodes)
        vals.data["gate_data"] = x.data
        idx = Lab("route_idx", labels, shape, dict(data, gate_data=x.data), nodes)
        return [vals, idx]

    def _op_GatherElements(self, node, ins, a):
        p, i = self.settle(ins[0]), self.settle(ins[1])
        rank = len(p.shape)
        if isinstance(p, Lab) and p.kind == "gate_probs" and isinstance(i, Lab) and i.kind == "route_idx" \
                and i.data["gate_data"] is p.data and int(a.get("axis", 0)) % rank == rank - 1:
            return Lab("route_scores", i.labels, i.shape, i.data, p.nodes | i.nodes | self.nodes_here())
        raise self.fail("only gathering the routed experts' gate probabilities is supported")

    def _op_ScatterElements(self, node, ins, a):
        data, idx, upd = ins[0], self.settle(ins[1]), self.settle(ins[2])
        rank = len(idx.shape) if isinstance(idx, Sym) else 0
        if not (isinstance(data, np.ndarray) and isinstance(idx, Lab) and idx.kind == "route_idx"
                and isinstance(upd, Lab) and upd.kind == "route_scores"
                and upd.data["gate_data"] is idx.data["gate_data"]):
            raise self.fail("only scattering the routing scores into a zero score matrix is supported")
        if int(a.get("axis", 0)) % rank != rank - 1 or a.get("reduction", "none") != "none" or np.any(data) \
                or data.shape[:-1] != idx.shape[:-1] or data.shape[-1] != idx.data["gate_data"]["w"][0].shape[1]:
            raise self.fail("the score matrix must be zeros [tokens, experts] scattered along the expert axis")
        return Lab("combine", idx.labels[:-1] + ("n",), data.shape, idx.data,
                   idx.nodes | upd.nodes | self.nodes_here())

    def _op_OneHot(self, node, ins, a):
        idx, depth, values = self.settle(ins[0]), ins[1], ins[2]
        if not (isinstance(idx, Lab) and idx.kind == "route_idx" and isinstance(depth, np.ndarray)
                and isinstance(values, np.ndarray)) or not np.array_equal(np.asarray(values).reshape(-1), [0, 1]):
            raise self.fail("only a 0/1 one-hot of the MoE routing indices is supported")
        n = int(np.asarray(depth).reshape(-1)[0])
        if int(a.get("axis", -1)) not in (-1, len(idx.shape)) or n != idx.data["gate_data"]["w"][0].shape[1]:
            raise self.fail("the one-hot must be over all experts, as the last axis")
        return Lab("onehot", idx.labels + ("n",), idx.shape + (n,), idx.data, idx.nodes | self.nodes_here())

    def _lab_mul(self, x: Lab, y: Lab):
        kinds = {x.kind, y.kind}
        if kinds == {"onehot", "route_scores"}:
            kind = "combine_k"
        elif kinds == {"combine", "experts"}:
            kind = "weighted"
        else:
            raise self.fail(f"a product of {x.describe()} and {y.describe()}")
        labels, shape = self._broadcast_labels(x, y)
        if kind == "combine_k":
            if x.data["gate_data"] is not y.data["gate_data"]:
                raise self.fail("the one-hot and the scores come from different gates")
            return Lab(kind, labels, shape, x.data, x.nodes | y.nodes | self.nodes_here())
        comb, exp = (x, y) if x.kind == "combine" else (y, x)
        if exp.data["stage"] != "y":
            raise self.fail("the scores multiply expert activations before their second layer")
        return Lab(kind, labels, shape, {"combine": comb, "experts": exp}, x.nodes | y.nodes | self.nodes_here())

    def _broadcast_labels(self, x: Lab, y: Lab):
        n = max(len(x.labels), len(y.labels))
        lx = ("1",) * (n - len(x.labels)) + x.labels
        ly = ("1",) * (n - len(y.labels)) + y.labels
        sx = (1,) * (n - len(x.shape)) + x.shape
        sy = (1,) * (n - len(y.shape)) + y.shape
        labels, shape = [], []
        for a_, b_, s1, s2 in zip(lx, ly, sx, sy):
            if a_ == b_ or b_ == "1":
                labels.append(a_), shape.append(s1)
            elif a_ == "1":
                labels.append(b_), shape.append(s2)
            else:
                raise self.fail(f"axes '{a_}' and '{b_}' of {x.describe()} and {y.describe()} do not line up")
            if s1 != s2 and 1 not in (s1, s2):
                raise self.fail("the two operands' sizes do not broadcast")
        return labels, shape

    def _experts_fc1(self, x: View, w: np.ndarray):
        rows, cols = self.rows_cols(x)
        if rows is None or not np.array_equal(rows, np.arange(x.src_shape[0])) or int(np.prod(x.shape[:-2])) != 1:
            raise self.fail("the expert-batched product must take the MoE input tokens, broadcast over experts")
        batch_x, batch_w = x.shape[:-2], w.shape[:-2]
        nb = max(len(batch_x), len(batch_w))
        bw = (1,) * (nb - len(batch_w)) + tuple(batch_w)
        non1 = [i for i, s in enumerate(bw) if s != 1]
        if len(non1) > 1 or w.shape[-2] != x.shape[-1]:
            raise self.fail(f"expert weights {list(w.shape)} are not [experts, in, out]")
        n_ax = non1[0] if non1 else nb - 1
        n = bw[n_ax]
        labels = ["1"] * nb
        labels[n_ax] = "n"
        w1 = self._scaled(self._gather_weight_batched(w.reshape(n, w.shape[-2], w.shape[-1]), cols, x.src_shape[1]),
                          x.factor)
        shape = [1] * nb
        shape[n_ax] = n
        data = {"x": x.src, "w1": w1, "b1": np.zeros((n, w.shape[-1])), "approx": None, "stage": "h",
                "w2": None, "b2": None}
        return Lab("experts", labels + ["t", "h"], shape + [x.shape[-2], w.shape[-1]], data,
                   x.nodes | self.nodes_here())

    def _gather_weight_batched(self, w, cols, n_src):
        if len(cols) == n_src and np.array_equal(cols, np.arange(n_src)):
            return w
        return np.stack([self._gather_weight(w[e], cols, n_src) for e in range(w.shape[0])])

    @staticmethod
    def _scaled(w, factor: float):
        """factor * w; an exact 1 keeps the source dtype (float32 weights stay float32)."""
        return w if factor == 1.0 else factor * np.asarray(w, np.float64)

    def _experts_fc2(self, x: Lab, w: np.ndarray):
        d = x.data
        if d["stage"] != "h" or x.labels[-2:] != ("t", "h"):
            raise self.fail("the expert second layer must follow the first, as [.., experts, tokens, hidden]")
        if d["approx"] is None:
            raise self.fail("the experts' first layer is not followed by a GELU")
        n = d["w1"].shape[0]
        nb = len(x.labels) - 2
        bw = (1,) * (nb - (w.ndim - 2)) + tuple(w.shape[:-2])
        n_ax = x.labels.index("n")
        if w.ndim < 3 or w.shape[-2] != x.shape[-1] or bw[n_ax] != n or int(np.prod(bw)) != n:
            raise self.fail(f"expert weights {list(w.shape)} do not line up with the {n} experts")
        data = dict(d, stage="y", w2=w.reshape(n, w.shape[-2], w.shape[-1]),
                    b2=np.zeros((n, w.shape[-1])))
        return Lab("experts", x.labels[:-1] + ("c",), x.shape[:-1] + (w.shape[-1],), data,
                   x.nodes | self.nodes_here())

    def _expert_bias(self, x: Lab, c: np.ndarray):
        d = x.data
        if np.broadcast_shapes(c.shape, x.shape) != x.shape:
            raise self.fail("the expert bias broadcasts the activations to a larger shape")
        rank, t_ax, n_ax = len(x.shape), x.labels.index("t"), x.labels.index("n")
        ca = np.asarray(c, np.float64).reshape((1,) * (rank - c.ndim) + c.shape)
        if ca.shape[t_ax] != 1:
            if not np.all(ca == np.take(ca, [0], axis=t_ax)):
                raise self.fail("the expert bias varies across tokens")
            ca = np.take(ca, [0], axis=t_ax)
        target = [1] * rank
        target[n_ax], target[-1] = x.shape[n_ax], x.shape[-1]
        b = np.broadcast_to(ca, target)
        b = b.reshape(x.shape[n_ax], x.shape[-1])  # n precedes the channel axis
        key = "b1" if d["stage"] == "h" else "b2"
        if d["stage"] == "h" and d["approx"] is not None:
            raise self.fail("a constant added after the experts' GELU")
        return Lab("experts", x.labels, x.shape, dict(d, **{key: d[key] + b}), x.nodes | self.nodes_here())

    def _combine_matmul(self, x: Lab, y: Lab):
        if x.labels[-1] != "n" or y.labels[-2] != "n":
            raise self.fail("the product does not contract the expert axis of the score matrix and the experts")
        comb, exp = (x, y) if x.kind == "combine" else (y, x)
        if exp.data["stage"] != "y":
            raise self.fail("the scores multiply expert activations before their second layer")
        bx = Lab(x.kind, x.labels[:-2], x.shape[:-2], x.data, frozenset())
        by = Lab(y.kind, y.labels[:-2], y.shape[:-2], y.data, frozenset())
        labels, shape = self._broadcast_labels(bx, by)
        labels += [x.labels[-2], y.labels[-1]]
        shape += [x.shape[-2], y.shape[-1]]
        return self._emit_moe(comb, exp, labels, shape, x.nodes | y.nodes)

    def _emit_moe(self, comb: Lab, exp: Lab, labels, shape, nodes):
        if sorted(lb for lb in labels if lb != "1") != ["c", "t"]:
            raise self.fail(f"the MoE result has axes {labels}; expected tokens and channels")
        gate, e = comb.data["gate_data"], exp.data
        k = comb.data["k"]
        if gate["x"] != e["x"]:
            raise self.fail("the MoE gate and the experts read different tensors")
        n_exp = e["w1"].shape[0]
        if gate["w"][0].shape[1] != n_exp:
            raise self.fail(f"the gate scores {gate['w'][0].shape[1]} experts, the expert weights hold {n_exp}")
        nt = self.n_tasks
        gw = np.stack(gate["w"] * (nt if len(gate["w"]) == 1 else 1))
        params = {"gate_w": gw}
        if gate["b"] is not None:
            params["gate_b"] = np.stack(gate["b"] * (nt if len(gate["b"]) == 1 else 1))
        params.update({"w1": e["w1"], "b1": e["b1"], "w2": e["w2"], "b2": e["b2"]})
        if gw.shape[0] != nt or ("gate_b" in params and params["gate_b"].shape[0] != nt):
            raise self.fail(f"the gate has {gw.shape[0]} task variants, the model {nt} tasks")
        op = self.emit("moe", [e["x"]], [comb, exp], {"top_k": k, "approx": e["approx"]}, params)
        op.source = tuple(sorted(set(op.source) | set(nodes)))
        T, D = op.shape
        idx = np.zeros(shape, dtype=np.int64)
        for ax, lb in enumerate(labels):
            if lb in ("t", "c"):
                r = np.arange(shape[ax]) * (D if lb == "t" else 1)
                idx = idx + r.reshape([-1 if i == ax else 1 for i in range(len(shape))])
        return View(op.name, op.shape, idx.shape, idx)

    # ---- output, head cut, coverage ----
    def _finish_output(self, sym, name: str):
        if not isinstance(sym, Sym):
            raise UsageError(f"{self.label}: the output '{name}' does not depend on the image")
        value = self.plain(sym)
        out = Op("output", "%out", [value], self.shape_of(value), {"onnx_shape": list(sym.shape), "onnx_name": name},
                 {}, (self._label(self.node),) if self.node is not None else ())
        self.ops.append(out)
        self.by_name[out.name] = out

    def _producer_of(self, tensor: str):
        for n in self.nodes:
            if tensor in n.output:
                return n
        return None

    def _head_cut(self, node, exc: UsageError) -> Op:
        """The graph failed at `node`. If that is right after the backbone's final LayerNorm (a norm
        of a residual sum, with only layout ops since), the rest is a head: say so, or cut it off."""
        final = self.ops[-1] if self.ops else None
        if final is None or final.kind != "layernorm":
            raise exc
        src = self.by_name.get(final.inputs[0])
        if src is None or src.kind != "add" or len(src.inputs) != 2:
            raise exc
        if not (self.meta_in.get("with_head") == "true" or node.op_type in _SPATIAL_OPS):
            raise exc
        if not self.host_head:
            raise UsageError(f"{self.label}: the graph carries a dense-prediction head after the backbone "
                             f"({node.op_type} node '{self._label(node)}'), which does not run on the accelerator; "
                             "export the backbone without --with-head (the head runs on the host)") from None
        return final

    def _build_ir(self, live, cut) -> IR:
        host = []
        if cut is not None:  # the head: what reads the backbone's output, and every node not reached
            after = self._descendants(cut)
            done = {id(n) for n in self.processed[:-1]}
            host = [self._label(n) for n in live if id(n) in after or id(n) not in done]
        covered = set(self.folded).union(*(set(op.source) for op in self.ops))
        missing = [n for n in live if self._label(n) not in covered and self._label(n) not in host]
        if missing:
            n = missing[0]
            raise UsageError(f"{self.label}: {n.op_type} node '{self._label(n)}' computes something no accelerator "
                             f"op uses ({len(missing)} such node(s)); {SUPPORTED}")
        ir = IR(self.ops, tuple(self.image_shape), self._task_names(), {})
        ir.meta.update(self._meta(host, cut))
        try:
            ir.assign_canonical_names()
            ir.validate()
        except IRError as exc:
            raise M3ViTError(f"{self.label}: internal error raising the graph: {exc}") from None
        return ir

    def _descendants(self, tensor: str) -> set[int]:
        out, frontier = set(), {tensor}
        for n in self.nodes:
            if any(i in frontier for i in n.input):
                out.add(id(n))
                frontier.update(o for o in n.output if o)
        return out

    def _task_names(self) -> list[str]:
        names = None
        config = self.meta_in.get("config")
        if config:
            try:
                names = [t["name"] for t in json.loads(config)["tasks"]]
            except (ValueError, KeyError, TypeError):
                names = None
        if self.task_input is None:
            task = self.meta_in.get("task")
            return [task if task and task != "all" else "task0"]
        if names and len(names) == self.n_tasks:
            return names
        return [f"task{i}" for i in range(self.n_tasks)]

    def _meta(self, host, cut) -> dict:
        meta: dict[str, Any] = {"source": self.label, "opset": self.opset,
                                "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
                                "task_input": self.task_input, "dead_nodes": list(self.dead_nodes),
                                "onnx_nodes": len(self.graph.node), "folded_nodes": len(self.folded)}
        for key in ("preset", "dataset", "exporter", "task", "task_index", "with_head", "config"):
            if key in self.meta_in:
                meta[f"m3vit_{key}"] = self.meta_in[key]
        if cut is not None:
            meta["host_nodes"] = host
            meta["host_input"] = cut
        return meta
