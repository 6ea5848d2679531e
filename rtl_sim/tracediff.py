"""`m3vit trace-diff BUILD A B`: run a compiled build on two executors and compare every traced
tensor in execution order, naming the first differing tensor, the instruction that wrote it and
the first differing index.

Executors: ``golden`` (the QGraph's golden model), ``program`` (the Python Program executor),
``csim`` (the HLS kernel compiled with g++) and ``rtl`` (the RTL accelerator under Verilator).
Every executor but ``golden`` is read back through program.json's tensor map from its arena.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from m3vit.errors import M3ViTError, UsageError

EXECUTORS = ("golden", "program", "csim", "rtl")


def trace_of(which: str, build: Path, x_q: np.ndarray, task: int) -> dict[str, np.ndarray]:
    """Every traced tensor (and the output) of one executor's run."""
    from m3vit.compiler import golden, qgraph as qg
    from m3vit.compiler.numerics import SatCounter
    from m3vit.compiler.program_exec import execute_build, read_tensor

    meta = json.loads((build / "program.json").read_text())
    out_name = meta["output"]["name"]
    image = np.asarray(x_q).astype("<i2").tobytes()
    weights = (build / "weights.bin").read_bytes()
    if which == "golden":
        out, tr = golden.run(qg.load(build / "qgraph"), x_q, task, trace=True, stats=SatCounter())
        return {**{n: tr[n] for n in meta["trace"] if n in tr}, out_name: out}
    if which == "program":
        res = execute_build(build, x_q, task, trace=True)
        return {**res.trace, out_name: res.output}
    if which == "csim":
        from m3vit.hls.csim import build_testbench, run_testbench

        exe, _, _ = build_testbench(build / "hls")
        r = run_testbench(exe, build, x_q, task, arena=True)
        if r["status"]:
            raise M3ViTError(f"the C-simulation refused the Program (status {r['status']})")
        output, arena = r["output"], r["arena"]
    else:
        from m3vit.rtl_sim.hwconfig import load_hw_config
        from m3vit.rtl_sim.rtlsim import Job, simulate

        hw = load_hw_config(build / "hw.json")
        res = simulate([Job("trace", (build / "program.bin").read_bytes(), weights, image, task, meta=meta)], hw,
                       run_name="tracediff")[0]
        if res.status:
            raise M3ViTError(f"the RTL stopped with STATUS {res.status_name}")
        output, arena = res.output, res.arena
    spaces = {"wgt": weights, "arena": arena, "in": image, "out": output}
    tr = {n: read_tensor(spaces, meta, n) for n in meta["trace"] if n != out_name}
    tr[out_name] = np.frombuffer(output, "<i2").astype(np.int64).reshape(meta["output"]["shape"])
    return tr


def diff(build: str | Path, a: str, b: str, image=None, task=0) -> dict:
    from m3vit.compiler import qgraph as qg
    from m3vit.hls.csim import default_image, quantized_input

    build = Path(build)
    for name in ("program.bin", "weights.bin", "program.json", "qgraph.json", "hw.json"):
        if not (build / name).is_file():
            raise UsageError(f"{build}: no {name}; give a folder written by m3vit compile")
    for w in (a, b):
        if w not in EXECUTORS:
            raise UsageError(f"unknown executor {w!r}; choose from {', '.join(EXECUTORS)}")
    graph = qg.load(build / "qgraph")
    try:
        ti = graph.task_index(task)
    except (KeyError, ValueError, IndexError):
        raise UsageError(f"--task {task}: the model's tasks are {', '.join(graph.tasks)}") from None
    x_q = quantized_input(graph, default_image(graph) if image is None else image)
    ta, tb = trace_of(a, build, x_q, ti), trace_of(b, build, x_q, ti)
    meta = json.loads((build / "program.json").read_text())
    producer = {e.get("name"): e["index"] for e in meta["instructions"] if e.get("name")}
    order = [n for n in meta["trace"] if n in ta and n in tb]
    if meta["output"]["name"] not in order:
        order.append(meta["output"]["name"])
    rep = {"build": str(build), "a": a, "b": b, "task": list(graph.tasks)[ti], "tensors": len(order),
           "differing_tensors": 0, "differing_elements": 0, "first": None}
    for n in order:
        x, y = ta[n], tb[n]
        bad = x.shape != y.shape or bool(np.any(x != y))
        if not bad:
            continue
        rep["differing_tensors"] += 1
        rep["differing_elements"] += int(np.count_nonzero(x != y)) if x.shape == y.shape else int(max(x.size, y.size))
        if rep["first"] is None:
            first = {"tensor": n, "instruction": producer.get(n)}
            if x.shape != y.shape:
                first.update(shape_a=list(x.shape), shape_b=list(y.shape))
            else:
                i = tuple(int(v) for v in np.argwhere(x != y)[0])
                first.update(index=list(i), a=int(x[i]), b=int(y[i]))
            rep["first"] = first
    rep["identical"] = rep["differing_tensors"] == 0
    return rep


def add_tracediff_args(p) -> None:
    p.add_argument("build", metavar="BUILD", help="build folder written by m3vit compile")
    p.add_argument("a", choices=EXECUTORS, help="first executor")
    p.add_argument("b", choices=EXECUTORS, help="second executor")
    p.add_argument("--task", default="0", help="task name or index")
    p.add_argument("--input", metavar="IMG", help="image (.npy or PNG/JPEG); default: a crop of a bundled photograph")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def cli_tracediff(args) -> int:
    from m3vit.compiler import qgraph as qg
    from m3vit.hls.csim import load_input

    build = Path(args.build)
    if not (build / "qgraph.json").is_file():
        raise UsageError(f"{build}: no qgraph.json; give a folder written by m3vit compile")
    image = load_input(args.input, qg.load(build / "qgraph")) if args.input else None
    task = int(args.task) if args.task.isdigit() else args.task
    rep = diff(build, args.a, args.b, image, task)
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    elif rep["identical"]:
        print(f"m3vit trace-diff: {args.a} and {args.b} agree on all {rep['tensors']} tensors (task {rep['task']})")
    else:
        f = rep["first"]
        where = f"index {f['index']}: {args.a} {f['a']}, {args.b} {f['b']}" if "index" in f else \
            f"shape {f['shape_a']} against {f['shape_b']}"
        print(f"m3vit trace-diff: {rep['differing_tensors']} of {rep['tensors']} tensors differ "
              f"({rep['differing_elements']} elements); first: {f['tensor']} (instruction {f['instruction']}), {where}")
    return 0 if rep["identical"] else 1
