"""Builders of ONNX graphs that our exporter did not write, for the importer's tests.

* `handwritten_vit`: a ViT written node by node with onnx.helper in other op styles: Gemm
  (transB) linears on 2-D token matrices, decomposed LayerNorm, separate q/k/v projections or a
  per-head interleaved packed qkv, other head-split orders, the attention scale on q before the
  matmul (or a Div after it), GELU as the tanh formula, an Erf formula in another operand order or
  the Gelu op, residual adds written branch first, an optional classification head on the CLS
  token and an optional MoE written with OneHot / Mul / ReduceSum instead of ScatterElements.
* graph surgery used by the error tests: inserting an op mid-graph, making the batch dynamic.
* `export_torch`: torch.onnx.export with the legacy (TorchScript) or the dynamo exporter.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, opset: int, seed: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def const(self, value, name=None) -> str:
        self.n += 1
        name = name or f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape, scale=None) -> np.ndarray:
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1] if len(shape) > 1 else 1)
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        self.n += 1
        outs = [f"t{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"hand/{op_type}_{self.n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(self, values) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def scalar(self, v) -> str:
        return self.const(np.array(v, dtype=np.float32))

    # layers ---------------------------------------------------------------------------------
    def reduce_mean(self, x):
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints([-1])], keepdims=1)
        return self.op("ReduceMean", [x], axes=[-1], keepdims=1)

    def unsqueeze(self, x, axes):
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def squeeze(self, x, axes):
        return self.op("Squeeze", [x, self.ints(axes)])

    def layernorm(self, x, d, style):
        gamma = (1 + 0.1 * self.rng.standard_normal(d)).astype(np.float32)
        beta = (0.1 * self.rng.standard_normal(d)).astype(np.float32)
        if style == "op":
            return self.op("LayerNormalization", [x, self.const(gamma), self.const(beta)], axis=-1, epsilon=1e-6)
        mean = self.reduce_mean(x)
        centered = self.op("Sub", [x, mean])
        sq = self.op("Pow", [centered, self.scalar(2.0)]) if style == "decomposed" else self.op("Mul", [centered, centered])
        var = self.reduce_mean(sq)
        std = self.op("Sqrt", [self.op("Add", [var, self.scalar(1e-5)])])
        if style == "decomposed":
            normed = self.op("Div", [centered, std])
        else:  # reciprocal, operands swapped
            normed = self.op("Mul", [self.op("Reciprocal", [std]), centered])
        return self.op("Add", [self.const(beta), self.op("Mul", [self.const(gamma), normed])])

    def gemm(self, x, d_in, d_out, bias=True):
        w = self.weight(d_out, d_in)  # [out, in]: transB
        ins = [x, self.const(w)] + ([self.const(self.weight(d_out, scale=0.1))] if bias else [])
        return self.op("Gemm", ins, transB=1)

    def gelu(self, x, style):
        if style == "op":
            return self.op("Gelu", [x])
        if style == "tanh":
            cube = self.op("Pow", [x, self.scalar(3.0)])
            inner = self.op("Add", [x, self.op("Mul", [cube, self.scalar(0.044715)])])
            t = self.op("Tanh", [self.op("Mul", [self.scalar(math.sqrt(2 / math.pi)), inner])])
            return self.op("Mul", [self.op("Mul", [x, self.op("Add", [self.scalar(1.0), t])]), self.scalar(0.5)])
        half = self.op("Mul", [x, self.scalar(0.5)])
        e = self.op("Erf", [self.op("Mul", [x, self.scalar(1 / math.sqrt(2))])])
        return self.op("Mul", [half, self.op("Add", [e, self.scalar(1.0)])])


def handwritten_vit(*, qkv: str = "separate", ln: str = "decomposed", gelu: str = "tanh", dim: int = 32,
                    heads: int = 4, depth: int = 2, img=(16, 24), patch: int = 8, chans: int = 3, hidden: int = 64,
                    moe_blocks=(), experts: int = 4, top_k: int = 2, expert_hidden: int = 48,
                    classes: int | None = None, head_ln: bool = False, opset: int = 17, seed: int = 0) -> bytes:
    """A pre-norm ViT in plain ONNX ops; see the module docstring for the styles."""
    g = _Builder(opset, seed)
    d, h, dh = dim, heads, dim // heads
    gh, gw = img[0] // patch, img[1] // patch
    n_tok = gh * gw + 1

    x = g.op("Conv", ["image", g.const(g.weight(d, chans, patch, patch, scale=0.1)), g.const(g.weight(d, scale=0.1))],
             kernel_shape=[patch, patch], strides=[patch, patch])
    x = g.op("Transpose", [g.op("Reshape", [x, g.ints([d, gh * gw])])], perm=[1, 0])  # [Np, D]
    x = g.op("Concat", [g.const(g.weight(1, d, scale=0.5)), x], axis=0)
    x = g.op("Add", [x, g.const(g.weight(n_tok, d, scale=0.5))])

    for i in range(depth):
        y = g.layernorm(x, d, ln)
        if qkv == "separate":
            q = g.op("Mul", [g.gemm(y, d, d), g.scalar(dh ** -0.5)])  # scale on q, before the matmul
            q = g.op("Transpose", [g.op("Reshape", [q, g.ints([n_tok, h, dh])])], perm=[1, 0, 2])
            kt = g.op("Transpose", [g.op("Reshape", [g.gemm(y, d, d), g.ints([n_tok, h, dh])])], perm=[1, 2, 0])
            v = g.op("Transpose", [g.op("Reshape", [g.gemm(y, d, d), g.ints([n_tok, h, dh])])], perm=[1, 0, 2])
            s = g.op("MatMul", [q, kt])
        else:  # one Gemm whose columns are (head, q/k/v, dh), split after a transpose
            packed = g.op("Reshape", [g.gemm(y, d, 3 * d), g.ints([n_tok, h, 3, dh])])
            parts = g.op("Split", [g.op("Transpose", [packed], perm=[2, 1, 0, 3]), g.ints([1, 1, 1])], n_out=3, axis=0)
            q, k, v = (g.squeeze(p, [0]) for p in parts)
            s = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])]), g.scalar(math.sqrt(dh))])
        o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])  # [H, T, dh]
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[1, 0, 2]), g.ints([n_tok, d])])
        x = g.op("Add", [g.gemm(o, d, d), x])  # branch first
        y = g.layernorm(x, d, ln)
        if i in moe_blocks:
            branch = _moe(g, y, d, experts, top_k, expert_hidden, gelu)
        else:
            branch = g.gemm(g.gelu(g.gemm(y, d, hidden), gelu), hidden, d)
        x = g.op("Add", [x, branch])

    x = g.layernorm(x, d, "op" if ln == "op" else ln)
    if classes:
        x = g.op("Slice", [x, g.ints([0]), g.ints([1]), g.ints([0])])  # the CLS token, [1, D]
        if head_ln:
            x = g.layernorm(x, d, "op")
        x = g.gemm(x, d, classes)
        out = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, classes])
    else:
        x = g.unsqueeze(x, [0])
        out = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, n_tok, d])
    graph = helper.make_graph(g.nodes, "handwritten_vit",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, chans, *img])],
                              [out], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="handwritten")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _moe(g: _Builder, y, d, n, k, hidden, gelu):
    """Top-k MoE on [T, D] tokens: probabilities -> TopK -> OneHot x scores -> ReduceSum combine;
    experts as expert-batched MatMuls [N, T, H]; combine by Mul and ReduceSum over experts."""
    probs = g.op("Softmax", [g.op("MatMul", [y, g.const(g.weight(d, n))])], axis=-1)
    vals, idx = g.op("TopK", [probs, g.ints([k])], n_out=2, axis=-1)
    onehot = g.op("OneHot", [idx, g.const(np.array(n, dtype=np.int64)), g.const(np.array([0, 1], np.float32))], axis=-1)
    combine = g.op("ReduceSum", [g.op("Mul", [onehot, g.unsqueeze(vals, [-1])]), g.ints([1])], keepdims=0)  # [T, N]
    hdn = g.op("Add", [g.op("MatMul", [g.unsqueeze(y, [0]), g.const(g.weight(n, d, hidden))]),
                       g.const(g.weight(n, 1, hidden, scale=0.1))])
    out = g.op("Add", [g.op("MatMul", [g.gelu(hdn, gelu), g.const(g.weight(n, hidden, d))]),
                       g.const(g.weight(n, 1, d, scale=0.1))])  # [N, T, D]
    weights = g.unsqueeze(g.op("Transpose", [combine], perm=[1, 0]), [-1])  # [N, T, 1]
    return g.op("ReduceSum", [g.op("Mul", [weights, out]), g.ints([0])], keepdims=0)


# ---- graph surgery -----------------------------------------------------------------------------
def insert_after(data: bytes, tensor: str, op_type: str, name: str, **attrs) -> bytes:
    """Insert `op_type` on `tensor`: its consumers read the new node's output instead."""
    model = onnx.load_from_string(data)
    new_out = f"{tensor}__{op_type}"
    for node in model.graph.node:
        node.input[:] = [new_out if i == tensor else i for i in node.input]
    index = next(i for i, n in enumerate(model.graph.node) if tensor in n.output) + 1
    model.graph.node.insert(index, helper.make_node(op_type, [tensor], [new_out], name=name, **attrs))
    return model.SerializeToString()


def make_batch_dynamic(data: bytes, name: str = "batch") -> bytes:
    model = onnx.load_from_string(data)
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = name
    return model.SerializeToString()


def with_outputs(data: bytes, names: list[str]) -> bytes:
    """The model with extra graph outputs (for reading intermediate tensors in ONNX Runtime)."""
    model = onnx.load_from_string(data)
    for n in names:
        model.graph.output.append(helper.make_empty_tensor_value_info(n))
    return model.SerializeToString()


# ---- torch export ------------------------------------------------------------------------------
def export_torch(module, args: tuple, dynamo: bool, opset: int = 18, input_names=("image",)) -> bytes:
    import torch

    module.eval()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                            input_names=list(input_names), verbose=False, optimize=True)
                return program.model_proto.SerializeToString()
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=min(opset, 17),
                              input_names=list(input_names), do_constant_folding=True)
            return buf.getvalue()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
