"""Resource and logic-depth estimates from yosys `synth_xilinx -family xcup` (ZCU104, xczu7ev).

    synth_report(hw)                       # the datapath (today: compute_unit), JSON-able dict
    synth_report(hw, units=["all"])        # every datapath unit, each on its own, and their total
    m3vit synth --parallel 8x8 --json      # the CLI (parser: add_synth_args, handler: cli_synth)

Counts: dsp (DSP48E2), lut (LUT1..LUT6), lutram (LUTs used as distributed RAM), srl (SRL16E /
SRLC32E), ff (FD*), bram36 (RAMB36E2 + RAMB18E2 / 2), uram (URAM288), carry (CARRY4/CARRY8).
Any latch (LDCE/LDPE, $dlatch, "Latch inferred") is an error.

Method "full" synthesises the design as configured. Method "scaled" synthesises it with
P_OUT = 1, 2 and 3 (same P_IN and formats) and extrapolates linearly to P_OUT: every part of
compute_unit is either per output lane or shared, so total = r1 + (P_OUT - 1) * (r2 - r1).
The DSP-packable flops are extrapolated from P_OUT = 2 and 3 instead: with one lane, registers
shared by the lanes have a single load and would count as packable. For an 8x8 array the
scaled and full counts agree exactly except for distributed RAM, which comes in 14-bit-wide
RAM32M16 steps.
"auto" picks full for small arrays and scaled otherwise (the full default array takes yosys far
longer than a test run may; scripts/synth_full.sh runs it).

Yosys 0.23 maps multipliers to DSP48E2 but does not pack registers into them (it does only for
DSP48E1): the product (M) and weight (B) registers stay in fabric. `ff_dsp_packable` counts the
flops that Vivado would absorb (driven only by a DSP output, or driving only DSP inputs), and
`ff_after_dsp_packing` is ff minus those.

Logic levels are the longest flop-to-flop path through LUTs, MUXF7/8/9 and distributed-RAM
reads, with carry cells weighted as UltraScale+ CARRY8 (yosys 0.23 emits CARRY4: two count as
one level). They are computed from the netlist of the smallest run (a lane's depth does not
depend on the number of lanes).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from m3vit.errors import M3ViTError, UsageError
from m3vit.rtl_sim import runner
from m3vit.rtl_sim.emit import emit_svh
from m3vit.rtl_sim.hwconfig import BRAM36_BYTES, URAM_BYTES, ZCU104, HwConfig, load_hw_config

DATAPATH = ["compute_unit"]          # the units that make up the whole datapath today
TOP = "m3v_accel"                    # the whole accelerator: engines, controller and the units
# "all": the MAC array with its GELU epilogue and the nonlinear units, those present in rtl/
ALL_UNITS = ("compute_unit", "softmax_unit", "layernorm_unit", "topk_gate")
FULL_DSP_LIMIT = 200                 # "auto" synthesises in full up to this many DSPs
RESOURCES = ("dsp", "lut", "lutram", "srl", "ff", "bram36", "uram", "carry")
LUTRAM_LUTS = {"RAM32M16": 8, "RAM64M8": 8, "RAM32M": 4, "RAM64M": 4, "RAM32X1D": 2, "RAM64X1D": 2,
               "RAM128X1D": 4, "RAM256X1D": 8, "RAM32X1S": 1, "RAM64X1S": 1, "RAM128X1S": 2,
               "RAM256X1S": 4, "RAM512X1S": 8}


def _unit_params(unit: str, hw: HwConfig) -> dict[str, int]:
    """Parameters given to a unit synthesised on its own (compute_unit reads the .svh instead)."""
    p = hw.rtl_params()
    prod = p["ACT_W"] + p["W_W"]
    return {
        "mac_array": {"P_IN": p["P_IN"], "P_OUT": p["P_OUT"], "ACT_W": p["ACT_W"], "W_W": p["W_W"]},
        "adder_tree": {"N": p["P_IN"], "IN_W": prod},
        "requant": {"IN_W": p["ACC_W"], "OUT_W": p["ACT_W"], "SHIFT_W": p["SHIFT_W"], "OB_W": p["OB_W"],
                    "MAX_LSHIFT": p["ACT_W"]},
        "epilogue": {"P_OUT": p["P_OUT"], "DATA_W": p["ACT_W"], "OB_W": p["OB_W"]},
        "gelu_unit": {"P": p["P_OUT"], "DATA_W": p["ACT_W"], "OB_W": p["OB_W"]},   # inside epilogue
        "layernorm_unit": {"P": min(p["P_OUT"], 8), "DATA_W": p["ACT_W"], "G_W": p["W_W"], "B_W": p["ACC_W"],
                           "SHIFT_W": p["SHIFT_W"], "OB_W": p["OB_W"], "MAX_DIM": hw.limits.max_dim},
        "softmax_unit": {"P": p["SM_P"], "DATA_W": p["ACT_W"], "SCORE_W": p["SCORE_W"], "OB_W": p["OB_W"]},
        "topk_gate": {"MAX_E": hw.limits.max_experts, "MAX_K": hw.limits.max_k, "MAX_T": hw.limits.max_tokens,
                      "LOGIT_W": p["ACT_W"]},
    }.get(unit, {})


def _lanes(unit: str, hw: HwConfig) -> int | None:
    """Lanes of a unit whose resources are per lane or shared (the scaled method varies P_OUT,
    which sets them); None for a unit without lanes."""
    if unit in ("compute_unit", "mac_array", "epilogue", "gelu_unit"):
        return hw.p_out
    if unit == "softmax_unit":
        return hw.softmax_lanes
    if unit == "layernorm_unit":
        return _unit_params(unit, hw)["P"]
    return None


# ---------------------------------------------------------------------------- one yosys run

def _yosys_script(unit: str, hw: HwConfig, inc: Path, json_out: Path | None, stat_out: Path,
                  dsp_only: bool = False) -> str:
    files = " ".join(str(p) for p in runner.rtl_sources())
    chparams = " ".join(f"-chparam {k} {v}" for k, v in _unit_params(unit, hw).items())
    # dsp_only stops after multiplier mapping, where the DSP48E2 count is final, and keeps the
    # hierarchy so each module is synthesised once however often it is instantiated: flattening
    # the whole top (48 lanes of everything) takes yosys hours. Without flattening a constant that
    # reaches a module through a port is not propagated into it, so the count is an upper bound.
    lines = [
        f"read_verilog -sv -I{inc} {files}",
        f"hierarchy -check -top {unit} {chparams}",
        f"synth_xilinx -family xcup -top {unit} -noiopad"
        + (" -run begin:coarse" if dsp_only else " -flatten"),
        f"tee -q -o {stat_out} stat",
    ]
    if json_out is not None:
        lines.append(f"write_json {json_out}")
    return "; ".join(lines)


def _parse_stat(text: str) -> Counter:
    cells: Counter = Counter()
    for m in re.finditer(r"^\s+(\S+)\s+(\d+)\s*$", text, re.M):
        if not m.group(1).startswith("Number"):
            cells[m.group(1)] += int(m.group(2))
    return cells


def resources_from_cells(cells: Counter) -> dict[str, float]:
    def total(prefixes):
        return sum(n for t, n in cells.items() if any(t.startswith(p) for p in prefixes))
    return {
        "dsp": cells.get("DSP48E2", 0),
        "lut": sum(cells.get(f"LUT{i}", 0) for i in range(1, 7)),
        "lutram": sum(LUTRAM_LUTS.get(t, 0) * n for t, n in cells.items()),
        "srl": cells.get("SRL16E", 0) + cells.get("SRLC32E", 0),
        "ff": total(["FDRE", "FDSE", "FDCE", "FDPE"]),
        "bram36": cells.get("RAMB36E2", 0) + cells.get("RAMB18E2", 0) / 2,
        "uram": cells.get("URAM288", 0),
        "carry": cells.get("CARRY4", 0) + cells.get("CARRY8", 0),
    }


def _module_name(ident: str) -> str:
    """`$paramod$<hash>\\eng_attn` or `$paramod\\recip_unit\\S_W=...` -> the module's source name."""
    parts = ident.split("\\")
    return parts[1] if ident.startswith("$paramod") and len(parts) > 1 else ident


def dsp_by_instance(stat_text: str, top: str) -> dict[str, int]:
    """DSP48E2 of each submodule of top in a hierarchical `stat`, with what it instantiates,
    keyed by module name (instances of the same module summed); top's own under its name."""
    own: dict[str, int] = {}
    for sec in re.split(r"^=== ", stat_text, flags=re.M)[1:]:
        name = sec.split(" ===", 1)[0].strip()
        m = re.search(r"^\s+DSP48E2\s+(\d+)\s*$", sec, re.M)
        own[name] = int(m.group(1)) if m else 0
    tree = stat_text.split("=== design hierarchy ===")[-1] if "design hierarchy" in stat_text else ""
    out: dict[str, int] = {top: own.get(top, 0)}
    path: list[tuple[int, int, str]] = []      # (indent, instances along the path, level-1 name)
    for m in re.finditer(r"^( +)(\S+)\s+(\d+)\s*$", tree.split("Number of wires")[0], re.M):
        indent, ident, n = len(m.group(1)), m.group(2), int(m.group(3))
        if ident == top:
            continue
        while path and path[-1][0] >= indent:
            path.pop()
        mult = (path[-1][1] if path else 1) * n
        group = path[0][2] if path else _module_name(ident)
        path.append((indent, mult, group))
        out[group] = out.get(group, 0) + mult * own.get(ident, 0)
    return {k: v for k, v in sorted(out.items()) if v}


def _latches(cells: Counter, log: str) -> int:
    n = sum(cells.get(t, 0) for t in ("LDCE", "LDPE")) + sum(n for t, n in cells.items() if "DLATCH" in t.upper())
    return n + len(re.findall(r"Latch inferred for signal", log))


def run_yosys(unit: str, hw: HwConfig, workdir: Path, netlist: bool = False, dsp_only: bool = False) -> dict[str, Any]:
    """Synthesise one unit; returns cell counts, resources, latch count, seconds, and the netlist path."""
    exe = runner.yosys_path()
    if exe is None:
        raise M3ViTError("yosys is not installed (apt-get install yosys)")
    workdir.mkdir(parents=True, exist_ok=True)
    inc = workdir / "include"
    emit_svh(hw, inc)
    runner.emit_program_headers(hw, inc)   # the accelerator top includes the ISA and register map headers
    stat_out, json_out, log_out = workdir / "stat.txt", workdir / "netlist.json", workdir / "yosys.log"
    script = _yosys_script(unit, hw, inc, json_out if netlist else None, stat_out, dsp_only)
    t0 = time.monotonic()
    proc = subprocess.run([exe, "-q", "-l", str(log_out), "-p", script], capture_output=True, text=True,
                          cwd=inc)   # where emit_svh put the .mem tables that $readmemh reads
    seconds = time.monotonic() - t0
    log = log_out.read_text(errors="replace") if log_out.is_file() else proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise M3ViTError(f"yosys failed on {unit} (see {log_out}):\n{tail}")
    # The last statistics block is the flattened top (earlier ones are per-module).
    stat_text = stat_out.read_text()
    cells = _parse_stat(stat_text.split("=== design hierarchy ===")[-1] if "design hierarchy" in stat_text
                        else stat_text)
    latches = _latches(cells, log)
    if latches:
        raise M3ViTError(f"{unit}: synthesis inferred {latches} latch(es); see {log_out}")
    out = {"cells": dict(sorted(cells.items())), "resources": resources_from_cells(cells),
           "seconds": round(seconds, 1), "log": str(log_out)}
    if dsp_only:
        out["dsp_by_instance"] = dsp_by_instance(stat_text, unit)
    if netlist:
        out.update(analyse_netlist(json_out, unit))
    return out


# ---------------------------------------------------------------------------- netlist analysis

_SEQ_PREFIXES = ("FD", "SRL", "DSP48", "RAMB", "URAM", "BUFG", "IBUF", "OBUF", "LD")
_CARRY = ("CARRY4", "CARRY8")


def analyse_netlist(path: Path, top: str) -> dict[str, Any]:
    """Logic levels and DSP-packable flops of a mapped netlist (yosys write_json)."""
    mod = json.loads(Path(path).read_text())["modules"][top]
    cells = mod["cells"]
    driver: dict[int, str] = {}
    sinks: dict[int, list[tuple[str, str]]] = {}
    for name, c in cells.items():
        dirs = c.get("port_directions", {})
        for port, bits in c["connections"].items():
            for b in bits:
                if not isinstance(b, int):
                    continue
                if dirs.get(port) == "output":
                    driver[b] = name
                else:
                    sinks.setdefault(b, []).append((name, port))

    def comb_inputs(name: str) -> list[int]:
        c = cells[name]
        t = c["type"]
        dirs = c.get("port_directions", {})
        ports = [p for p, d in dirs.items() if d == "input"]
        if t in LUTRAM_LUTS:   # only the read address is a combinational input
            ports = [p for p in ports if p.startswith(("ADDR", "A", "DPRA"))]
        return [b for p in ports for b in c["connections"].get(p, []) if isinstance(b, int)]

    def is_comb(name: str) -> bool:
        return not cells[name]["type"].startswith(_SEQ_PREFIXES)

    def weight(name: str) -> float:
        t = cells[name]["type"]
        return 0.5 if t == "CARRY4" else 1.0

    depth: dict[str, float] = {}
    lut_depth: dict[str, int] = {}
    sys.setrecursionlimit(max(10000, 4 * len(cells)))
    for start in cells:
        if not is_comb(start) or start in depth:
            continue
        stack = [(start, False)]
        while stack:
            name, ready = stack.pop()
            if name in depth:
                continue
            preds = {driver[b] for b in comb_inputs(name) if b in driver and is_comb(driver[b])}
            if not ready:
                stack.append((name, True))
                stack.extend((p, False) for p in preds if p not in depth)
                continue
            depth[name] = weight(name) + max((depth[p] for p in preds), default=0.0)
            is_lut = cells[name]["type"].startswith(("LUT", "INV"))
            lut_depth[name] = int(is_lut) + max((lut_depth[p] for p in preds), default=0)

    # Flops Vivado packs into a DSP48E2: M/P (D driven by a DSP output) or A/B (Q feeds DSPs only).
    packable = 0
    for name, c in cells.items():
        if not c["type"].startswith("FD"):
            continue
        d = [b for b in c["connections"].get("D", []) if isinstance(b, int)]
        q = [b for b in c["connections"].get("Q", []) if isinstance(b, int)]
        if d and d[0] in driver and cells[driver[d[0]]]["type"] == "DSP48E2":
            packable += 1
        elif q and sinks.get(q[0]) and len(sinks[q[0]]) == 1 and \
                cells[sinks[q[0]][0][0]]["type"] == "DSP48E2":
            packable += 1
    return {"logic_levels": math.ceil(max(depth.values(), default=0)),
            "lut_levels": max(lut_depth.values(), default=0),
            "ff_dsp_packable": packable}


# ---------------------------------------------------------------------------- reports

SCALE_FROM = (1, 2, 3)   # the P_OUT values of the scaled runs


def _scaled(ra: dict[str, float], rb: dict[str, float], a: int, b: int, p_out: int) -> dict[str, float]:
    """Linear through (a, ra) and (b, rb), evaluated at p_out."""
    return {k: ra[k] + (p_out - a) * (rb[k] - ra[k]) / (b - a) for k in ra}


def synth_unit(unit: str, hw: HwConfig, method: str = "auto", workdir: Path | None = None) -> dict[str, Any]:
    """Synthesise one unit for hw; see the module docstring for the methods."""
    runner._check_unit(unit)
    if method not in ("auto", "full", "scaled", "dsp"):
        raise UsageError(f"method must be auto, full, scaled or dsp, got {method!r}")
    if method == "dsp" or (method == "auto" and unit == TOP):
        r = run_yosys(unit, hw, workdir / f"{unit}-dsp", dsp_only=True)
        return {"method": "dsp (multiplier mapping only, hierarchical: an upper bound)", "seconds": r["seconds"],
                **{k: 0 for k in RESOURCES}, "dsp": r["resources"]["dsp"], "dsp_by_instance": r["dsp_by_instance"]}
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="m3vit-synth-"))
    lanes = _lanes(unit, hw)
    scalable = lanes is not None
    if method == "auto":
        method = ("full" if hw.dsp_estimate <= FULL_DSP_LIMIT or not scalable or lanes <= SCALE_FROM[-1]
                  else "scaled")
    if method == "scaled" and not scalable:
        raise UsageError(f"{unit} has no output lanes to scale; use --method full")
    if method == "full":
        small = unit not in ("compute_unit", "mac_array") or hw.dsp_estimate <= FULL_DSP_LIMIT
        r = run_yosys(unit, hw, workdir / f"{unit}-full", netlist=small)   # big netlists: GBs of JSON
        res = dict(r["resources"])
        out = {"method": "full", "seconds": r["seconds"], **res}
        levels_from = r
    else:
        # the softmax unit's lanes are their own parameter; every other unit's follow P_OUT
        hws = [hw.replace(softmax_lanes=p) if unit == "softmax_unit" else hw.replace(p_out=p) for p in SCALE_FROM]
        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = list(pool.map(lambda h: run_yosys(unit, h, workdir / f"{unit}-lanes{_lanes(unit, h)}",
                                                     netlist=True), hws))
        res = _scaled(runs[0]["resources"], runs[1]["resources"], 1, 2, lanes)
        target = f"P_OUT={hw.p_out}" if lanes == hw.p_out else f"{lanes} lanes"
        out = {"method": f"scaled from P_OUT=1,2,3 to {target}",
               "seconds": round(sum(r["seconds"] for r in runs), 1), **res}
        levels_from = dict(runs[2])
        levels_from["ff_dsp_packable"] = _scaled({"n": runs[1]["ff_dsp_packable"]},
                                                 {"n": runs[2]["ff_dsp_packable"]}, 2, 3, lanes)["n"]
    if "logic_levels" in levels_from:
        out["logic_levels"] = levels_from["logic_levels"]
        out["lut_levels"] = levels_from["lut_levels"]
        out["ff_dsp_packable"] = levels_from["ff_dsp_packable"]
        out["ff_after_dsp_packing"] = out["ff"] - levels_from["ff_dsp_packable"]
    return out


def synth_report(hw: HwConfig, units: list[str] | None = None, method: str = "auto",
                 workdir: str | Path | None = None) -> dict[str, Any]:
    """Per-unit and total resources, utilisation of the ZCU104 and peak throughput (JSON-able)."""
    units = list(units) if units else ["datapath"]
    expanded = []
    for u in units:
        if u == "all":
            expanded.extend(a for a in ALL_UNITS if a in runner.units())
        else:
            expanded.extend(DATAPATH if u == "datapath" else [u])
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="m3vit-synth-"))
    per_unit = {u: synth_unit(u, hw, method, wd) for u in expanded}
    total = {k: sum(r[k] for r in per_unit.values()) for k in RESOURCES}
    lut_all = total["lut"] + total["lutram"] + total["srl"]
    util = {
        "dsp": 100.0 * total["dsp"] / ZCU104["dsp"],
        "lut": 100.0 * lut_all / ZCU104["lut"],
        "ff": 100.0 * total["ff"] / ZCU104["ff"],
        "bram36": 100.0 * total["bram36"] / ZCU104["bram36"],
        "uram": 100.0 * total["uram"] / ZCU104["uram"],
    }
    levels = [r["logic_levels"] for r in per_unit.values() if "logic_levels" in r]
    return {
        "board": hw.board,
        "part": hw.part,
        "parallel": f"{hw.p_in}x{hw.p_out}",
        "hw_hash": hw.hash(),
        "clock_mhz": hw.clock_mhz,
        "units": per_unit,
        "total": total,
        "lut_including_lutram_srl": lut_all,
        "budget": dict(ZCU104),
        "utilisation_pct": {k: round(v, 2) for k, v in util.items()},
        "fits": all(v <= 100.0 for v in util.values()),
        "logic_levels": max(levels) if levels else None,
        "macs_per_cycle": hw.macs,
        "peak_gmacs": round(hw.macs * hw.clock_mhz / 1000.0, 2),
    }


def model_report(hw: HwConfig) -> dict[str, Any]:
    """The resources the design model expects for hw, without synthesis: DSP48E2 per datapath unit
    (HwConfig.dsp_units, from earlier yosys runs) and the on-chip buffers of hw.json: the weight
    and activation buffers in URAM (the large ones), the score buffer in BRAM36. The same shape
    as synth_report; LUT and FF need synthesis and are left out."""
    units = {u: {k: 0 for k in RESOURCES} | {"dsp": n, "method": "model"} for u, n in hw.dsp_units().items()}
    for name, kind, size in (("weights", "uram", URAM_BYTES), ("activations", "uram", URAM_BYTES),
                             ("scores", "bram36", BRAM36_BYTES)):
        units[f"{name} buffer"] = {k: 0 for k in RESOURCES} | {
            kind: math.ceil(getattr(hw.buffers, name) / size), "method": "model"}
    total = {k: sum(r[k] for r in units.values()) for k in RESOURCES}
    util = {k: round(100.0 * total[k] / ZCU104[k], 2) for k in ("dsp", "bram36", "uram")}
    return {"board": hw.board, "part": hw.part, "parallel": f"{hw.p_in}x{hw.p_out}", "hw_hash": hw.hash(),
            "clock_mhz": hw.clock_mhz, "method": "model", "units": units, "total": total, "budget": dict(ZCU104),
            "utilisation_pct": util, "fits": all(v <= 100.0 for v in util.values()),
            "macs_per_cycle": hw.macs, "peak_gmacs": round(hw.macs * hw.clock_mhz / 1000.0, 2)}


def resource_plot(rep: dict[str, Any], path: str | Path) -> Path:
    """Utilisation of the ZCU104 per resource, stacked by unit, against the 100 % line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("dsp", "lut", "ff", "bram36", "uram") if k in rep["utilisation_pct"]]
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(kinds) + 1.8))
    left = [0.0] * len(kinds)
    for i, (unit, r) in enumerate(rep["units"].items()):
        widths = [100.0 * (r[k] + (r["lutram"] + r["srl"] if k == "lut" else 0)) / rep["budget"][k] for k in kinds]
        ax.barh(range(len(kinds)), widths, left=left, label=unit, color=f"C{i % 10}")
        left = [a + b for a, b in zip(left, widths)]
    for y, k in enumerate(kinds):
        ax.text(left[y] + 1, y, f"{rep['utilisation_pct'][k]:.1f} %", va="center", fontsize=8)
    ax.axvline(100, color="red", ls="--", lw=1)
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([k.upper() for k in kinds])
    ax.invert_yaxis()
    ax.set_xlabel(f"% of the {rep['board'].upper()} ({rep['part']})")
    how = "yosys synth_xilinx" if rep.get("method") != "model" else "design model, not synthesised"
    ax.set_title(f"resources, {rep['parallel']} MAC array ({how})", fontsize=10)
    ax.set_xlim(0, max(110.0, max(left) + 12))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"synth: {rep['board']} ({rep['part']}), array {rep['parallel']}, {rep['clock_mhz']} MHz"]
    for unit, r in rep["units"].items():
        lines.append(f"  {unit}: {r['method']}, {r['seconds']} s")
        if r["method"].startswith("dsp"):
            lines.append(f"    dsp {r['dsp']:g} (LUT, FF and memories are not counted by this method)")
            if len(r.get("dsp_by_instance", {})) > 1:
                lines.append("    " + ", ".join(f"{k} {v}" for k, v in
                                               sorted(r["dsp_by_instance"].items(), key=lambda kv: -kv[1])))
            continue
        lines.append("    " + "  ".join(f"{k} {r[k]:g}" for k in RESOURCES))
        if "logic_levels" in r:
            lines.append(f"    logic levels {r['logic_levels']} (LUT levels {r['lut_levels']}); "
                         f"ff after DSP register packing {r['ff_after_dsp_packing']:g}")
    t, u, b = rep["total"], rep["utilisation_pct"], rep["budget"]
    if all(r["method"].startswith("dsp") for r in rep["units"].values()):
        lines.append(f"  total: DSP {t['dsp']:g}/{b['dsp']} ({u['dsp']}%)"
                     + ("" if t["dsp"] <= b["dsp"] else "  -- DOES NOT FIT"))
        return "\n".join(lines)
    lines.append(f"  total: DSP {t['dsp']:g}/{b['dsp']} ({u['dsp']}%)  "
                 f"LUT {rep['lut_including_lutram_srl']:g}/{b['lut']} ({u['lut']}%, incl. LUTRAM and SRL)  "
                 f"FF {t['ff']:g}/{b['ff']} ({u['ff']}%)  BRAM36 {t['bram36']:g}/{b['bram36']} ({u['bram36']}%)  "
                 f"URAM {t['uram']:g}/{b['uram']} ({u['uram']}%)")
    lines.append(f"  {rep['macs_per_cycle']} MACs/cycle, peak {rep['peak_gmacs']} GMAC/s"
                 + ("" if rep["fits"] else "  -- DOES NOT FIT"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI

def add_synth_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `m3vit synth` (the handler is cli_synth)."""
    parser.add_argument("--hw", metavar="FILE", help="hardware config (default: the shipped rtl_sim/hw.json)")
    parser.add_argument("--parallel", metavar="PINxPOUT", help="override the MAC array, e.g. 8x8")
    parser.add_argument("--unit", action="append", metavar="NAME",
                        help="RTL module to synthesise (repeatable; default: datapath = the MAC array; "
                             "all = the MAC array and every nonlinear unit, with their total; m3v_accel = the "
                             "whole accelerator, DSP48E2 only)")
    parser.add_argument("--method", choices=("auto", "full", "scaled", "dsp"), default="auto",
                        help="full synthesis, P_OUT=1,2,3 runs scaled to P_OUT, or dsp: multiplier mapping only "
                             "(auto: full for small arrays, dsp for the whole accelerator)")
    parser.add_argument("--workdir", metavar="DIR", help="keep yosys logs and netlists here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cli_synth(args: argparse.Namespace) -> int:
    hw = load_hw_config(args.hw) if getattr(args, "hw", None) else HwConfig.default()
    if getattr(args, "parallel", None):
        hw = hw.with_parallel(args.parallel)
    units = getattr(args, "unit", None) or ["datapath"]
    for u in units:
        if u not in ("datapath", "all") and u not in runner.units():
            raise UsageError(f"unknown unit '{u}'; choose datapath, all or one of: {', '.join(runner.units())}")
    rep = synth_report(hw, units, getattr(args, "method", "auto"), getattr(args, "workdir", None))
    print(json.dumps(rep, indent=2, sort_keys=True) if args.json else format_report(rep))
    return 0 if rep["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m m3vit.rtl_sim.synth ...`: the same as `m3vit synth ...`."""
    parser = argparse.ArgumentParser(prog="python -m m3vit.rtl_sim.synth", description=__doc__.splitlines()[0])
    add_synth_args(parser)
    args = parser.parse_args(argv)
    try:
        return cli_synth(args)
    except M3ViTError as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
