"""Fidelity of a quantized graph against the float PyTorch model it came from.

For every evaluation image and task: the float trace (hooks at every canonical tensor) and the
golden trace, dequantized, are compared tensor by tensor (SQNR, cosine), the backbone output per
task, and the MoE routing. Routing agreement is the fraction of tokens whose chosen expert SET
equals the float model's, measured end to end and per layer in isolation (the float model's
input to that MoE layer, quantized to the layer's input format, through the quantized gate
only), so that drift from earlier layers cannot hide where routes flip.

Evaluation images are seeded crops (and mirror images) of the bundled photographs, not the
whole frames that calibration uses.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from m3vit.compiler import golden
from m3vit.compiler import numerics as nx
from m3vit.compiler.from_torch import float_trace
from m3vit.compiler.numerics import SatCounter
from m3vit.compiler.qgraph import QGraph

TARGETS = {"output_cosine": 0.995, "routing_agreement": 0.98}


def eval_images(size: tuple[int, int], n: int, seed: int = 1):
    """n inputs (name, 1x3xHxW): seeded crops of the bundled photographs (every other one
    mirrored), cycling through them; seeded random images if no photograph is available."""
    import torch

    from m3vit.model.images import sample_images, to_input

    photos = sample_images()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if not photos:
            g = torch.Generator().manual_seed(seed * 1000 + i)
            out.append((f"random{i}", torch.randn(1, 3, *size, generator=g)))
            continue
        name, img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = rng.uniform(0.55, 0.9)
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y0:y0 + ch, x0:x0 + cw]
        flip = (i // len(photos)) % 2 == 1 or rng.random() < 0.5
        if flip:
            crop = crop[:, ::-1]
        out.append((f"{name}-crop{i}{'-flip' if flip else ''}", to_input(np.ascontiguousarray(crop), size)))
    return out


def _same_sets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1)


class _Acc:
    """Pooled sums for SQNR and cosine of one tensor."""

    __slots__ = ("ff", "ee", "fq", "qq")

    def __init__(self):
        self.ff = self.ee = self.fq = self.qq = 0.0

    def add(self, f: np.ndarray, q: np.ndarray):
        f = f.astype(np.float64, copy=False)
        self.ff += float((f * f).sum())
        self.ee += float(((f - q) ** 2).sum())
        self.fq += float((f * q).sum())
        self.qq += float((q * q).sum())

    def sqnr(self) -> float:
        if self.ee == 0:
            return math.inf
        return 10 * math.log10(self.ff / self.ee) if self.ff > 0 else -math.inf

    def cosine(self) -> float:
        den = math.sqrt(self.ff * self.qq)
        return self.fq / den if den > 0 else (1.0 if self.ee == 0 else 0.0)


def _cos(f, q) -> float:
    a = _Acc()
    a.add(f, q)
    return a.cosine()


def _compare_names(graph: QGraph) -> list[str]:
    """Tensors compared layer by layer: every canonical tensor of fixed shape."""
    out = []
    for name in graph.trace_names():
        info = graph.tensors[name]
        if -1 in info.shape or name.endswith((".topk", ".score")):
            continue
        out.append(name)
    return out


def evaluate(model, graph: QGraph, images, tasks=None, progress: bool = False) -> dict:
    """The fidelity report (a JSON-ready dict) of ``graph`` against ``model`` on ``images``."""
    from tqdm import tqdm

    cfg = model.cfg
    task_ids = list(range(len(cfg.tasks))) if tasks is None else [cfg.task_index(t) for t in tasks]
    names = _compare_names(graph)
    moe_ops = [op for op in graph.ops if op.kind == "moe"]
    layer_acc = {t: defaultdict(_Acc) for t in task_ids}
    out_cos = {t: [] for t in task_ids}
    out_acc = {t: _Acc() for t in task_ids}
    route = {t: {op.name: [0, 0, 0] for op in moe_ops} for t in task_ids}   # e2e same, isolated same, tokens
    sats = {t: SatCounter() for t in task_ids}
    jobs = [(t, name, x) for name, x in images for t in task_ids]
    for t, _, x in tqdm(jobs, desc=f"quant-report {cfg.name}", unit="run", disable=not progress):
        ft = float_trace(model, x, t)
        _, tr = golden.run(graph, x, t, trace=True, stats=sats[t])
        for name in names:
            layer_acc[t][name].add(ft[name], graph.tensors[name].dequantize(tr[name]))
        f_out = ft[graph.output]
        q_out = graph.tensors[graph.output].dequantize(tr[graph.output])
        out_cos[t].append(_cos(f_out, q_out))
        out_acc[t].add(f_out, q_out)
        with golden.single_thread_blas():
            for op in moe_ops:
                ref = ft[f"{op.name}.topk"]
                r = route[t][op.name]
                r[0] += int(_same_sets(tr[f"{op.name}.topk"], ref).sum())
                x_info = graph.tensors[op.inputs[0]]
                xq = nx.quantize(ft[op.inputs[0]], x_info.fmt, SatCounter(), op.inputs[0])
                _, idx, _ = golden.run_gate(graph, op, xq, t, SatCounter())
                r[1] += int(_same_sets(idx, ref).sum())
                r[2] += ref.shape[0]

    tn = {t: cfg.task_names[t] for t in task_ids}

    def per_task(vals: dict) -> dict:
        d = {tn[t]: v for t, v in vals.items()}
        d["min"] = min(vals.values())
        return d

    def ratio(t, i):
        rs = route[t].values()
        tot = sum(r[2] for r in rs)
        return sum(r[i] for r in rs) / tot if tot else 1.0

    report = {
        "model": {"name": cfg.name, "dataset": cfg.dataset},
        "precision": graph.meta.get("precision"),
        "images": [n for n, _ in images],
        "output_cosine": per_task({t: float(np.mean(v)) for t, v in out_cos.items()}),
        "output_cosine_worst_image": per_task({t: float(np.min(v)) for t, v in out_cos.items()}),
        "output_sqnr_db": per_task({t: out_acc[t].sqnr() for t in task_ids}),
        "routing_agreement": per_task({t: ratio(t, 0) for t in task_ids}),
        "routing_agreement_isolated": per_task({t: ratio(t, 1) for t in task_ids}),
        "layers": [{"name": n, "sqnr_db": {tn[t]: layer_acc[t][n].sqnr() for t in task_ids},
                    "cosine": {tn[t]: layer_acc[t][n].cosine() for t in task_ids}} for n in names],
        "moe_layers": [{"name": op.name,
                        "routing_agreement": {tn[t]: route[t][op.name][0] / max(1, route[t][op.name][2])
                                              for t in task_ids},
                        "routing_agreement_isolated": {tn[t]: route[t][op.name][1] / max(1, route[t][op.name][2])
                                                       for t in task_ids}}
                       for op in moe_ops],
        "saturation": {tn[t]: {k: list(v) for k, v in sorted(sats[t].events().items())} for t in task_ids},
    }
    if moe_ops:
        report["routing_agreement_min_layer"] = per_task(
            {t: min(route[t][op.name][0] / max(1, route[t][op.name][2]) for op in moe_ops) for t in task_ids})
    met = report["output_cosine"]["min"] >= TARGETS["output_cosine"] and \
        report["routing_agreement"]["min"] >= TARGETS["routing_agreement"]
    report["targets"] = {**TARGETS, "met": bool(met)}
    return _json_safe(report)


def _json_safe(obj):
    """inf (an exact tensor) as the string 'inf', so the report stays strict JSON."""
    if isinstance(obj, float):
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def summary_text(report: dict) -> str:
    tasks = [k for k in report["output_cosine"] if k != "min"]
    lines = [f"{report['model']['name']} ({report['model']['dataset']}), precision "
             f"{spec_text(report.get('precision'))}, {len(report['images'])} image(s)"]
    lines.append(f"{'task':<14}{'out cos':>9}{'worst img':>11}{'out SQNR':>10}{'route e2e':>11}{'route iso':>11}")
    for t in tasks:
        lines.append(f"{t:<14}{report['output_cosine'][t]:>9.5f}{report['output_cosine_worst_image'][t]:>11.5f}"
                     f"{_db(report['output_sqnr_db'][t]):>10}{report['routing_agreement'][t]:>11.2%}"
                     f"{report['routing_agreement_isolated'][t]:>11.2%}")
    lines.append(f"{'min':<14}{report['output_cosine']['min']:>9.5f}{report['output_cosine_worst_image']['min']:>11.5f}"
                 f"{_db(report['output_sqnr_db']['min']):>10}{report['routing_agreement']['min']:>11.2%}"
                 f"{report['routing_agreement_isolated']['min']:>11.2%}")
    if report["moe_layers"]:
        lines.append("routing per MoE layer (min over tasks): " + ", ".join(
            f"{m['name']} {min(m['routing_agreement'].values()):.1%} / {min(m['routing_agreement_isolated'].values()):.1%}"
            for m in report["moe_layers"]) + "  (end to end / isolated)")
    worst = min(report["layers"], key=lambda r: min(_num(v) for v in r["sqnr_db"].values()), default=None)
    if worst:
        lines.append(f"lowest layer SQNR: {worst['name']} {min(_num(v) for v in worst['sqnr_db'].values()):.1f} dB")
    sat = {t: v for t, v in report["saturation"].items() if v}
    lines.append("saturation: " + ("none" if not sat else "; ".join(
        f"{t}: " + ", ".join(f"{k} {n}/{tot}" for k, (n, tot) in v.items()) for t, v in sat.items())))
    tg = report["targets"]
    lines.append(f"targets (output cosine >= {tg['output_cosine']}, routing >= {tg['routing_agreement']:.0%}): "
                 f"{'met' if tg['met'] else 'NOT met'}")
    return "\n".join(lines)


def _num(v) -> float:
    return float(v) if not isinstance(v, str) else (math.inf if v == "inf" else -math.inf)


def _db(v) -> str:
    return f"{_num(v):.1f} dB" if math.isfinite(_num(v)) else "exact"


def spec_text(spec) -> str:
    if not spec:
        return "?"
    extra = [f"{k}={_entry_text(v)}" for sec in ("layer_type", "layer_name") for k, v in spec.get(sec, {}).items()]
    if spec.get("act_range", "max") != "max":
        extra.append(f"act_range={spec['act_range']}")
    if spec.get("per_channel") is False:
        extra.append("per-tensor weights")
    if spec.get("expert_formats") == "per_expert":
        extra.append("per-expert formats")
    return spec["precision"] + (f" ({', '.join(extra)})" if extra else "")


def _entry_text(v: dict) -> str:
    s = (f"W{v['weight']}" if "weight" in v else "") + (f"A{v['act']}" if "act" in v else "")
    return s + (f" {v['act_range']}" if "act_range" in v else "")


def plot(report: dict, path) -> None:
    """Per-layer SQNR and cosine (one line per task) and routing agreement bars per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [k for k in report["output_cosine"] if k != "min"]
    layers = report["layers"]
    labels = [r["name"] for r in layers]
    x = np.arange(len(labels))
    moe = report["moe_layers"]
    fig, axes = plt.subplots(3 if moe else 2, 1, figsize=(max(12, 0.16 * len(labels) + 4), 13 if moe else 9),
                             gridspec_kw={"height_ratios": [3, 3, 2] if moe else [3, 3]})
    for t in tasks:
        axes[0].plot(x, [min(_num(r["sqnr_db"][t]), 99.0) for r in layers], marker=".", label=t)
        axes[1].plot(x, [max(1 - r["cosine"][t], 1e-9) for r in layers], marker=".", label=t)
    axes[0].set_ylabel("SQNR vs float (dB)")
    axes[1].set_ylabel("1 - cosine vs float")
    axes[1].set_yscale("log")
    axes[1].axhline(1 - TARGETS["output_cosine"], color="red", ls="--", lw=1,
                    label=f"output target (cos {TARGETS['output_cosine']})")
    for ax in axes[:2]:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=min(len(tasks) + 1, 6))
        ax.set_xlim(-0.5, len(labels) - 0.5)
    title = (f"{report['model']['name']} ({report['model']['dataset']}), {spec_text(report.get('precision'))}: "
             f"output cosine min {report['output_cosine']['min']:.5f}, routing min {report['routing_agreement']['min']:.1%}")
    axes[0].set_title(title, fontsize=10)
    if moe:
        ax = axes[2]
        n = len(tasks)
        width = 0.8 / (2 * n)
        mx = np.arange(len(moe))
        for j, t in enumerate(tasks):
            e2e = [m["routing_agreement"][t] * 100 for m in moe]
            iso = [m["routing_agreement_isolated"][t] * 100 for m in moe]
            ax.bar(mx - 0.4 + (2 * j + 0.5) * width, e2e, width, label=f"{t} end to end", color=f"C{j}")
            ax.bar(mx - 0.4 + (2 * j + 1.5) * width, iso, width, label=f"{t} isolated", color=f"C{j}", alpha=0.45,
                   hatch="//")
        ax.axhline(TARGETS["routing_agreement"] * 100, color="red", ls="--", lw=1, label="target")
        lo = min([m["routing_agreement"][t] for m in moe for t in tasks] +
                 [m["routing_agreement_isolated"][t] for m in moe for t in tasks]) * 100
        ax.set_ylim(max(0.0, min(lo, 95.0) - 2), 100.5)
        ax.set_xticks(mx)
        ax.set_xticklabels([m["name"] for m in moe])
        ax.set_ylabel("top-k set agreement (%)")
        ax.legend(fontsize=7, ncol=min(2 * n + 1, 6), loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
