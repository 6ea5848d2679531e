"""The accelerator-level float IR: a graph of ViT / MoE ops with NumPy parameters.

Every op produces one value, named like the op; values are 2-D ``[tokens, channels]`` (the batch
of 1 is implicit), except the image input ``[C, H, W]`` and a classification head's ``[1, classes]``.
Op names are CANONICAL: they are derived from the graph's structure (``blocks.3.attn.qkv``), never
from the source file, so the quantizer, the golden model and the hardware traces agree on them.

Op kinds (parameters in brackets; see docs/compiler.md):

* ``patch_embed``  image -> [Np, D]; w [C*p*p, D] (GEMM form, columns (c, i, j)), b [D]
* ``embed``        [Np, D] -> [T, D]; cls [D] (prepended), pos [T, D] (added)
* ``layernorm``    gamma [D], beta [D]; attr eps
* ``linear``       w [Cin, Cout], b [Cout]; attrs gelu (bool), approx ('erf' | 'tanh')
* ``attention``    inputs (qkv) packed [T, 3D] or (q, k, v); attrs heads, head_dim, scale
* ``add``          two inputs (residual: skip first, branch second)
* ``moe``          gate_w [n_tasks, D, N], gate_b [n_tasks, N], w1 [N, D, H], b1 [N, H],
                   w2 [N, H, D], b2 [N, D]; attrs top_k, approx
* ``cls_head``     LN (ln_gamma, ln_beta; attr ln_eps, optional) + Linear (w, b) on token 0
* ``output``       the graph's result; attr onnx_shape

Raw kinds appear between import and the clean-up flow (compiler/passes.py) and never after it:
``gelu`` (before fusion into its linear), ``add`` with a constant ``bias`` (one input),
``scale`` (x * s, s scalar or per channel) and ``select`` (a column gather, attr cols).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from m3vit.errors import M3ViTError, UsageError

IMAGE = "image"

KINDS = ("patch_embed", "embed", "layernorm", "linear", "gelu", "attention", "add", "scale", "select",
         "moe", "cls_head", "output")
RAW_KINDS = ("gelu", "scale", "select")
# A raw op is named after the op it follows: "blocks.0.mlp.fc1" -> "blocks.0.mlp.fc1.gelu".
_RAW_SUFFIX = {"add": "bias", "scale": "scale", "select": "select", "gelu": "gelu"}
GELU_APPROX = ("erf", "tanh")


class IRError(M3ViTError):
    """An inconsistent IR: a bug in the importer or in a pass, never the user's input."""


@dataclass
class Op:
    kind: str
    name: str
    inputs: list[str]
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    # The ONNX nodes this op was raised from (provenance and import coverage).
    source: tuple[str, ...] = ()

    @property
    def is_raw(self) -> bool:
        return self.kind in RAW_KINDS or self.is_bias_add

    @property
    def is_bias_add(self) -> bool:
        return self.kind == "add" and len(self.inputs) == 1

    def clone(self, **changes) -> "Op":
        """A copy with its own attrs/params dicts; the arrays are shared and treated as immutable."""
        new = Op(self.kind, self.name, list(self.inputs), tuple(self.shape), dict(self.attrs),
                 dict(self.params), tuple(self.source))
        for key, value in changes.items():
            setattr(new, key, value)
        return new

    def __repr__(self) -> str:
        params = ", ".join(f"{k}{list(v.shape)}" for k, v in self.params.items())
        attrs = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items() if k != "cols")
        return f"{self.name} = {self.kind}({', '.join(self.inputs)}) -> {list(self.shape)}" + \
            (f" [{attrs}]" if attrs else "") + (f" {{{params}}}" if params else "")


@dataclass
class IR:
    ops: list[Op]
    image_shape: tuple[int, int, int]
    tasks: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- access ------------------------------------------------------------------------------
    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def __getitem__(self, name: str) -> Op:
        return self.op(name)

    def __contains__(self, name: str) -> bool:
        return any(op.name == name for op in self.ops)

    def by_kind(self, kind: str) -> list[Op]:
        return [op for op in self.ops if op.kind == kind]

    @property
    def output(self) -> Op:
        outs = self.by_kind("output")
        if len(outs) != 1:
            raise IRError(f"the IR has {len(outs)} output ops, expected 1")
        return outs[0]

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def consumers(self) -> dict[str, list[Op]]:
        out: dict[str, list[Op]] = defaultdict(list)
        for op in self.ops:
            for i in op.inputs:
                out[i].append(op)
        return out

    def producers(self) -> dict[str, Op]:
        return {op.name: op for op in self.ops}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {IMAGE: tuple(self.image_shape)}
        shapes.update({op.name: tuple(op.shape) for op in self.ops})
        return shapes

    def task_index(self, task: int | str) -> int:
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            if 0 <= int(task) < self.n_tasks:
                return int(task)
        elif isinstance(task, str):
            if task in self.tasks:
                return self.tasks.index(task)
            if task.isdigit() and int(task) < self.n_tasks:
                return int(task)
        raise UsageError(f"task {task!r} is not one of this program's {self.n_tasks} task(s): "
                         + ", ".join(f"{i}={n}" for i, n in enumerate(self.tasks)))

    def copy(self) -> "IR":
        return IR([op.clone() for op in self.ops], tuple(self.image_shape), list(self.tasks),
                  copy.deepcopy(self.meta))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for op in self.ops:
            out[op.kind] += 1
        return dict(sorted(out.items()))

    def summary(self) -> str:
        return "\n".join(repr(op) for op in self.ops)

    # ---- structure ---------------------------------------------------------------------------
    def validate(self) -> "IR":
        """Check names, order, kinds and shapes; raise IRError on the first inconsistency."""
        shapes = {IMAGE: tuple(self.image_shape)}
        for op in self.ops:
            if op.kind not in KINDS:
                raise IRError(f"{op.name}: unknown op kind '{op.kind}'")
            if op.name in shapes:
                raise IRError(f"{op.name}: duplicate value name")
            missing = [i for i in op.inputs if i not in shapes]
            if missing:
                raise IRError(f"{op.name}: input(s) {', '.join(missing)} not defined before it")
            expected = infer_shape(op, [shapes[i] for i in op.inputs])
            if tuple(op.shape) != tuple(expected):
                raise IRError(f"{op.name}: shape {list(op.shape)} but its inputs give {list(expected)}")
            shapes[op.name] = tuple(op.shape)
        self.output  # exactly one
        return self

    def remove_dead(self) -> int:
        """Drop ops that do not reach the output; returns how many."""
        live = {self.output.name}
        producers = self.producers()
        stack = [self.output.name]
        while stack:
            for i in producers[stack.pop()].inputs:
                if i in producers and i not in live:
                    live.add(i)
                    stack.append(i)
        before = len(self.ops)
        self.ops = [op for op in self.ops if op.name in live]
        return before - len(self.ops)

    def rename(self, mapping: dict[str, str]) -> None:
        for op in self.ops:
            op.name = mapping.get(op.name, op.name)
            op.inputs = [mapping.get(i, i) for i in op.inputs]

    def assign_canonical_names(self) -> "IR":
        self.rename(canonical_names(self))
        return self

    def is_clean(self) -> bool:
        """True when only canonical (post clean-up) op kinds remain."""
        return not any(op.is_raw for op in self.ops)


# ---- shapes ------------------------------------------------------------------------------------
def infer_shape(op: Op, ins: list[tuple[int, ...]]) -> tuple[int, ...]:
    k, p, a = op.kind, op.params, op.attrs

    def need(n):
        if len(ins) != n:
            raise IRError(f"{op.name}: {k} takes {n} input(s), got {len(ins)}")

    def chans(shape, c, what):
        if len(shape) != 2 or shape[1] != c:
            raise IRError(f"{op.name}: {what} expects [T, {c}], got {list(shape)}")

    if k == "patch_embed":
        need(1)
        c, h, w = ins[0]
        pt = a["patch"]
        if p["w"].shape[0] != c * pt * pt or h % pt or w % pt:
            raise IRError(f"{op.name}: weight {list(p['w'].shape)} does not fit image {list(ins[0])}, patch {pt}")
        return ((h // pt) * (w // pt), p["w"].shape[1])
    if k == "embed":
        need(1)
        t, d = ins[0]
        t += "cls" in p
        if "pos" in p and p["pos"].shape != (t, d):
            raise IRError(f"{op.name}: pos {list(p['pos'].shape)} for {t} tokens of {d}")
        return (t, d)
    if k in ("layernorm", "gelu", "scale", "output"):
        need(1)
        if k == "layernorm":
            chans(ins[0], p["gamma"].shape[0], "layernorm")
        return tuple(ins[0])
    if k == "linear":
        need(1)
        chans(ins[0], p["w"].shape[0], "linear")
        return (ins[0][0], p["w"].shape[1])
    if k == "select":
        need(1)
        cols = np.asarray(a["cols"])
        if len(ins[0]) != 2 or cols.min(initial=0) < 0 or cols.max(initial=0) >= ins[0][1]:
            raise IRError(f"{op.name}: columns out of range for {list(ins[0])}")
        return (ins[0][0], len(cols))
    if k == "add":
        if len(ins) == 2:
            if tuple(ins[0]) != tuple(ins[1]):
                raise IRError(f"{op.name}: adds {list(ins[0])} and {list(ins[1])}")
            return tuple(ins[0])
        need(1)
        np.broadcast_shapes(p["bias"].shape, ins[0])
        return tuple(ins[0])
    if k == "attention":
        d = a["heads"] * a["head_dim"]
        if len(ins) == 1:
            chans(ins[0], 3 * d, "packed attention")
        else:
            need(3)
            for s in ins:
                chans(s, d, "attention")
        return (ins[0][0], d)
    if k == "moe":
        need(1)
        n, d, h = p["w1"].shape
        chans(ins[0], d, "moe")
        if p["gate_w"].shape[1:] != (d, n) or p["w2"].shape != (n, h, d):
            raise IRError(f"{op.name}: inconsistent MoE parameter shapes")
        return tuple(ins[0])
    if k == "cls_head":
        need(1)
        chans(ins[0], p["w"].shape[0], "cls_head")
        return (1, p["w"].shape[1])
    raise IRError(f"{op.name}: unknown op kind '{k}'")


# ---- canonical names ---------------------------------------------------------------------------
def canonical_names(ir: IR) -> dict[str, str]:
    """Map every op's current name to its canonical, structure-derived name.

    The walk follows the residual stream: patch_embed -> embed -> blocks (LN -> attention branch ->
    residual add, LN -> MLP or MoE branch -> residual add) -> final norm -> head -> output. Raw ops
    take the name of the op they follow plus a suffix (.bias, .scale, .select, .gelu)."""
    ops = {op.name: op for op in ir.ops}
    cons = ir.consumers()
    names: dict[str, str] = {}
    taken: set[str] = set()

    def give(op: Op, name: str) -> None:
        if op.name in names:
            return
        base, n = name, 1
        while name in taken:
            name = f"{base}{n}"
            n += 1
        names[op.name] = name
        taken.add(name)

    def chain_after(value: str, base: str) -> str:
        """Name the single-consumer raw ops after `value`; return the last value of the chain."""
        while True:
            users = cons.get(value, [])
            if len(users) != 1 or not users[0].is_raw or users[0].name in names:
                return value
            give(users[0], f"{base}.{_RAW_SUFFIX[users[0].kind]}")
            value = users[0].name

    def name_producer(value: str, base: str, shared: str | None = None) -> None:
        """Name the linear (and raw ops after it) that produce `value`; ops shared with other
        consumers take `shared` as their base."""
        chain = []
        op = ops.get(value)
        while op is not None and op.is_raw:
            chain.append(op)
            op = ops.get(op.inputs[0])
        if op is not None and op.kind == "linear":
            chain.append(op)
        chain.reverse()
        if not chain:
            return
        split = 0  # ops before `split` have other consumers
        for i, c in enumerate(chain[:-1]):
            if len(cons.get(c.name, [])) > 1:
                split = i + 1
        for group, b in ((chain[:split], shared or base), (chain[split:], base)):
            for j, c in enumerate(group):
                give(c, b if j == 0 else f"{b}.{_RAW_SUFFIX[c.kind]}")

    def branch_ops(start: Op, stop: Op) -> list[Op]:
        seen, order, stack = set(), [], [start]
        while stack:
            op = stack.pop()
            if op.name in seen or op is stop:
                continue
            seen.add(op.name)
            order.append(op)
            stack.extend(cons.get(op.name, []))
        index = {op.name: i for i, op in enumerate(ir.ops)}
        return sorted(order, key=lambda o: index[o.name])

    patch = ir.by_kind("patch_embed")
    if len(patch) != 1:
        raise UsageError(f"the graph has {len(patch)} patch embeddings; a ViT backbone has exactly one")
    give(patch[0], "patch_embed")
    value = chain_after(patch[0].name, "patch_embed")
    users = cons.get(value, [])
    if len(users) == 1 and users[0].kind == "embed":
        give(users[0], "embed")
        value = chain_after(users[0].name, "embed")

    block, phase = 0, "attn"
    while True:
        users = cons.get(value, [])
        lns = [u for u in users if u.kind == "layernorm"]
        adds = [u for u in users if u.kind == "add" and len(u.inputs) == 2]
        if len(users) == 2 and len(lns) == 1 and len(adds) == 1:
            ln, res = lns[0], adds[0]
            branch = branch_ops(ln, res)
            kinds = {o.kind for o in branch}
            kind = "attn" if "attention" in kinds else "mlp"
            if kind != phase:
                raise UsageError(f"block {block}: expected an {'attention' if phase == 'attn' else 'MLP or MoE'} "
                                 f"branch between two residual adds, found {', '.join(sorted(kinds))}")
            p = f"blocks.{block}"
            if kind == "attn":
                give(ln, f"{p}.norm1")
                chain_after(ln.name, f"{p}.norm1")
                att = [o for o in branch if o.kind == "attention"]
                if len(att) != 1:
                    raise UsageError(f"block {block}: {len(att)} attention ops in one branch")
                give(att[0], f"{p}.attn")
                if len(att[0].inputs) == 1:
                    name_producer(att[0].inputs[0], f"{p}.attn.qkv")
                else:
                    for role, inp in zip("qkv", att[0].inputs):
                        name_producer(inp, f"{p}.attn.{role}", shared=f"{p}.attn.qkv")
                after = chain_after(att[0].name, f"{p}.attn")
                proj = [u for u in cons.get(after, []) if u.kind == "linear"]
                if len(proj) == 1:
                    give(proj[0], f"{p}.attn.proj")
                    chain_after(proj[0].name, f"{p}.attn.proj")
                give(res, f"{p}.residual1")
            else:
                give(ln, f"{p}.norm2")
                chain_after(ln.name, f"{p}.norm2")
                fc = 0
                for o in branch:
                    if o.kind == "linear" and o.name not in names:
                        fc += 1
                        give(o, f"{p}.mlp.fc{fc}")
                        chain_after(o.name, f"{p}.mlp.fc{fc}")
                    elif o.kind == "moe":
                        give(o, f"{p}.moe")
                        chain_after(o.name, f"{p}.moe")
                give(res, f"{p}.residual2")
                block += 1
            for o in branch:  # anything left in the branch hangs off a named op
                if o.name not in names and o.is_raw and o.inputs[0] in names:
                    give(o, f"{names[o.inputs[0]]}.{_RAW_SUFFIX[o.kind]}")
            phase = "mlp" if kind == "attn" else "attn"
            value = chain_after(res.name, names[res.name])
            continue
        if len(users) == 1 and users[0].kind == "layernorm":
            give(users[0], "norm")
            value = chain_after(users[0].name, "norm")
            continue
        if len(users) == 1 and users[0].kind == "cls_head":
            give(users[0], "head")
            value = chain_after(users[0].name, "head")
            continue
        if len(users) == 1 and users[0].kind == "output":
            give(users[0], "output")
            break
        found = ", ".join(f"{u.kind}" for u in users) or "nothing"
        raise UsageError(f"the graph is not a pre-norm ViT backbone: after '{names.get(value, value)}' "
                         f"the residual stream feeds {found}")
    if phase == "mlp":
        raise UsageError(f"block {block} has an attention branch but no MLP or MoE branch")

    live = {ir.output.name}
    for op in reversed(ir.ops):
        if op.name in live:
            live.update(op.inputs)
    for op in ir.ops:  # a pass may leave ops that no longer reach the output; remove-dead drops them
        if op.name not in names and op.name not in live:
            give(op, f"dead.{op.kind}")
    for op in ir.ops:  # a raw op off the walked path still follows a named op
        if op.name not in names and op.is_raw and op.inputs[0] in names:
            give(op, f"{names[op.inputs[0]]}.{_RAW_SUFFIX[op.kind]}")
    unnamed = [op for op in ir.ops if op.name not in names]
    if unnamed:
        raise UsageError("the graph is not a pre-norm ViT backbone: no place in its structure for "
                         + ", ".join(f"{op.kind} {op.name}" for op in unnamed[:4]))
    return names


def model_meta(ir: IR) -> dict[str, Any]:
    """The model's sizes as the IR holds them (the importer records this as ir.meta['model'])."""
    pe = ir.by_kind("patch_embed")
    embed = ir.by_kind("embed") or pe
    attn, moe = ir.by_kind("attention"), ir.by_kind("moe")
    fc1 = [op for op in ir.ops if op.name.endswith(".mlp.fc1")]
    heads = [op for op in ir.ops if op.kind == "cls_head"]
    expert_hidden = max((op.params["w1"].shape[2] for op in moe), default=0)
    mlp_hidden = max((op.shape[1] for op in fc1), default=0)
    return {
        "tasks": len(ir.tasks), "task_names": list(ir.tasks),
        "in_chans": int(ir.image_shape[0]), "img_size": [int(ir.image_shape[1]), int(ir.image_shape[2])],
        "patch": int(pe[0].attrs["patch"]) if pe else 0,
        "tokens": int(embed[0].shape[0]) if embed else 0, "dim": int(embed[0].shape[1]) if embed else 0,
        "depth": len(attn),
        "heads": max((op.attrs["heads"] for op in attn), default=0),
        "head_dim": max((op.attrs["head_dim"] for op in attn), default=0),
        "mlp_hidden": mlp_hidden, "expert_hidden": expert_hidden, "hidden": max(mlp_hidden, expert_hidden),
        "num_experts": max((op.params["w1"].shape[0] for op in moe), default=0),
        "top_k": max((op.attrs["top_k"] for op in moe), default=0),
        "moe_blocks": [int(op.name.split(".")[1]) for op in moe if op.name.startswith("blocks.")],
        "classes": int(heads[0].shape[1]) if heads else 0,
    }


def iter_params(ir: IR) -> Iterable[tuple[str, str, np.ndarray]]:
    for op in ir.ops:
        for key, value in op.params.items():
            yield op.name, key, value


def param_count(ir: IR) -> int:
    return int(sum(v.size for _, _, v in iter_params(ir)))
