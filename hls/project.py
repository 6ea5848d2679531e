"""The Vitis HLS project of one hardware build: `emit_project(build_dir, hw, program_dir)`.

The folder is self-contained: the top function `m3v_top` (m_axi ports from hw.json, s_axilite
registers at the offsets of compiler/regmap.py), the generated headers (`m3v_config.h`,
`m3v_tables.h`, `m3v_isa.h`, `m3v_regmap.h`, `m3v_build.h`, `m3v_depth.h`), a copy of the header
library (`hls/include`), the C-simulation testbench `m3v_tb.cpp`, `run_hls.tcl` (csim / csynth /
cosim / export_design), the board files of `m3vit.rtl_sim.board` (`vivado_bd.tcl`, the ZCU104
block design around either the exported IP or the RTL top, with that RTL) and a README. The sources but `m3v_depth.h` depend on the hardware
configuration alone, so one C-simulation build serves every Program compiled for it
(`hls/csim.py` hashes exactly those sources). Output is a pure function of the inputs: no dates,
no absolute paths; a file is rewritten only when its bytes change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jinja2

from m3vit.compiler import isa
from m3vit.compiler.numerics import CONTRACT
from m3vit.errors import UsageError
from m3vit.hls import emit_tables

__all__ = ["TOP", "CSIM_SOURCES", "MAX_INSTR", "AXILITE_PORTS", "control_registers", "axi_ports", "decoder_buffers",
           "render_build",
           "project_files", "csim_digest", "emit_project"]

HLS_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = HLS_DIR / "include"
TOP = "m3v_top"
# The longest Program the sequencer's trip count assumes (a synthesis estimate, not a limit of
# the encoding: the header's count is checked against it).
MAX_INSTR = 1 << 16
TB_INPUT = "tb_input.bin"
# The files the C-simulation build compiles (and hashes): hardware-dependent only.
CSIM_SOURCES = ("m3v_top.cpp", "m3v_tb.cpp")

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(HLS_DIR / "templates")),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
)


# s_axilite ports of m3v_top -> their register in compiler/regmap.py (64-bit: the low word).
AXILITE_PORTS = (("task", "TASK"), ("prog", "PROG_LO"), ("wgt", "WGT_LO"), ("arena", "ARENA_LO"), ("in", "IN_LO"),
                 ("out", "OUT_LO"), ("status", "STATUS"), ("hw_hash", "HW_HASH"), ("instr_count", "INSTR_COUNT"))


def control_registers() -> list[dict]:
    """The registers m3v_top implements: port, register name, offset (from compiler/regmap.py), doc."""
    from m3vit.compiler import regmap

    regs = {r.name: r for r in regmap.registers()}
    out = [dict(port=None, name=n, offset=regs[n].offset, doc=regs[n].doc) for n in ("CTRL", "GIE", "IER", "ISR")]
    for port, name in AXILITE_PORTS:
        out.append(dict(port=port, name=name, offset=regs[name].offset, doc=regs[name].doc))
    return out


def axi_ports(hw) -> list[dict]:
    """m_axi ports: program and weights on gmem0, the activations spread over the others."""
    n = int(hw.axi_ports)
    act = [f"gmem{i}" for i in range(1, n)] or ["gmem0"]
    ports = [dict(name="prog", bundle="gmem0", space=None), dict(name="wgt", bundle="gmem0", space="wgt")]
    for i, name in enumerate(("arena", "in", "out")):
        ports.append(dict(name=name, bundle=act[i % len(act)], space=name))
    for p in ports:
        p["depth_macro"] = f"M3V_DEPTH_{p['name'].upper()}"
    return ports


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decoder_buffers(hw) -> dict[str, int]:
    """On-chip bytes of the decoder kernel for a hardware config (each element in whole bytes):
    `weights` (the two halves of the GEMM's MAX_IN x P_OUT weight ping-pong), `activations` (row
    blocks, attention K / V tiles, query tile and sums, parameters, routing tables), `scores`, their `total`, and `kv_elems`
    (elements of each K / V tile buffer). Mirrors m3v::dec_sizes; the kernel static_asserts the
    equality of the totals (m3v_build.h ONCHIP_BYTES), so the two cannot drift apart."""
    c = emit_tables.normalise_config(hw.to_dict() if hasattr(hw, "to_dict") else hw)

    def nb(n: int, bits: int) -> int:
        return n * ((bits + 7) // 8)

    pi, po, tb = c["p_in"], c["p_out"], c["token_block"]
    max_in, dh, qt = max(c["max_dim"], c["max_hidden"]), c["max_dim"], c["p_out"]
    x_n = tb * max(max_in, c["max_k"] * c["max_dim"])
    y_n = tb * max(c["max_dim"], po, c["max_experts"])
    tk, tbk = c["max_tokens"] * c["max_k"], tb * c["max_k"]
    par_n = max(c["max_dim"], c["max_experts"], po)
    keys_bits = (CONTRACT.max_keys - 1).bit_length()
    pv_bits, psum_bits = 16 + CONTRACT.exp_frac + keys_bits, CONTRACT.exp_frac + 1 + keys_bits
    act = c["act_bits"]
    weights = 2 * nb(_cdiv(max_in, pi) * pi * po, c["weight_bits"])  # the GEMM's ping-pong halves
    fixed = (nb(x_n + y_n + _cdiv(dh, pi) * pi * qt + qt + c["max_dim"], act) + nb(qt * dh, pv_bits)
             + nb(qt, psum_bits) + nb(par_n + 2 * po, c["acc_bits"]) + nb(par_n, 7) + nb(2 * po, 32)
             + nb(c["max_dim"], 16) + nb(3 * tk + 2 * tbk + c["max_experts"] + 1 + 2 * tb, 16))
    ab = (act + 7) // 8
    kv = min((c["activations"] - fixed) // (2 * ab), c["max_tokens"] * dh)
    activations = fixed + 2 * nb(kv, act)
    scores = nb(c["scores"] // ab, act)
    return {"weights": weights, "activations": activations, "scores": scores,
            "total": weights + activations + scores, "kv_elems": kv}


def render_build(hw) -> str:
    digest = bytes.fromhex(hw.hash())
    words = [int.from_bytes(digest[4 * i:4 * i + 4], "little") for i in range(8)]
    return _env.get_template("m3v_build.h.j2").render(
        hw_hash=hw.hash(), axi_w=int(hw.axi_width_bits), axi_ports=int(hw.axi_ports),
        max_tasks=int(hw.limits.max_tasks), max_instr=MAX_INSTR, hash_words=[f"0x{w:08X}" for w in words],
        onchip_bytes=decoder_buffers(hw)["total"])


def _render_depth(hw, sizes: dict[str, int]) -> str:
    wb = hw.axi_width_bits // 8
    lines = ["// m3v_depth.h: m_axi depths (words) of the Program the project was emitted with, for",
             "// co-simulation; synthesis only. Generated by m3vit.hls.project; do not edit.",
             "#ifndef M3V_DEPTH_H", "#define M3V_DEPTH_H", ""]
    for p in axi_ports(hw):
        lines.append(f"#define {p['depth_macro']} {max(1, -(-sizes[p['name']] // wb) + 1)}")
    return "\n".join(lines + ["", "#endif // M3V_DEPTH_H", ""])


def _write(path: Path, data: bytes | str) -> None:
    b = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.read_bytes() == b:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(b)
    tmp.replace(path)


def _program_sizes(program_dir: Path | None) -> dict[str, int]:
    """Byte sizes of the spaces from the Program header (1 word each without a Program)."""
    sizes = {"prog": isa.RECORD_BYTES, "wgt": 1, "arena": 1, "in": 1, "out": 1}
    if program_dir is None:
        return sizes
    blob = (program_dir / "program.bin").read_bytes()
    h = isa.decode_header(blob, str(program_dir / "program.bin"))
    sizes.update(prog=len(blob), wgt=h.weight_bytes, arena=h.arena_bytes, **{"in": h.input_bytes},
                 out=h.output_bytes)
    return sizes


def _tb_input(program_dir: Path | None, sizes: dict[str, int]) -> bytes:
    """The C-simulation input of run_hls.tcl: the default image of `m3vit csim` quantized, when
    the build folder holds the quantized graph; zeros otherwise."""
    if program_dir is not None and (program_dir / "qgraph.json").is_file():
        from m3vit.hls.csim import default_image, quantized_input
        from m3vit.compiler import qgraph as qg

        graph = qg.load(program_dir / "qgraph")
        return quantized_input(graph, default_image(graph)).astype("<i2").tobytes()
    return bytes(sizes["in"] if sizes["in"] > 1 else 0)


def project_files(hw, program_dir: str | Path | None = None, rel_program: str = "..") -> dict[str, bytes | str]:
    """name -> contents of every file of the project."""
    cfg = emit_tables.normalise_config(hw.to_dict())
    pdir = Path(program_dir) if program_dir is not None else None
    sizes = _program_sizes(pdir)
    from m3vit.compiler import regmap

    regs = control_registers()
    axilite = [r for r in regs if r["port"]]
    files: dict[str, bytes | str] = {
        emit_tables.TABLES_NAME: emit_tables.render_tables(),
        emit_tables.CONFIG_NAME: emit_tables.render_config(cfg),
        "m3v_isa.h": regmap.render_isa_header(),
        "m3v_regmap.h": regmap.render_regmap_header(hw),
        "m3v_build.h": render_build(hw),
        "m3v_depth.h": _render_depth(hw, sizes),
        "m3v_top.h": _env.get_template("m3v_top.h.j2").render(),
        "m3v_top.cpp": _env.get_template("m3v_top.cpp.j2").render(
            hw_hash=hw.hash(), ports=axi_ports(hw), axilite=axilite, axi_w=int(hw.axi_width_bits)),
        "m3v_tb.cpp": _env.get_template("m3v_tb.cpp.j2").render(),
    }
    for h in sorted(INCLUDE_DIR.glob("*.h")):
        files[h.name] = h.read_bytes()
    vectors = dict(program=f"{rel_program}/program.bin", weights=f"{rel_program}/weights.bin", input=TB_INPUT, task=0)
    files["run_hls.tcl"] = _env.get_template("run_hls.tcl.j2").render(
        part=hw.part, period_ns=f"{1000.0 / hw.clock_mhz:.3f}", vectors=vectors)
    files[TB_INPUT] = _tb_input(pdir, sizes)
    from m3vit.rtl_sim.board import board_files

    files.update(board_files(hw, sorted({p["bundle"] for p in axi_ports(hw)}), TOP))
    files["README.md"] = _env.get_template("README.md.j2").render(
        hw_hash=hw.hash(), part=hw.part, clock_mhz=hw.clock_mhz, p_in=hw.p_in, p_out=hw.p_out,
        axi_w=hw.axi_width_bits, ports=axi_ports(hw), registers=regs,
        library=sorted(p.name for p in INCLUDE_DIR.glob("*.h")), max_instr=MAX_INSTR, rel_program=rel_program)
    return files


def csim_digest(project_dir: str | Path, extra: str = "") -> str:
    """Hash of the sources a C-simulation build compiles (hardware-dependent files only)."""
    d = Path(project_dir)
    h = hashlib.sha256(extra.encode() + b"\0")
    names = sorted({p.name for p in d.glob("*.h") if p.name != "m3v_depth.h"} | set(CSIM_SOURCES))
    for n in names:
        h.update(n.encode() + b"\0" + (d / n).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def emit_project(build_dir: str | Path, hw, program_dir: str | Path | None = None) -> Path:
    """Write the Vitis HLS project for ``hw`` into ``build_dir``; ``program_dir`` (the build
    folder with program.bin) sizes the co-simulation depths and provides the test vectors."""
    out = Path(build_dir)
    pdir = Path(program_dir) if program_dir is not None else None
    if pdir is not None and not (pdir / "program.bin").is_file():
        raise UsageError(f"{pdir}: no program.bin; run m3vit compile first")
    rel = Path(os.path.relpath(pdir.resolve(), out.resolve())).as_posix() if pdir is not None else "."
    files = project_files(hw, pdir, rel)
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(files):
        _write(out / name, files[name])
    _write(out / "project.json", json.dumps({"top": TOP, "hw_hash": hw.hash(), "files": sorted(files)},
                                            indent=1, sort_keys=True) + "\n")
    return out
