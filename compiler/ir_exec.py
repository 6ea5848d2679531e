"""A float64 NumPy executor of the IR: the reference the compiler's passes are verified with.

The MoE runs sparsely, as the accelerator does: the gate picks each token's top-k experts
(largest logit first, the lower expert index on ties), each expert takes its queue of tokens
(gather), runs fc1-GELU-fc2 on them only, and its outputs are added back weighted by the gate
probability (scatter with score). Probabilities are the softmax over all experts, not renormalised.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from m3vit.compiler.ir import IMAGE, IR, IRError, Op
from m3vit.compiler.numerics import expert_queues
from m3vit.errors import UsageError


def _erf(x):
    from scipy.special import erf

    return erf(x)


def gelu(x: np.ndarray, approx: str = "erf") -> np.ndarray:
    if approx == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layernorm(x: np.ndarray, gamma, beta, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def patchify(img: np.ndarray, patch: int) -> np.ndarray:
    """[C, H, W] -> [(H/p)(W/p), C p p], rows in raster order, columns (c, i, j) (as numerics.patchify)."""
    c, h, w = img.shape
    g = img.reshape(c, h // patch, patch, w // patch, patch)
    return g.transpose(1, 3, 0, 2, 4).reshape((h // patch) * (w // patch), c * patch * patch)


def moe_route(op: Op, x: np.ndarray, task: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gate logits [T, N], expert indices [T, k], their gate probabilities [T, k])."""
    p = _Params(op)
    logits = x @ p["gate_w"][task]
    if "gate_b" in p:
        logits = logits + p["gate_b"][task]
    k = op.attrs["top_k"]
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return logits, idx, np.take_along_axis(softmax(logits), idx, axis=1)


def moe_sparse(op: Op, x: np.ndarray, idx: np.ndarray, score: np.ndarray, trace: dict | None = None) -> np.ndarray:
    """With ``trace``: each expert's fc1 input to GELU (``.pre``), fc1 and fc2 on its own queue."""
    p = _Params(op)
    out = np.zeros_like(x)
    for e, queue in enumerate(expert_queues(idx, p["w1"].shape[0])):
        if len(queue.tokens) == 0 and trace is None:
            continue
        pre = x[queue.tokens] @ p["w1"][e] + p["b1"][e]
        h = gelu(pre, op.attrs.get("approx") or "erf")
        y = h @ p["w2"][e] + p["b2"][e]
        if trace is not None:
            trace[f"{op.name}.e{e}.fc1.pre"], trace[f"{op.name}.e{e}.fc1"], trace[f"{op.name}.e{e}.fc2"] = pre, h, y
        np.add.at(out, queue.tokens, score[queue.tokens, queue.slots][:, None] * y)
    return out


def attention(op: Op, ins: list[np.ndarray], trace: dict | None = None) -> np.ndarray:
    """With ``trace``: the scaled scores [heads, T, T] as ``{name}.score``."""
    heads, dh = op.attrs["heads"], op.attrs["head_dim"]
    d = heads * dh
    q, k, v = (ins[0][:, :d], ins[0][:, d:2 * d], ins[0][:, 2 * d:]) if len(ins) == 1 else ins
    t = q.shape[0]
    qh, kh, vh = (a.reshape(a.shape[0], heads, dh).transpose(1, 0, 2) for a in (q, k, v))
    scores = qh @ kh.transpose(0, 2, 1) * op.attrs["scale"]
    if trace is not None:
        trace[f"{op.name}.score"] = scores
    probs = softmax(scores)
    return (probs @ vh).transpose(1, 0, 2).reshape(t, d)


class _Params:
    """An op's parameters as float64, converted once per op (mixed-precision matmuls are slow)."""

    def __init__(self, op: Op):
        cache = op.__dict__.setdefault("_f64_cache", {})
        self.op, self.cache = op, cache

    def __contains__(self, key):
        return key in self.op.params

    def __getitem__(self, key):
        value = self.op.params[key]
        hit = self.cache.get(key)
        if hit is None or hit[0] is not value:  # a pass may have replaced the array
            hit = (value, np.asarray(value, dtype=np.float64))
            self.cache[key] = hit
        return hit[1]


def _f64(p, key: str, default=0.0):
    return p[key] if key in p else default


def run_op(op: Op, ins: list[np.ndarray], task: int, trace: dict | None = None) -> np.ndarray:
    k, p, a = op.kind, _Params(op), op.attrs
    x = ins[0] if ins else None
    if k == "patch_embed":
        return patchify(x, a["patch"]) @ _f64(p, "w") + _f64(p, "b")
    if k == "embed":
        y = np.concatenate([_f64(p, "cls").reshape(1, -1), x], axis=0) if "cls" in p else x
        return y + _f64(p, "pos")
    if k == "layernorm":
        return layernorm(x, _f64(p, "gamma"), _f64(p, "beta"), a["eps"])
    if k == "linear":
        y = x @ _f64(p, "w") + _f64(p, "b")
        if a.get("gelu") and trace is not None:
            trace[f"{op.name}.pre"] = y
        return gelu(y, a.get("approx", "erf")) if a.get("gelu") else y
    if k == "gelu":
        return gelu(x, a.get("approx", "erf"))
    if k == "attention":
        return attention(op, ins, trace)
    if k == "add":
        return ins[0] + ins[1] if len(ins) == 2 else x + _f64(p, "bias")
    if k == "scale":
        return x * _f64(p, "s")
    if k == "select":
        return x[:, np.asarray(a["cols"], dtype=np.int64)]
    if k == "moe":
        logits, idx, score = moe_route(op, x, task)
        if trace is not None:  # the names the quantized graph's trace uses too
            trace[f"{op.name}.gate"] = logits
            trace[f"{op.name}.topk"] = idx
            trace[f"{op.name}.score"] = score
        return moe_sparse(op, x, idx, score, trace)
    if k == "cls_head":
        t = x[:1]
        if "ln_gamma" in p:
            t = layernorm(t, _f64(p, "ln_gamma"), _f64(p, "ln_beta"), a["ln_eps"])
        return t @ _f64(p, "w") + _f64(p, "b")
    if k == "output":
        return x
    raise IRError(f"{op.name}: the executor has no op kind '{k}'")


@contextlib.contextmanager
def _one_blas_thread():
    """The IR's matmuls are small: extra OpenBLAS threads only cost time, badly so on busy cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _image(ir: IR, image: Any) -> np.ndarray:
    try:
        img = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"the image must be a numeric array, got {type(image).__name__}") from None
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.shape != tuple(ir.image_shape):
        raise UsageError(f"the image is {list(np.shape(image))}, the program takes [1, {', '.join(map(str, ir.image_shape))}]")
    return img


def run_ir(ir: IR, image: Any, task: int | str = 0, trace: bool = False):
    """Run the IR on one image (1xCxHxW or CxHxW) for one task (index or name).

    Returns the output in the source model's output shape, or (output, trace) with trace[name] the
    value of every op (2-D) and, per MoE layer, trace[f"{moe}.gate"] (logits), f"{moe}.topk" (expert
    indices [T, k]) and f"{moe}.score" (their probabilities). What calibration needs is traced too:
    a GELU linear's input to GELU f"{name}.pre", an attention's scaled scores f"{attn}.score"
    [heads, T, T], and each expert's f"{moe}.e{e}.fc1.pre", ".fc1", ".fc2" on its own tokens."""
    t = ir.task_index(task)
    values: dict[str, np.ndarray] = {IMAGE: _image(ir, image)}
    record: dict[str, np.ndarray] | None = {} if trace else None
    consumers: dict[str, int] = {}
    for op in ir.ops:
        for i in op.inputs:
            consumers[i] = consumers.get(i, 0) + 1
    out = None
    with _one_blas_thread():
        for op in ir.ops:
            out = _step(op, values, consumers, t, record, out)
    if out is None:
        raise IRError("the IR has no output op")
    return (out, record) if trace else out


def _step(op: Op, values: dict, consumers: dict, t: int, record: dict | None, out):
    y = run_op(op, [values[i] for i in op.inputs], t, record)
    if op.kind == "output":
        out = y.reshape(op.attrs.get("onnx_shape", y.shape))
    values[op.name] = y
    if record is not None:
        record[op.name] = y
    else:
        for i in op.inputs:  # free what no later op reads
            consumers[i] -= 1
            if consumers[i] == 0 and i != IMAGE:
                values.pop(i, None)
    return out
