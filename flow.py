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
    quiet: bool = False

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
        "| | GMAC |", "| --- | ---: |",
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


def stage_compile(ctx: FlowContext) -> None:
    """The all-tasks backbone through `m3vit compile`: Program, weights and the HLS project."""
    import argparse

    from m3vit.compiler.compile_cli import compile_model

    cargs = argparse.Namespace(model=str(ctx.work / "backbone_all_tasks.onnx"), out=str(ctx.work / "build"),
                               precision=None, layer_precision=[], calib=None, calib_file=None,
                               calib_images=ctx.args.calib_images, board=None, hw=ctx.args.hw,
                               parallel=ctx.args.parallel)
    _, s = compile_model(cargs, quiet=True)
    ctx.summary["compile"] = {k: s[k] for k in ("instructions", "program_bytes", "weight_bytes", "arena_bytes",
                                                "estimated_cycles", "estimated_ms", "parallel", "hw_hash") if k in s}
    ctx.report += [
        "## Compile", "",
        f"`build/`: {s.get('instructions', '?')} instructions, Program {s.get('program_bytes', 0):,} bytes, "
        f"weights {s.get('weight_bytes', 0):,} bytes, arena {s.get('arena_bytes', 0):,} bytes, for a "
        f"{s['parallel']} MAC array. Schedule-model estimate: {s['estimated_cycles']:,} cycles, "
        f"{s['estimated_ms']:.3f} ms at 300 MHz.", "",
    ]


def stage_fidelity(ctx: FlowContext) -> None:
    """The compiled (bit-exact quantized) backbone against the float model, layer by layer, on
    crops of the bundled photographs: the same report as `m3vit quant-report`."""
    from m3vit.compiler import qgraph as qg
    from m3vit.compiler.fidelity import eval_images, evaluate, plot, summary_text

    graph = qg.load(ctx.work / "build" / "qgraph")
    images = eval_images(ctx.model.cfg.img_size, ctx.args.images, seed=1)
    rep = evaluate(ctx.model, graph, images, progress=not ctx.quiet)
    (ctx.work / "fidelity.json").write_text(json.dumps(rep, indent=1, sort_keys=True))
    plot(rep, ctx.work / "fidelity.png")
    ctx.summary["fidelity"] = {"output_cosine_min": rep["output_cosine"]["min"],
                               "routing_agreement_min": rep["routing_agreement"]["min"],
                               "targets_met": rep["targets"]["met"], "images": len(images)}
    ctx.report += ["## Fidelity", "",
                   f"The compiled backbone (every task) against the float model on {len(images)} crops of the bundled "
                   "photographs: output cosine, SQNR and top-k routing agreement per task, and per layer in the "
                   "plot (`fidelity.json` has every figure).", "", "```", summary_text(rep), "```", "",
                   "![fidelity](fidelity.png)", ""]


def stage_resources(ctx: FlowContext) -> None:
    """Resources of the accelerator the build targets against the ZCU104: the design model by
    default, yosys per datapath unit with --synth."""
    from m3vit.rtl_sim.hwconfig import load_hw_config
    from m3vit.rtl_sim.synth import RESOURCES, model_report, resource_plot, synth_report

    hw = load_hw_config(ctx.work / "build" / "hw.json")
    rep = synth_report(hw, ["all"]) if getattr(ctx.args, "synth", False) else model_report(hw)
    (ctx.work / "resources.json").write_text(json.dumps(rep, indent=1, sort_keys=True))
    resource_plot(rep, ctx.work / "resources.png")
    measured = rep.get("method") != "model"
    ctx.summary["resources"] = {"method": "yosys" if measured else "model", "total": rep["total"],
                                "utilisation_pct": rep["utilisation_pct"], "fits": rep["fits"]}
    kinds = [k for k in RESOURCES if any(r[k] for r in rep["units"].values())]
    how = ("yosys `synth_xilinx -family xcup`, per datapath unit" if measured else
           "the design model (DSP48E2 per unit as synthesised earlier, buffers of hw.json in URAM/BRAM); "
           "`m3vit flow --synth` or `m3vit synth --unit all` measures with yosys")
    ctx.report += ["## Resources", "", f"{rep['parallel']} MAC array at {rep['clock_mhz']} MHz, from {how}.", "",
                   "| unit | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    ctx.report += [f"| {u} | " + " | ".join(f"{r[k]:g}" for k in kinds) + " |" for u, r in rep["units"].items()]
    ctx.report += ["| total | " + " | ".join(f"{rep['total'][k]:g}" for k in kinds) + " |", "",
                   "Utilisation: " + ", ".join(f"{k.upper()} {v} %" for k, v in rep["utilisation_pct"].items()) + ".",
                   "", "![resources](resources.png)", ""]


def _flow_image(ctx: FlowContext):
    """The demo input: the first bundled photograph at the model's size, [C, H, W] float."""
    from m3vit.model.images import sample_images, to_input

    name, photo = sample_images()[0]
    return name, to_input(photo, ctx.model.cfg.img_size)


def stage_csim(ctx: FlowContext) -> None:
    """The HLS kernel, C-simulated with g++, on the demo photograph for the flow's task."""
    from m3vit.errors import M3ViTError
    from m3vit.hls.csim import run_csim

    name, x = _flow_image(ctx)
    rep = run_csim(ctx.work / "build", image=x[0].numpy(), tasks=[ctx.task])
    if not rep["bit_exact"]:
        fm = rep["first_mismatch"] or {}
        raise M3ViTError(f"C-simulation differs from the golden model: {rep['mismatches']} elements, first in "
                         f"{fm.get('tensor', '?')} (run m3vit csim {ctx.work / 'build'} --trace)")
    ctx.summary["csim"] = {"bit_exact": True, "mismatches": 0, "image": name,
                           "seconds_per_frame": rep["seconds_per_frame"], "build_seconds": rep["build_seconds"]}
    ctx.report += ["## C-simulation", "",
                   f"The HLS kernel (g++ C-simulation of `build/hls/`) runs the Program on '{name}' for task "
                   f"{ctx.task_name}: bit-exact with the golden model ({rep['seconds_per_frame']:.2f} s per frame; "
                   f"testbench build {rep['build_seconds']:.1f} s).", ""]


def _task_image(out):
    """A task output [C, H, W] as an image: class colours for segmentation, a colour map otherwise."""
    import numpy as np
    from matplotlib import colormaps

    if out.shape[0] > 1:
        labels = out.argmax(0)
        palette = (colormaps["tab20"](np.arange(20))[:, :3] * 255).astype(np.uint8)
        return palette[labels % 20]
    v = out[0]
    lo, hi = float(v.min()), float(v.max())
    v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return (colormaps["magma"](v)[..., :3] * 255).astype(np.uint8)


def stage_head(ctx: FlowContext) -> None:
    """The task head on the host, on the accelerator's dequantized backbone output, for a real photo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from m3vit.compiler import golden
    from m3vit.compiler import qgraph as qg
    from m3vit.compiler.numerics import SatCounter

    name, x = _flow_image(ctx)
    graph = qg.load(ctx.work / "build" / "qgraph")
    # the golden model's bits, which the csim stage has just proven equal to the kernel's
    y_q = golden.run(graph, x, ctx.task, stats=SatCounter())[0]
    tokens = torch.from_numpy(graph.tensors[graph.output].dequantize(y_q)).float()[None]
    head = ctx.model.heads[ctx.task_name]
    with torch.no_grad():
        acc = head(tokens)[0].numpy()
        ref = ctx.model(x, ctx.task)[0].numpy()
    if acc.shape[0] > 1:
        agree = float((acc.argmax(0) == ref.argmax(0)).mean())
        metric = {"pixel_agreement": round(agree, 6)}
        text = f"{100 * agree:.2f} % of pixels get the float model's class"
    else:
        cos = float(np.dot(acc.ravel(), ref.ravel()) / (np.linalg.norm(acc) * np.linalg.norm(ref) + 1e-30))
        metric = {"cosine": round(cos, 6)}
        text = f"cosine {cos:.6f} with the float model's map"
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    shown = np.clip(x[0].permute(1, 2, 0).numpy() * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406]),
                    0, 1)
    for ax, img, title in zip(axes, (shown, _task_image(ref), _task_image(acc)),
                              (f"input ({name})", f"{ctx.task_name}: float PyTorch", f"{ctx.task_name}: accelerator")):
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(ctx.work / "task_output.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    ctx.summary["head"] = {"image": name, "output": "task_output.png", **metric}
    ctx.report += ["## Task output", "",
                   f"The {ctx.task_name} head runs on the host on the accelerator's dequantized backbone output "
                   f"for the photograph '{name}': {text}.", "", "![task output](task_output.png)", ""]


def stage_rtlsim(ctx: FlowContext) -> None:
    """The RTL accelerator (Verilator) runs the same Program on the same photograph."""
    from m3vit.errors import M3ViTError
    from m3vit.rtl_sim.rtlsim import run_rtlsim

    name, x = _flow_image(ctx)
    rep = run_rtlsim(ctx.work / "build", image=x[0].numpy(), tasks=[ctx.task], progress=not ctx.quiet,
                     plot=ctx.work / "rtlsim_latency.png")
    if not rep["bit_exact"]:
        fm = rep["first_mismatch"] or {}
        raise M3ViTError(f"the RTL simulation differs from the golden model: {rep['mismatches']} elements, first in "
                         f"{fm.get('tensor', '?')} (run m3vit rtlsim {ctx.work / 'build'} --trace)")
    e = rep["tasks"][0]
    ctx.summary["rtlsim"] = {"bit_exact": True, "mismatches": 0, "image": name, "total_cycles": e["total_cycles"],
                             "latency_ms_300mhz": e["latency_ms_300mhz"], "utilization": e["utilization"],
                             "ddr_bytes": e["ddr_bytes"], "stall_cycles": e["stall_cycles"],
                             "schedule_estimate_cycles": e["schedule_estimate_cycles"], "seconds": rep["seconds"]}
    rows = sorted(e["classes"].items(), key=lambda kv: -kv[1]["cycles"])
    ctx.report += ["## RTL simulation", "",
                   f"The RTL accelerator (Verilator, cold start from DDR, DDR model at 12.8 GB/s) runs the Program "
                   f"on '{name}' for task {ctx.task_name}: bit-exact with the golden model. "
                   f"{e['total_cycles']:,} cycles = {e['latency_ms_300mhz']:.3f} ms at 300 MHz; MAC-array utilisation "
                   f"{100 * e['utilization']:.1f} %; {e['stall_cycles']:,} stall cycles; DDR "
                   f"{e['ddr_bytes'] / 1e6:.2f} MB. The compiler's schedule model estimates "
                   f"{e['schedule_estimate_cycles']:,} cycles for the same routing.", "",
                   "| class | instructions | RTL cycles | schedule estimate | DDR MB |", "| --- | ---: | ---: | ---: | ---: |"]
    ctx.report += [f"| {c} | {v['instructions']} | {v['cycles']:,} | {v.get('estimate_cycles', 0):,} | "
                   f"{v['ddr_bytes'] / 1e6:.3f} |" for c, v in rows]
    ctx.report += ["", "![latency breakdown](rtlsim_latency.png)", ""]


STAGES: list[tuple[str, Callable[[FlowContext], None]]] = [
    ("profile", stage_profile),
    ("export", stage_export),
    ("compile", stage_compile),
    ("fidelity", stage_fidelity),
    ("resources", stage_resources),
    ("csim", stage_csim),
    ("rtlsim", stage_rtlsim),
    ("head", stage_head),
]
# The flow's own default model: the RTL simulation of a whole edge-moe frame takes longer than a
# first run should (docs/accelerator.md), so the demo runs tiny end to end; --preset edge-moe
# runs the same stages on the paper's model.
FLOW_PRESET = "tiny"


def run_flow(args, quiet: bool = False) -> tuple[Path, dict[str, Any]]:
    from m3vit.model.checkpoint import model_from_args, task_from_args

    out = Path(args.out)
    with atomic_folder(out, "summary.json", "m3vit flow") as work:
        ctx = FlowContext(args=args, work=work, quiet=quiet)
        if getattr(args, "hw", None):   # a bad hardware config fails now, not after the profile and export
            from m3vit.rtl_sim.hwconfig import load_hw_config

            load_hw_config(args.hw)
        if not (args.preset or args.config or args.checkpoint or args.dataset):
            args.preset = FLOW_PRESET
        ctx.model = model_from_args(args, with_heads=True)
        ctx.task = task_from_args(args, ctx.model.cfg)
        cfg = ctx.model.cfg
        if args.images < 1:
            raise UsageError("--images must be at least 1")
        ctx.summary.update({"model": cfg.name, "dataset": cfg.dataset, "task": ctx.task_name,
                            "config": cfg.to_dict()})
        ctx.report += [f"# m3vit flow: {cfg.name} / {cfg.dataset}, task {ctx.task_name}", ""]
        for name, stage in STAGES:
            if name == "rtlsim" and getattr(args, "no_rtlsim", False):
                continue
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
    c, s, h = summary["compile"], summary["csim"], summary["head"]
    print(f"  compile : {c['instructions']} instructions, {c['weight_bytes'] / 1e6:.2f} MB of weights; schedule model "
          f"{c['estimated_cycles']:,} cycles = {c['estimated_ms']:.3f} ms at 300 MHz ({c['parallel']} MACs)")
    f, r = summary["fidelity"], summary["resources"]
    print(f"  fidelity: output cosine {f['output_cosine_min']:.5f}, routing agreement "
          f"{100 * f['routing_agreement_min']:.2f} % (worst task, {f['images']} images; targets "
          f"{'met' if f['targets_met'] else 'NOT met'})")
    print(f"  resource: " + ", ".join(f"{k.upper()} {v} %" for k, v in r["utilisation_pct"].items()) +
          f" of the ZCU104 ({'yosys' if r['method'] == 'yosys' else 'design model; --synth measures'})")
    print(f"  csim    : bit-exact with the golden model on '{s['image']}' ({s['seconds_per_frame']:.2f} s per frame)")
    if "rtlsim" in summary:
        r = summary["rtlsim"]
        print(f"  rtlsim  : bit-exact with the golden model; {r['total_cycles']:,} cycles = {r['latency_ms_300mhz']:.3f} ms "
              f"at 300 MHz, utilisation {100 * r['utilization']:.1f} %, DDR {r['ddr_bytes'] / 1e6:.2f} MB "
              f"(schedule model {r['schedule_estimate_cycles']:,} cycles)")
    metric = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in h.items() if k not in ("image", "output"))
    print(f"  head    : {summary['task']} output {out / h['output']} ({metric} against the float model)")
    print(f"  report  : {out / 'report.md'}")
    return 0
