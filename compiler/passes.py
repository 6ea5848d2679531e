"""Pass infrastructure over the float IR, and the clean-up flow that runs right after import.

A pass is an object with a `name` and `apply(ir) -> (ir, changed)`; it never mutates its input, so
the IR before and after a pass can be executed and compared. `run_to_fixed_point` applies a list of
passes until none changes anything; with `verify`, every change is checked by a callable
`verify(before, after, pass_name)` (a `Verifier` runs both IRs on sample images for every task,
compares them with each other and with ONNX Runtime on the source model). A `Flow` names a group
of passes run to a fixed point.

The clean-up flow leaves only op kinds with an accelerator counterpart:

* fold-constants: merges chains of constant scales / biases, drops identities, folds a constant
  scale into the neighbouring linear, a column selection into the linear that produces it, and
  constant additions into the embedding's position table;
* fuse-bias: a constant addition after a linear (or patch embedding, head) becomes its bias;
* fuse-gelu: linear + GELU -> linear(gelu=True);
* residual: every residual add takes (skip, branch) in that order;
* pack-qkv: separate q, k, v linears on one input become one packed qkv linear, so a graph
  written with three projections maps onto the same compute unit as ours;
* remove-dead: ops whose value does not reach the output.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from m3vit.compiler.ir import IR, Op
from m3vit.errors import M3ViTError, UsageError

PASS_TOLERANCE = 1e-6  # max abs change of the output per pass, relative to max|output| (float64 IR)
ONNX_TOLERANCE = 1e-4  # max abs error vs ONNX Runtime (float32), relative to max|output|


class PassVerificationError(M3ViTError):
    """A pass changed what the IR computes."""


# ---- infrastructure ----------------------------------------------------------------------------
class Pass:
    """Subclasses implement `rewrite(ir) -> bool` on a private copy; `apply` does the bookkeeping."""

    name = "pass"

    def rewrite(self, ir: IR) -> bool:
        raise NotImplementedError

    def apply(self, ir: IR) -> tuple[IR, bool]:
        new = ir.copy()
        if not self.rewrite(new):
            return ir, False
        new.assign_canonical_names()
        new.validate()
        return new, True

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """A pass from a function that rewrites an IR in place and says whether it changed it."""

    def __init__(self, name: str, fn: Callable[[IR], bool]):
        self.name, self.fn = name, fn

    def rewrite(self, ir: IR) -> bool:
        return bool(self.fn(ir))


def run_to_fixed_point(ir: IR, passes: Sequence[Pass], verify: Callable | None = None,
                       max_rounds: int = 50) -> IR:
    """Apply the passes in order, repeatedly, until a whole round changes nothing.

    Every change is verified when `verify` is given; the names of the passes that changed the IR
    are appended to ir.meta['passes']."""
    history = list(ir.meta.get("passes", []))
    if verify is not None and hasattr(verify, "check"):
        verify.check(ir, "import")
    for _ in range(max_rounds):
        changed_any = False
        for p in passes:
            new, changed = p.apply(ir)
            if not changed:
                continue
            if verify is not None:
                verify(ir, new, p.name)
            ir, changed_any = new, True
            history.append(p.name)
        if not changed_any:
            ir.meta["passes"] = history
            return ir
    raise M3ViTError(f"the passes {', '.join(p.name for p in passes)} did not reach a fixed point in "
                     f"{max_rounds} rounds")


class Flow:
    """A named group of passes, run to a fixed point."""

    def __init__(self, name: str, passes: Iterable[Pass], max_rounds: int = 50):
        self.name, self.passes, self.max_rounds = name, list(passes), max_rounds

    def run(self, ir: IR, verify: Callable | None = None) -> IR:
        start = time.perf_counter()
        out = run_to_fixed_point(ir, self.passes, verify, self.max_rounds)
        out.meta.setdefault("flows", {})[self.name] = round(time.perf_counter() - start, 4)
        return out

    def __repr__(self) -> str:
        return f"<flow {self.name}: {', '.join(p.name for p in self.passes)}>"


# ---- verification ------------------------------------------------------------------------------
def _rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)).max()) if ref.size else 0.0
    return err / scale if scale > 0 else err


class Verifier:
    """Checks that a pass keeps the IR's output: against the IR before it (PASS_TOLERANCE) and against
    reference outputs of the source model (ONNX_TOLERANCE), on every (image, task) case."""

    def __init__(self, cases: list[tuple[np.ndarray, int]], reference: list[np.ndarray] | None = None,
                 pass_tolerance: float = PASS_TOLERANCE, onnx_tolerance: float = ONNX_TOLERANCE):
        self.cases, self.reference = cases, reference
        self.pass_tolerance, self.onnx_tolerance = pass_tolerance, onnx_tolerance
        self._last: tuple[int, list[np.ndarray]] | None = None
        self.log: list[dict[str, Any]] = []

    @classmethod
    def for_model(cls, ir: IR, model: bytes | str, images: Sequence[np.ndarray] | None = None,
                  seed: int = 0, **kw) -> "Verifier":
        """Cases: the images (default: one seeded random image) for every task of the IR; reference:
        ONNX Runtime on the source model."""
        if images is None:
            rng = np.random.default_rng(seed)
            images = [rng.standard_normal((1, *ir.image_shape)).astype(np.float32)]
        cases = [(np.asarray(img, np.float32).reshape(1, *ir.image_shape), t)
                 for img in images for t in range(ir.n_tasks)]
        # A graph whose head stays on the host is compared at the backbone's output tensor.
        return cls(cases, ort_outputs(model, cases, ir.meta.get("task_input"), ir.meta.get("host_input")), **kw)

    def outputs(self, ir: IR) -> list[np.ndarray]:
        from m3vit.compiler.ir_exec import run_ir

        if self._last is not None and self._last[0] == id(ir):
            return self._last[1]
        outs = [run_ir(ir, img, t) for img, t in self.cases]
        self._last = (id(ir), outs)
        return outs

    def check(self, ir: IR, what: str) -> None:
        """The IR against the source model alone."""
        if self.reference is None:
            return
        outs = self.outputs(ir)
        worst = max(_rel_error(o, r) for o, r in zip(outs, self.reference))
        self.log.append({"pass": what, "vs_onnx": worst})
        if worst > self.onnx_tolerance:
            raise PassVerificationError(f"{what}: the IR differs from ONNX Runtime by {worst:.3g} x max|output| "
                                        f"(limit {self.onnx_tolerance:g})")

    def __call__(self, before: IR, after: IR, name: str) -> None:
        ref = self.outputs(before)
        outs = self.outputs(after)
        worst = max(_rel_error(o, r) for o, r in zip(outs, ref))
        entry = {"pass": name, "vs_before": worst}
        if worst > self.pass_tolerance:
            raise PassVerificationError(f"pass {name} changed the IR's output by {worst:.3g} x max|output| "
                                        f"(limit {self.pass_tolerance:g})")
        if self.reference is not None:
            onnx_err = max(_rel_error(o, r) for o, r in zip(outs, self.reference))
            entry["vs_onnx"] = onnx_err
            if onnx_err > self.onnx_tolerance:
                raise PassVerificationError(f"after pass {name} the IR differs from ONNX Runtime by {onnx_err:.3g} "
                                            f"x max|output| (limit {self.onnx_tolerance:g})")
        self.log.append(entry)


def ort_outputs(model: bytes | str, cases: list[tuple[np.ndarray, int]], task_input: str | None,
                output: str | None = None) -> list[np.ndarray]:
    """ONNX Runtime's first output (or the tensor `output`) for every (image, task) case."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = 1  # the reference runs once per case; threads only contend
    data = model if isinstance(model, bytes) else open(model, "rb").read()
    if output is not None:
        proto = onnx.load_from_string(data)
        if output not in [o.name for o in proto.graph.output]:
            proto.graph.output.insert(0, onnx.helper.make_empty_tensor_value_info(output))
            data = proto.SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = []
    for img, t in cases:
        feed = {}
        for name in names:
            if name == task_input:
                info = next(i for i in session.get_inputs() if i.name == name)
                shape = [d if isinstance(d, int) else 1 for d in info.shape]
                dtype = np.int32 if "int32" in info.type else np.int64
                feed[name] = np.full(shape, t, dtype=dtype)
            else:
                feed[name] = np.asarray(img, np.float32)
        outs.append(session.run([output] if output else None, feed)[0])
    return outs


# ---- graph editing helpers ---------------------------------------------------------------------
def _consumers(ir: IR, value: str) -> list[Op]:
    return [op for op in ir.ops if value in op.inputs]


def _bypass(ir: IR, op: Op) -> None:
    """Remove a one-input op, wiring its consumers to its input."""
    src = op.inputs[0]
    for c in ir.ops:
        c.inputs = [src if i == op.name else i for i in c.inputs]
    ir.ops.remove(op)


def _fresh(ir: IR, base: str) -> str:
    names = {op.name for op in ir.ops}
    n = 0
    while f"{base}%{n}" in names:
        n += 1
    return f"{base}%{n}"


def _channel_vector(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A per-channel constant as [C] (None when it varies across tokens)."""
    v = np.asarray(value, np.float64)
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    if v.shape == (channels,):
        return v
    return None


_GEMM_KINDS = ("linear", "patch_embed", "cls_head")


# ---- the clean-up passes -----------------------------------------------------------------------
class FoldConstants(Pass):
    name = "fold-constants"

    def rewrite(self, ir: IR) -> bool:
        changed = False
        while self._once(ir):
            changed = True
        return changed

    def _once(self, ir: IR) -> bool:
        producers = ir.producers()
        for op in ir.ops:
            if op.kind not in ("scale", "select") and not op.is_bias_add:
                continue
            src = producers.get(op.inputs[0])
            users_of_src = _consumers(ir, src.name) if src is not None else []
            # identities
            if op.kind == "scale" and np.all(op.params["s"] == 1) or op.is_bias_add and not np.any(op.params["bias"]):
                _bypass(ir, op)
                return True
            if op.kind == "select" and src is not None and list(op.attrs["cols"]) == list(range(src.shape[1])):
                _bypass(ir, op)
                return True
            # chains of the same constant op
            if src is not None and len(users_of_src) == 1 and src.kind == op.kind and src.is_bias_add == op.is_bias_add \
                    and op.kind != "select":
                key = "bias" if op.is_bias_add else "s"
                first, second = np.asarray(src.params[key], np.float64), np.asarray(op.params[key], np.float64)
                op.params[key] = first + second if op.is_bias_add else first * second
                op.inputs = list(src.inputs)
                op.source = tuple(sorted(set(op.source) | set(src.source)))
                ir.ops.remove(src)
                return True
            # a scale after a linear: into its weights and bias
            if op.kind == "scale" and src is not None and src.kind in _GEMM_KINDS and len(users_of_src) == 1 \
                    and not src.attrs.get("gelu"):
                s = _channel_vector(op.params["s"], src.shape[1])
                if s is not None:
                    src.params["w"] = np.asarray(src.params["w"], np.float64) * s[None, :]
                    if "b" in src.params:
                        src.params["b"] = np.asarray(src.params["b"], np.float64) * s
                    src.source = tuple(sorted(set(src.source) | set(op.source)))
                    _bypass(ir, op)
                    return True
            # a scale read only by linears: into their input rows
            if op.kind == "scale":
                users = _consumers(ir, op.name)
                s = _channel_vector(op.params["s"], op.shape[1])
                if s is not None and users and all(u.kind == "linear" for u in users):
                    for u in users:
                        u.params["w"] = s[:, None] * np.asarray(u.params["w"], np.float64)
                    _bypass(ir, op)
                    return True
            # a column selection of a linear: a linear with those columns
            if op.kind == "select" and src is not None and src.kind == "linear":
                cols = np.asarray(op.attrs["cols"], dtype=np.int64)
                params = {"w": np.asarray(src.params["w"])[:, cols]}
                if "b" in src.params:
                    params["b"] = np.asarray(src.params["b"])[cols]
                new = Op("linear", op.name, list(src.inputs), op.shape, dict(src.attrs), params,
                         tuple(sorted(set(src.source) | set(op.source))))
                ir.ops[ir.ops.index(op)] = new
                return True
            # constant additions around the embedding go into its position table
            if op.is_bias_add and src is not None and src.kind == "embed" and len(users_of_src) == 1:
                pos = np.asarray(src.params.get("pos", np.zeros(src.shape)), np.float64)
                src.params["pos"] = pos + np.broadcast_to(op.params["bias"], src.shape)
                src.source = tuple(sorted(set(src.source) | set(op.source)))
                _bypass(ir, op)
                return True
            if op.is_bias_add:
                users = _consumers(ir, op.name)
                if len(users) == 1 and users[0].kind == "embed":
                    emb = users[0]
                    extra = np.zeros(emb.shape)
                    extra[emb.shape[0] - op.shape[0]:] = np.broadcast_to(op.params["bias"], op.shape)
                    emb.params["pos"] = np.asarray(emb.params.get("pos", np.zeros(emb.shape)), np.float64) + extra
                    emb.source = tuple(sorted(set(emb.source) | set(op.source)))
                    _bypass(ir, op)
                    return True
        return False


class FuseBias(Pass):
    name = "fuse-bias"

    def rewrite(self, ir: IR) -> bool:
        changed = False
        producers = ir.producers()
        for op in list(ir.ops):
            if not op.is_bias_add:
                continue
            src = producers.get(op.inputs[0])
            if src is None or src.kind not in _GEMM_KINDS or src.attrs.get("gelu") or len(_consumers(ir, src.name)) != 1:
                continue
            b = _channel_vector(op.params["bias"], src.shape[1])
            if b is None:
                continue
            src.params["b"] = np.asarray(src.params.get("b", np.zeros(src.shape[1])), np.float64) + b
            src.source = tuple(sorted(set(src.source) | set(op.source)))
            _bypass(ir, op)
            changed = True
        return changed


class FuseGelu(Pass):
    name = "fuse-gelu"

    def rewrite(self, ir: IR) -> bool:
        changed = False
        producers = ir.producers()
        for op in list(ir.ops):
            if op.kind != "gelu":
                continue
            src = producers.get(op.inputs[0])
            if src is None or src.kind != "linear" or src.attrs.get("gelu") or len(_consumers(ir, src.name)) != 1:
                continue
            src.attrs["gelu"], src.attrs["approx"] = True, op.attrs.get("approx", "erf")
            src.source = tuple(sorted(set(src.source) | set(op.source)))
            _bypass(ir, op)
            changed = True
        return changed


class CanonicalResidual(Pass):
    """A residual add reads (skip, branch): the skip input is the one the other is computed from."""

    name = "residual"

    def rewrite(self, ir: IR) -> bool:
        producers = ir.producers()

        def ancestors(value: str) -> set[str]:
            seen, stack = set(), [value]
            while stack:
                op = producers.get(stack.pop())
                if op is None:
                    continue
                for i in op.inputs:
                    if i not in seen:
                        seen.add(i)
                        stack.append(i)
            return seen

        changed = False
        for op in ir.ops:
            if op.kind == "add" and len(op.inputs) == 2:
                a, b = op.inputs
                if b in ancestors(a) and a not in ancestors(b):
                    op.inputs = [b, a]
                    changed = True
        return changed


class PackQKV(Pass):
    """attention(q, k, v) with three linears of one input -> attention(qkv) with one packed linear."""

    name = "pack-qkv"

    def rewrite(self, ir: IR) -> bool:
        changed = False
        producers = ir.producers()
        for att in list(ir.ops):
            if att.kind != "attention" or len(att.inputs) != 3:
                continue
            lins = [producers.get(i) for i in att.inputs]
            if any(l is None or l.kind != "linear" or l.attrs.get("gelu") for l in lins):
                continue
            if len({l.name for l in lins}) != 3 or len({l.inputs[0] for l in lins}) != 1:
                continue
            if any(_consumers(ir, l.name) != [att] for l in lins):
                continue
            d = lins[0].shape[1]
            w = np.concatenate([np.asarray(l.params["w"], np.float64) for l in lins], axis=1)
            b = np.concatenate([np.asarray(l.params.get("b", np.zeros(d)), np.float64) for l in lins])
            params = {"w": w, "b": b} if any("b" in l.params for l in lins) else {"w": w}
            packed = Op("linear", _fresh(ir, "qkv"), [lins[0].inputs[0]], (lins[0].shape[0], 3 * d),
                        {"gelu": False, "approx": "erf"}, params,
                        tuple(sorted(set().union(*(l.source for l in lins)))))
            first = min(ir.ops.index(l) for l in lins)
            ir.ops.insert(first, packed)
            for l in lins:
                ir.ops.remove(l)
            att.inputs = [packed.name]
            changed = True
        return changed


class RemoveDeadOps(Pass):
    name = "remove-dead"

    def rewrite(self, ir: IR) -> bool:
        return ir.remove_dead() > 0


def cleanup_passes() -> list[Pass]:
    return [FoldConstants(), FuseBias(), FuseGelu(), CanonicalResidual(), PackQKV(), RemoveDeadOps()]


def cleanup_flow() -> Flow:
    return Flow("cleanup", cleanup_passes())


def require_clean(ir: IR, label: str = "the model") -> IR:
    """UsageError when raw ops are left that the accelerator has no unit for."""
    raw = [op for op in ir.ops if op.is_raw]
    if raw:
        what = {"gelu": "a GELU that does not follow a linear layer", "scale": "a constant scale that folds "
                "into no linear layer", "select": "a channel selection of a tensor that no linear produces",
                "add": "a constant addition that folds into no linear layer or embedding"}
        op = raw[0]
        raise UsageError(f"{label}: {op.name} is {what[op.kind]}, which has no accelerator counterpart "
                         f"({len(raw)} such op(s): {', '.join(o.name for o in raw[:4])})")
    return ir
