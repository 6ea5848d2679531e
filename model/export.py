"""ONNX export of one task's pathway, or of the multi-task backbone, with an ONNX Runtime parity check.

Single-task export: input `image` (1×C×H×W), output `features` (1×T×D backbone tokens) or
`prediction` (the task head's map). Every MoE gate is folded to that task's constant matrix, so no
other task's gate and no other head reaches the graph.

Multi-task export (`all_tasks`): a second input `task_id` (0-d int64) selects the gate in every MoE
layer by a Gather on the stacked gate matrices (or feeds the task MLP in task-conditioned routing);
experts are shared, so one compiled program serves every task.

The MoE is exported in its static-shape form (MoE.forward_dense): gate MatMul -> Softmax / TopK ->
ScatterElements score matrix -> expert-batched MatMuls -> combining MatMul. Shapes are static, batch 1.

The parity check runs the file in ONNX Runtime and the eager model in PyTorch on the same inputs.
Where a token's k-th and (k+1)-th expert logits are a near-tie, rounding may route it differently in
the two; the PyTorch reference then takes ONNX Runtime's expert (reported as `routing_ties`), and
every other routing difference fails the check.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import json
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from m3vit import __version__
from m3vit.errors import M3ViTError, UsageError
from m3vit.model.vit import M3ViT

EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = 17
# Highest opset each exporter writes natively; the dynamo exporter builds 18 and converts down to 17.
MAX_OPSET = {"torchscript": 20, "dynamo": 23}
PARITY_TOLERANCE = 1e-4  # max abs error, relative to the output's max magnitude
# Two experts whose gate logits differ by less than this (times 1 + the token's largest |logit|)
# are a near-tie: float rounding in ONNX Runtime's MatMuls may legitimately pick the other one.
ROUTING_TIE_TOLERANCE = 1e-5
META_PREFIX = "m3vit."
_PROTOBUF_LIMIT = 2**31 - 1


# ---- results -----------------------------------------------------------------------------------
@dataclass
class ParityCase:
    input: str
    task: str
    max_abs_error: float
    max_abs_output: float
    # Tokens (over all MoE layers) where ONNX Runtime chose other experts than PyTorch: within a
    # near-tie (aligned, see _follow_routing), or not (a routing error, which fails the check).
    routing_ties: int = 0
    routing_mismatches: int = 0

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.max_abs_output if self.max_abs_output > 0 else self.max_abs_error

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "task": self.task, "max_abs_error": self.max_abs_error,
                "max_abs_output": self.max_abs_output, "relative_error": self.relative_error,
                "routing_ties": self.routing_ties, "routing_mismatches": self.routing_mismatches}


@dataclass
class ParityReport:
    cases: list[ParityCase]
    tolerance: float = PARITY_TOLERANCE
    seconds: float = 0.0

    @property
    def worst(self) -> ParityCase:
        return max(self.cases, key=lambda c: c.relative_error)

    @property
    def max_relative_error(self) -> float:
        return self.worst.relative_error

    @property
    def routing_ties(self) -> int:
        return sum(c.routing_ties for c in self.cases)

    @property
    def routing_mismatches(self) -> int:
        return sum(c.routing_mismatches for c in self.cases)

    @property
    def ok(self) -> bool:
        return self.routing_mismatches == 0 and all(c.relative_error <= self.tolerance for c in self.cases)

    def summary(self) -> str:
        w = self.worst
        text = (f"max abs error {w.max_abs_error:.3g} = {w.relative_error:.3g} x max|output| "
                f"(input {w.input}, task {w.task}; limit {self.tolerance:g}) over {len(self.cases)} run(s)")
        if self.routing_mismatches:
            bad = next(c for c in self.cases if c.routing_mismatches)
            text += (f"; {self.routing_mismatches} token routing(s) differ beyond a near-tie "
                     f"(first: input {bad.input}, task {bad.task})")
        if self.routing_ties:
            text += f"; {self.routing_ties} near-tie routing(s) followed ONNX Runtime's choice"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "tolerance": self.tolerance, "max_relative_error": self.max_relative_error,
                "runs": len(self.cases), "seconds": round(self.seconds, 3),
                "routing_ties": self.routing_ties, "routing_mismatches": self.routing_mismatches,
                "cases": [c.to_dict() for c in self.cases]}


@dataclass
class ExportInfo:
    path: Path
    bytes: int
    nodes: int
    ops: dict[str, int]
    opset: int
    exporter: str
    preset: str
    dataset: str
    task: str  # task name, or "all"
    task_index: int | None  # None for the multi-task export
    with_head: bool
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    export_seconds: float
    parity: ParityReport | None = None
    seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def all_tasks(self) -> bool:
        return self.task_index is None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "bytes": self.bytes, "nodes": self.nodes, "ops": self.ops,
                "opset": self.opset, "exporter": self.exporter, "preset": self.preset, "dataset": self.dataset,
                "task": self.task, "task_index": self.task_index, "all_tasks": self.all_tasks,
                "with_head": self.with_head, "inputs": self.inputs, "outputs": self.outputs,
                "export_seconds": round(self.export_seconds, 3),
                "parity": self.parity.to_dict() if self.parity else None, "seconds": round(self.seconds, 3)}


# ---- the exported modules ----------------------------------------------------------------------
class _FixedGate(nn.Module):
    """One task's gate folded to constants: logits = x @ W (+ the task-conditioned bias).

    Stands in for TaskGate in the single-task export, so that only this task's matrix is in the graph."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # Named apart from TaskGate.weight (all tasks stacked): this is one task's D×N slice.
        self.task_weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.task_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        logits = x @ self.task_weight
        return logits if self.task_bias is None else logits + self.task_bias


class _Pathway(nn.Module):
    """`image` -> backbone tokens (-> the task's head); with `task_id` when the task is an input."""

    def __init__(self, backbone: M3ViT, task: int | None, head: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.task = task
        self.head = head

    def forward(self, image: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.backbone.features(image, self.task if task_id is None else task_id)
        return feats if self.head is None else self.head(feats)


def _shared_copy(model: M3ViT) -> M3ViT:
    """A structural copy that shares every parameter and buffer, so the export can swap gates and
    drop heads without touching (or duplicating the memory of) the caller's model."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def export_module(model: M3ViT, task: int | None, with_head: bool) -> _Pathway:
    """The module that is traced: task None gives the multi-task backbone with a task-id input."""
    backbone = _shared_copy(model)
    backbone.heads = None
    head = None
    if task is not None:
        with torch.no_grad():
            for moe in backbone.moe_layers:
                gate = moe.gate
                bias = gate.task_bias(task) if gate.routing == "task-conditioned" else None
                moe.gate = _FixedGate(gate.token_weight(task), bias)
        if with_head:
            head = model.heads[model.cfg.task_names[task]]
    return _Pathway(backbone, task, head).eval()


# ---- export ------------------------------------------------------------------------------------
def _check_opset(opset: int, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}'; choose one of: {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old: the export needs opset {MIN_OPSET} or newer "
                         f"(LayerNormalization, TopK tie order)")
    if opset > MAX_OPSET[exporter]:
        raise UsageError(f"opset {opset} is newer than the {exporter} exporter supports "
                         f"(at most {MAX_OPSET[exporter]})")


def _output_dir(path: Path) -> Path:
    """The folder for `path`, created if needed; a path that cannot hold a file is a usage error."""
    if path.is_dir():
        raise UsageError(f"output {path} is a directory; give a file name such as {path / 'model.onnx'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {parent} is not writable")
    return parent


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, tracer warnings and log lines: the CLI owns the output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _eval(model: nn.Module):
    """Eval mode for the duration, then every submodule's own mode back (they may differ)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _run_exporter(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  opset: int, exporter: str):
    import onnx

    with _quiet():
        if exporter == "torchscript":
            buf = io.BytesIO()
            try:
                torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=input_names,
                                  output_names=output_names, do_constant_folding=True,
                                  training=torch.onnx.TrainingMode.EVAL)
            except Exception as exc:
                raise M3ViTError(f"the torchscript exporter failed: {_first_line(exc)}") from None
            return onnx.load_from_string(buf.getvalue())
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, verbose=False, optimize=True)
            return program.model_proto
        except Exception as exc:
            raise M3ViTError(f"the dynamo exporter cannot export this model ({_first_line(exc)}); "
                             "use --exporter torchscript") from None


def _state_dict_names(proto, task_name: str | None) -> None:
    """Name weights as in M3ViT's state_dict ("blocks.1.moe.w1", "heads.depth.classifier.weight")
    rather than after the traced wrapper's attributes, so they map back to a checkpoint by name.
    Node outputs are renamed too: the torchscript exporter shares equal weights through Identity nodes."""

    def renamed(name: str) -> str:
        if name.startswith("backbone."):
            return name[len("backbone."):]
        if name.startswith("head.") and task_name is not None:
            return f"heads.{task_name}." + name[len("head."):]
        return name

    graph = proto.graph
    for init in graph.initializer:
        init.name = renamed(init.name)
    for node in graph.node:
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]
    for vi in itertools.chain(graph.input, graph.value_info, graph.output):
        vi.name = renamed(vi.name)


_FOLD_MAX_ELEMENTS = 4096


def _fold_shape_arithmetic(proto) -> None:
    """Replace nodes computable from Constant nodes and static shapes alone by Constant nodes.

    The torchscript exporter leaves shape arithmetic in the graph (Shape -> Slice -> Concat for a
    flatten, ConstantOfShape -> Equal -> Where for expand's -1 sizes); folding it makes every shape
    static to ONNX shape inference and to the compiler. Weights (initializers) are never folded, and
    nothing larger than a shape-sized tensor is."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    # Shape inference reads only the dims of large initializers: infer on a copy without their data.
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    for init in light.graph.initializer:
        if int(np.prod(init.dims)) > _FOLD_MAX_ELEMENTS:
            init.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(f)
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True).graph
    static: dict[str, list[int]] = {}
    for vi in itertools.chain(inferred.input, inferred.value_info, inferred.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            static[vi.name] = [d.dim_value for d in t.shape.dim]
    subgraph_attrs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    known: dict[str, np.ndarray] = {}
    nodes = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        values = None
        if any(a.type in subgraph_attrs for a in node.attribute):
            pass
        elif node.op_type == "Constant":
            known[node.output[0]] = ReferenceEvaluator(node).run(None, {})[0]
        elif node.op_type == "Shape" and node.input[0] in static:
            attrs = {a.name: a.i for a in node.attribute}
            dims = static[node.input[0]]
            # ONNX clamps start/end and counts negatives from the back, as Python slicing does.
            values = [np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], dtype=np.int64)]
        elif inputs and all(i in known for i in inputs):
            values = ReferenceEvaluator(node).run(None, {i: known[i] for i in inputs})
        if values is None or any(np.asarray(v).size > _FOLD_MAX_ELEMENTS for v in values):
            nodes.append(node)
            continue
        for name, value in zip(node.output, values):
            value = np.asarray(value)
            known[name] = value
            nodes.append(helper.make_node("Constant", [], [name], name=f"{node.name or name}/folded",
                                          value=numpy_helper.from_array(value)))
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(nodes)


def _graph_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _shape(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def onnx_metadata(path_or_proto) -> dict[str, str]:
    """The m3vit.* metadata of an exported file (or loaded model), without the prefix."""
    import onnx

    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(str(path_or_proto),
                                                                                        load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


def export_onnx(model: M3ViT, path: str | Path, task: int | str | None = None, all_tasks: bool = False,
                with_head: bool = False, opset: int = MIN_OPSET, exporter: str = "torchscript",
                check: bool = False, check_inputs: Sequence[tuple[str, torch.Tensor]] | None = None,
                n_real: int | None = None, n_random: int = 1, seed: int = 0) -> ExportInfo:
    """Export one task's pathway (default: the first task) or, with all_tasks, the multi-task backbone.

    The file is written atomically. With check, ONNX Runtime is compared with PyTorch before the
    file is put in place, and a parity failure raises M3ViTError and leaves no file behind.
    """
    import onnx

    start = time.perf_counter()
    cfg = model.cfg
    _check_opset(opset, exporter)
    if all_tasks and with_head:
        raise UsageError("--all-tasks exports the shared backbone only; drop --with-head (heads are per task)")
    if all_tasks and task is not None:
        raise UsageError("--all-tasks exports every task's pathway; drop --task")
    if with_head and model.heads is None:
        raise UsageError("this model has no task heads; export without --with-head")
    task_index = None if all_tasks else cfg.task_index(0 if task is None else task)
    path = Path(path)
    folder = _output_dir(path)

    image = torch.zeros(1, cfg.in_chans, *cfg.img_size)
    args: tuple = (image,) if task_index is not None else (image, torch.tensor(0, dtype=torch.int64))
    input_names = ["image"] if task_index is not None else ["image", "task_id"]
    output_names = ["prediction" if with_head else "features"]
    # Built inside _eval: the head is shared with the caller's model, whose mode is restored on exit.
    with _eval(model), torch.no_grad():
        module = export_module(model, task_index, with_head)
        proto = _run_exporter(module, args, input_names, output_names, opset, exporter)
    if _graph_opset(proto) != opset:
        raise M3ViTError(f"the {exporter} exporter wrote opset {_graph_opset(proto)}, not the requested {opset}; "
                         f"request opset {_graph_opset(proto)} or use the other exporter")
    _state_dict_names(proto, None if task_index is None else cfg.task_names[task_index])
    _fold_shape_arithmetic(proto)

    preset = cfg.name.split("+", 1)[0]
    task_name = "all" if task_index is None else cfg.task_names[task_index]
    metadata = {
        "config": cfg.to_json(), "preset": preset, "dataset": cfg.dataset, "task": task_name,
        "task_index": "all" if task_index is None else str(task_index), "with_head": json.dumps(with_head),
        "exporter": exporter, "opset": str(_graph_opset(proto)), "version": __version__,
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=META_PREFIX + key, value=value)
    proto.doc_string = (f"m3vit {preset}/{cfg.dataset}: " + ("multi-task backbone (task_id input)"
                        if task_index is None else f"task {task_name}" + (" with head" if with_head else " backbone")))
    try:
        data = proto.SerializeToString()
    except ValueError:
        data = b""
    if not data or len(data) > _PROTOBUF_LIMIT:
        raise M3ViTError("the exported model is larger than 2 GB, the limit of a single-file ONNX model")
    try:
        onnx.checker.check_model(data, full_check=True)
    except Exception as exc:
        raise M3ViTError(f"the exported graph fails the ONNX checker: {_first_line(exc)}") from None
    export_seconds = time.perf_counter() - start

    parity = None
    if check:
        parity = _parity(model, data, metadata, check_inputs, n_real, n_random, seed, PARITY_TOLERANCE)
        if not parity.ok:
            raise M3ViTError(f"ONNX Runtime does not match PyTorch: {parity.summary()}; {path} not written")
    _write_atomic(path, folder, data)

    graph = proto.graph
    return ExportInfo(
        path=path, bytes=len(data), nodes=len(graph.node), ops=dict(sorted(Counter(n.op_type for n in graph.node).items())),
        opset=_graph_opset(proto), exporter=exporter, preset=preset, dataset=cfg.dataset, task=task_name,
        task_index=task_index, with_head=with_head, inputs={i.name: _shape(i) for i in graph.input},
        outputs={o.name: _shape(o) for o in graph.output}, export_seconds=export_seconds, parity=parity,
        seconds=time.perf_counter() - start, metadata=metadata)


def _write_atomic(path: Path, folder: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


# ---- ONNX Runtime parity -----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[tuple[str, np.ndarray], ...]:
    """The decoded sample photographs, kept for repeated checks in one process."""
    from m3vit.model.images import sample_images

    return tuple(sample_images())


def default_inputs(cfg, n_real: int | None = None, n_random: int = 1, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """The bundled photographs (all, or the first n_real) and n_random seeded random images."""
    from m3vit.model.images import to_input

    out: list[tuple[str, torch.Tensor]] = []
    if cfg.in_chans == 3:
        photos = _photographs()
        out = [(name, to_input(img, tuple(cfg.img_size))) for name, img in photos[: len(photos) if n_real is None else n_real]]
    g = torch.Generator().manual_seed(seed)
    for i in range(n_random):
        out.append((f"random{i}", torch.randn(1, cfg.in_chans, *cfg.img_size, generator=g)))
    return out


def reference_output(model: M3ViT, image: torch.Tensor, task: int, with_head: bool) -> torch.Tensor:
    """PyTorch's answer for one pathway: the eager model, sparse MoE as configured."""
    with _eval(model), torch.no_grad():
        return model(image, task) if with_head else model.features(image, task)


def check_with_ort(model: M3ViT, path_or_bytes: str | Path | bytes,
                   inputs: Sequence[tuple[str, torch.Tensor]] | None = None, *, n_real: int | None = None,
                   n_random: int = 1, seed: int = 0, tolerance: float = PARITY_TOLERANCE) -> ParityReport:
    """Run an exported file in ONNX Runtime and compare with PyTorch on every input (and, for the
    multi-task export, every task id). What to compare is read from the file's m3vit metadata."""
    import onnx

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    meta = onnx_metadata(onnx.load_from_string(data))
    if "task_index" not in meta:
        raise UsageError("this ONNX file has no m3vit metadata; was it written by 'm3vit export'?")
    if json.loads(meta["config"]) != model.cfg.to_dict():
        raise UsageError("this ONNX file was exported from a model with another config than the one given")
    return _parity(model, data, meta, inputs, n_real, n_random, seed, tolerance)


@dataclass
class _RoutingCount:
    ties: int = 0
    mismatches: int = 0


@contextlib.contextmanager
def _follow_routing(model: M3ViT, routes: Sequence[np.ndarray], logits: Sequence[np.ndarray] | None = None,
                    tie_tolerance: float = ROUTING_TIE_TOLERANCE):
    """While active, every MoE layer of `model` compares its top-k choice with ONNX Runtime's
    (`routes`: one B×T×k index array per layer; `logits`: the B×T×N gate logits it chose from) and,
    for a token where the two differ only among experts whose PyTorch logits are within a near-tie
    of the k-th largest, takes ONNX Runtime's choice.

    A near-tie decided by the last bit of a MatMul is not an export error, but it swaps an expert
    and so moves that token's output far beyond the parity tolerance. Following ONNX Runtime there
    keeps every number computed by PyTorch. Any other difference counts as a mismatch, and so does a
    choice that breaks the tie rule (lower index first) on ONNX Runtime's own logits, which an
    exact tie would otherwise excuse."""
    from m3vit.model.moe import select_topk

    count = _RoutingCount()
    layers = model.moe_layers
    if len(routes) != len(layers):
        raise M3ViTError(f"the ONNX graph has {len(routes)} TopK routing node(s), the model {len(layers)} MoE layer(s)")

    def follower(moe, original, theirs, their_logits):
        def route(x, task):
            idx, scores, probs = original(x, task)
            if tuple(theirs.shape) != tuple(idx.shape):
                count.mismatches += idx[..., 0].numel()
                return idx, scores, probs
            differ = (idx.sort(-1).values != theirs.sort(-1).values).any(-1)
            if not differ.any():
                return idx, scores, probs
            logits = moe.gate(x, task)
            kth = logits.gather(-1, idx[..., -1:])  # idx is in descending logit order
            near = (logits - kth).abs() <= tie_tolerance * (1 + logits.abs().amax(-1, keepdim=True))
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, True)
            other = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, theirs, True)
            tie = differ & ((chosen == other) | near).all(-1)
            if their_logits is not None:
                ruled = select_topk(their_logits, idx.shape[-1]).sort(-1).values
                tie &= (ruled == theirs.sort(-1).values).all(-1)
            count.ties += int(tie.sum())
            count.mismatches += int((differ & ~tie).sum())
            idx = torch.where(tie.unsqueeze(-1), theirs, idx)
            return idx, probs.gather(-1, idx), probs
        return route

    for i, (moe, theirs) in enumerate(zip(layers, routes)):
        their_logits = None if logits is None else torch.as_tensor(logits[i])
        moe.route = follower(moe, moe.route, torch.as_tensor(theirs, dtype=torch.int64), their_logits)
    try:
        yield count
    finally:
        for moe in layers:
            del moe.route


def _with_routing_outputs(data: bytes) -> tuple[bytes, list[str], list[str]]:
    """The model with every TopK's expert indices and input logits added as graph outputs, in layer order."""
    import onnx

    proto = onnx.load_from_string(data)
    topk = [n for n in proto.graph.node if n.op_type == "TopK"]
    existing = {o.name for o in proto.graph.output}
    for node in topk:
        for name, dtype in ((node.output[1], onnx.TensorProto.INT64), (node.input[0], onnx.TensorProto.FLOAT)):
            if name not in existing:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
                existing.add(name)
    return proto.SerializeToString(), [n.output[1] for n in topk], [n.input[0] for n in topk]


def _parity(model: M3ViT, data: bytes, meta: dict[str, str], inputs, n_real, n_random, seed,
            tolerance) -> ParityReport:
    import onnxruntime as ort

    start = time.perf_counter()
    with_head = meta.get("with_head") == "true"
    tasks = range(len(model.cfg.tasks)) if meta["task_index"] == "all" else [int(meta["task_index"])]
    if inputs is None:
        inputs = default_inputs(model.cfg, n_real=n_real, n_random=n_random, seed=seed)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Without this, ORT's idle worker threads spin between runs and starve the PyTorch reference.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data, route_names, logit_names = _with_routing_outputs(data)
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feeds_wanted = {i.name for i in session.get_inputs()}
    output = session.get_outputs()[0].name
    cases = []
    for name, image in inputs:
        for t in tasks:
            feed = {"image": image.numpy().astype(np.float32), "task_id": np.array(t, dtype=np.int64)}
            got, *rest = session.run([output, *route_names, *logit_names],
                                     {k: v for k, v in feed.items() if k in feeds_wanted})
            routes, logits = rest[: len(route_names)], rest[len(route_names):]
            with _follow_routing(model, routes, logits) as routing:
                ref = reference_output(model, image, t, with_head).numpy()
            if got.shape != ref.shape:
                raise M3ViTError(f"ONNX Runtime output has shape {got.shape}, PyTorch {ref.shape}")
            cases.append(ParityCase(name, model.cfg.task_names[t], float(np.abs(got - ref).max()),
                                    float(np.abs(ref).max()), routing.ties, routing.mismatches))
    return ParityReport(cases, tolerance, time.perf_counter() - start)


# ---- command line ------------------------------------------------------------------------------
def cli_export(args) -> int:
    from m3vit.model.checkpoint import model_from_args, task_from_args

    _check_opset(args.opset, args.exporter)
    if args.all_tasks and args.with_head:
        raise UsageError("--all-tasks exports the shared backbone only; drop --with-head (heads are per task)")
    if args.all_tasks and args.task is not None:
        raise UsageError("--all-tasks exports every task's pathway; drop --task")
    _output_dir(Path(args.out))
    model = model_from_args(args, with_heads=args.with_head)
    task = None if args.all_tasks else task_from_args(args, model.cfg)
    info = export_onnx(model, args.out, task=task, all_tasks=args.all_tasks, with_head=args.with_head,
                       opset=args.opset, exporter=args.exporter, check=not args.no_check, seed=args.seed)
    if args.json:
        print(json.dumps(info.to_dict()))
        return 0
    what = ("multi-task backbone (task_id input)" if info.all_tasks
            else f"task {info.task} ({info.task_index})" + (" with head" if info.with_head else " backbone"))
    print(f"exported {info.preset}/{info.dataset} {what} to {info.path}: {info.bytes / 1e6:.1f} MB, "
          f"{info.nodes} nodes, opset {info.opset}, {info.exporter} exporter, {info.export_seconds:.1f} s")
    if info.parity:
        print(f"ONNX Runtime parity ok: {info.parity.summary()}")
    else:
        print("ONNX Runtime check skipped (--no-check)")
    return 0
