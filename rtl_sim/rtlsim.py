"""Run Programs on the RTL accelerator: rtl_sim/tb/accel_tb.sv (m3v_accel on the DDR model),
built with Verilator for one hardware configuration and driven by the host Driver under cocotb.

    jobs = [Job("case0", program, weights, image_bytes, task=0)]
    results = simulate(jobs, hw)        # one simulator start for all jobs
    results[0].status, .output, .arena, .cycles, .tb_cycles, .rd_bytes, .wr_bytes, .counters

Every job runs cold from zeroed buffers: the driver writes the Program, the weights and the input
into the simulated DDR and starts the accelerator; the output and the arena are read back through
the DDR model. ``program_bytes`` assembles a Program from instructions for tests and tools.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m3vit.compiler import isa
from m3vit.errors import M3ViTError
from m3vit.rtl_sim import runner
from m3vit.rtl_sim.hwconfig import HwConfig

TB = "accel_tb"
MEM_WORDS = 1 << 18             # the testbench's default DDR: MEM_WORDS beats of the AXI width


@dataclass
class Job:
    name: str
    program: bytes
    weights: bytes
    image: bytes                # the `in` space: int16 little-endian
    task: int = 0
    meta: dict | None = None    # program.json, when the Program came from a build
    arena: bool = True          # read the arena back
    arena_init: bytes | None = None   # the arena's contents at the start (a slice of a Program)


@dataclass
class WaveWindow:
    """A wave dump of one instruction: from its fetch in job number ``run`` (1-based) to its
    retirement, at most ``cycles`` cycles; FST or VCD by the file's suffix."""
    path: Path
    run: int
    pc: int
    cycles: int = 20000

    @property
    def format(self) -> str:
        return Path(self.path).suffix.lstrip(".").lower()


@dataclass
class JobResult:
    name: str
    status: int
    status_name: str
    output: bytes
    arena: bytes
    counters: dict[str, int] = field(default_factory=dict)
    tb: dict[str, int] = field(default_factory=dict)
    ddr_errors: int = 0
    run_seconds: float = 0.0       # wall time of the driver's run in the simulator (input, start to done, output)
    run_cpu_seconds: float = 0.0   # the simulator process's CPU time over the same run

    @property
    def cycles(self) -> int:
        return self.counters.get("cycles", 0)

    @property
    def tb_cycles(self) -> int:
        return self.tb.get("cycles", 0)

    @property
    def rd_bytes(self) -> int:
        return self.tb.get("rd_bytes", 0)

    @property
    def wr_bytes(self) -> int:
        return self.tb.get("wr_bytes", 0)


def program_bytes(instrs: Sequence[isa.Instr], hw: HwConfig, *, weight_bytes: int, arena_bytes: int,
                  input_bytes: int, output_bytes: int, n_tasks: int = 1) -> bytes:
    """A Program (header + instructions) for hw from a list of instructions."""
    header = isa.Header(bytes.fromhex(hw.hash()), len(instrs), weight_bytes, arena_bytes, n_tasks, input_bytes,
                        output_bytes)
    return header.encode() + b"".join(i.encode() for i in instrs)


def ddr_words(jobs: Sequence[Job], hw: HwConfig) -> int:
    """DDR beats the jobs need (the driver's 4 KB-aligned buffers), as a power of two, at least
    the testbench's default."""
    def page(n: int) -> int:
        return (max(n, 1) + 4095) // 4096 * 4096

    need = 0
    for j in jobs:
        h = isa.decode_header(j.program, j.name)
        need = max(need, sum(page(n) for n in (len(j.program), len(j.weights), h.arena_bytes, h.input_bytes,
                                                h.output_bytes)))
    words = MEM_WORDS
    while words * (hw.axi_width_bits // 8) < need:
        words *= 2
    return words


def build_for(jobs: Sequence[Job], hw: HwConfig, build_root: str | Path | None = None) -> Path:
    """Build (cached) the testbench that ``simulate`` will run the jobs on; its directory."""
    words = ddr_words(jobs, hw)
    return runner.build(TB, hw, build_root, parameters={"MEM_WORDS": words} if words != MEM_WORDS else None)


def simulate(jobs: Sequence[Job], hw: HwConfig, *, seed: int = 1, stall_permille: int = 0,
             build_root: str | Path | None = None, run_name: str = "rtlsim", poll_cycles: int = 64,
             instr_log: Path | None = None, waves: "WaveWindow | None" = None) -> list[JobResult]:
    """Build accel_tb for hw (cached) and run the jobs, in order, in one simulation.
    ``instr_log``: a file that receives one line per retired instruction (accel_tb.sv).
    ``waves``: write an FST of that window instead (a model built with tracing); the simulation
    ends with the window, so no results are returned."""
    if not jobs:
        return []
    if hw.axi_ports < 4:
        raise M3ViTError(f"the RTL accelerator streams on 4 AXI ports; this hw.json has axi_ports = {hw.axi_ports}")
    words = ddr_words(jobs, hw)
    params = {"MEM_WORDS": words} if words != MEM_WORDS else None
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise M3ViTError(f"job names must be unique: {names}")
    run_dir = runner.build_dir_for(TB, hw, build_root, params, waves.format if waves else None) / f"{run_name}-jobs"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_jobs = []
    for j in jobs:
        files = {"program": f"{j.name}.program.bin", "weights": f"{j.name}.weights.bin", "image": f"{j.name}.in.bin"}
        (run_dir / files["program"]).write_bytes(j.program)
        (run_dir / files["weights"]).write_bytes(j.weights)
        (run_dir / files["image"]).write_bytes(j.image)
        if j.arena_init is not None:
            files["arena_init"] = f"{j.name}.arena_init.bin"
            (run_dir / files["arena_init"]).write_bytes(j.arena_init)
        if j.meta is not None:
            files["meta"] = f"{j.name}.meta.json"
            (run_dir / files["meta"]).write_text(json.dumps(j.meta))
        spec_jobs.append({"name": j.name, "task": int(j.task), "arena": j.arena, **files})
    (run_dir / "jobs.json").write_text(json.dumps(
        {"hw": hw.to_dict(), "mem_bytes": words * (hw.axi_width_bits // 8), "stall_permille": stall_permille, "poll_cycles": poll_cycles,
         "jobs": spec_jobs}))
    from m3vit.rtl_sim.cocotb_device import plusargs   # needs cocotb: imported only when simulating

    test_dir = runner.build_dir_for(TB, hw, build_root, params, waves.format if waves else None) / run_name
    extra = [f"+instr_log={Path(instr_log).resolve()}"] if instr_log is not None else []
    if waves is not None:
        out = Path(waves.path).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.unlink(missing_ok=True)
        extra += [f"+wave_file={tmp}", f"+wave_run={waves.run}", f"+wave_pc={waves.pc}",
                  f"+wave_cycles={waves.cycles}"]
    result = runner.run(TB, hw, "m3vit.rtl_sim.cocotb_program", seed=seed, build_root=build_root, name=run_name,
                        plusargs=plusargs(test_dir) + extra, extra_env={"M3V_RUN_DIR": str(run_dir)},
                        parameters=params, waves=waves.format if waves else None)
    if waves is not None:
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise M3ViTError(f"the RTL simulation wrote no waves: run {waves.run} never fetched instruction "
                             f"{waves.pc} (log {result.log})")
        tmp.replace(out)
        return []
    out = []
    for j in jobs:
        rep = run_dir / f"{j.name}.json"
        if not rep.is_file():
            raise M3ViTError(f"the RTL simulation stopped before job {j.name!r} finished "
                             f"(log {result.log}):\n{runner.failure_summary(result)}")
        r = json.loads(rep.read_text())
        out.append(JobResult(j.name, r["status"], r["status_name"], (run_dir / f"{j.name}.out.bin").read_bytes(),
                             (run_dir / f"{j.name}.arena.bin").read_bytes(), r["registers"], r["tb"],
                             r["ddr_errors"], r.get("run_seconds", 0.0), r.get("run_cpu_seconds", 0.0)))
    if not result.ok:
        raise M3ViTError(f"the RTL simulation failed (log {result.log}):\n{runner.failure_summary(result)}")
    return out


# ---------------------------------------------------------------------------- m3vit rtlsim

def _queue_counts(meta: dict, instrs: list[isa.Instr], arena: bytes) -> list[list[int]]:
    """Per MoE layer (program order), the tokens each expert received, read from the queue tables
    the RTL wrote into its arena; a layer whose gate did not run (outside a slice) counts as
    uniform routing, as the schedule model assumes without a trace."""
    import numpy as np

    from m3vit.compiler.schedule import uniform_queues

    counts = []
    for ins in instrs:
        if ins.op != "moe_gate":
            continue
        n, k = ins.fields["experts_k"] & 0xFFFF, ins.fields["experts_k"] >> 16
        space, off = isa.split_ref(ins.fields["queue_ref"])
        if space != "arena" or off + 2 * (n + 1) > len(arena):
            return []
        q = list(np.diff(np.frombuffer(arena, np.uint16, n + 1, off).astype(int)))
        counts.append(q if sum(q) == ins.fields["tokens"] * k else uniform_queues(ins.fields["tokens"], n, k))
    return counts


def writer_of(meta: dict, tensor: str) -> dict | None:
    """The first instruction of a build's Program that writes ``tensor``: index, opcode, layer."""
    from m3vit.compiler.schedule import _OUTPUTS

    for entry in meta["instructions"]:
        ops = entry.get("operands", {})
        if any(ops.get(f) == tensor for f in _OUTPUTS.get(entry["op"], ())):
            return {"instruction": entry["index"], "op": entry["op"], "layer": entry.get("name") or ""}
    return None


def read_instr_log(path: Path) -> dict[int, list[tuple[int, int, int, int, int, int]]]:
    """run -> [(index, opcode, cycles, stall cycles, rd bytes, wr bytes) per retired instruction];
    the last three are the accelerator's running counts, differenced here."""
    runs: dict[int, list] = {}
    if not path.is_file():
        return runs
    prev: dict[int, tuple[int, int, int]] = {}
    for line in path.read_text().split("\n"):
        parts = line.split()
        if len(parts) != 7:
            continue
        run, pc, op, cyc, stall, rd, wr = map(int, parts)
        s0, r0, w0 = prev.get(run, (0, 0, 0))
        runs.setdefault(run, []).append((pc, op, cyc, stall - s0, rd - r0, wr - w0))
        prev[run] = (stall, rd, wr)
    return runs


def run_rtlsim(build_dir: str | Path, image=None, tasks=None, trace: bool = False, progress: bool = False,
               stall_permille: int = 0, seed: int = 1, plot: str | Path | None = None,
               waves: str | Path | None = None, waves_instr: int | None = None, wave_cycles: int = 20000,
               span: tuple[int, int] | None = None, csim: bool = False) -> dict:
    """Run a compiled build on the RTL accelerator for ``tasks`` (None: every task), compare with
    the golden model (every traced tensor with ``trace``), and report cycles, latency at the
    configuration's clock, MAC-array utilisation, stalls and DDR bytes, per instruction class
    next to the compiler's schedule estimate for the same routing. ``waves``: then simulate once
    more with tracing and write an FST of the instruction that produced the first mismatch (or
    of instruction ``waves_instr``), at most ``wave_cycles`` cycles. ``span`` = (A, B): run only
    instructions A..B-1, from the arena the Python executor leaves after A-1; the tensors they
    write are compared with the golden model's, every arena byte with the executor's after B-1.
    ``csim``: also run the HLS kernel's C-simulation on the same input and compare the RTL's
    output (every traced tensor with ``trace``) with it."""
    import threading
    import time

    import numpy as np

    from m3vit.compiler import golden, qgraph as qg, schedule
    from m3vit.compiler.numerics import SatCounter
    from m3vit.compiler.program_exec import read_tensor
    from m3vit.errors import UsageError
    from m3vit.hls.csim import _count, _first_diff, default_image, quantized_input
    from m3vit.rtl_sim.hwconfig import load_hw_config

    build = Path(build_dir)
    for name in ("program.bin", "weights.bin", "program.json", "qgraph.json", "hw.json"):
        if not (build / name).is_file():
            raise UsageError(f"{build}: no {name}; give a folder written by m3vit compile")
    hw = load_hw_config(build / "hw.json")
    meta = json.loads((build / "program.json").read_text())
    program, weights = (build / "program.bin").read_bytes(), (build / "weights.bin").read_bytes()
    header, instrs = isa.decode_program(program, str(build / "program.bin"), hw.hash())
    for ins, entry in zip(instrs, meta["instructions"]):
        ins.name = entry.get("name") or ""
    graph = qg.load(build / "qgraph")
    names = list(graph.tasks)
    try:
        task_ids = list(range(len(names))) if tasks is None else [graph.task_index(t) for t in tasks]
    except (KeyError, ValueError, IndexError):
        raise UsageError(f"--task {tasks}: the model's tasks are {', '.join(names)}") from None
    x_q = quantized_input(graph, default_image(graph) if image is None else image)
    image_bytes = np.asarray(x_q).astype("<i2").tobytes()
    first, last = 0, len(instrs)   # the instructions that run: all, or a slice
    refs: list[dict] = []           # per job, with a slice: the executor's memories after it
    if span is None:
        jobs = [Job(f"task{ti}", program, weights, image_bytes, ti, meta=meta) for ti in task_ids]
    else:
        from m3vit.compiler.program_exec import execute

        body = [i for i in instrs if i.op != "end"]
        first, last = span
        if not 0 <= first < last <= len(body):
            raise UsageError(f"--instrs {first}:{last}: the Program has instructions 0..{len(body) - 1}; give A:B "
                             f"with 0 <= A < B <= {len(body)}")
        sizes = {"weight_bytes": header.weight_bytes, "arena_bytes": header.arena_bytes,
                 "input_bytes": header.input_bytes, "output_bytes": header.output_bytes, "n_tasks": header.n_tasks}
        prefix = program_bytes(body[:first] + [isa.Instr("end")], hw, **sizes)
        piece = program_bytes(body[first:last] + [isa.Instr("end")], hw, **sizes)
        jobs = []
        for ti in task_ids:
            start = bytes(execute(prefix, weights, image_bytes, ti, hw_hash=hw.hash()).memories["arena"])
            refs.append(execute(piece, weights, image_bytes, ti, hw_hash=hw.hash(), arena=start).memories)
            jobs.append(Job(f"task{ti}", piece, weights, image_bytes, ti, meta=meta, arena_init=start))

    # one log per call: two rtlsim runs of the same configuration may be under way at once
    runner.build_dir_for(TB, hw).mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="rtlsim-log-", dir=runner.build_dir_for(TB, hw)))
    log = log_dir / "instr.log"
    outcome: dict = {}

    def work():
        try:
            outcome["results"] = simulate(jobs, hw, seed=seed, stall_permille=stall_permille, instr_log=log)
        except BaseException as exc:   # handed to the caller's thread
            outcome["error"] = exc

    t_build = time.monotonic()
    build_for(jobs, hw)   # timed apart from the simulation (cached after the first run)
    t0 = time.monotonic()
    build_seconds = t0 - t_build
    th = threading.Thread(target=work, daemon=True)
    th.start()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs) * (header.n_instr if span is None else last - first + 1), desc="rtlsim", unit="instr", file=sys.stderr, mininterval=1.0)
    while th.is_alive():
        th.join(1.0)
        if bar is not None:
            done = sum(len(v) for v in read_instr_log(log).values())
            if done > bar.n:   # redraw only on progress: a log stays readable without a terminal
                bar.update(done - bar.n)
    if bar is not None:
        bar.close()
    if "error" in outcome:
        shutil.rmtree(log_dir, ignore_errors=True)
        raise outcome["error"]
    seconds = time.monotonic() - t0
    per_run = read_instr_log(log)
    shutil.rmtree(log_dir, ignore_errors=True)
    out_name, out_shape = meta["output"]["name"], tuple(meta["output"]["shape"])
    macs_per_cycle = hw.p_in * hw.p_out
    run_seconds = sum(r.run_seconds for r in outcome["results"])
    run_cpu_seconds = sum(r.run_cpu_seconds for r in outcome["results"])
    report = {"build": str(build), "hw": hw.to_dict(), "trace": trace, "tasks": [], "bit_exact": True,
              "instructions_run": [first, last],
              "mismatches": 0, "first_mismatch": None, "seconds": round(seconds, 3),
              "build_seconds": round(build_seconds, 3), "run_seconds": round(run_seconds, 3),
              "run_cpu_seconds": round(run_cpu_seconds, 3)}
    for k, (ti, res) in enumerate(zip(task_ids, outcome["results"])):
        if res.status != 0:
            i = first + res.counters.get("instr_count", 0)
            at = f"at instruction {i} ({instrs[i].op} {instrs[i].name})".rstrip() if i < len(instrs) else ""
            raise M3ViTError(f"task {names[ti]}: the accelerator stopped with STATUS {res.status_name} {at}".rstrip())
        got = np.frombuffer(res.output, "<i2").astype(np.int64).reshape(out_shape)
        spaces = {"wgt": weights, "arena": res.arena, "in": image_bytes, "out": res.output}
        entry = {"task": names[ti], "output_mismatches": 0, "tensors_compared": 0, "tensor_mismatches": 0,
                 "first_mismatch": None}
        ref_out, ref_tr = golden.run(graph, x_q, ti, trace=trace or span is not None, stats=SatCounter())
        if span is None:
            compare = meta["trace"] if trace else []
        else:
            # a slice: the tensors its instructions write against the golden model's; every arena
            # byte (queue tables too) against the executor's; the output only if the slice makes it
            compare = [n for n in meta["trace"] if first <= (writer_of(meta, n) or {}).get("instruction", -1) < last]
            ref = refs[k]
            if not first <= (writer_of(meta, out_name) or {}).get("instruction", -1) < last:
                ref_out = np.frombuffer(bytes(ref["out"]), "<i2").astype(np.int64).reshape(out_shape)
            entry["arena_bytes_differing"] = int(np.count_nonzero(
                np.frombuffer(res.arena, np.uint8) != np.frombuffer(bytes(ref["arena"]), np.uint8)))
        entry["output_mismatches"] = _count(got, ref_out)
        for name in compare:   # in execution order, so the first difference is where it arose
            if name not in ref_tr or name == out_name:
                continue
            n = _count(read_tensor(spaces, meta, name), ref_tr[name])
            entry["tensors_compared"] += 1
            entry["tensor_mismatches"] += n
            if n and entry["first_mismatch"] is None:
                entry["first_mismatch"] = _first_diff(name, read_tensor(spaces, meta, name), ref_tr[name])
        if csim:
            from m3vit.rtl_sim.tracediff import trace_of

            ref_c = trace_of("csim", build, x_q, ti)
            entry["csim_mismatches"] = sum(_count(got if name == out_name else read_tensor(spaces, meta, name),
                                                  ref_c[name])
                                           for name in [out_name, *[n for n in compare if n != out_name]]
                                           if name in ref_c)
        if entry["output_mismatches"] and entry["first_mismatch"] is None:
            entry["first_mismatch"] = _first_diff(out_name, got, ref_out)
        if entry.get("arena_bytes_differing") and entry["first_mismatch"] is None:
            off = int(np.argmax(np.frombuffer(res.arena, np.uint8) != np.frombuffer(bytes(refs[k]["arena"]), np.uint8)))
            entry["first_mismatch"] = {"tensor": f"arena byte {off}", "index": [off],
                                       "got": res.arena[off], "expected": refs[k]["arena"][off]}
        queues = _queue_counts(meta, instrs, res.arena)
        est = schedule.estimate(build / "program.json", hw, queue_lengths=queues or None)
        # Program indices; a slice's own END is not one of the Program's instructions
        rows = [(pc + first, *rest) for (pc, *rest) in per_run.get(k + 1, []) if span is None or pc + first < last]
        ran = [r for r in est["instructions"] if first <= r["index"] < last]
        cls_of = {r["index"]: r["class"] for r in est["instructions"]}   # fused ops keep their origin's class
        est_cyc = {r["index"]: r["cycles"] for r in est["instructions"]}
        classes: dict[str, dict] = {}
        for (pc, _op, cyc, stall, rd, wr) in rows:
            cls = cls_of.get(pc, "end")
            c = classes.setdefault(cls, {"cycles": 0, "stall_cycles": 0, "ddr_bytes": 0, "instructions": 0})
            c["cycles"] += cyc
            c["stall_cycles"] += stall
            c["ddr_bytes"] += rd + wr
            c["instructions"] += 1
        for r in ran:
            c = classes.setdefault(r["class"], {"cycles": 0, "stall_cycles": 0, "ddr_bytes": 0, "instructions": 0})
            c["estimate_cycles"] = c.get("estimate_cycles", 0) + r["cycles"]
        cycles = res.tb_cycles
        macs = sum(r["macs"] for r in ran)
        entry.update({
            "total_cycles": cycles, "run_seconds": round(res.run_seconds, 3), "latency_ms_300mhz": round(cycles / 300e3, 4),
            "latency_ms": round(cycles / (hw.clock_mhz * 1e3), 4),
            "utilization": round(macs / (macs_per_cycle * cycles), 4) if cycles else 0.0, "useful_macs": macs,
            "stall_cycles": res.counters.get("stall_cycles", 0), "ddr_bytes": res.rd_bytes + res.wr_bytes,
            "ddr_rd_bytes": res.rd_bytes, "ddr_wr_bytes": res.wr_bytes, "ddr_errors": res.ddr_errors,
            "schedule_estimate_cycles": sum(r["cycles"] for r in ran), "classes": classes,
            "queue_lengths": [list(map(int, q)) for q in queues],
            "instructions": [{"index": pc, "op": isa.OPCODE_NAMES.get(op, str(op)), "name": instrs[pc].name,
                              "class": cls_of.get(pc, "end"), "cycles": cyc, "stall_cycles": st,
                              "ddr_bytes": rd + wr, "estimate_cycles": est_cyc.get(pc, 0)}
                             for (pc, op, cyc, st, rd, wr) in rows if pc < len(instrs)]})
        mism = entry["output_mismatches"] + entry["tensor_mismatches"] + entry.get("arena_bytes_differing", 0) + \
            entry.get("csim_mismatches", 0)
        report["tasks"].append(entry)
        report["mismatches"] += mism
        if mism and report["first_mismatch"] is None:
            report["first_mismatch"] = dict(entry["first_mismatch"], task=names[ti])
    report["bit_exact"] = report["mismatches"] == 0
    if report["first_mismatch"] is not None:
        report["first_mismatch"].update(writer_of(meta, report["first_mismatch"]["tensor"]) or {})
    if waves is not None:
        fm = report["first_mismatch"]
        k = next((i for i, ti in enumerate(task_ids) if fm and names[ti] == fm["task"]), 0)
        pc = waves_instr if waves_instr is not None else (fm or {}).get("instruction")
        if pc is not None and not first <= pc < last:
            raise UsageError(f"--waves-instr {pc} is outside the instructions that ran ({first}..{last - 1})")
        if pc is not None:
            simulate([jobs[k]], hw, seed=seed, stall_permille=stall_permille,
                     waves=WaveWindow(Path(waves), 1, pc - first, wave_cycles))
            report["waves"] = {"file": str(waves), "task": names[task_ids[k]], "instruction": pc,
                               "op": instrs[pc].op, "layer": instrs[pc].name}
        else:
            report["waves"] = None
    for key in ("total_cycles", "latency_ms_300mhz", "utilization", "ddr_bytes", "stall_cycles"):
        report[key] = report["tasks"][0][key]
    # The simulator's speed over the runs themselves; "seconds" also holds its start, the DDR
    # loads and the read-back, "build_seconds" the Verilator build when it was not cached.
    sim_cycles = sum(e["total_cycles"] for e in report["tasks"])
    report["simulated_cycles_per_second"] = round(sim_cycles / run_seconds, 1) if run_seconds else 0.0
    report["simulated_cycles_per_cpu_second"] = round(sim_cycles / run_cpu_seconds, 1) if run_cpu_seconds else 0.0
    if plot is not None:
        report["plot"] = str(latency_plot(report, plot))
    return report


def latency_plot(report: dict, path: str | Path) -> Path:
    """Cycles per instruction class, RTL next to the schedule estimate, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, e in zip(axes[0], tasks):
        cls = sorted(e["classes"], key=lambda c: -e["classes"][c]["cycles"])
        rtl = [e["classes"][c]["cycles"] for c in cls]
        est = [e["classes"][c].get("estimate_cycles", 0) for c in cls]
        xs = range(len(cls))
        ax.bar([x - 0.2 for x in xs], rtl, 0.4, label="RTL (cycles)")
        ax.bar([x + 0.2 for x in xs], est, 0.4, label="schedule estimate")
        ax.set_xticks(list(xs), cls, rotation=45, ha="right")
        ax.set_title(f"{e['task']}: {e['total_cycles']:,} cycles = {e['latency_ms_300mhz']:.3f} ms at 300 MHz")
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def add_rtlsim_args(p) -> None:
    p.add_argument("build", metavar="BUILD", help="build folder written by m3vit compile")
    p.add_argument("--input", metavar="IMG", help="image (.npy [C, H, W] or H x W x 3, or PNG/JPEG); "
                                                  "default: a crop of a bundled photograph")
    p.add_argument("--task", action="append", metavar="T", help="task name or index (repeatable; default: every task)")
    p.add_argument("--trace", action="store_true", help="also compare every intermediate tensor (arena dump)")
    p.add_argument("--stall-permille", type=int, default=0, metavar="N",
                   help="random DDR stalls: N per mille of the cycles (0 = off)")
    p.add_argument("--seed", type=int, default=1, help="Verilator seed of the randomised power-up state")
    p.add_argument("--plot", metavar="PNG", help="latency-breakdown plot (default: BUILD/rtlsim_latency.png)")
    p.add_argument("--csim", action="store_true", help="also compare with the HLS kernel's C-simulation (g++) on the "
                                                        "same input (every traced tensor with --trace)")
    p.add_argument("--instrs", metavar="A:B", help="run only instructions A..B-1 (a layer, a block), starting from "
                                                   "the arena the Python executor leaves after A-1; their tensors "
                                                   "are compared with the golden model's")
    p.add_argument("--waves", metavar="FILE", help="on a mismatch, simulate again with tracing and write the waves "
                                                   "of the instruction that produced it (its fetch to its "
                                                   "retirement) to FILE.fst (needs liblz4-dev) or FILE.vcd")
    p.add_argument("--waves-instr", type=int, metavar="N", help="with --waves: dump instruction N of the first task "
                                                               "instead, mismatch or not")
    p.add_argument("--wave-cycles", type=int, default=20000, metavar="N", help="with --waves: at most N cycles")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def cli_rtlsim(args) -> int:
    from m3vit.compiler import qgraph as qg
    from m3vit.errors import UsageError
    from m3vit.hls.csim import load_input

    build = Path(args.build)
    if not (build / "qgraph.json").is_file():
        raise UsageError(f"{build}: no qgraph.json; give a folder written by m3vit compile")
    if not 0 <= args.stall_permille <= 1000:
        raise UsageError(f"--stall-permille must be between 0 and 1000, got {args.stall_permille}")
    waves_instr = getattr(args, "waves_instr", None)
    if waves_instr is not None and not args.waves:
        raise UsageError("--waves-instr needs --waves FILE.fst")
    if args.waves and Path(args.waves).suffix.lower() not in (".fst", ".vcd"):
        raise UsageError(f"--waves writes FST or VCD; give a name ending in .fst or .vcd, got '{args.waves}'")
    if args.wave_cycles < 1:
        raise UsageError(f"--wave-cycles must be at least 1, got {args.wave_cycles}")
    if waves_instr is not None:
        n = len(json.loads((build / "program.json").read_text())["instructions"])
        if not 0 <= waves_instr < n:
            raise UsageError(f"--waves-instr {waves_instr}: the Program has instructions 0..{n - 1}")
    span = None
    if getattr(args, "instrs", None):
        a, sep, b = args.instrs.partition(":")
        if not (sep and a.strip().isdigit() and b.strip().isdigit()):
            raise UsageError(f"--instrs takes A:B (instruction indices, B exclusive), got '{args.instrs}'")
        span = (int(a), int(b))
        if args.csim:
            raise UsageError("--csim compares whole frames; leave out --instrs")
    image = load_input(args.input, qg.load(build / "qgraph")) if args.input else None
    tasks = [int(t) if t.isdigit() else t for t in args.task] if args.task else None
    rep = run_rtlsim(build, image, tasks, trace=args.trace, progress=not args.json,
                     stall_permille=args.stall_permille, seed=args.seed,
                     plot=args.plot or build / "rtlsim_latency.png", waves=args.waves, waves_instr=waves_instr,
                     wave_cycles=args.wave_cycles, span=span, csim=args.csim)
    if args.json:
        print(json.dumps(rep, sort_keys=True))
        return 0 if rep["bit_exact"] else 1
    if span is not None:
        print(f"instructions {span[0]}..{span[1] - 1}, from the Python executor's arena; their tensors compared with "
              f"the golden model, the arena with the executor")
    for e in rep["tasks"]:
        mism = e["output_mismatches"] + e["tensor_mismatches"] + e.get("arena_bytes_differing", 0)
        state = "bit-exact" if not mism else f"{mism} mismatching elements"
        extra = f", {e['tensors_compared']} tensors compared" if rep["trace"] or span is not None else ""
        if "csim_mismatches" in e:
            extra += "; C-sim " + ("identical" if not e["csim_mismatches"] else f"{e['csim_mismatches']} elements differ")
        print(f"task {e['task']}: {state}{extra}; {e['total_cycles']:,} cycles = {e['latency_ms_300mhz']:.3f} ms "
              f"at 300 MHz (schedule estimate {e['schedule_estimate_cycles']:,}); utilisation "
              f"{100 * e['utilization']:.1f} %, stalls {e['stall_cycles']:,} cycles, DDR {e['ddr_bytes'] / 1e6:.2f} MB")
    fm = rep["first_mismatch"]
    if fm:
        where = f" at {fm['index']}: {fm['got']} != {fm['expected']}" if "index" in fm else \
            f": shape {fm['shape']} != {fm['expected_shape']}"
        instr = f" (instruction {fm['instruction']}, {fm['op']} {fm['layer']})" if "instruction" in fm else ""
        print(f"first mismatch: task {fm['task']}, tensor {fm['tensor']}{where}{instr}")
    if rep.get("waves"):
        w = rep["waves"]
        print(f"waves: {w['file']} (task {w['task']}, instruction {w['instruction']}, {w['op']} {w['layer']})")
    elif args.waves:
        print("waves: none written (bit-exact; --waves-instr N dumps an instruction anyway)")
    print(f"m3vit rtlsim: {'bit-exact' if rep['bit_exact'] else 'MISMATCH'} over {len(rep['tasks'])} task(s); "
          f"simulation {rep['seconds']:.1f} s, of which the runs {rep['run_seconds']:.1f} s "
          f"({rep['simulated_cycles_per_second']:,.0f} simulated cycles/s, "
          f"{rep['simulated_cycles_per_cpu_second']:,.0f} per CPU second); build {rep['build_seconds']:.1f} s; "
          f"plot {rep['plot']}")
    return 0 if rep["bit_exact"] else 1
