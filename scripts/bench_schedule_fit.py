#!/usr/bin/env python3
"""How well the compiler's schedule model predicts the RTL: random model configurations are
compiled and run on the RTL accelerator (random DDR stalls off), and every instruction's RTL
cycles are set beside the model's estimate for the routing the RTL took.

    scripts/bench_schedule_fit.py [--configs 6] [--seed 100] [--parallel 32x48] [--json] [--keep DIR]

Configurations come from a seeded generator, so a seed range the model was never tuned on is an
unseen set: tune on one --seed, report agreement on another. Printed per configuration: frame
cycles (RTL, model, error); then per instruction class over all configurations: cycles, model,
error, and the worst single-instruction error. Agreement means |model / RTL - 1| per frame.
`--keep DIR` saves every configuration's build and RTL report (DIR/cfgSEED); `--replay DIR`
makes the comparison again from them with the current model, without the RTL.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def draw_config(rng: random.Random) -> list[str]:
    """`--set` overrides of a small random model on top of the tiny preset."""
    heads, head_dim = rng.randint(1, 4), rng.choice([8, 16, 24, 32])
    patch = rng.choice([4, 8])
    gh, gw = rng.randint(2, 5), rng.randint(2, 5)
    n = rng.randint(2, 8)
    k = rng.randint(1, min(2, n))
    tasks = ",".join(f"t{i}:{2 + i}" for i in range(rng.randint(1, 2)))
    return [f"dim={heads * head_dim}", f"heads={heads}", f"depth={rng.randint(2, 4)}", f"patch={patch}",
            f"img_size={gh * patch}x{gw * patch}", f"mlp_hidden={rng.choice([32, 64, 96, 128])}",
            f"num_experts={n}", f"expert_hidden={rng.choice([16, 32, 64])}", f"top_k={k}",
            f"routing={rng.choice(['multi-gate', 'task-conditioned'])}", f"tasks={tasks}"]


def _m3vit(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "m3vit", *args, "--json"], capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise SystemExit(f"m3vit {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def _replay(keep: Path) -> dict | None:
    """A kept RTL report with the model's estimate made again (the RTL's routing)."""
    from m3vit.compiler import schedule
    from m3vit.rtl_sim.hwconfig import load_hw_config

    if not (keep / "rtlsim.json").is_file():
        return None
    e = json.loads((keep / "rtlsim.json").read_text())["tasks"][0]
    est = schedule.estimate(keep / "program.json", load_hw_config(keep / "hw.json"),
                            queue_lengths=e.get("queue_lengths") or None)
    by_index = {r["index"]: r["cycles"] for r in est["instructions"]}
    for ins in e["instructions"]:
        ins["estimate_cycles"] = by_index.get(ins["index"], 0)
    e["schedule_estimate_cycles"] = sum(ins["estimate_cycles"] for ins in e["instructions"])
    return e


def _tally(runs: list, per_class: dict, seed: int, over: list[str], e: dict) -> None:
    runs.append({"seed": seed, "config": over, "rtl_cycles": e["total_cycles"],
                 "model_cycles": e["schedule_estimate_cycles"],
                 "error": e["schedule_estimate_cycles"] / e["total_cycles"] - 1})
    for ins in e["instructions"]:
        c = per_class.setdefault(ins["class"], {"rtl": 0, "model": 0, "worst": 0.0, "instructions": 0})
        c["rtl"] += ins["cycles"]
        c["model"] += ins["estimate_cycles"]
        c["instructions"] += 1
        if ins["cycles"]:
            err = ins["estimate_cycles"] / ins["cycles"] - 1
            c["worst"] = err if abs(err) > abs(c["worst"]) else c["worst"]
    print(f"configuration {seed}: RTL {e['total_cycles']:,} cycles, model {e['schedule_estimate_cycles']:,} "
          f"({100 * runs[-1]['error']:+.1f} %)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=6, help="random configurations to run")
    ap.add_argument("--seed", type=int, default=100, help="first configuration seed")
    ap.add_argument("--parallel", help="MAC array PINxPOUT (default: hw.json's)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", help="keep every configuration's build and RTL report here (DIR/cfgSEED), so the "
                                   "model can be compared again without the RTL")
    ap.add_argument("--replay", help="compare the model with the RTL reports kept in this folder (--keep) instead "
                                     "of running the RTL: the configurations --seed .. --seed + --configs - 1")
    args = ap.parse_args(argv)

    from m3vit.model.config import resolve_config
    from m3vit.model.export import export_onnx
    from m3vit.model.vit import build_model
    import torch

    runs, per_class = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="m3vit-fit-") as scratch:
        for i in range(args.configs):
            seed = args.seed + i
            over = draw_config(random.Random(seed))
            if args.replay:
                e = _replay(Path(args.replay) / f"cfg{seed}")
                if e is None:
                    continue
                _tally(runs, per_class, seed, over, e)
                continue
            cfg = resolve_config("tiny", overrides=over)
            root = Path(scratch) / f"cfg{seed}"
            root.mkdir()
            torch.manual_seed(seed)
            export_onnx(build_model(cfg, with_heads=False).eval(), root / "m.onnx", all_tasks=True)
            par = ["--parallel", args.parallel] if args.parallel else []
            _m3vit("compile", str(root / "m.onnx"), "--out", str(root / "build"), "--calib-images", "1", *par)
            rep = _m3vit("rtlsim", str(root / "build"), "--task", "0")
            if args.keep:
                keep = Path(args.keep) / f"cfg{seed}"
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(root / "build", keep)
                (keep / "rtlsim.json").write_text(json.dumps(rep))
            if not rep["bit_exact"]:
                raise SystemExit(f"configuration {seed} is not bit-exact on the RTL: {rep['first_mismatch']}")
            _tally(runs, per_class, seed, over, rep["tasks"][0])
    worst = max((abs(r["error"]) for r in runs), default=0.0)
    out = {"configs": runs, "classes": per_class, "worst_frame_error": worst, "within_2_percent": worst <= 0.02,
           "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print("| configuration | RTL cycles | model cycles | model / RTL - 1 |")
    print("| --- | ---: | ---: | ---: |")
    for r in runs:
        print(f"| seed {r['seed']} | {r['rtl_cycles']:,} | {r['model_cycles']:,} | {100 * r['error']:+.1f} % |")
    print("\n| class | instructions | RTL cycles | model cycles | model / RTL - 1 | worst instruction |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, c in sorted(per_class.items(), key=lambda kv: -kv[1]["rtl"]):
        err = c["model"] / c["rtl"] - 1 if c["rtl"] else 0.0
        print(f"| {name} | {c['instructions']} | {c['rtl']:,} | {c['model']:,} | {100 * err:+.1f} % | "
              f"{100 * c['worst']:+.1f} % |")
    print(f"\nworst frame error {100 * worst:.1f} % ({'within' if worst <= 0.02 else 'outside'} 2 %), "
          f"{out['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
