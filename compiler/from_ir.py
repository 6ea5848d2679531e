"""IR -> QGraph: the quantized graph of any model the ONNX front end accepts.

The float IR (compiler/ir.py) is a second float source beside the PyTorch model: this module
gives its weights in the layout ``from_torch.float_weights`` uses, its float trace under the
canonical names ``from_torch.float_trace`` uses, and a configuration with what calibration and
quantization read. Calibration (``quantize.calibrate_source``) and graph assembly
(``from_torch.assemble_qgraph``) are the very code the PyTorch path runs.

Our exporter's files carry their ModelConfig in the m3vit metadata (for an IR imported apart, a
calibration's ModelConfig stands in); when it agrees with the graph, the QGraph records it, so the
ONNX path and the PyTorch path give equal graphs. Any other graph gets an ``IRConfig`` derived from
the IR: MoE layers wherever the graph has them, one LayerNorm eps per layer, no MoE at all for a
dense ViT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3vit.compiler.ir import IMAGE, IR
from m3vit.compiler.qgraph import QGraph
from m3vit.compiler.quantize import (DEFAULT_SPEC, Calibration, calibrate_source, choose_formats,
                                     load_calibration, normalise_spec, resolve_precision, weight_formats)
from m3vit.errors import ConfigError, UsageError

__all__ = ["IRConfig", "load_ir", "ir_config", "config_from_record", "ir_float_weights", "ir_float_trace",
           "calibrate_ir", "qgraph_from_ir", "qgraph_from_onnx"]

CONFIG_META = "m3vit_config"  # ir.meta key: our exporter's ModelConfig (JSON), when the file has one


def _f32_decimal(v: float) -> float:
    """The shortest decimal that a float32 constant rounds from (1e-6, not 9.99999997e-7): ONNX
    stores eps in float32, the model was written with the decimal."""
    return float(str(np.float32(v)))


@dataclass(frozen=True)
class IRConfig:
    """What calibration and quantization read of a model, derived from its IR. The attributes
    mirror ModelConfig's; MoE blocks are listed, and every LayerNorm has its own eps."""

    name: str
    img_size: tuple[int, int]
    patch: int
    in_chans: int
    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    num_experts: int
    expert_hidden: int
    top_k: int
    moe_block_ids: tuple[int, ...]
    ln_eps: float
    ln_eps_by_layer: tuple[tuple[str, float], ...]
    tasks: tuple[str, ...]

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch, self.img_size[1] // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def has_moe(self) -> bool:
        return bool(self.moe_block_ids)

    def is_moe_block(self, index: int) -> bool:
        return index in self.moe_block_ids

    @property
    def moe_blocks(self) -> list[int]:
        return list(self.moe_block_ids)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": "onnx", "img_size": list(self.img_size), "patch": self.patch,
                "in_chans": self.in_chans, "dim": self.dim, "depth": self.depth, "heads": self.heads,
                "mlp_hidden": self.mlp_hidden, "num_experts": self.num_experts,
                "expert_hidden": self.expert_hidden, "top_k": self.top_k, "moe_blocks": list(self.moe_block_ids),
                "ln_eps": self.ln_eps, "ln_eps_by_layer": dict(self.ln_eps_by_layer),
                "tasks": [{"name": t} for t in self.tasks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# ---------------------------------------------------------------------------- the IR as a source


def load_ir(model: str | Path | bytes | IR, limits: dict[str, int] | None = None) -> IR:
    """An ONNX file (path or bytes) imported with a dense-prediction head left to the host, with
    our exporter's configuration kept in ``ir.meta['m3vit_config']``; an IR is returned as is."""
    import onnx

    from m3vit.compiler.onnx_import import check_limits, import_onnx

    if isinstance(model, IR):
        check_limits(model, limits)
        return model
    ir = import_onnx(model, limits=limits, host_head=True)
    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else \
            onnx.load(str(model), load_external_data=False)
    except Exception:  # import_onnx read this very file; only its metadata is looked for here
        return ir
    for prop in proto.metadata_props:
        if prop.key == "m3vit.config":
            ir.meta[CONFIG_META] = prop.value
    return ir


def _expected_ops(cfg) -> list[tuple[str, str, list[str]]]:
    """(name, kind, inputs) of the backbone the QGraph holds, in execution order."""
    out = [("patch_embed", "patch_embed", [IMAGE]), ("embed", "embed", ["patch_embed"])]
    cur = "embed"
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        out += [(f"{b}.norm1", "layernorm", [cur]), (f"{b}.attn.qkv", "linear", [f"{b}.norm1"]),
                (f"{b}.attn", "attention", [f"{b}.attn.qkv"]), (f"{b}.attn.proj", "linear", [f"{b}.attn"]),
                (f"{b}.residual1", "add", [cur, f"{b}.attn.proj"]), (f"{b}.norm2", "layernorm", [f"{b}.residual1"])]
        if cfg.is_moe_block(i):
            out.append((f"{b}.moe", "moe", [f"{b}.norm2"]))
            branch = f"{b}.moe"
        else:
            out += [(f"{b}.mlp.fc1", "linear", [f"{b}.norm2"]), (f"{b}.mlp.fc2", "linear", [f"{b}.mlp.fc1"])]
            branch = f"{b}.mlp.fc2"
        out.append((f"{b}.residual2", "add", [f"{b}.residual1", branch]))
        cur = f"{b}.residual2"
    out.append(("norm", "layernorm", [cur]))
    return out


def _unsupported(what: str) -> UsageError:
    return UsageError(f"the quantized graph cannot hold this model: {what}")


def _one(values: list, what: str) -> int:
    """The single value every block agrees on (the accelerator's units have one size each)."""
    distinct = sorted(set(values))
    if len(distinct) > 1:
        raise _unsupported(f"its blocks differ in {what} ({', '.join(map(str, distinct))}); all blocks must agree")
    return int(distinct[0]) if distinct else 0


def _derived_config(ir: IR) -> IRConfig:
    if "patch_embed" not in ir or "embed" not in ir:
        raise _unsupported("it has no patch embedding followed by a CLS token and position embedding")
    pe, embed = ir["patch_embed"], ir["embed"]
    if "cls" not in embed.params:
        raise _unsupported("it has no CLS token (the graph prepends one to the patch tokens)")
    attn = ir.by_kind("attention")
    moe = ir.by_kind("moe")
    fc1 = [op for op in ir.ops if op.name.endswith(".mlp.fc1")]
    source = ir.meta.get("source")
    name = Path(source).stem if isinstance(source, str) and source.endswith(".onnx") else "onnx"
    lns = {op.name: _f32_decimal(op.attrs["eps"]) for op in ir.by_kind("layernorm")}
    cfg = IRConfig(
        name=name, img_size=(int(ir.image_shape[1]), int(ir.image_shape[2])), patch=int(pe.attrs["patch"]),
        in_chans=int(ir.image_shape[0]), dim=int(pe.shape[1]), depth=len(attn),
        heads=_one([op.attrs["heads"] for op in attn], "attention heads"),
        mlp_hidden=_one([op.shape[1] for op in fc1], "MLP hidden size"),
        num_experts=_one([op.params["w1"].shape[0] for op in moe], "number of experts"),
        expert_hidden=_one([op.params["w1"].shape[2] for op in moe], "expert hidden size"),
        top_k=_one([op.attrs["top_k"] for op in moe], "top-k"),
        moe_block_ids=tuple(sorted(int(op.name.split(".")[1]) for op in moe if op.name.startswith("blocks."))),
        ln_eps=lns.get("norm", next(iter(lns.values()), 1e-6)), ln_eps_by_layer=tuple(sorted(lns.items())),
        tasks=tuple(ir.tasks))
    if cfg.heads and cfg.dim != cfg.heads * _one([op.attrs["head_dim"] for op in attn], "head size"):
        raise _unsupported(f"its attention heads do not span the model width {cfg.dim}")
    return cfg


def _layernorms(cfg) -> list[str]:
    return [f"blocks.{i}.norm{j}" for i in range(cfg.depth) for j in (1, 2)] + ["norm"]


def _signature(cfg) -> dict[str, Any]:
    """What the backbone's structure and numerics depend on, from a ModelConfig or an IRConfig."""
    moe = list(cfg.moe_blocks)
    eps = dict(getattr(cfg, "ln_eps_by_layer", ())) or {n: cfg.ln_eps for n in _layernorms(cfg)}
    return {"img_size": list(cfg.img_size), "patch": cfg.patch, "in_chans": cfg.in_chans, "dim": cfg.dim,
            "depth": cfg.depth, "heads": cfg.heads, "moe_blocks": moe,
            "experts": [cfg.num_experts, cfg.expert_hidden, cfg.top_k] if moe else None,
            "mlp_hidden": cfg.mlp_hidden if len(moe) < cfg.depth else None,
            "ln_eps": {n: _f32_decimal(e) for n, e in sorted(eps.items())}}


def config_from_record(record: dict):
    """The config object of a config record (a calibration's or a QGraph's): an IRConfig for a
    record this module wrote, else a ModelConfig; None when the record is neither."""
    from m3vit.model.config import ModelConfig

    try:
        if record.get("source") == "onnx":
            return IRConfig(record["name"], tuple(record["img_size"]), record["patch"], record["in_chans"],
                            record["dim"], record["depth"], record["heads"], record["mlp_hidden"],
                            record["num_experts"], record["expert_hidden"], record["top_k"],
                            tuple(record["moe_blocks"]), record["ln_eps"],
                            tuple(sorted(record["ln_eps_by_layer"].items())),
                            tuple(t["name"] for t in record["tasks"]))
        return ModelConfig.from_dict(record, "config record")
    except Exception:  # a record of something else: the caller reports the mismatch
        return None


def _model_config(ir: IR, derived: IRConfig, record: dict | None):
    """(cfg, full): a ModelConfig that describes this very graph, narrowed to the IR's tasks, and
    the whole model's; else (None, None)."""
    full = config_from_record(record) if record else None
    if full is None or isinstance(full, IRConfig) or not set(ir.tasks) <= set(full.task_names):
        return None, None
    names = full.task_names
    cfg = dataclasses.replace(full, tasks=tuple(full.tasks[names.index(t)] for t in ir.tasks))
    return (cfg, full) if _signature(cfg) == _signature(derived) else (None, None)


def ir_config(ir: IR, hint: dict | None = None):
    """(cfg, full config record) of the IR. A ModelConfig that describes the graph — our
    exporter's, kept by ``load_ir``, else ``hint`` (a calibration's config record) — is used,
    narrowed to the IR's tasks (the record stays the whole model's); otherwise the ``IRConfig``
    derived from the IR. The IR's structure is checked against it: a graph the QGraph cannot hold
    is one UsageError naming the first op that differs."""
    derived = _derived_config(ir)
    text = ir.meta.get(CONFIG_META)
    try:
        record = json.loads(text) if text else hint
    except ValueError:  # metadata is a convenience; the graph itself is authoritative
        record = hint
    cfg, full = _model_config(ir, derived, record)
    if cfg is None:
        cfg = full = derived
    expected = _expected_ops(cfg)
    ops = [op for op in ir.ops if op.kind not in ("cls_head", "output")]
    for (name, kind, inputs), op in zip(expected, ops):
        if (op.name, op.kind, list(op.inputs)) != (name, kind, inputs):
            raise _unsupported(f"found {op.kind} '{op.name}' where the ViT backbone has {kind} '{name}'")
    if len(ops) > len(expected):
        extra = ops[len(expected)]
        raise _unsupported(f"{extra.kind} '{extra.name}' follows the final LayerNorm (only a CLS head may)")
    if len(ops) < len(expected):
        raise _unsupported(f"it ends at '{ops[-1].name if ops else 'image'}', before the final LayerNorm 'norm'")
    for op in ops:
        if op.kind == "linear":
            want_gelu = op.name.endswith(".mlp.fc1")
            if bool(op.attrs.get("gelu")) != want_gelu:
                raise _unsupported(f"'{op.name}' {'lacks' if want_gelu else 'has'} a GELU "
                                   f"(only an MLP's first linear carries one)")
    return cfg, full.to_dict()


def _attn_scale(op) -> float:
    """The attention's scale; 1/sqrt(d_h) exactly when the file's float32 constant rounds from it."""
    s = float(op.attrs["scale"])
    canonical = 1.0 / math.sqrt(op.attrs["head_dim"])
    return canonical if np.float32(s) == np.float32(canonical) else s


def ir_float_weights(ir: IR, cfg) -> dict[str, np.ndarray]:
    """The IR's parameters as ``from_torch.float_weights`` lays them out, in float64."""
    out: dict[str, np.ndarray] = {}
    d = cfg.dim

    def f64(a):
        return np.asarray(a, np.float64)

    def linear(name, scale=1.0):
        op = ir[name]
        w = f64(op.params["w"]).copy()
        b = f64(op.params["b"]).copy() if "b" in op.params else np.zeros(w.shape[1])
        if scale != 1.0:  # the attention scale folded into q, as in the PyTorch path
            w[:, :d] *= scale
            b[:d] *= scale
        out[name + ".w"], out[name + ".b"] = w, b

    def layernorm(name):
        op = ir[name]
        out[name + ".gamma"], out[name + ".beta"] = f64(op.params["gamma"]), f64(op.params["beta"])

    pe, embed = ir["patch_embed"], ir["embed"]
    out["patch_embed.w"] = f64(pe.params["w"])
    out["patch_embed.b"] = f64(pe.params["b"]) if "b" in pe.params else np.zeros(d)
    out["embed.cls"] = f64(embed.params["cls"]).reshape(d)
    out["embed.pos"] = f64(embed.params["pos"]) if "pos" in embed.params else np.zeros((cfg.num_tokens, d))
    n_tasks = len(cfg.tasks)
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        layernorm(f"{b}.norm1")
        linear(f"{b}.attn.qkv", _attn_scale(ir[f"{b}.attn"]))
        linear(f"{b}.attn.proj")
        layernorm(f"{b}.norm2")
        if cfg.is_moe_block(i):
            p = ir[f"{b}.moe"].params
            out[f"{b}.moe.gate.w"] = f64(p["gate_w"])
            out[f"{b}.moe.gate.b"] = f64(p["gate_b"]) if "gate_b" in p else np.zeros((n_tasks, cfg.num_experts))
            for e in range(cfg.num_experts):
                out[f"{b}.moe.e{e}.fc1.w"], out[f"{b}.moe.e{e}.fc1.b"] = f64(p["w1"][e]), f64(p["b1"][e])
                out[f"{b}.moe.e{e}.fc2.w"], out[f"{b}.moe.e{e}.fc2.b"] = f64(p["w2"][e]), f64(p["b2"][e])
        else:
            linear(f"{b}.mlp.fc1")
            linear(f"{b}.mlp.fc2")
    layernorm("norm")
    return out


def ir_weights_hash(fw: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(fw):
        h.update(k.encode())
        h.update(np.ascontiguousarray(fw[k], np.float64).tobytes())
    return h.hexdigest()[:16]


def ir_float_trace(ir: IR, cfg, x, task: int, sink=None) -> dict[str, np.ndarray]:
    """One float64 run of the IR (``run_ir``) with every canonical tensor of ``from_torch.float_trace``:
    the q part of ``*.attn.qkv`` scaled, ``*.attn.score``, ``*.pre`` GELU inputs, each MoE's gate
    logits, top-k and every expert's fc1.pre / fc1 / fc2 on its own tokens. A dict, or with
    ``sink`` each tensor handed to ``sink(name, array)``."""
    from m3vit.compiler.ir_exec import run_ir

    store: dict[str, np.ndarray] = {}
    put = sink or store.__setitem__
    img = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.float64)
    _, rec = run_ir(ir, img, task, trace=True)
    put("input", img.reshape(ir.image_shape))
    d = cfg.dim
    for op in ir.ops:
        n = op.name
        if op.kind in ("cls_head", "output"):
            continue
        if op.kind == "attention":
            put(f"{n}.score", rec[f"{n}.score"])
        elif op.kind == "linear" and op.attrs.get("gelu"):
            put(f"{n}.pre", rec[f"{n}.pre"])
        elif op.kind == "moe":
            put(f"{n}.gate", rec[f"{n}.gate"])
            put(f"{n}.topk", rec[f"{n}.topk"])
            for e in range(op.params["w1"].shape[0]):
                for part in ("fc1.pre", "fc1", "fc2"):
                    put(f"{n}.e{e}.{part}", rec[f"{n}.e{e}.{part}"])
        y = rec[n]
        if n.endswith(".attn.qkv"):
            y = y.copy()
            y[:, :d] *= _attn_scale(ir[n[:-len(".qkv")]])
        put(n, y)
    return store


# ---------------------------------------------------------------------------- calibration


def calibrate_ir(ir: IR, images=None, spec: Any = None, n_images: int = 8, seed: int = 0,
                 folder: str | Path | None = None, progress: bool = False) -> Calibration:
    """``quantize.calibrate`` on the IR: ranges over the images (``folder``'s, or the bundled
    photographs plus seeded random images) for every task of the IR."""
    cfg, _ = ir_config(ir)
    if images is None and cfg.in_chans != 3:
        raise UsageError(f"calibration images are RGB but this model takes {cfg.in_chans} channel(s); "
                         f"pass a calibration file made for it")
    fw = ir_float_weights(ir, cfg)
    return calibrate_source(cfg, lambda x, t, sink: ir_float_trace(ir, cfg, x, t, sink), fw, ir_weights_hash(fw),
                            images, spec, n_images, seed, folder, progress)


def _check_calibration(calib: Calibration, cfg, fw: dict[str, np.ndarray], label: str) -> None:
    """A calibration must describe this model: the same structure and tasks, and weights with the
    same per-channel fractions (a different checkpoint almost surely moves one)."""
    theirs = config_from_record(calib.config)
    if theirs is None or _signature(theirs) != _signature(cfg):
        raise ConfigError(f"the calibration was made for another model ('{calib.config.get('name')}', "
                          f"config hash {calib.config_hash}) than {label}; recalibrate on this model")
    missing = [t for t in cfg.task_names if t not in calib.tasks]
    if missing:
        raise ConfigError(f"the calibration has no ranges for task(s) {', '.join(missing)} of {label}; "
                          f"recalibrate on this model")
    if not calib.weights:
        return
    rows = [calib.tasks.index(t) for t in cfg.task_names]
    for key, want in weight_formats(cfg, fw, calib.spec).items():
        got = calib.weights.get(key)
        frac = got and got["frac"]
        if got and key.endswith(".gate.w"):
            frac = [got["frac"][r] for r in rows]
        if not got or got["bits"] != want["bits"] or frac != want["frac"]:
            raise ConfigError(f"the calibration was made for other weights than {label} (first difference "
                              f"at {key}); recalibrate on this model")


def qgraph_from_ir(ir: IR, calib: Calibration, precision: Any = None) -> QGraph:
    """The QGraph of the IR under a calibration (checked against the IR), with its own precision
    spec or ``precision``; the same assembly as ``from_torch.build_qgraph``."""
    from m3vit.compiler.from_torch import assemble_qgraph

    cfg, _ = ir_config(ir, calib.config)
    fw = ir_float_weights(ir, cfg)
    _check_calibration(calib, cfg, fw, _label(ir))
    spec = calib.spec if precision is None else normalise_spec(precision)
    resolve_precision(spec, cfg)
    resolved = dataclasses.replace(calib, spec=spec, formats=choose_formats(cfg, calib.ranges, spec),
                                   weights=weight_formats(cfg, fw, spec))
    return assemble_qgraph(cfg, fw, resolved, cfg.to_dict())


def _label(ir: IR) -> str:
    src = ir.meta.get("source")
    return f"'{src}'" if isinstance(src, str) and src else "this model"


def qgraph_from_onnx(model: str | Path | bytes | IR, *, calib: Calibration | str | Path | None = None,
                     precision: Any = None, n_images: int = 8, seed: int = 0, limits: dict[str, int] | None = None,
                     progress: bool = False) -> QGraph:
    """The quantized graph of an ONNX model (a path, bytes, or an imported IR).

    calib: None (calibrate on the bundled photographs plus seeded random images, ``n_images`` in
    all), a ``Calibration``, a calibration file (``m3vit calibrate --out``), or a folder of
    images. precision: a preset name, a spec mapping or ``quantize.load_precision``'s result;
    None keeps a calibration's own spec, else DEFAULT_SPEC. Deterministic: the same inputs give
    an identical graph."""
    ir = load_ir(model, limits)
    if isinstance(calib, (str, Path)):
        path = Path(calib)
        if path.is_dir():
            calib = calibrate_ir(ir, spec=precision, n_images=n_images, seed=seed, folder=path, progress=progress)
        elif path.is_file():
            calib = load_calibration(path)
        else:
            raise UsageError(f"calibration '{path}' is neither a calibration file nor a folder of images")
    elif calib is None:
        calib = calibrate_ir(ir, spec=DEFAULT_SPEC if precision is None else precision, n_images=n_images, seed=seed,
                             progress=progress)
    elif not isinstance(calib, Calibration):
        raise UsageError(f"calib must be a Calibration, a calibration file or an image folder, "
                         f"got {type(calib).__name__}")
    return qgraph_from_ir(ir, calib, precision)
