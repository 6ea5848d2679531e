"""PyTorch -> QGraph: the float reference trace (forward hooks at every canonical tensor) and the
quantized graph built from the model's parameters and a calibration.

Semantics shared with the graph: the attention scale 1/sqrt(d_h) is folded into the q part of
``attn.qkv`` (so the float trace's q is scaled too), the patch embedding is a GEMM on
``patchify`` rows, and task-conditioned routing is folded for inference into the shared token
gate plus a per-task bias on the logits (``TaskGate.token_weight`` / ``task_bias``).
"""

from __future__ import annotations

import copy

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from m3vit.compiler import numerics as nx
from m3vit.compiler.numerics import CONTRACT, SatCounter
from m3vit.compiler.qgraph import QGraph, QOp, TensorInfo
from m3vit.compiler.quantize import Calibration, acc_quantize, quantize_channels, weight_formats
from m3vit.errors import ConfigError

__all__ = ["float_trace", "float_weights", "choose_weight_fracs", "build_qgraph", "assemble_qgraph"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def float_weights(model) -> dict[str, np.ndarray]:
    """Every backbone parameter as the graph lays it out, in float64: GEMM weights [in, out],
    the q part of qkv pre-scaled, gates [tasks, D, N] with per-task biases [tasks, N]."""
    cfg = model.cfg
    d = cfg.dim
    out: dict[str, np.ndarray] = {}
    pe = model.patch_embed
    out["patch_embed.w"] = _np(pe.weight).reshape(d, -1).T.astype(np.float64)
    out["patch_embed.b"] = _np(pe.bias).astype(np.float64)
    out["embed.cls"] = _np(model.cls_token).reshape(d).astype(np.float64)
    out["embed.pos"] = _np(model.pos_embed)[0].astype(np.float64)

    def ln(name, m):
        out[name + ".gamma"] = _np(m.weight).astype(np.float64)
        out[name + ".beta"] = _np(m.bias).astype(np.float64)

    def lin(name, m, scale_cols: int = 0, scale: float = 1.0):
        w = _np(m.weight).T.astype(np.float64).copy()
        b = _np(m.bias).astype(np.float64).copy() if m.bias is not None else np.zeros(w.shape[1])
        w[:, :scale_cols] *= scale
        b[:scale_cols] *= scale
        out[name + ".w"], out[name + ".b"] = w, b

    for i, blk in enumerate(model.blocks):
        b = f"blocks.{i}"
        ln(f"{b}.norm1", blk.norm1)
        lin(f"{b}.attn.qkv", blk.attn.qkv, d, blk.attn.scale)
        lin(f"{b}.attn.proj", blk.attn.proj)
        ln(f"{b}.norm2", blk.norm2)
        if blk.is_moe:
            moe = blk.moe
            with torch.no_grad():
                out[f"{b}.moe.gate.w"] = np.stack([_np(moe.gate.token_weight(t)) for t in range(len(cfg.tasks))]
                                                  ).astype(np.float64)
                if moe.gate.routing == "task-conditioned":
                    out[f"{b}.moe.gate.b"] = np.stack([_task_bias64(moe.gate, t) for t in range(len(cfg.tasks))])
                else:
                    out[f"{b}.moe.gate.b"] = np.zeros((len(cfg.tasks), cfg.num_experts))
            for e in range(cfg.num_experts):
                out[f"{b}.moe.e{e}.fc1.w"] = _np(moe.w1[e]).astype(np.float64)
                out[f"{b}.moe.e{e}.fc1.b"] = _np(moe.b1[e]).astype(np.float64)
                out[f"{b}.moe.e{e}.fc2.w"] = _np(moe.w2[e]).astype(np.float64)
                out[f"{b}.moe.e{e}.fc2.b"] = _np(moe.b2[e]).astype(np.float64)
        else:
            lin(f"{b}.mlp.fc1", blk.mlp.fc1)
            lin(f"{b}.mlp.fc2", blk.mlp.fc2)
    ln("norm", model.norm)
    return out


def _task_bias64(gate, task: int) -> np.ndarray:
    """TaskGate.task_bias evaluated in float64 from the float32 parameters, as the ONNX importer
    folds it (onnx_import._fold_per_task): both front ends then quantize the same numbers."""
    mlp = copy.deepcopy(gate.task_mlp).double()
    onehot = (torch.arange(gate.n_tasks) == task).double()
    return _np(mlp(onehot) @ gate.weight[gate.dim:].double())


def float_trace(model, x: torch.Tensor, task: int, sink: Callable[[str, np.ndarray], None] | None = None,
                scores: bool = False) -> dict[str, np.ndarray]:
    """One float forward of ``model.features(x, task)`` (x: 1x3xHxW) with every canonical tensor
    captured by hooks: a dict name -> float32 array (batch dimension dropped), or, with ``sink``,
    each tensor handed to ``sink(name, array)`` as it appears (nothing kept). Also records the
    GELU inputs ``*.pre``, the chosen experts ``*.moe.topk``, each expert's rows in queue order
    (tokens ascending), and with ``scores`` the attention scores ``*.attn.score``."""
    if x.shape[0] != 1:
        raise ValueError("float_trace takes one image (batch 1)")
    cfg = model.cfg
    d = cfg.dim
    store: dict[str, np.ndarray] = {}
    put_fn = sink or (lambda n, a: store.__setitem__(n, a))

    def put(name, t):
        put_fn(name, _np(t[0]).astype(np.float32, copy=False))

    hooks = []

    def fwd(mod, fn):
        hooks.append(mod.register_forward_hook(lambda m, i, o: fn(i, o)))

    def pre(mod, fn):
        hooks.append(mod.register_forward_pre_hook(lambda m, i: fn(i)))

    fwd(model.patch_embed, lambda i, o: put("patch_embed", o.flatten(2).transpose(1, 2)))
    pre(model.blocks[0], lambda i: put("embed", i[0]))
    for bi, blk in enumerate(model.blocks):
        b = f"blocks.{bi}"
        fwd(blk.norm1, lambda i, o, b=b: put(f"{b}.norm1", o))

        def qkv_hook(i, o, b=b, attn=blk.attn):
            o = o.clone()
            o[..., :d] *= attn.scale
            put(f"{b}.attn.qkv", o)
            if scores:
                t = o.shape[1]
                q, k = (o[0, :, s * d:(s + 1) * d].reshape(t, attn.heads, -1).transpose(0, 1) for s in (0, 1))
                put_fn(f"{b}.attn.score", _np(q @ k.transpose(-2, -1)))
        fwd(blk.attn.qkv, qkv_hook)
        pre(blk.attn.proj, lambda i, b=b: put(f"{b}.attn", i[0]))
        fwd(blk.attn.proj, lambda i, o, b=b: put(f"{b}.attn.proj", o))
        pre(blk.norm2, lambda i, b=b: put(f"{b}.residual1", i[0]))
        fwd(blk.norm2, lambda i, o, b=b: put(f"{b}.norm2", o))
        if blk.is_moe:
            fwd(blk.moe.gate, lambda i, o, b=b: put(f"{b}.moe.gate", o))

            def moe_hook(i, o, b=b, moe=blk.moe):
                xt = i[0][0]
                idx = moe.last_routing[0]
                put_fn(f"{b}.moe.topk", _np(idx).astype(np.int64))
                for e in range(moe.num_experts):
                    tok = torch.nonzero((idx == e).any(-1)).flatten()
                    pre_act = xt[tok] @ moe.w1[e] + moe.b1[e]
                    h = F.gelu(pre_act)
                    put_fn(f"{b}.moe.e{e}.fc1.pre", _np(pre_act))
                    put_fn(f"{b}.moe.e{e}.fc1", _np(h))
                    put_fn(f"{b}.moe.e{e}.fc2", _np(h @ moe.w2[e] + moe.b2[e]))
                put(f"{b}.moe", o)
            fwd(blk.moe, moe_hook)
        else:
            def fc1_hook(i, o, b=b):
                put(f"{b}.mlp.fc1.pre", o)
                put(f"{b}.mlp.fc1", F.gelu(o))
            fwd(blk.mlp.fc1, fc1_hook)
            fwd(blk.mlp.fc2, lambda i, o, b=b: put(f"{b}.mlp.fc2", o))
        fwd(blk, lambda i, o, b=b: put(f"{b}.residual2", o))
    fwd(model.norm, lambda i, o: put("norm", o))
    was_training = model.training
    threads = torch.get_num_threads()
    model.eval()
    # one intra-op thread: these small per-image forwards ran 6x slower with two threads on busy cores
    torch.set_num_threads(1)
    try:
        put("input", x)
        with torch.no_grad():
            model.features(x, task)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        torch.set_num_threads(threads)
    return store


def choose_weight_fracs(model, spec) -> dict[str, dict]:
    """Per weight tensor: {"bits": W, "frac": one fraction per output channel} under ``spec``."""
    return weight_formats(model.cfg, float_weights(model), spec)


def build_qgraph(model, calib: Calibration) -> QGraph:
    """The quantized graph of ``model`` under the calibration's formats and weight fractions.
    Every GEMM's accumulator bound is proven (``QGraph.validate``) or a ConfigError is raised."""
    calib.check_model(model)
    return assemble_qgraph(model.cfg, float_weights(model), calib)


def assemble_qgraph(cfg, fw: dict[str, np.ndarray], calib: Calibration, config: dict | None = None) -> QGraph:
    """The quantized graph of any float source: ``cfg`` its configuration (a ModelConfig or
    ``from_ir.IRConfig``, which may give a LayerNorm its own eps in ``ln_eps_by_layer``), ``fw``
    its weights in ``float_weights``' layout, ``calib`` the formats and weight fractions to use;
    ``config`` the graph's config record (default ``cfg.to_dict()``)."""
    Fm = calib.formats
    Wt = calib.weights
    eps_of = dict(getattr(cfg, "ln_eps_by_layer", ()))
    n_tasks = len(cfg.tasks)
    sat = SatCounter()
    ops: list[QOp] = []
    tensors: dict[str, TensorInfo] = {}

    def wq(key):
        spec = Wt[key]
        fr = np.asarray(spec["frac"], np.int64)
        return quantize_channels(fw[key], spec["bits"], fr), fr

    def emit(op: QOp):
        ops.append(op)
        tensors[op.output] = Fm[op.output]

    def linear(name, inp, gelu=False):
        x = Fm[inp]
        w, wf = wq(name + ".w")
        b = acc_quantize(fw[name + ".b"], x.fmt.frac + wf, name)
        attrs = {"gelu": gelu}
        if gelu:
            mid = Fm[name + ".pre"]
            attrs.update(mid_bits=mid.bits, mid_frac=mid.frac)
            shift = x.fmt.frac + wf - mid.frac
        else:
            shift = x.fmt.frac + wf - Fm[name].col_frac()
        emit(QOp("linear", name, [inp], name, attrs, {"w": w, "b": b, "w_frac": wf, "shift": shift}))

    def layernorm(name, inp):
        x, z = Fm[inp], Fm[name]
        g, gf = wq(name + ".gamma")
        beta = acc_quantize(fw[name + ".beta"], CONTRACT.norm_frac + gf, name)
        eps = nx.layernorm_eps_int(eps_of.get(name, cfg.ln_eps), cfg.dim, x.fmt.frac)
        emit(QOp("layernorm", name, [inp], name, {"eps_int": eps, "beta_shift": 0},
                 {"gamma": g, "beta": beta, "gamma_frac": gf, "out_shift": CONTRACT.norm_frac + gf - z.fmt.frac}))

    def add(name, a, b):
        fa, fb, fz = Fm[a].fmt.frac, Fm[b].fmt.frac, Fm[name].fmt.frac
        emit(QOp("add", name, [a, b], name, {"a_shift": fa - fz, "b_shift": fb - fz}))

    # patch embedding: a GEMM on patchify rows
    x_in = Fm["input"]
    w, wf = wq("patch_embed.w")
    emit(QOp("patch_embed", "patch_embed", ["input"], "patch_embed", {"patch": cfg.patch},
             {"w": w, "b": acc_quantize(fw["patch_embed.b"], x_in.fmt.frac + wf, "patch_embed"), "w_frac": wf,
              "shift": x_in.fmt.frac + wf - Fm["patch_embed"].fmt.frac}))
    pe, em = Fm["patch_embed"], Fm["embed"]
    pos, pos_fr = wq("embed.pos")
    pos_frac = int(pos_fr[0])
    cls = nx.quantize(fw["embed.cls"], pe.fmt, sat, "embed.cls")
    emit(QOp("embed", "embed", ["patch_embed"], "embed",
             {"pos_frac": pos_frac, "a_shift": pe.fmt.frac - em.fmt.frac, "b_shift": pos_frac - em.fmt.frac},
             {"cls": cls, "pos": pos}))

    cur = "embed"
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        layernorm(f"{b}.norm1", cur)
        linear(f"{b}.attn.qkv", f"{b}.norm1")
        qkv, att, score = Fm[f"{b}.attn.qkv"], Fm[f"{b}.attn"], Fm[f"{b}.attn.score"]
        fq, fk, fv = qkv.frac
        emit(QOp("attention", f"{b}.attn", [f"{b}.attn.qkv"], f"{b}.attn",
                 {"heads": cfg.heads, "score_bits": score.bits, "score_frac": score.frac,
                  "score_shift": fq + fk - score.frac, "out_shift": fv - att.fmt.frac}))
        linear(f"{b}.attn.proj", f"{b}.attn")
        add(f"{b}.residual1", cur, f"{b}.attn.proj")
        layernorm(f"{b}.norm2", f"{b}.residual1")
        if cfg.is_moe_block(i):
            name = f"{b}.moe"
            x = Fm[f"{b}.norm2"]
            n = cfg.num_experts
            gw, gwf = wq(f"{name}.gate.w")
            gb = np.stack([acc_quantize(fw[f"{name}.gate.b"][t], x.fmt.frac + gwf[t], f"{name}.gate")
                           for t in range(n_tasks)])
            logits = Fm[f"{name}.gate"]
            p = {"gate_w": gw, "gate_b": gb, "gate_w_frac": gwf, "gate_shift": x.fmt.frac + gwf - logits.fmt.frac}
            per = {k: [] for k in ("w1", "b1", "w1_frac", "shift1", "mid_frac", "w2", "b2", "w2_frac", "shift2",
                                   "combine_shift")}
            for e in range(n):
                f1, f2 = Fm[f"{name}.e{e}.fc1"], Fm[f"{name}.e{e}.fc2"]
                mid = Fm[f"{name}.e{e}.fc1.pre"]
                w1, w1f = wq(f"{name}.e{e}.fc1.w")
                w2, w2f = wq(f"{name}.e{e}.fc2.w")
                vals = {"w1": w1, "b1": acc_quantize(fw[f"{name}.e{e}.fc1.b"], x.fmt.frac + w1f, f"{name}.e{e}.fc1"), "w1_frac": w1f,
                        "shift1": x.fmt.frac + w1f - mid.frac, "mid_frac": mid.frac,
                        "w2": w2, "b2": acc_quantize(fw[f"{name}.e{e}.fc2.b"], f1.fmt.frac + w2f, f"{name}.e{e}.fc2"), "w2_frac": w2f,
                        "shift2": f1.fmt.frac + w2f - f2.fmt.frac,
                        "combine_shift": CONTRACT.gate_frac + f2.fmt.frac - Fm[name].fmt.frac}
                for k, v in vals.items():
                    per[k].append(v)
            p.update({k: np.asarray(v, np.int64) for k, v in per.items()})
            for sub in [f"{name}.gate", f"{name}.topk", f"{name}.score"] + \
                       [f"{name}.e{e}.{fc}" for e in range(n) for fc in ("fc1", "fc2")]:
                tensors[sub] = Fm[sub]
            emit(QOp("moe", name, [f"{b}.norm2"], name,
                     {"experts": n, "top_k": cfg.top_k, "hidden": cfg.expert_hidden, "mid_bits": Fm[f"{name}.e0.fc1.pre"].bits},
                     p))
            branch = name
        else:
            linear(f"{b}.mlp.fc1", f"{b}.norm2", gelu=True)
            linear(f"{b}.mlp.fc2", f"{b}.mlp.fc1")
            branch = f"{b}.mlp.fc2"
        add(f"{b}.residual2", f"{b}.residual1", branch)
        cur = f"{b}.residual2"
    layernorm("norm", cur)
    if sat.saturated:
        raise ConfigError(f"quantizing the parameters saturated: {sat.report()}")
    tensors = {"input": Fm["input"], **tensors}
    meta = {"precision": calib.spec, "calibration": {"images": calib.images, "config_hash": calib.config_hash,
                                                     "weights_hash": calib.weights_hash}}
    g = QGraph(cfg.to_dict() if config is None else config, list(cfg.task_names), Fm["input"], ops, tensors,
               "norm", meta)
    return g.validate()
