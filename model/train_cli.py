"""`m3vit train`: a short synthetic run that makes the task gates non-random, saved as a checkpoint."""

from __future__ import annotations

import json
import sys

from m3vit.errors import UsageError
from m3vit.model.checkpoint import model_from_args, save_checkpoint
from m3vit.model.train import train


def cli_train(args) -> int:
    if args.steps < 1 or args.batch < 1 or args.lr <= 0:
        raise UsageError("--steps and --batch must be at least 1 and --lr positive")
    model = model_from_args(args, with_heads=True)
    n_tasks = len(model.cfg.tasks)
    per_step = getattr(args, "tasks_per_step", None)
    if per_step is not None and not 1 <= per_step <= n_tasks:
        raise UsageError(f"--tasks-per-step must be between 1 and {n_tasks} (the model's task count)")
    keep = getattr(args, "keep_tokens", None)
    if keep is not None and not (0 < keep <= 1 and getattr(args, "probe_heads", False)):
        raise UsageError("--keep-tokens must be in (0, 1] and needs --probe-heads")
    result = train(model, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                   progress=sys.stderr.isatty() or not args.json,
                   probe_heads=getattr(args, "probe_heads", False), tasks_per_step=per_step,
                   keep_tokens=1.0 if keep is None else keep)
    if result.steps == 0:
        raise UsageError("training was stopped before its first step ended; no checkpoint written")
    extra = {"steps": result.steps, "loss": result.last_loss}
    if keep is not None:
        extra["keep_tokens"] = keep
    if result.stopped:
        extra["requested_steps"] = args.steps
    path = save_checkpoint(model, args.out, extra=extra)
    summary = {"checkpoint": str(path), "preset": model.cfg.name, "dataset": model.cfg.dataset,
               "steps": result.steps, "seconds": round(result.seconds, 2),
               "first_loss": round(result.first_loss, 4), "last_loss": round(result.last_loss, 4)}
    if result.stopped:
        summary["stopped_early"] = True
    if args.json:
        print(json.dumps(summary))
    else:
        early = f" (stopped by a signal, of {args.steps})" if result.stopped else ""
        print(f"trained {model.cfg.name} for {result.steps} steps{early} in {result.seconds:.1f} s: "
              f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}; saved {path}")
    return 0
