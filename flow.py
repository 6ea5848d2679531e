"""`m3vit flow`: the main job, end to end on one model and one task.

Stages run in order and each adds files to the output folder and a section to the summary. The
folder is assembled under a temporary name and renamed into place only when every stage has
succeeded, so a failed run leaves the previous result (or nothing) behind, never a partial one.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from m3vit.builddir import atomic_folder
from m3vit.errors import UsageError


@dataclass
class FlowContext:
    args: Any
    work: Path  # the temporary folder being assembled
    model: Any = None
    task: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def task_name(self) -> str:
        return self.model.cfg.task_names[self.task]


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def stage_profile(ctx: FlowContext) -> None:
    from m3vit.model.images import input_batch
    from m3vit.model.profile import profile_model
    from m3vit.model.profile_plots import write_profile_figure

    cfg = ctx.model.cfg
    images = input_batch(cfg.img_size, ctx.args.images)
    result = profile_model(ctx.model, ctx.task, images, with_head=True, preset=cfg.name)
    usage_by_task = {ctx.task_name: result["expert_usage"]}
    for t, name in enumerate(cfg.task_names):
        if t != ctx.task:
            usage_by_task[name] = profile_model(ctx.model, t, images, with_head=True)["expert_usage"]
    (ctx.work / "profile.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    write_profile_figure(result, usage_by_task, str(ctx.work / "profile.png"))
    ctx.summary["profile"] = {k: result[k] for k in ("total_macs", "backbone_macs", "head_macs", "params_total",
                                                      "params_active", "weight_bytes_per_frame")}
    ctx.report += [
        "## Profile", "",
        f"| | GMAC |", "| --- | ---: |",
        f"| backbone | {result['backbone_macs'] / 1e9:.4f} |",
        f"| head | {result['head_macs'] / 1e9:.4f} |",
        f"| total | {result['total_macs'] / 1e9:.4f} |", "",
        f"Parameters: {result['params_total']:,} in all, {result['params_active']:,} active for this task. "
        f"Weight bytes per frame (8-bit weights, experts fetched once per layer): "
        f"{result['weight_bytes_per_frame'] / 1e6:.2f} MB.", "",
        "![profile](profile.png)", "",
    ]


def stage_export(ctx: FlowContext) -> None:
    from m3vit.model.export import export_onnx

    info = export_onnx(ctx.model, ctx.work / "model.onnx", task=ctx.task, check=True)
    all_tasks = export_onnx(ctx.model, ctx.work / "backbone_all_tasks.onnx", all_tasks=True, check=True)
    ctx.summary["export"] = {
        "onnx": "model.onnx", "nodes": info.nodes, "bytes": info.bytes, "opset": info.opset,
        "ort_max_relative_error": info.parity.max_relative_error, "ort_ok": info.parity.ok,
        "all_tasks_onnx": "backbone_all_tasks.onnx",
        "all_tasks_ort_max_relative_error": all_tasks.parity.max_relative_error,
    }
    ctx.report += [
        "## ONNX export", "",
        f"`model.onnx`: task {ctx.task_name}, {info.nodes} nodes, opset {info.opset}, {info.bytes / 1e6:.2f} MB. "
        f"ONNX Runtime vs PyTorch: {info.parity.summary()}.", "",
        f"`backbone_all_tasks.onnx` (task-id input): {all_tasks.parity.summary()}.", "",
    ]


STAGES: list[tuple[str, Callable[[FlowContext], None]]] = [
    ("profile", stage_profile),
    ("export", stage_export),
]


def run_flow(args, quiet: bool = False) -> tuple[Path, dict[str, Any]]:
    from m3vit.model.checkpoint import model_from_args, task_from_args

    out = Path(args.out)
    with atomic_folder(out, "summary.json", "m3vit flow") as work:
        ctx = FlowContext(args=args, work=work)
        ctx.model = model_from_args(args, with_heads=True)
        ctx.task = task_from_args(args, ctx.model.cfg)
        cfg = ctx.model.cfg
        if args.images < 1:
            raise UsageError("--images must be at least 1")
        ctx.summary.update({"model": cfg.name, "dataset": cfg.dataset, "task": ctx.task_name,
                            "config": cfg.to_dict()})
        ctx.report += [f"# m3vit flow: {cfg.name} / {cfg.dataset}, task {ctx.task_name}", ""]
        for name, stage in STAGES:
            _say(f"flow: {name} ...", quiet)
            start = time.perf_counter()
            stage(ctx)
            ctx.timings[name] = round(time.perf_counter() - start, 3)
            _say(f"flow: {name} done in {ctx.timings[name]:.1f} s", quiet)
        ctx.summary["seconds"] = ctx.timings
        ctx.report += ["## Timings", "", "| stage | seconds |", "| --- | ---: |"]
        ctx.report += [f"| {k} | {v:.1f} |" for k, v in ctx.timings.items()] + [""]
        (work / "report.md").write_text("\n".join(ctx.report))
        (work / "summary.json").write_text(json.dumps(ctx.summary, indent=1, sort_keys=True))
    return out, ctx.summary


def cli_flow(args) -> int:
    out, summary = run_flow(args, quiet=args.json)
    if args.json:
        print(json.dumps({"out": str(out), **{k: v for k, v in summary.items() if k != "config"}}, sort_keys=True))
        return 0
    p, e = summary["profile"], summary["export"]
    print(f"m3vit flow: {summary['model']} / {summary['dataset']}, task {summary['task']}")
    print(f"  profile : backbone {p['backbone_macs'] / 1e9:.3f} GMAC, head {p['head_macs'] / 1e9:.3f} GMAC, "
          f"{p['params_active']:,} active of {p['params_total']:,} parameters")
    print(f"  export  : {e['nodes']} ONNX nodes, ONNX Runtime max error {e['ort_max_relative_error']:.2e} x max|output|")
    print(f"  report  : {out / 'report.md'}")
    return 0
