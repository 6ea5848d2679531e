"""The golden executor: runs a QGraph with the numeric contract's integer ops, bit-exact by
construction (every value is produced by an op of ``numerics``; nothing here does arithmetic
of its own beyond indexing).

``run(graph, image, task)`` executes one task's pathway of the whole backbone, MoE routing
included: the task's gate, per-expert token queues, gather -> expert -> scatter, combine.
Saturation is counted per tensor in a ``SatCounter``; without one, any saturation ends in one
``SaturationWarning`` that lists the tensors.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from m3vit.compiler import numerics as nx
from m3vit.compiler.numerics import Fmt, SatCounter, SaturationWarning
from m3vit.compiler.qgraph import QGraph, QOp

__all__ = ["run", "quantize_input", "run_gate", "single_thread_blas"]


@contextlib.contextmanager
def single_thread_blas():
    """One BLAS thread: the GEMMs here are small, and OpenBLAS's threads under load made a frame
    an order of magnitude slower (measured 9 s against 0.7 s on two busy cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the dependency is declared; without it the run is only slower
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def quantize_input(graph: QGraph, image, stats: SatCounter | None = None) -> np.ndarray:
    """A float image [C, H, W] (or [1, C, H, W], NumPy or torch) into the input format; an
    integer array is taken as already quantized and must lie in the format."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    info = graph.input
    if a.shape != info.shape:
        raise ValueError(f"input is {a.shape}, the graph takes {info.shape}")
    if a.dtype.kind in "iu":
        if not info.fmt.contains(a):
            raise ValueError(f"integer input outside its format {info.fmt}")
        return a.astype(np.int64)
    return nx.quantize(a, info.fmt, stats, "input")


def _gemm_op(graph: QGraph, op: QOp, x, x_fmt: Fmt, out_fmt: Fmt, stats):
    p = op.params
    bound = graph.gemm_bound(op.name, p["w"], p["b"])
    if op.attrs.get("gelu"):
        mid = Fmt(int(op.attrs["mid_bits"]), int(op.attrs["mid_frac"]))
        return nx.gemm_gelu(x, p["w"], p["b"], p["shift"], mid, out_fmt, x_fmt, stats, op.name, bound=bound)
    return nx.gemm(x, p["w"], p["b"], p["shift"], out_fmt, x_fmt, stats, op.name, bound=bound)


def _sub_bound(graph: QGraph, op: QOp, which: str, i: int) -> int | None:
    """The validated bound of one stacked MoE matrix (a task's gate, an expert's w1 or w2):
    validate() checked the slices of these very stacked arrays."""
    label = f"{op.name}.gate[{graph.tasks[i]}]" if which == "gate" else \
        f"{op.name}.e{i}.{'fc1' if which == 'w1' else 'fc2'}"
    got = graph.bounds.get(label)
    stack = {"gate": ("gate_w", "gate_b"), "w1": ("w1", "b1"), "w2": ("w2", "b2")}[which]
    if got is None or (got[1], got[2]) != tuple(id(op.params[k]) for k in stack):
        return None
    return got[0]


def run_gate(graph: QGraph, op: QOp, x, task: int, stats: SatCounter | None = None):
    """The MoE op's gate alone: (logits, top-k expert indices, their scores)."""
    p = op.params
    x_fmt = graph.tensors[op.inputs[0]].fmt
    lfmt = graph.tensors[f"{op.name}.gate"].fmt
    w, b = p["gate_w"][task], p["gate_b"][task]
    logits = nx.gemm(x, w, b, p["gate_shift"][task], lfmt, x_fmt, stats, f"{op.name}.gate",
                     bound=_sub_bound(graph, op, "gate", task))
    idx, score = nx.moe_gate(logits, int(op.attrs["top_k"]), lfmt.frac, stats, f"{op.name}.score")
    return logits, idx, score


def _expert(graph: QGraph, op: QOp, e: int, xe, stats):
    """One expert's GELU MLP on its gathered tokens: (fc1 output, fc2 output)."""
    p = op.params
    x_fmt = graph.tensors[op.inputs[0]].fmt
    f1 = graph.tensors[f"{op.name}.e{e}.fc1"].fmt
    f2 = graph.tensors[f"{op.name}.e{e}.fc2"].fmt
    mid = Fmt(int(op.attrs["mid_bits"]), int(p["mid_frac"][e]))
    h = nx.gemm_gelu(xe, p["w1"][e], p["b1"][e], p["shift1"][e], mid, f1, x_fmt, stats, f"{op.name}.e{e}.fc1",
                     bound=_sub_bound(graph, op, "w1", e))
    y = nx.gemm(h, p["w2"][e], p["b2"][e], p["shift2"][e], f2, f1, stats, f"{op.name}.e{e}.fc2",
                bound=_sub_bound(graph, op, "w2", e))
    return h, y


def _moe(graph: QGraph, op: QOp, x, task: int, stats, tr: dict | None):
    n, k = int(op.attrs["experts"]), int(op.attrs["top_k"])
    d = graph.tensors[op.output].shape[-1]
    logits, idx, score = run_gate(graph, op, x, task, stats)
    y = np.zeros((x.shape[0], k, d), np.int64)
    for e, q in enumerate(nx.expert_queues(idx, n)):
        if q.tokens.size:
            h, ye = _expert(graph, op, e, x[q.tokens], stats)
            y[q.tokens, q.slots] = ye  # scatter: each (token, slot) pair is filled exactly once
        else:
            h = np.zeros((0, op.params["w1"].shape[2]), np.int64)
            ye = np.zeros((0, d), np.int64)
        if tr is not None:
            tr[f"{op.name}.e{e}.fc1"], tr[f"{op.name}.e{e}.fc2"] = h, ye
    out = nx.moe_combine(score, y, op.params["combine_shift"], graph.tensors[op.output].fmt, idx, stats, op.name)
    if tr is not None:
        tr[f"{op.name}.gate"], tr[f"{op.name}.topk"], tr[f"{op.name}.score"] = logits, idx, score
    return out


def _exec(graph: QGraph, op: QOp, env: dict, task: int, stats, tr):
    t = graph.tensors
    out_fmt = t[op.output].fmt
    xs = [env[i] for i in op.inputs]
    a = op.attrs
    if op.kind == "patch_embed":
        patches = nx.patchify(xs[0], int(a["patch"]))
        return _gemm_op(graph, op, patches, t[op.inputs[0]].fmt, out_fmt, stats)
    if op.kind == "linear":
        return _gemm_op(graph, op, xs[0], t[op.inputs[0]].fmt, out_fmt, stats)
    if op.kind == "embed":
        tokens = nx.prepend_cls(xs[0], op.params["cls"])
        return nx.residual_add(tokens, op.params["pos"], a["a_shift"], a["b_shift"], out_fmt, stats, op.name)
    if op.kind == "layernorm":
        p = op.params
        return nx.layernorm(xs[0], p["gamma"], p["beta"], int(a["eps_int"]), a["beta_shift"], p["out_shift"],
                            out_fmt, stats, op.name)
    if op.kind == "attention":
        qkv = xs[0]
        d = qkv.shape[1] // 3
        score_fmt = Fmt(int(a["score_bits"]), int(a["score_frac"]))
        return nx.attention(qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:], int(a["heads"]), int(a["score_shift"]),
                            score_fmt, int(a["out_shift"]), out_fmt, stats, op.name)
    if op.kind == "add":
        return nx.residual_add(xs[0], xs[1], a["a_shift"], a["b_shift"], out_fmt, stats, op.name)
    if op.kind == "moe":
        return _moe(graph, op, xs[0], task, stats, tr)
    raise ValueError(f"{op.name}: unknown op kind '{op.kind}'")


def run(graph: QGraph, image_or_q, task: int | str = 0, trace: bool = False,
        stats: SatCounter | None = None):
    """Execute one task's pathway. Returns ``(output_q, trace)``; ``trace`` maps every canonical
    tensor name to its integer array when ``trace`` is true (else it is empty)."""
    ti = graph.task_index(task)
    own = stats is None
    counter = SatCounter() if own else stats
    tr: dict[str, np.ndarray] = {}
    with single_thread_blas():
        x = quantize_input(graph, image_or_q, counter)
        env = {"input": x}
        for op in graph.ops:
            env[op.output] = _exec(graph, op, env, ti, counter, tr if trace else None)
    if trace:
        full = {"input": env["input"]}
        for op in graph.ops:
            for name in op.sub_tensors():
                full[name] = tr[name]
            full[op.output] = env[op.output]
        tr = full
    if own and counter.saturated:
        warnings.warn(f"saturation in task {graph.tasks[ti]}:\n{counter.report()}", SaturationWarning, stacklevel=2)
    return env[graph.output], tr

