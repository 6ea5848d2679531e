"""Exact MACs, parameters and expert usage of one task's pathway through M3ViT / Edge-MoE.

Three views of the same model, kept separate so that each checks the others:

* `analytic_layers` counts multiply-accumulates from the config alone, layer by layer;
* `MacCounter` counts the matrix products and convolutions that actually execute (a
  TorchDispatchMode over aten ops), attributed to the same canonical layer names;
* `expert_usage` runs the images and reads the routing of every MoE layer, which decides the
  parameters touched and the DDR weight traffic (the MAC count itself does not depend on the
  data: every token runs exactly top_k experts).

Units: 1 MAC = one multiply and one add; FLOPs = 2 x MACs. Only matrix products and
convolutions are counted; see docs/profile.md for what is left out and why.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m3vit.errors import UsageError
from m3vit.model.config import PRESETS, ModelConfig, dense_counterpart, head_upsample_stages
from m3vit.model.moe import MoE, TaskGate
from m3vit.model.vit import Attention, M3ViT

OP_CLASSES = ("patch_embed", "qkv", "attn_qk", "attn_av", "proj", "mlp", "gate", "experts", "head")
BACKBONE_CLASSES = OP_CLASSES[:-1]

# Canonical layer name suffix -> op class (heads and patch_embed are matched separately).
_SUFFIX_CLASS = {
    "attn.qkv": "qkv",
    "attn.qk": "attn_qk",
    "attn.av": "attn_av",
    "attn.proj": "proj",
    "mlp.fc1": "mlp",
    "mlp.fc2": "mlp",
    "moe.gate": "gate",
    "moe.experts": "experts",
}


def op_class_of(name: str) -> str:
    """The op class of a canonical layer name; 'other' for a name the model does not produce."""
    if name == "patch_embed":
        return "patch_embed"
    if name.startswith("heads."):
        return "head"
    m = re.fullmatch(r"blocks\.\d+\.(\w+\.\w+)", name)
    return _SUFFIX_CLASS.get(m.group(1), "other") if m else "other"


# ---- analytic count ----------------------------------------------------------------------------
def analytic_layers(cfg: ModelConfig, task: int | str = 0, with_head: bool = True) -> list[dict[str, Any]]:
    """MACs of one frame (batch 1) through one task's pathway, in execution order."""
    t = cfg.task_index(task)
    T, D, N, k = cfg.num_tokens, cfg.dim, cfg.num_experts, cfg.top_k
    layers: list[dict[str, Any]] = []

    def add(name: str, macs: int) -> None:
        layers.append({"name": name, "op_class": op_class_of(name), "macs": int(macs)})

    # A stride-p convolution with a p x p kernel: one dot product of C*p*p per patch and channel.
    add("patch_embed", cfg.num_patches * D * cfg.in_chans * cfg.patch**2)
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        add(f"{p}.attn.qkv", T * D * 3 * D)
        add(f"{p}.attn.qk", cfg.heads * T * T * cfg.head_dim)
        add(f"{p}.attn.av", cfg.heads * T * T * cfg.head_dim)
        add(f"{p}.attn.proj", T * D * D)
        if cfg.is_moe_block(i):
            gate = T * D * N
            if cfg.routing == "task-conditioned":
                # The eager gate recomputes the task embedding's share of the logits every forward:
                # one-hot @ Linear(tasks, E), Linear(E, E), then @ W[D:] (E x N). Input-independent.
                e = cfg.task_embed_dim
                gate += len(cfg.tasks) * e + e * e + e * N
            add(f"{p}.moe.gate", gate)
            # Every token runs exactly k distinct experts, each a D->H->D MLP.
            add(f"{p}.moe.experts", k * T * (D * cfg.expert_hidden + cfg.expert_hidden * D))
        else:
            add(f"{p}.mlp.fc1", T * D * cfg.mlp_hidden)
            add(f"{p}.mlp.fc2", T * cfg.mlp_hidden * D)
    if with_head:
        task_cfg = cfg.tasks[t]
        gh, gw = cfg.grid
        c, stages = cfg.head_channels, head_upsample_stages(cfg)
        # 3x3 'same' convs at the grid resolution doubled per stage; BN folds into the conv and
        # the bilinear upsampling is interpolation, so neither adds MACs.
        for j in range(stages):
            cin = D if j == 0 else c
            add(f"heads.{task_cfg.name}.stages.{j}.0", (gh << j) * (gw << j) * c * cin * 9)
        last = stages - 1
        add(f"heads.{task_cfg.name}.classifier", (gh << last) * (gw << last) * c * task_cfg.channels)
    return layers


def sum_by_class(layers: Iterable[dict[str, Any]]) -> dict[str, int]:
    out = {c: 0 for c in OP_CLASSES}
    for layer in layers:
        out[layer["op_class"]] = out.get(layer["op_class"], 0) + layer["macs"]
    return out


# ---- instrumented count ------------------------------------------------------------------------
def _arg(args: tuple, kwargs: dict, pos: int, name: str, default=None):
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _conv_macs(args, kwargs, out) -> int:
    x, w = args[0], args[1]
    # Each output (or, transposed, each input) element is one dot product over Cin/groups x kernel.
    per = math.prod(w.shape[1:])
    return (x.numel() if _arg(args, kwargs, 6, "transposed", False) else out.numel()) * per


def _sdpa_macs(args, kwargs, out) -> int:
    q, k, v = args[0], args[1], args[2]
    batch = math.prod(q.shape[:-2])
    return batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


# aten op -> MACs from (args, kwargs, output). The output's element count times the contraction length.
_MAC_RULES: dict[str, Callable[[tuple, dict, Any], int]] = {
    "mm": lambda a, kw, o: o.numel() * a[0].shape[-1],
    "addmm": lambda a, kw, o: o.numel() * a[1].shape[-1],
    "bmm": lambda a, kw, o: o.numel() * a[0].shape[-1],
    "baddbmm": lambda a, kw, o: o.numel() * a[1].shape[-1],
    "addbmm": lambda a, kw, o: a[1].shape[0] * o.numel() * a[1].shape[-1],
    "mv": lambda a, kw, o: a[0].numel(),
    "addmv": lambda a, kw, o: a[1].numel(),
    "dot": lambda a, kw, o: a[0].numel(),
    "vdot": lambda a, kw, o: a[0].numel(),
    "addr": lambda a, kw, o: a[1].numel() * a[2].numel(),
    "convolution": _conv_macs,
    "_convolution": _conv_macs,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_macs,
    "_scaled_dot_product_flash_attention": _sdpa_macs,
    "_scaled_dot_product_efficient_attention": _sdpa_macs,
    "_scaled_dot_product_cudnn_attention": _sdpa_macs,
}
# Substrings of contraction-like aten op names, so that one without a rule above is reported, not
# missed (bilinear interpolation is the one look-alike).
_CONTRACTION_HINTS = ("mm", "mv", "dot", "linear", "matmul", "einsum", "conv", "attention")


class MacCounter(TorchDispatchMode):
    """Counts the MACs of every matrix product and convolution that executes, by aten op and by
    canonical layer name (module hooks say which module is running).

    Composite ops (linear, matmul, einsum, conv2d) reach the dispatcher as the aten kernels they
    decompose into, so a functional `q @ k.T` or an expert applied to a gathered subset of tokens
    is seen with the shapes it really ran with. Contraction-like ops without a rule are listed
    in `unhandled` rather than silently dropped.
    """

    def __init__(self, model: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.layers: dict[str, int] = defaultdict(int)
        self.ops: dict[str, int] = defaultdict(int)
        self.unhandled: set[str] = set()
        self._stack: list[list] = []  # [path, module, contractions seen in this call]
        self._handles: list = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def by_class(self) -> dict[str, int]:
        return sum_by_class({"op_class": op_class_of(n), "macs": m} for n, m in self.layers.items())

    def __enter__(self):
        if self.model is not None:
            for path, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._push(path)))
                self._handles.append(module.register_forward_hook(self._pop))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        return super().__exit__(*exc)

    def _push(self, path: str):
        def hook(module, inputs):
            self._stack.append([path, module, 0])
        return hook

    def _pop(self, module, inputs, output):
        if self._stack and self._stack[-1][1] is module:
            self._stack.pop()

    def _scope(self) -> str:
        for path, module, _ in reversed(self._stack):
            if isinstance(module, TaskGate):  # the token logits and the task-embedding terms alike
                return path
        if not self._stack:
            return "(outside modules)"
        frame = self._stack[-1]
        path, module = frame[0], frame[1]
        if isinstance(module, Attention):  # the two functional matmuls, in execution order
            i = frame[2]
            frame[2] += 1
            return f"{path}.{('qk', 'av')[i]}" if i < 2 else f"{path}.matmul{i}"
        if isinstance(module, MoE):
            return f"{path}.experts"
        return path or "(model)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        rule = _MAC_RULES.get(name.rstrip("_"))  # in-place variants count the same
        if rule is not None:
            macs = int(rule(args, kwargs, out))
            self.ops[name] += macs
            self.layers[self._scope()] += macs
        elif any(h in name for h in _CONTRACTION_HINTS) and "bilinear" not in name:
            self.unhandled.add(str(func))
        return out


def count_executed(model: M3ViT, x: torch.Tensor, task: int | str) -> MacCounter:
    """Run one task's pathway on x under a MacCounter and return the counter."""
    counter = MacCounter(model)
    with torch.no_grad(), counter:
        model(x, task=task)
    return counter


# ---- parameters --------------------------------------------------------------------------------
def expert_params(cfg: ModelConfig) -> int:
    """One expert: w1 (D x H) + b1 (H) + w2 (H x D) + b2 (D)."""
    d, h = cfg.dim, cfg.expert_hidden
    return d * h + h + h * d + d


def param_breakdown(model: M3ViT, task: int | str = 0) -> dict[str, int]:
    """Parameter counts by role, from the model's own tensors.

    dense: everything every task runs (patch embedding, CLS/position, LayerNorms, attention,
    dense MLPs); gate: this task's share of the gates as used at inference (multi-gate: its
    D x N slice per layer; task-conditioned: the whole shared gate and task MLP); gate_training_only:
    the noise weights, used only while training; experts: all experts of all MoE layers;
    head: this task's head; heads: all heads.
    """
    cfg = model.cfg
    t = cfg.task_index(task)
    out = dict(total=0, dense=0, gate=0, gates_all=0, gate_training_only=0, experts=0, head=0, heads=0)
    for name, p in model.named_parameters():
        n = p.numel()
        out["total"] += n
        parts = name.split(".")
        if parts[0] == "heads":
            out["heads"] += n
            if parts[1] == cfg.tasks[t].name:
                out["head"] += n
        elif ".moe.gate." in name:
            if parts[-1] == "noise_weight":
                out["gate_training_only"] += n
            else:
                out["gates_all"] += n
                per_task = parts[-1] == "weight" and cfg.routing == "multi-gate"
                out["gate"] += n // len(cfg.tasks) if per_task else n
        elif re.fullmatch(r"blocks\.\d+\.moe\.(w1|b1|w2|b2)", name):
            out["experts"] += n
        else:
            out["dense"] += n
    return out


# ---- data-dependent figures ----------------------------------------------------------------------
def _frames(images: Iterable) -> list[tuple[str, torch.Tensor]]:
    """(name, 1 x C x H x W) frames from tensors, (name, tensor) pairs, or batches of either."""
    frames = []
    for i, item in enumerate(images):
        name, x = item if isinstance(item, tuple) else (f"image{i}", item)
        x = x if x.dim() == 4 else x.unsqueeze(0)
        for j, f in enumerate(x.split(1)):
            frames.append((name if x.shape[0] == 1 else f"{name}[{j}]", f))
    return frames


def expert_usage(model: M3ViT, task: int | str, images: Iterable, progress=None) -> dict[str, Any]:
    """Routing of one task's pathway over the frames: per MoE layer, the token-slots routed to each
    expert (per frame and summed), the distinct experts each frame touches, and their union."""
    cfg = model.cfg
    t = cfg.task_index(task)
    frames = _frames(images)
    blocks = cfg.moe_blocks
    per_image: list[list[list[int]]] = [[] for _ in blocks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, x in frames:
                model.features(x, t)
                for j, moe in enumerate(model.moe_layers):
                    idx = moe.last_routing.reshape(-1)
                    per_image[j].append(torch.bincount(idx, minlength=cfg.num_experts).tolist())
                if progress is not None:
                    progress.update(1)
    finally:
        model.train(was_training)
    layers = []
    for b, rows in zip(blocks, per_image):
        counts = [sum(col) for col in zip(*rows)] if rows else [0] * cfg.num_experts
        distinct = [sum(1 for c in row if c) for row in rows]
        touched = [e for e, c in enumerate(counts) if c]
        layers.append({
            "name": f"blocks.{b}.moe", "block": b, "counts": counts, "counts_per_image": rows,
            "distinct_per_frame": distinct, "distinct_mean": sum(distinct) / len(distinct) if distinct else 0.0,
            "touched": touched, "touched_count": len(touched),
        })
    return {"task": cfg.tasks[t].name, "num_experts": cfg.num_experts, "top_k": cfg.top_k if cfg.has_moe else 0,
            "tokens": cfg.num_tokens, "images": len(frames), "layers": layers}


# ---- the whole profile -------------------------------------------------------------------------
def _meta_model(cfg: ModelConfig, with_heads: bool) -> M3ViT:
    """The module structure without real storage: parameter counts at no memory or init cost."""
    with torch.device("meta"):
        return M3ViT(cfg, with_heads=with_heads)


def profile_model(model: M3ViT, task: int | str = 0, images: Iterable | None = None, *, with_head: bool = True,
                  weight_bits: int = 8, progress=None, preset: str | None = None) -> dict[str, Any]:
    """The profile of one task's pathway as one JSON-ready dict (schema in docs/profile.md)."""
    cfg = model.cfg
    t = cfg.task_index(task)
    task_name = cfg.tasks[t].name
    with_head = bool(with_head and model.heads is not None)
    if preset is None:  # built-in configs are named after their preset, overridden ones 'preset+custom'
        base = cfg.name.split("+")[0]
        preset = base if base in PRESETS else None
    if images is None:
        from m3vit.model.images import input_batch

        images = input_batch(cfg.img_size, 8)
    frames = _frames(images)
    if not frames:
        raise UsageError("the profile needs at least one image")
    bytes_per_param = weight_bits / 8

    layers = analytic_layers(cfg, t, with_head)
    by_class = sum_by_class(layers)
    head_macs = by_class["head"]
    total = sum(l["macs"] for l in layers)

    usage = expert_usage(model, t, frames, progress)
    params = param_breakdown(model, t)
    per_expert = expert_params(cfg)
    n_moe = len(cfg.moe_blocks)
    # Weights every frame of this pathway reads regardless of routing.
    fixed = params["dense"] + params["gate"] + (params["head"] if with_head else 0)
    touched_experts = sum(l["touched_count"] for l in usage["layers"])
    per_frame_experts = [sum(col) for col in zip(*(l["distinct_per_frame"] for l in usage["layers"]))] \
        or [0] * len(frames)
    mean_experts_per_frame = sum(per_frame_experts) / len(per_frame_experts)
    reordered = (fixed + mean_experts_per_frame * per_expert) * bytes_per_param
    per_token = (fixed + n_moe * cfg.num_tokens * cfg.top_k * per_expert) * bytes_per_param if cfg.has_moe \
        else fixed * bytes_per_param

    dense_cfg = dense_counterpart(cfg)
    dense_layers = analytic_layers(dense_cfg, t, with_head)
    dense_params = param_breakdown(_meta_model(dense_cfg, model.heads is not None), t)
    dense_by_class = sum_by_class(dense_layers)

    return {
        "units": "MAC",
        "flops_per_mac": 2,
        "preset": preset,
        "model": cfg.name,
        "dataset": cfg.dataset,
        "task": task_name,
        "task_index": t,
        "tasks": cfg.task_names,
        "img_size": list(cfg.img_size),
        "tokens": cfg.num_tokens,
        "images": len(frames),
        "image_names": [n for n, _ in frames],
        "with_head": with_head,
        "weight_bits": weight_bits,
        "routing": cfg.routing,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k if cfg.has_moe else 0,
        "total_macs": total,
        "backbone_macs": total - head_macs,
        "head_macs": head_macs,
        "total_flops": 2 * total,
        "by_class": by_class,
        "layers": layers,
        "params_total": params["total"],
        "params_active": fixed + touched_experts * per_expert,
        "params_active_per_token": fixed + n_moe * cfg.top_k * per_expert if cfg.has_moe else fixed,
        "params": {**params, "per_expert": per_expert, "moe_layers": n_moe,
                   "experts_touched": touched_experts, "experts_per_frame_mean": mean_experts_per_frame},
        "weight_bytes_per_frame": reordered,
        "ddr_weight_bytes_per_frame": {"reordered": reordered, "per_token": per_token},
        "expert_usage": usage,
        "dense_counterpart": {
            "model": dense_cfg.name,
            "total_macs": sum(l["macs"] for l in dense_layers),
            "backbone_macs": sum(l["macs"] for l in dense_layers) - dense_by_class["head"],
            "head_macs": dense_by_class["head"],
            "by_class": dense_by_class,
            "params_total": dense_params["total"],
            "params_active": dense_params["dense"] + (dense_params["head"] if with_head else 0),
        },
    }


# ---- report ------------------------------------------------------------------------------------
def _g(macs: float) -> str:
    return f"{macs / 1e9:12.6f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:10.3f} MB"


def format_report(r: dict[str, Any]) -> str:
    total = r["total_macs"] or 1
    head = "with its head" if r["with_head"] else "backbone only"
    lines = [
        f"{r['model']} / {r['dataset']}: task '{r['task']}' (#{r['task_index']} of: {', '.join(r['tasks'])}), {head}; "
        f"{r['img_size'][0]}x{r['img_size'][1]} input, {r['tokens']} tokens; {r['images']} image(s)",
        "",
        "MACs per frame (1 MAC = 1 multiply-accumulate; FLOPs = 2 x MACs; matmuls and convs only)",
        f"  {'op class':<14}{'GMACs':>12}{'share':>9}",
    ]
    for c in OP_CLASSES:
        if r["by_class"].get(c):
            lines.append(f"  {c:<14}{_g(r['by_class'][c])}{100 * r['by_class'][c] / total:8.1f}%")
    lines += [
        f"  {'backbone':<14}{_g(r['backbone_macs'])}",
        f"  {'head':<14}{_g(r['head_macs'])}",
        f"  {'total':<14}{_g(r['total_macs'])}   ({r['total_flops'] / 1e9:.3f} GFLOPs)",
        "",
        "Parameters",
        f"  {'total (all tasks, gates, experts, heads)':<52}{r['params_total']:>14,}",
        f"  {'active: this pathway, experts touched on these images':<52}{r['params_active']:>14,}",
        f"  {'active per token: dense + gate + k experts per layer':<52}{r['params_active_per_token']:>14,}",
    ]
    d, ddr = r["dense_counterpart"], r["ddr_weight_bytes_per_frame"]
    lines += [
        f"  {'dense ViT of the same size (' + d['model'] + ')':<52}{d['params_total']:>14,}  total, "
        f"{d['params_active']:,} on this pathway, {d['total_macs'] / 1e9:.4f} GMACs",
        "",
        f"Weight bytes per frame at {r['weight_bits']}-bit weights (mean over the images)",
        f"  {'touched: fixed weights + distinct experts per layer':<52}{_mb(r['weight_bytes_per_frame'])}",
        f"  {'DDR traffic, patch reordering (expert once/layer)':<52}{_mb(ddr['reordered'])}",
        f"  {'DDR traffic, no reordering (k experts per token)':<52}{_mb(ddr['per_token'])}",
    ]
    u = r["expert_usage"]
    if u["layers"]:
        lines += ["", f"Experts per MoE layer ({u['num_experts']} experts, top-{u['top_k']}, "
                      f"{u['tokens']} tokens per frame)",
                  f"  {'layer':<16}{'distinct per frame':>22}{'touched':>10}{'busiest expert':>22}",
                  f"  {'':<16}{'min / mean / max':>22}{'(union)':>10}{'(share of slots)':>22}"]
        for l in u["layers"]:
            dist = l["distinct_per_frame"]
            slots = sum(l["counts"]) or 1
            top = max(range(len(l["counts"])), key=lambda e: l["counts"][e])
            spread = f"{min(dist)} / {l['distinct_mean']:.2f} / {max(dist)}"
            touched = f"{l['touched_count']}/{u['num_experts']}"
            busiest = f"#{top}: {100 * l['counts'][top] / slots:.1f}%"
            lines.append(f"  {l['name']:<16}{spread:>22}{touched:>10}{busiest:>22}")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------
def _check_plot_path(path: str) -> str:
    """Fail before the work if the figure could not be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--plot {path} is a directory; give a file name such as {os.path.join(path, 'profile.png')}")
    if not os.path.isdir(folder):
        raise UsageError(f"--plot {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"--plot {path} is not writable")
    return path


def cli_profile(args) -> int:
    from m3vit.model.checkpoint import model_from_args, task_from_args
    from m3vit.model.images import input_batch

    if args.images < 1:
        raise UsageError(f"--images must be at least 1, got {args.images}")
    if not 1 <= args.weight_bits <= 64:
        raise UsageError(f"--weight-bits must be between 1 and 64, got {args.weight_bits}")
    plot = _check_plot_path(args.plot) if args.plot else None
    model = model_from_args(args, with_heads=True)
    cfg = model.cfg
    task = task_from_args(args, cfg)
    if cfg.in_chans == 3:
        images = input_batch(cfg.img_size, args.images)
    else:  # the photographs are RGB; other channel counts get seeded random frames
        g = torch.Generator().manual_seed(0)
        images = [(f"random{i}", torch.randn(1, cfg.in_chans, *cfg.img_size, generator=g)) for i in range(args.images)]
    other_tasks = [i for i in range(len(cfg.tasks)) if i != task] if plot else []
    passes = args.images * (1 + len(other_tasks))

    from tqdm import tqdm

    bar = tqdm(total=passes, desc="profile", unit="frame", file=sys.stderr, leave=False,
               disable=passes < 4 or not sys.stderr.isatty())
    try:
        result = profile_model(model, task, images, with_head=args.with_head, weight_bits=args.weight_bits,
                               progress=bar)
        usage = {result["task"]: result["expert_usage"]}
        for i in other_tasks:
            usage[cfg.tasks[i].name] = expert_usage(model, i, images, bar)
    finally:
        bar.close()
    if plot:
        from m3vit.model.profile_plots import write_profile_figure

        ordered = {name: usage[name] for name in cfg.task_names}
        write_profile_figure(result, ordered, plot)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))
        if plot:
            print(f"\nfigure: {plot}")
    return 0
