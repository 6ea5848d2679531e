"""`m3vit compile`: ONNX model -> quantized graph -> Program -> Vitis HLS project, in one build folder.

    BUILD/program.bin  program.json  weights.bin     the Program (docs/program.md)
    BUILD/qgraph.json  qgraph.npz                    the quantized graph the golden model runs
    BUILD/hw.json                                    the hardware configuration it was built for
    BUILD/schedule.json                              the schedule model's cycle estimate
    BUILD/hls/                                       the Vitis HLS project (docs/hls.md)
    BUILD/summary.json                               what the command prints

The folder is assembled under a temporary name and renamed into place when complete. Nothing
in it depends on the time or the path, so compiling twice gives byte-identical folders.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from m3vit.errors import UsageError

SUMMARY = "summary.json"


def add_compile_args(p) -> None:
    p.add_argument("model", help="ONNX file (from 'm3vit export' or any supported ViT / MoE-ViT graph)")
    p.add_argument("--out", required=True, help="build folder to write")
    g = p.add_argument_group("quantization")
    g.add_argument("--precision", metavar="P|FILE",
                   help="W8A8, W8A16, W16A16, or a JSON/YAML spec (default: W16A16 with 8-bit expert weights)")
    g.add_argument("--layer-precision", metavar="KEY=P", action="append", default=[],
                   help="override one layer type (e.g. gate=W16A16) or layer name (e.g. blocks.1.norm2=A16)")
    g.add_argument("--calib", metavar="DIR", help="calibrate on this folder of images")
    g.add_argument("--calib-file", metavar="FILE", help="reuse a calibration written by 'm3vit calibrate' (the fast "
                                                        "path: calibration then runs once per model, not per compile)")
    g.add_argument("--calib-images", type=int, default=4, help="calibration images (bundled photographs, then random)")
    h = p.add_argument_group("hardware")
    h.add_argument("--board", default="zcu104", help="target board (only zcu104)")
    h.add_argument("--hw", metavar="FILE", help="hardware config (default: the shipped rtl_sim/hw.json)")
    h.add_argument("--parallel", metavar="PINxPOUT", help="override the MAC array, e.g. 16x16")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep every residual add an instruction of its own (no residual fusion)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def hw_from_args(args):
    from m3vit.rtl_sim.hwconfig import HwConfig, load_hw_config

    hw = load_hw_config(args.hw) if getattr(args, "hw", None) else HwConfig.default()
    if getattr(args, "parallel", None):
        hw = hw.with_parallel(args.parallel)
    board = getattr(args, "board", None)
    if board and board != hw.board:
        raise UsageError(f"--board {board} is not supported; this hardware configuration targets {hw.board}")
    return hw


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def compile_model(args, quiet: bool = False) -> tuple[Path, dict[str, Any]]:
    from m3vit.builddir import atomic_folder
    from m3vit.compiler import qgraph as qg
    from m3vit.compiler.from_ir import qgraph_from_onnx
    from m3vit.compiler.lower import compile_qgraph
    from m3vit.compiler.onnx_import import import_onnx
    from m3vit.compiler.quantize import load_calibration, load_precision
    from m3vit.compiler.schedule import estimate, summary_lines
    from m3vit.hls.project import emit_project

    hw = hw_from_args(args)
    model = Path(args.model)
    if not model.is_file():
        raise UsageError(f"no ONNX file at {model}")
    if args.calib and args.calib_file:
        raise UsageError("give --calib DIR or --calib-file FILE, not both")
    if args.calib_images < 1:
        raise UsageError("--calib-images must be at least 1")
    # None keeps a calibration file's own precision; the default spec otherwise
    precision = load_precision(args.precision, args.layer_precision) if args.precision or args.layer_precision \
        else None
    calib = load_calibration(args.calib_file) if args.calib_file else args.calib
    times: dict[str, float] = {}

    def stage(name: str, fn):
        _say(f"compile: {name} ...", quiet)
        t0 = time.perf_counter()
        out = fn()
        times[name] = round(time.perf_counter() - t0, 3)
        return out

    limits = {k: getattr(hw.limits, k) for k in ("max_tokens", "max_dim", "max_hidden", "max_experts", "max_k",
                                                  "max_tasks", "max_heads")}
    ir = stage("import", lambda: import_onnx(model, limits=limits, host_head=True))
    graph = stage("quantize", lambda: qgraph_from_onnx(ir, calib=calib, precision=precision,
                                                       n_images=args.calib_images, progress=not quiet))
    with atomic_folder(args.out, SUMMARY, "m3vit compile") as work:
        qg.save(graph, work / "qgraph")
        fuse = not getattr(args, "no_fuse", False)
        lowered = stage("lower", lambda: compile_qgraph(graph, hw, work, fuse=fuse))
        (work / "hw.json").write_text(json.dumps(hw.to_dict(), indent=1, sort_keys=True) + "\n")
        stage("hls", lambda: emit_project(work / "hls", hw, work))
        sched = stage("schedule", lambda: estimate(work / "program.json", hw))
        (work / "schedule.json").write_text(json.dumps(sched, indent=1, sort_keys=True) + "\n")
        total = sched["total"]
        summary = {
            "model": model.name,
            "tasks": list(graph.tasks),
            "hw_hash": hw.hash(),
            "parallel": f"{hw.p_in}x{hw.p_out}",
            "precision": graph.meta.get("precision"),
            "ops": lowered["ops"],
            "passes": lowered["passes"],
            "fused": lowered["fused"],
            "instructions": lowered["instructions"],
            "program_bytes": lowered["program_bytes"],
            "weight_bytes": lowered["weights_bytes"],
            "arena_bytes": lowered["arena_bytes"],
            "macs": total["macs"],
            "ddr_bytes": total["ddr_bytes"],
            "estimated_cycles": sched["total_cycles"],
            "estimated_ms": round(sched["latency_ms"], 6),
            "estimated_utilization": round(total["utilisation"], 6),
            "routing": sched["routing"],
        }
        (work / SUMMARY).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    summary = dict(summary, seconds=times, schedule_lines=summary_lines(sched))
    return Path(args.out), summary


def cli_compile(args) -> int:
    out, s = compile_model(args, quiet=args.json)
    if args.json:
        print(json.dumps({"out": str(out), **{k: v for k, v in s.items() if k != "schedule_lines"}}, sort_keys=True))
        return 0
    print(f"m3vit compile: {s['model']} -> {out}  ({s['parallel']} MAC array, tasks: {', '.join(s['tasks'])})")
    ops = ", ".join(f"{n} {k}" for k, n in sorted(s["ops"].items()))
    print(f"  {'instructions':<18}: {s['instructions']:,} ({ops})")
    for key, label in (("macs", "MACs per frame"), ("weight_bytes", "weight bytes"),
                       ("program_bytes", "Program bytes"), ("arena_bytes", "arena bytes"),
                       ("ddr_bytes", "DDR bytes / frame")):
        print(f"  {label:<18}: {s[key]:,}")
    for line in s["schedule_lines"]:
        print("  " + line)
    print(f"  {'seconds':<18}: " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
    return 0
