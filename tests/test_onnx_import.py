"""ONNX import: our exporter's graphs, foreign graphs, clear errors, and the pass infrastructure.

Every imported graph is executed by the float64 IR executor and compared with ONNX Runtime on the
source file (max abs error <= 1e-4 x max|output|), for every task id, with MoE routing compared
expert by expert; every clean-up pass is verified against the IR before it and against ONNX Runtime.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from foreign_models import export_torch, handwritten_vit, insert_after, make_batch_dynamic, with_outputs
from m3vit.compiler import passes
from m3vit.compiler.ir import IR, canonical_names
from m3vit.compiler.ir_exec import run_ir
from m3vit.compiler.onnx_import import LIMIT_KEYS, import_onnx, model_dims
from m3vit.errors import M3ViTError, UsageError
from m3vit.model import export as ex
from m3vit.model.config import resolve_config
from m3vit.model.images import sample_images, to_input
from m3vit.model.vit import build_model

TOL = 1e-4
_WORK = Path(tempfile.mkdtemp(prefix="m3vit-import-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


# ---- a timm-style ViT, written apart from m3vit's own model ------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch, chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads, fused_attn):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * (1 + 0.2 * torch.randn(dim)))

    def forward(self, x):
        return x * self.gamma


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden, approximate):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate=approximate), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads, hidden, fused_attn, init_values, approximate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads, fused_attn)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, hidden, approximate)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, img=(32, 48), patch=8, chans=3, dim=64, depth=2, heads=4, mlp_ratio=2.0, classes=10,
                 fused_attn=False, init_values=None, approximate="none"):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, chans, dim)
        n = (img[0] // patch) * (img[1] // patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads, int(dim * mlp_ratio), fused_attn, init_values, approximate)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes) if classes else nn.Identity()
        self.classes = classes

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x):
        x = self.forward_features(x)
        return self.head(x[:, 0]) if self.classes else x


# ---- helpers -----------------------------------------------------------------------------------
_EXPORTS: dict = {}


def ours(preset="tiny", task=0, exporter="torchscript", with_head=False, dataset=None, **overrides) -> bytes:
    """Bytes of one of our exports (cached per configuration)."""
    key = (preset, task, exporter, with_head, dataset, tuple(sorted(overrides.items())))
    if key not in _EXPORTS:
        model = build_model(resolve_config(preset, dataset, overrides=overrides), with_heads=with_head)
        path = _WORK / f"m{len(_EXPORTS)}.onnx"
        ex.export_onnx(model, path, task=None if task == "all" else task, all_tasks=task == "all",
                       with_head=with_head, exporter=exporter)
        _EXPORTS[key] = path.read_bytes()
    return _EXPORTS[key]


def images_for(ir: IR, n_random: int = 1, photo: bool = True) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = [rng.standard_normal((1, *ir.image_shape)).astype(np.float32) for _ in range(n_random)]
    if photo and ir.image_shape[0] == 3:
        out.append(to_input(sample_images()[0][1], tuple(ir.image_shape[1:])).numpy().astype(np.float32))
    return out


def _topk_outputs(data: bytes, ir: IR) -> dict[str, str]:
    """MoE op name -> the ONNX tensor holding its TopK indices."""
    model = onnx.load_from_string(data)
    out = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "TopK":
            continue
        label = node.name or f"#{i} -> {node.output[0]}"
        owners = [op.name for op in ir.by_kind("moe") if label in op.source]
        assert len(owners) == 1, f"TopK {label} is in {owners}"
        out[owners[0]] = node.output[1]
    return out


def compare_with_ort(ir: IR, data: bytes, images=None) -> float:
    """run_ir == ONNX Runtime for every image and task id; routing identical. Returns the worst error."""
    topk = _topk_outputs(data, ir)
    assert set(topk) == {op.name for op in ir.by_kind("moe")}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(with_outputs(data, list(topk.values())) if topk else data, options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for img in images if images is not None else images_for(ir):
        for t in range(ir.n_tasks):
            feed = {"image": img} if ir.meta.get("task_input") is None else \
                {"image": img, ir.meta["task_input"]: np.array(t, dtype=np.int64)}
            feed = {session.get_inputs()[0].name: img, **{k: v for k, v in feed.items() if k != "image"}}
            outs = dict(zip(names, session.run(None, feed)))
            ref = outs[names[0]]
            got, trace = run_ir(ir, img, t, trace=True)
            assert got.shape == ref.shape
            err = float(np.abs(got - ref).max()) / float(np.abs(ref).max())
            assert err <= TOL, f"task {t}: relative error {err:.3g}"
            worst = max(worst, err)
            for moe, tensor in topk.items():
                want = outs[tensor].reshape(-1, ir[moe].attrs["top_k"])
                np.testing.assert_array_equal(trace[f"{moe}.topk"], want, err_msg=f"{moe} routing, task {t}")
    return worst


def assert_canonical(ir: IR) -> None:
    assert ir.is_clean(), ir.summary()
    assert set(canonical_names(ir).values()) == {op.name for op in ir.ops}
    ir.validate()


# ---- our exporter ------------------------------------------------------------------------------
OURS = [
    ("tiny", 0, "torchscript", {}),
    ("tiny", 1, "dynamo", {}),
    ("tiny", "all", "torchscript", {}),
    ("tiny", "all", "dynamo", {}),
    ("tiny", 1, "torchscript", {"routing": "task-conditioned"}),
    ("tiny", "all", "torchscript", {"routing": "task-conditioned"}),
    ("tiny", "all", "dynamo", {"routing": "task-conditioned"}),
    ("tiny", 0, "torchscript", {"num_experts": 0}),
    ("tiny", 0, "dynamo", {"num_experts": 0}),
    ("edge-moe", "semseg", "torchscript", {}),
    ("edge-moe", "all", "torchscript", {}),  # both tasks through the task id
    pytest.param("edge-moe", "depth", "dynamo", {}, marks=pytest.mark.slow),
]


def _case_id(case) -> str:
    p, t, e, o = case.values if hasattr(case, "values") else case
    return f"{p}-{t}-{e}" + "".join(f"-{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("preset,task,exporter,overrides", OURS, ids=[_case_id(c) for c in OURS])
def test_our_exports_match_onnx_runtime(preset, task, exporter, overrides):
    data = ours(preset, task, exporter, **overrides)
    ir = import_onnx(data, verify=True)  # every clean-up pass checked against ONNX Runtime
    cfg = resolve_config(preset, overrides=overrides)
    assert_canonical(ir)
    counts = ir.counts()
    assert counts["attention"] == cfg.depth and counts.get("moe", 0) == len(cfg.moe_blocks)
    assert counts["layernorm"] == 2 * cfg.depth + 1 and counts["add"] == 2 * cfg.depth
    assert ir.tasks == (cfg.task_names if task == "all" else [task if isinstance(task, str) else cfg.task_names[task]])
    dims = model_dims(ir)
    assert (dims["tokens"], dims["dim"], dims["heads"]) == (cfg.num_tokens, cfg.dim, cfg.heads)
    for moe in ir.by_kind("moe"):
        assert moe.attrs["top_k"] == cfg.top_k and moe.params["gate_w"].shape == (ir.n_tasks, cfg.dim, cfg.num_experts)
        assert ("gate_b" in moe.params) == (cfg.routing == "task-conditioned")
    compare_with_ort(ir, data)


@pytest.mark.parametrize("exporter,opset", [("torchscript", 20), pytest.param("dynamo", 23, marks=pytest.mark.slow)])
def test_newer_opsets(exporter, opset):
    """Opset 20+: the exporters write the Gelu op (in the experts too) instead of the Erf formula."""
    model = build_model(resolve_config("tiny"), with_heads=False)
    path = _WORK / f"opset{opset}.onnx"
    ex.export_onnx(model, path, all_tasks=True, exporter=exporter, opset=opset)
    data = path.read_bytes()
    assert "Gelu" in {n.op_type for n in onnx.load_from_string(data).graph.node}
    ir = import_onnx(data, verify=True)
    assert_canonical(ir)
    assert ir.meta["opset"] == opset
    compare_with_ort(ir, data)


def test_canonical_names_and_trace():
    ir = import_onnx(ours("tiny", "all"))
    expected = ["patch_embed", "embed"]
    for i in range(4):
        b = f"blocks.{i}"
        expected += [f"{b}.norm1", f"{b}.attn.qkv", f"{b}.attn", f"{b}.attn.proj", f"{b}.residual1", f"{b}.norm2"]
        expected += [f"{b}.moe"] if i % 2 else [f"{b}.mlp.fc1", f"{b}.mlp.fc2"]
        expected += [f"{b}.residual2"]
    assert [op.name for op in ir.ops] == expected + ["norm", "output"]
    assert ir["blocks.0.mlp.fc1"].attrs["gelu"] and not ir["blocks.0.mlp.fc2"].attrs["gelu"]
    assert ir["blocks.0.residual1"].inputs == ["embed", "blocks.0.attn.proj"]  # skip first, branch second
    out, trace = run_ir(ir, images_for(ir, photo=False)[0], "depth", trace=True)
    assert set(expected) <= set(trace) and trace["blocks.1.moe.topk"].shape == (25, 2)
    assert np.array_equal(out[0], trace["norm"])
    # The same names and numbers from the other exporter, and whatever the ONNX nodes are called.
    assert [op.name for op in import_onnx(ours("tiny", "all", "dynamo")).ops] == [op.name for op in ir.ops]
    model = onnx.load_from_string(ours("tiny", "all"))
    for i, node in enumerate(model.graph.node):
        node.name = f"n{(i * 7919) % 1000:03d}"
    renamed = import_onnx(model.SerializeToString())
    assert [op.name for op in renamed.ops] == [op.name for op in ir.ops]
    img = images_for(ir, photo=False)[0]
    np.testing.assert_array_equal(run_ir(renamed, img, 1), run_ir(ir, img, 1))


def test_multi_task_gates_equal_single_task_gates():
    multi = import_onnx(ours("tiny", "all"))
    for t in (0, 1):
        single = import_onnx(ours("tiny", t))
        for a, b in zip(multi.by_kind("moe"), single.by_kind("moe")):
            np.testing.assert_array_equal(a.params["gate_w"][t], b.params["gate_w"][0])
            np.testing.assert_array_equal(a.params["w1"], b.params["w1"])


def test_import_provenance_covers_every_node():
    data = ours("tiny", "all", "dynamo")
    ir = import_onnx(data, clean=False)
    model = onnx.load_from_string(data)
    covered = set().union(*(op.source for op in ir.ops))
    dynamic = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Softmax", "TopK", "ScatterElements",
                                                                 "Erf", "LayerNormalization", "Conv", "Concat")]
    assert dynamic and set(dynamic) <= covered
    moe = ir.by_kind("moe")[0]
    assert {"TopK", "ScatterElements", "GatherElements"} <= {model.graph.node[[n.name for n in model.graph.node]
                                                              .index(s)].op_type for s in moe.source}


# ---- foreign graphs ----------------------------------------------------------------------------
TIMM = [
    ("plain-head", dict(classes=10)),
    ("sdpa-layerscale-tanh", dict(classes=0, fused_attn=True, init_values=0.1, approximate="tanh")),
]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name,kw", TIMM, ids=[n for n, _ in TIMM])
def test_timm_style_vit(name, kw, dynamo):
    torch.manual_seed(1)
    model = VisionTransformer(**kw).eval()
    data = export_torch(model, (torch.zeros(1, 3, 32, 48),), dynamo=dynamo)
    ir = import_onnx(data, verify=True)
    assert_canonical(ir)
    assert ir.counts()["attention"] == 2 and "moe" not in ir.counts()
    assert ("head" in ir) == bool(kw.get("classes"))
    if kw.get("classes"):
        assert ir["head"].kind == "cls_head" and ir.output.attrs["onnx_shape"] == [1, 10]
    if kw.get("approximate") == "tanh":
        assert ir["blocks.0.mlp.fc1"].attrs["approx"] == "tanh"
    if kw.get("init_values"):  # LayerScale folded into the projections
        assert "fold-constants" in ir.meta["passes"]
    compare_with_ort(ir, data)
    with torch.no_grad():
        want = model(torch.from_numpy(images_for(ir)[-1])).numpy()
    got = run_ir(ir, images_for(ir)[-1])
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


HANDWRITTEN = [
    ("gemm-separate-qkv", dict()),
    ("interleaved-qkv-reciprocal-ln", dict(qkv="interleaved", ln="reciprocal", gelu="erf")),
    ("gelu-op-opset20", dict(ln="op", gelu="op", opset=20)),
    ("onehot-moe", dict(moe_blocks=(1,), gelu="erf")),
    ("onehot-moe-opset18", dict(opset=18, moe_blocks=(0, 1), gelu="tanh", depth=2)),
    ("cls-head", dict(classes=10)),
    ("cls-head-ln-interleaved", dict(classes=7, head_ln=True, qkv="interleaved")),
]


@pytest.mark.parametrize("name,kw", HANDWRITTEN, ids=[n for n, _ in HANDWRITTEN])
def test_handwritten_vit(name, kw):
    data = handwritten_vit(**kw)
    ir = import_onnx(data, verify=True)
    assert_canonical(ir)
    assert all(len(a.inputs) == 1 for a in ir.by_kind("attention"))  # q/k/v packed for the compute unit
    assert ir.counts().get("moe", 0) == len(kw.get("moe_blocks", ()))
    compare_with_ort(ir, data)


# ---- the dense-prediction head -----------------------------------------------------------------
def test_with_head_export_is_reported_and_backbone_kept():
    data = ours("tiny", 0, with_head=True)
    with pytest.raises(UsageError, match="without --with-head") as err:
        import_onnx(data)
    assert "\n" not in str(err.value) and "Conv" in str(err.value)
    ir = import_onnx(data, host_head=True, verify=True)  # checked against ORT at the backbone output
    assert ir.meta["host_nodes"] and ir.output.inputs == ["norm"]
    assert all(name.startswith("/head/") for name in ir.meta["host_nodes"])
    backbone = import_onnx(ours("tiny", 0))  # the same model's backbone export
    img = images_for(ir, photo=False)[0]
    np.testing.assert_allclose(run_ir(ir, img), run_ir(backbone, img), rtol=0, atol=1e-9)


# ---- errors ------------------------------------------------------------------------------------
def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_unsupported_op_names_type_and_node():
    data = ours("tiny", 0)
    model = onnx.load_from_string(data)
    fc1 = next(n for n in model.graph.node if n.op_type == "Add" and "mlp/fc1" in n.name)
    bad = insert_after(data, fc1.output[0], "LeakyRelu", "inserted/leaky", alpha=0.1)
    with pytest.raises(UsageError) as err:
        import_onnx(bad)
    text = _one_line(err)
    assert "LeakyRelu" in text and "inserted/leaky" in text and "supported" in text


def test_unnamed_nodes_import_and_are_named_by_position():
    model = onnx.load_from_string(handwritten_vit(moe_blocks=(1,), gelu="erf"))
    for node in model.graph.node:
        node.name = ""
    data = model.SerializeToString()
    ir = import_onnx(data)
    compare_with_ort(ir, data)
    gemm = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Gemm")
    bad = insert_after(data, model.graph.node[gemm].output[0], "LeakyRelu", "")
    with pytest.raises(UsageError, match=r"unsupported op LeakyRelu \(node '#\d+ -> "):
        import_onnx(bad)


def test_unsupported_pattern_names_node():
    data = ours("tiny", 0)
    model = onnx.load_from_string(data)
    soft = next(n for n in model.graph.node if n.op_type == "Softmax" and "attn" in n.name)
    bad = insert_after(data, soft.output[0], "Relu", "inserted/relu")  # Relu on attention probabilities
    with pytest.raises(UsageError) as err:
        import_onnx(bad)
    assert "Relu" in _one_line(err) and "inserted/relu" in str(err.value)


@pytest.mark.parametrize("what", ["half", "header", "empty", "garbage"])
def test_truncated_or_corrupt_file(tmp_path, what):
    data = ours("tiny", 0)
    content = {"half": data[: len(data) // 2], "header": data[:40], "empty": b"",
               "garbage": b"\x00\xff" * 500}[what]
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UsageError) as err:
        import_onnx(path)
    assert str(path) in _one_line(err)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        import_onnx(tmp_path / "nope.onnx")
    with pytest.raises(UsageError, match="directory"):
        import_onnx(tmp_path)


def test_checker_failure():
    model = onnx.load_from_string(ours("tiny", 0))
    model.graph.node[5].input[0] = "not_defined_anywhere"
    with pytest.raises(UsageError, match="ONNX checker") as err:
        import_onnx(model.SerializeToString())
    _one_line(err)


_CORRUPT_BASE: dict = {}


@settings(max_examples=16, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_random_corruption_never_escapes_as_another_exception(edits, structural):
    if "data" not in _CORRUPT_BASE:
        _CORRUPT_BASE["data"] = handwritten_vit(moe_blocks=(1,), gelu="erf")
    data = bytearray(_CORRUPT_BASE["data"])
    # The graph's nodes are serialised before its weights: aim half the cases at the structure.
    span = min(len(data), 6000) if structural else len(data)
    for where, value in edits:
        data[int(where * span)] = value
    try:
        ir = import_onnx(bytes(data))
    except M3ViTError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(ir, IR)


def test_dynamic_batch():
    with pytest.raises(UsageError, match="batch") as err:
        import_onnx(make_batch_dynamic(ours("tiny", 0)))
    assert "static" in _one_line(err)


def test_batch_other_than_one():
    model = onnx.load_from_string(handwritten_vit())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(UsageError, match="batch"):
        import_onnx(model.SerializeToString())


def test_hardware_limits():
    data = ours("tiny", "all")
    ir = import_onnx(data, limits={"max_tokens": 25, "max_dim": 48, "max_hidden": 96, "max_experts": 4,
                                   "max_k": 2, "max_tasks": 2, "max_heads": 3})
    assert ir.n_tasks == 2
    with pytest.raises(UsageError) as err:
        import_onnx(data, limits={"max_tokens": 16, "max_experts": 2, "max_tasks": 1, "max_heads": 3})
    text = _one_line(err)
    assert "tokens 25 > max_tokens 16" in text and "experts 4 > max_experts 2" in text
    assert "tasks 2 > max_tasks 1" in text and "heads" not in text
    with pytest.raises(UsageError, match="unknown hardware limit"):
        import_onnx(data, limits={"max_tokenz": 16})
    with pytest.raises(UsageError, match="positive integer"):
        import_onnx(data, limits={"max_k": 0})
    assert set(LIMIT_KEYS) == {"max_tokens", "max_dim", "max_hidden", "max_experts", "max_k", "max_tasks",
                               "max_heads"}


def test_dead_nodes_are_counted_not_raised():
    data = ours("tiny", 0)
    model = onnx.load_from_string(data)
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    model.graph.node.append(onnx.helper.make_node("LeakyRelu", [ln.output[0]], ["unused"], name="dangling"))
    ir = import_onnx(model.SerializeToString())
    assert ir.meta["dead_nodes"] == ["dangling"]


# ---- passes ------------------------------------------------------------------------------------
def _raw(data: bytes) -> IR:
    return import_onnx(data, clean=False)


def test_fuse_bias_and_gelu_change_what_they_should():
    raw = _raw(ours("tiny", 0))
    n_linear = len(raw.by_kind("linear"))
    bias_adds = [op for op in raw.ops if op.is_bias_add]
    assert len(raw.by_kind("gelu")) == 2 and len(bias_adds) == n_linear + 1  # every linear + the position table
    fused, changed = passes.FuseBias().apply(raw)
    assert changed and all("b" in op.params for op in fused.by_kind("linear"))
    assert [op.name for op in fused.ops if op.is_bias_add] == ["embed.bias"]
    assert passes.FuseBias().apply(fused) == (fused, False)
    gelu, changed = passes.FuseGelu().apply(fused)
    assert changed and not gelu.by_kind("gelu")
    assert sorted(op.name for op in gelu.by_kind("linear") if op.attrs["gelu"]) == ["blocks.0.mlp.fc1", "blocks.2.mlp.fc1"]
    assert passes.FuseGelu().apply(gelu)[1] is False
    folded, changed = passes.FoldConstants().apply(gelu)
    assert changed and folded.is_clean() and "pos" in folded["embed"].params
    assert len(raw.ops) - len(folded.ops) == len(bias_adds) + 2
    assert passes.FoldConstants().apply(folded)[1] is False


def test_pack_qkv_and_residual_order_on_a_foreign_graph():
    raw = _raw(handwritten_vit())
    assert all(len(a.inputs) == 3 for a in raw.by_kind("attention"))
    assert [op.inputs[0] for op in raw.by_kind("add") if len(op.inputs) == 2][0] == "blocks.0.attn.proj"
    packed, changed = passes.PackQKV().apply(raw)
    assert changed and all(len(a.inputs) == 1 for a in packed.by_kind("attention"))
    assert len(raw.by_kind("linear")) - len(packed.by_kind("linear")) == 2 * 2
    assert packed["blocks.0.attn.qkv"].shape[1] == 3 * 32
    res, changed = passes.CanonicalResidual().apply(packed)
    assert changed and res["blocks.0.residual1"].inputs == ["embed.bias", "blocks.0.attn.proj"]
    assert passes.CanonicalResidual().apply(res)[1] is False


def test_fold_selections_then_remove_dead():
    raw = _raw(handwritten_vit(qkv="interleaved"))
    assert len(raw.by_kind("select")) == 3 * 2
    folded, changed = passes.FoldConstants().apply(raw)
    assert changed and not folded.by_kind("select")
    dead = [op.name for op in folded.ops if op.name.startswith("dead.")]
    assert len(dead) == 2  # the interleaved projections, no longer read
    live, changed = passes.RemoveDeadOps().apply(folded)
    assert changed and not any(op.name.startswith("dead.") for op in live.ops)
    assert passes.RemoveDeadOps().apply(live)[1] is False


def test_flow_reaches_fixed_point_with_verification():
    data = handwritten_vit(qkv="interleaved", moe_blocks=(1,), gelu="erf")
    raw = _raw(data)
    verifier = passes.Verifier.for_model(raw, data)
    flow = passes.cleanup_flow()
    ir = flow.run(raw, verify=verifier)
    assert ir.is_clean() and "cleanup" in ir.meta["flows"]
    assert all(not p.apply(ir)[1] for p in flow.passes)
    assert [e["pass"] for e in verifier.log][0] == "import" and len(verifier.log) == len(ir.meta["passes"]) + 1
    assert all(e.get("vs_before", 0) <= passes.PASS_TOLERANCE and e["vs_onnx"] <= TOL for e in verifier.log)


def test_verification_catches_a_broken_pass():
    data = ours("tiny", 0)
    raw = _raw(data)

    def off_by_a_little(ir: IR) -> bool:
        op = next(op for op in ir.ops if op.kind == "linear" and "blocks.2" in op.name)
        op.params["w"] = np.asarray(op.params["w"], np.float64) * 1.01
        return True

    broken = passes.FunctionPass("scale-a-weight", off_by_a_little)
    verifier = passes.Verifier.for_model(raw, data)
    with pytest.raises(passes.PassVerificationError, match="scale-a-weight"):
        passes.run_to_fixed_point(raw, passes.cleanup_passes()[:3] + [broken], verify=verifier)
    # without verification the broken pass never settles either
    with pytest.raises(M3ViTError, match="fixed point"):
        passes.run_to_fixed_point(raw, [broken], max_rounds=3)


def test_verifier_compares_with_onnx_runtime():
    data = ours("tiny", 0)
    raw = _raw(data)
    other = ours("tiny", 1)  # another task's gates: same shapes, different routing
    verifier = passes.Verifier.for_model(raw, other)
    with pytest.raises(passes.PassVerificationError, match="ONNX Runtime"):
        verifier.check(raw, "import")


def test_pass_apply_does_not_mutate_its_input():
    raw = _raw(ours("tiny", 0))
    before = [(op.name, op.kind, list(op.inputs), sorted(op.params)) for op in raw.ops]
    for p in passes.cleanup_passes():
        p.apply(raw)
    assert [(op.name, op.kind, list(op.inputs), sorted(op.params)) for op in raw.ops] == before


# ---- executor ----------------------------------------------------------------------------------
def test_run_ir_checks_image_and_task():
    ir = import_onnx(ours("tiny", "all"))
    with pytest.raises(UsageError, match="image"):
        run_ir(ir, np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(UsageError, match="task"):
        run_ir(ir, np.zeros((1, 3, 32, 48), np.float32), task="normals")
    a = run_ir(ir, np.zeros((1, 3, 32, 48), np.float32), task="depth")
    b = run_ir(ir, torch.zeros(3, 32, 48), task=1)
    np.testing.assert_array_equal(a, b)


# ---- big models (timing) -----------------------------------------------------------------------
@pytest.mark.slow
def test_m3vit_small_pascal_import():
    data = ours("m3vit-small", 0, dataset="pascal")
    ir = import_onnx(data)
    assert_canonical(ir)
    assert model_dims(ir)["tokens"] == 1025 and ir.counts()["moe"] == 6
    compare_with_ort(ir, data, images_for(ir, photo=True, n_random=0))
