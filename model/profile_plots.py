"""The `m3vit profile --plot` figure: where the MACs go, how every task routes, MoE vs dense.

Panels: (a) MACs per backbone block and per head stage, stacked by op class; (b) one heatmap of
expert usage (MoE layer x expert) per task; (c) this task's MoE pathway against the dense ViT of
the same size, in MACs and in parameters.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from m3vit.errors import UsageError  # noqa: E402
from m3vit.model.profile import BACKBONE_CLASSES  # noqa: E402

CLASS_COLORS = {
    "patch_embed": "#7f7f7f",
    "qkv": "#1f77b4",
    "attn_qk": "#aec7e8",
    "attn_av": "#17becf",
    "proj": "#9467bd",
    "mlp": "#ff7f0e",
    "gate": "#d62728",
    "experts": "#2ca02c",
    "head": "#8c564b",
}


def _group(name: str) -> str:
    """The bar a layer belongs to in panel (a): patch embedding, one block, or one head stage."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"b{parts[1]}"
    if parts[0] == "heads":
        return "cls" if parts[2] == "classifier" else f"s{parts[3]}"
    return "embed"


def _stacked(ax, layers: list[dict[str, Any]], classes, title: str) -> None:
    groups: list[str] = []
    for layer in layers:
        g = _group(layer["name"])
        if g not in groups:
            groups.append(g)
    macs = {c: np.zeros(len(groups)) for c in classes}
    for layer in layers:
        if layer["op_class"] in macs:
            macs[layer["op_class"]][groups.index(_group(layer["name"]))] += layer["macs"] / 1e9
    bottom = np.zeros(len(groups))
    x = np.arange(len(groups))
    for c in classes:
        if macs[c].any():
            ax.bar(x, macs[c], bottom=bottom, color=CLASS_COLORS[c], label=c, width=0.75)
            bottom += macs[c]
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel("GMACs per frame")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    for xi, top in zip(x, bottom):
        ax.text(xi, top, f"{top:.2g}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, bottom.max() * 1.12 if bottom.max() > 0 else 1)


def _heatmap(ax, usage: dict[str, Any], vmax: float, selected: bool):
    layers = usage["layers"]
    n_img = max(usage["images"], 1)
    grid = np.array([[c / n_img for c in l["counts"]] for l in layers], dtype=float)
    # Experts no frame routed to are shown grey: the white space Edge-MoE never fetches.
    masked = np.ma.masked_equal(grid, 0.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(layers)),
                  [f"blk {l['block']}  ({l['distinct_mean']:.1f})" for l in layers], fontsize=7)
    n = usage["num_experts"]
    step = 1 if n <= 16 else math.ceil(n / 16)
    ax.set_xticks(range(0, n, step), [str(e) for e in range(0, n, step)], fontsize=7)
    ax.set_xlabel("expert", fontsize=8)
    mark = " (profiled)" if selected else ""
    ax.set_title(f"{usage['task']}{mark}", fontsize=9, fontweight="bold" if selected else "normal")
    return im


def _versus(ax_macs, ax_params, r: dict[str, Any]) -> None:
    d = r["dense_counterpart"]
    w = 0.38
    parts = ["backbone", "head"] if r["with_head"] else ["backbone"]
    x = np.arange(len(parts))
    moe_vals = [r[f"{p}_macs"] / 1e9 for p in parts]
    dense_vals = [d[f"{p}_macs"] / 1e9 for p in parts]
    for off, vals, label, color in ((-w / 2, moe_vals, "MoE pathway", "#2ca02c"),
                                    (w / 2, dense_vals, "dense ViT", "#7f7f7f")):
        bars = ax_macs.bar(x + off, vals, w, label=label, color=color)
        ax_macs.bar_label(bars, fmt="%.3g", fontsize=7)
    ax_macs.set_xticks(x, parts)
    ax_macs.set_ylabel("GMACs per frame")
    ax_macs.set_title("(c) MACs: MoE vs dense", fontsize=10)
    ax_macs.legend(fontsize=7)
    ax_macs.grid(axis="y", alpha=0.3)

    x = np.arange(3)
    moe_p = [r["params_total"] / 1e6, r["params_active"] / 1e6, r["params_active_per_token"] / 1e6]
    dense_p = [d["params_total"] / 1e6, d["params_active"] / 1e6, d["params_active"] / 1e6]
    for off, vals, label, color in ((-w / 2, moe_p, "MoE", "#2ca02c"), (w / 2, dense_p, "dense ViT", "#7f7f7f")):
        bars = ax_params.bar(x + off, vals, w, label=label, color=color)
        ax_params.bar_label(bars, fmt="%.3g", fontsize=7)
    ax_params.set_xticks(x, ["total", "active\n(touched)", "active\nper token"])
    ax_params.set_ylabel("parameters (millions)")
    ax_params.set_title("(c) parameters: MoE vs dense", fontsize=10)
    ax_params.legend(fontsize=7)
    ax_params.grid(axis="y", alpha=0.3)


def profile_figure(result: dict[str, Any], usage_by_task: dict[str, dict[str, Any]]):
    """The figure for one profile and the routing of every task (task name -> expert_usage)."""
    has_moe = any(u["layers"] for u in usage_by_task.values())
    n_tasks = len(usage_by_task) if has_moe else 0
    cols = min(max(n_tasks, 1), 3)
    heat_rows = math.ceil(n_tasks / cols) if n_tasks else 0
    heights = [4.6] + ([0.6 + 2.9 * heat_rows] if n_tasks else []) + [3.4]
    fig = plt.figure(figsize=(16, sum(heights) + 0.5), layout="constrained")
    # One subfigure per panel group, so each lays out its own axes and titles.
    subs = fig.subfigures(len(heights), 1, height_ratios=heights)

    if result["with_head"]:
        ax_b, ax_h = subs[0].subplots(1, 2, width_ratios=[3, 1])
    else:
        ax_b, ax_h = subs[0].subplots(1, 1), None
    _stacked(ax_b, [l for l in result["layers"] if l["op_class"] != "head"], BACKBONE_CLASSES,
             f"(a) backbone MACs per layer by op class (embed = patch embedding, b<i> = block i); "
             f"total {result['backbone_macs'] / 1e9:.3f} GMACs")
    ax_b.legend(ncol=5, fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.08))
    if ax_h is not None:
        _stacked(ax_h, [l for l in result["layers"] if l["op_class"] == "head"], ("head",),
                 f"(a) head '{result['task']}': 3x3 stages s<j>, 1x1 cls\n"
                 f"total {result['head_macs'] / 1e9:.3f} GMACs")

    if n_tasks:
        sub = subs[1]
        n_img = max(max(u["images"], 1) for u in usage_by_task.values())
        vmax = max((c / max(u["images"], 1) for u in usage_by_task.values() for l in u["layers"]
                    for c in l["counts"]), default=1.0) or 1.0
        grid = sub.subplots(heat_rows, cols, squeeze=False)
        used, im = [], None
        for i, (name, usage) in enumerate(usage_by_task.items()):
            ax = grid[i // cols][i % cols]
            im = _heatmap(ax, usage, vmax, name == result["task"])
            used.append(ax)
        for ax in grid.flat[n_tasks:]:
            ax.set_visible(False)
        sub.colorbar(im, ax=used, label="tokens per frame routed to the expert", shrink=0.9)
        sub.suptitle(f"(b) expert usage of every task over {n_img} image(s): MoE layer x expert; "
                     f"(n) = mean distinct experts per frame; grey = never routed", fontsize=10)

    _versus(*subs[-1].subplots(1, 2), result)

    experts = f"{result['num_experts']} experts top-{result['top_k']}" if result["num_experts"] else "dense (no MoE)"
    fig.suptitle(f"{result['model']} / {result['dataset']}: task '{result['task']}', {result['tokens']} tokens, "
                 f"{experts}, "
                 f"{result['total_macs'] / 1e9:.3f} GMACs per frame (1 MAC = 2 FLOPs)", fontsize=12)
    return fig


def write_profile_figure(result: dict[str, Any], usage_by_task: dict[str, dict[str, Any]], path: str) -> str:
    """Render and write the PNG atomically: a temporary file beside it, then a rename."""
    fig = profile_figure(result, usage_by_task)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".png")
    except OSError as exc:
        plt.close(fig)
        raise UsageError(f"--plot {path} is not writable: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"--plot {path} cannot be written: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
