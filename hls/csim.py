"""`m3vit csim BUILD`: the HLS kernel, C-simulated with g++, against the golden model, bit for bit.

The testbench of the build's Vitis project (`BUILD/hls/m3v_tb.cpp` + `m3v_top.cpp`) is compiled
once per hash of its sources (which depend on the hardware configuration only, see
`hls/project.py`) into a cache shared by every build, then run once per task. Its output, and
with ``trace`` every canonical tensor read back from the arena dump through program.json's
tensor map (all but the intermediates a residual fusion keeps on chip), is compared with
`compiler.golden.run` on the quantized graph saved in the build (`BUILD/qgraph.json` / `.npz`).
The first mismatching tensor is reported by name and index.

    report = run_csim("build/tiny", trace=True)
    report["bit_exact"], report["mismatches"], report["seconds"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from m3vit.compiler import isa
from m3vit.errors import M3ViTError, UsageError
from m3vit.hls import project
from m3vit.hls.csim_ops import CXX, CXX_FLAGS, _compiler_version, ap_types_dir

__all__ = ["CsimError", "cache_root", "build_testbench", "default_image", "quantized_input", "load_input",
           "run_testbench", "run_csim", "add_csim_args", "cli_csim"]

STATUS_NAMES = {v: k for k, v in isa.STATUS.items()}
# Exit code of the testbench for a refused Program: REFUSED + status.
REFUSED = 10


class CsimError(M3ViTError):
    """The testbench failed to build or to run."""


def cache_root() -> Path:
    """Where testbench binaries are cached: $M3VIT_CSIM_CACHE, else the user cache folder."""
    env = os.environ.get("M3VIT_CSIM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "m3vit" / "hls_csim"


def build_testbench(project_dir: str | Path, root: str | Path | None = None) -> tuple[Path, float, bool]:
    """Compile the project's testbench (cached per source hash). Returns (binary, seconds of
    this call, whether it was built now)."""
    pdir = Path(project_dir)
    for name in project.CSIM_SOURCES:
        if not (pdir / name).is_file():
            raise UsageError(f"{pdir}: no {name}; this is not an m3vit HLS project (run m3vit compile)")
    t0 = time.monotonic()
    digest = project.csim_digest(pdir, _compiler_version() + "|" + " ".join(CXX_FLAGS))
    bdir = (Path(root) if root is not None else cache_root()).resolve() / f"m3v_tb-{digest}"
    exe = bdir / "m3v_tb"
    if exe.is_file():
        return exe, time.monotonic() - t0, False
    bdir.mkdir(parents=True, exist_ok=True)
    tmp = bdir / f"m3v_tb.tmp{os.getpid()}"
    # nice: the build is long and the machine is shared; the result does not depend on it
    cmd = ["nice", "-n", "10", CXX, *CXX_FLAGS, "-isystem", str(ap_types_dir()), "-I", str(pdir.resolve()),
           *[str((pdir / s).resolve()) for s in project.CSIM_SOURCES], "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.monotonic() - t0
    (bdir / "build.log").write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr +
                                    f"\nreturn code {res.returncode}, {secs:.1f} s\n")
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-40:])
        raise CsimError(f"testbench build failed (log: {bdir / 'build.log'}):\n{tail}")
    tmp.replace(exe)  # atomic: concurrent builders of one hash end with one good binary
    return exe, secs, True


# ---------------------------------------------------------------------------- inputs


def default_image(graph) -> np.ndarray:
    """The image `m3vit csim` runs without --input: the first evaluation crop of the bundled
    photographs at the model's size (seeded noise for a model without 3 input channels)."""
    c, h, w = graph.input.shape
    if c == 3:
        from m3vit.compiler.fidelity import eval_images

        return eval_images((h, w), 1)[0][1].detach().cpu().numpy()[0]
    return np.random.default_rng(1).standard_normal((c, h, w)).astype(np.float32)


def quantized_input(graph, image) -> np.ndarray:
    from m3vit.compiler.golden import quantize_input
    from m3vit.compiler.numerics import SatCounter

    return quantize_input(graph, image, SatCounter())


def load_input(path: str | Path, graph) -> np.ndarray:
    """An .npy ([C, H, W] at the model's size, float or already quantized; or H x W x 3) or an
    image file, resized to the model's input."""
    p = Path(path)
    c, h, w = graph.input.shape
    if not p.is_file():
        raise UsageError(f"--input {p}: no such file")
    if p.suffix.lower() == ".npy":
        try:
            a = np.load(p)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--input {p}: not a readable .npy file ({exc})") from None
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.shape == (c, h, w):
            return a
    from m3vit.model.images import read_image, to_input

    if c != 3:
        raise UsageError(f"--input {p}: the model takes [{c}, {h}, {w}]; give an .npy of that shape")
    return to_input(read_image(p), (h, w)).detach().cpu().numpy()[0]


# ---------------------------------------------------------------------------- running


def run_testbench(exe: Path, build: Path, image_q: np.ndarray, task: int, arena: bool) -> dict:
    """One run: {'status', 'output' (bytes), 'arena' (bytes or None), 'seconds'}."""
    with tempfile.TemporaryDirectory(prefix="m3v_csim_") as td:
        t = Path(td)
        (t / "in.bin").write_bytes(np.asarray(image_q).astype("<i2").tobytes())
        cmd = [str(exe), str(build / "program.bin"), str(build / "weights.bin"), str(t / "in.bin"), str(task),
               str(t / "out.bin")] + ([str(t / "arena.bin")] if arena else [])
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.monotonic() - t0
        if res.returncode >= REFUSED:
            return {"status": res.returncode - REFUSED, "output": b"", "arena": None, "seconds": secs}
        if res.returncode != 0:
            raise CsimError(f"testbench failed (exit {res.returncode}): {res.stderr.strip()[-400:]}")
        return {"status": 0, "output": (t / "out.bin").read_bytes(),
                "arena": (t / "arena.bin").read_bytes() if arena else None, "seconds": secs}


def _first_diff(name: str, got: np.ndarray, ref: np.ndarray) -> dict:
    if got.shape != ref.shape:
        return {"tensor": name, "shape": list(got.shape), "expected_shape": list(ref.shape)}
    i = tuple(int(v) for v in np.argwhere(got != ref)[0])
    return {"tensor": name, "index": list(i), "got": int(got[i]), "expected": int(ref[i])}


def _count(got: np.ndarray, ref: np.ndarray) -> int:
    return int(np.count_nonzero(got != ref)) if got.shape == ref.shape else int(max(got.size, ref.size))


def _refusal(build: Path, status: int, task: int) -> UsageError:
    name = STATUS_NAMES.get(status, f"status {status}")
    what = {"hw_mismatch": "was compiled for another hardware configuration than its HLS project; recompile it "
                           "with this hw.json (m3vit compile --hw ...)",
            "bad_magic": "is not an m3vit Program; rebuild the folder with m3vit compile",
            "bad_version": "has another Program format version; rebuild the folder with m3vit compile",
            "bad_task": f"has no task {task}; choose one of its tasks",
            }.get(name, f"was refused by the kernel ({name}); rebuild the folder with m3vit compile")
    return UsageError(f"{build / 'program.bin'} {what}")


def run_csim(build_dir: str | Path, image=None, tasks=None, trace: bool = False, progress: bool = False,
             cache: str | Path | None = None) -> dict:
    """C-simulate the build on ``image`` (None: default_image) for ``tasks`` (None: every task)
    and compare with the golden model. Returns the report (see cli_csim --json)."""
    from m3vit.compiler import golden, qgraph as qg
    from m3vit.compiler.numerics import SatCounter
    from m3vit.compiler.program_exec import read_tensor

    build = Path(build_dir)
    for name in ("program.bin", "weights.bin", "program.json", "qgraph.json"):
        if not (build / name).is_file():
            raise UsageError(f"{build}: no {name}; give a folder written by m3vit compile")
    if not (build / "hls").is_dir():
        raise UsageError(f"{build}: no hls/ project; give a folder written by m3vit compile")
    meta = json.loads((build / "program.json").read_text())
    graph = qg.load(build / "qgraph")
    names = list(graph.tasks)
    if tasks is None:
        task_ids = list(range(len(names)))
    else:
        task_ids = []
        for t in tasks:
            try:
                task_ids.append(graph.task_index(t))
            except (KeyError, ValueError, IndexError):
                raise UsageError(f"--task {t}: the model's tasks are {', '.join(names)}") from None
    img = default_image(graph) if image is None else image
    x_q = quantized_input(graph, img)
    exe, build_secs, built = build_testbench(build / "hls", cache)
    weights = (build / "weights.bin").read_bytes()
    out_name, out_shape = meta["output"]["name"], tuple(meta["output"]["shape"])
    traced = []
    if trace:
        # the traced subset: every golden name but the intermediates fusion removed, checked here
        from m3vit.compiler.lower import trace_subset

        try:
            traced = trace_subset(meta, graph.trace_names())
        except ValueError as e:
            raise UsageError(f"{build / 'program.json'}: {e}; rebuild the folder with m3vit compile") from None
    report = {"build": str(build), "tasks": [], "bit_exact": True, "mismatches": 0, "first_mismatch": None,
              "trace": trace, "build_seconds": round(build_secs, 3), "built": built}
    bar = None
    if progress and len(task_ids) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(task_ids), desc="csim", unit="task", file=sys.stderr)
    sim_secs = 0.0
    t_all = time.monotonic()
    try:
        for ti in task_ids:
            r = run_testbench(exe, build, x_q, ti, trace)
            if r["status"] != 0:
                raise _refusal(build, r["status"], ti)
            sim_secs += r["seconds"]
            ref_out, ref_tr = golden.run(graph, x_q, ti, trace=trace, stats=SatCounter())
            got = np.frombuffer(r["output"], "<i2").astype(np.int64)
            got = got.reshape(out_shape) if got.size == int(np.prod(out_shape)) else got
            entry = {"task": names[ti], "seconds": round(r["seconds"], 3), "output_mismatches": _count(got, ref_out),
                     "tensors_compared": 0, "tensor_mismatches": 0, "first_mismatch": None}
            if entry["output_mismatches"]:
                entry["first_mismatch"] = _first_diff(out_name, got, ref_out)
            if trace:
                spaces = {"wgt": weights, "arena": r["arena"], "in": np.asarray(x_q).astype("<i2").tobytes(),
                          "out": r["output"]}
                first = None
                for name in traced:  # execution order: the first mismatch is the one to look at
                    tg = got if name == out_name else read_tensor(spaces, meta, name)
                    n = _count(tg, ref_tr[name])
                    if name != out_name:
                        entry["tensors_compared"] += 1
                        entry["tensor_mismatches"] += n
                    if n and first is None:
                        first = _first_diff(name, tg, ref_tr[name])
                entry["first_mismatch"] = first or entry["first_mismatch"]
            mism = entry["output_mismatches"] + entry["tensor_mismatches"]
            report["tasks"].append(entry)
            report["mismatches"] += mism
            if mism and report["first_mismatch"] is None:
                report["first_mismatch"] = dict(entry["first_mismatch"], task=names[ti])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report["bit_exact"] = report["mismatches"] == 0
    report["sim_seconds"] = round(sim_secs, 3)
    report["seconds_per_frame"] = round(sim_secs / max(1, len(task_ids)), 3)
    report["seconds"] = round(time.monotonic() - t_all + build_secs, 3)
    return report


# ---------------------------------------------------------------------------- CLI


def add_csim_args(p) -> None:
    p.add_argument("build", metavar="BUILD", help="build folder written by m3vit compile")
    p.add_argument("--input", metavar="IMG", help="image (.npy [C, H, W] or H x W x 3, or PNG/JPEG); "
                                                  "default: a crop of a bundled photograph")
    p.add_argument("--task", action="append", metavar="T", help="task name or index (repeatable; default: every task)")
    p.add_argument("--trace", action="store_true", help="also compare every intermediate tensor (arena dump)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def cli_csim(args) -> int:
    from m3vit.compiler import qgraph as qg

    build = Path(args.build)
    if not (build / "qgraph.json").is_file():
        raise UsageError(f"{build}: no qgraph.json; give a folder written by m3vit compile")
    image = None
    if args.input:
        image = load_input(args.input, qg.load(build / "qgraph"))
    tasks = None
    if args.task:
        tasks = [int(t) if t.isdigit() else t for t in args.task]
    rep = run_csim(build, image, tasks, trace=args.trace, progress=not args.json)
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        for e in rep["tasks"]:
            state = "bit-exact" if not (e["output_mismatches"] + e["tensor_mismatches"]) else \
                f"{e['output_mismatches'] + e['tensor_mismatches']} mismatching elements"
            extra = f", {e['tensors_compared']} tensors traced" if rep["trace"] else ""
            print(f"task {e['task']}: {state}{extra} ({e['seconds']:.2f} s)")
        fm = rep["first_mismatch"]
        if fm:
            where = f" at {fm['index']}: {fm['got']} != {fm['expected']}" if "index" in fm else \
                f": shape {fm['shape']} != {fm['expected_shape']}"
            print(f"first mismatch: task {fm['task']}, tensor {fm['tensor']}{where}")
        print(f"m3vit csim: {'bit-exact' if rep['bit_exact'] else 'MISMATCH'} over {len(rep['tasks'])} task(s); "
              f"testbench {'built' if rep['built'] else 'cached'} in {rep['build_seconds']:.1f} s, "
              f"{rep['seconds_per_frame']:.2f} s per frame")
    return 0 if rep["bit_exact"] else 1
