"""`m3vit calibrate`, `m3vit quantize` and `m3vit quant-report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from m3vit.errors import UsageError


def _progress(args) -> bool:
    return sys.stderr.isatty() or not getattr(args, "json", False)


def _check_counts(args):
    if getattr(args, "images", 1) < 1 or getattr(args, "calib_images", 1) < 1:
        raise UsageError("--images and --calib-images must be at least 1")
    if getattr(args, "calib", None) and getattr(args, "calib_file", None):
        raise UsageError("give --calib DIR (calibrate now) or --calib-file FILE (reuse a calibration), not both")


def _spec(args):
    from m3vit.compiler.quantize import load_precision

    if args.precision is None and not args.layer_precision and getattr(args, "calib_file", None):
        return None  # keep the calibration file's own precision
    return load_precision(args.precision, args.layer_precision)


def _calibration(args, model):
    """The calibration named by the options: a file (re-derived under --precision if given) or a
    fresh run over --calib DIR or the bundled photographs plus random images."""
    from m3vit.compiler.quantize import calibrate, load_calibration

    from m3vit.compiler.quantize import resolve_precision

    spec = _spec(args)
    if spec is not None:
        resolve_precision(spec, model.cfg)  # a bad spec fails before any float run
    if getattr(args, "calib_file", None):
        cal = load_calibration(args.calib_file)
        cal.check_model(model)
        return cal.with_spec(model, spec) if spec is not None else cal
    return calibrate(model, spec=spec, n_images=args.calib_images, seed=args.seed, folder=args.calib,
                     progress=_progress(args))


def cli_calibrate(args) -> int:
    from m3vit.model.checkpoint import model_from_args

    _check_counts(args)
    model = model_from_args(args, with_heads=False)
    cal = _calibration(args, model)
    path = cal.save(args.out)
    summary = {"calibration": str(path), "model": model.cfg.name, "dataset": model.cfg.dataset,
               "images": len(cal.images), "tasks": cal.tasks, "precision": cal.spec["precision"],
               "tensors": len(cal.formats)}
    print(json.dumps(summary) if args.json else
          f"calibrated {model.cfg.name} on {len(cal.images)} image(s) x {len(cal.tasks)} task(s), "
          f"precision {cal.spec['precision']}; wrote {path}")
    return 0


def cli_quantize(args) -> int:
    from m3vit.compiler import qgraph
    from m3vit.compiler.from_torch import build_qgraph
    from m3vit.model.checkpoint import model_from_args

    _check_counts(args)
    model = model_from_args(args, with_heads=False)
    graph = build_qgraph(model, _calibration(args, model))
    jpath, npath = qgraph.save(graph, args.out)
    summary = {"graph": str(jpath), "params": str(npath), "ops": len(graph.ops), "tensors": len(graph.tensors),
               "precision": graph.meta["precision"]["precision"]}
    print(json.dumps(summary) if args.json else
          f"quantized {model.cfg.name}: {len(graph.ops)} ops, {len(graph.tensors)} tensors; wrote {jpath} and {npath}")
    return 0


def cli_quant_report(args) -> int:
    from m3vit.compiler.fidelity import eval_images, evaluate, plot, summary_text
    from m3vit.compiler.from_torch import build_qgraph
    from m3vit.model.checkpoint import model_from_args

    _check_counts(args)
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG; got '{args.plot}'")
    model = model_from_args(args, with_heads=False)
    tasks = [model.cfg.task_index(args.task)] if args.task is not None else None
    graph = build_qgraph(model, _calibration(args, model))
    report = evaluate(model, graph, eval_images(model.cfg.img_size, args.images, seed=args.seed + 1), tasks,
                      progress=_progress(args))
    if args.checkpoint:
        report["model"]["checkpoint"] = str(args.checkpoint)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
        report["plot"] = str(args.plot)
    print(json.dumps(report) if args.json else summary_text(report) + (f"\nplot: {args.plot}" if args.plot else ""))
    return 0
