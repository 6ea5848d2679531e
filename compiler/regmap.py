"""The accelerator's s_axilite register map, and the generated headers of the Program encoding.

One map serves the HLS top, the RTL top and the driver; offsets are computed here only
(``registers``) and rendered through Jinja2 templates (``compiler/templates``):

* ``render_regmap_json(hw)``, ``render_regmap_header(hw)`` (C++ ``m3v_regmap.h``, namespace
  ``m3v::regmap``), ``render_regmap_svh(hw)`` (``m3v_regmap.svh``), ``render_regmap_markdown(hw)``
  (the table in docs/program.md);
* ``render_isa_header()`` (C++ ``m3v_isa.h``, namespace ``m3v::isa``) and ``render_isa_svh()``
  (``m3v_isa.svh``) from ``isa.c_constants()``, with ``isa.encoding_digest()`` in the comment.

Every renderer is a pure function of its input: identical input, byte-identical text.
``write_headers(out_dir, hw)`` writes the four headers, rewriting a file only when its bytes change.

Layout: the HLS block-level control registers first (CTRL, GIE, IER, ISR at 0x00–0x0C), then
TASK, the 64-bit base addresses (low word first, each pair 8-byte aligned), the read-only state
(STATUS, HW_HASH, INSTR_COUNT) and the 64-bit performance counters, one per opcode last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from m3vit.compiler import isa
from m3vit.rtl_sim.hwconfig import HwConfig

__all__ = ["Register", "registers", "ctrl_bits", "hw_hash32", "render_regmap_json", "render_regmap_header",
           "render_regmap_svh", "render_regmap_markdown", "render_isa_header", "render_isa_svh", "write_headers",
           "HEADER_NAMES"]

TEMPLATES = Path(__file__).with_name("templates")
HEADER_NAMES = ("m3v_isa.h", "m3v_isa.svh", "m3v_regmap.h", "m3v_regmap.svh")

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)

# CTRL bits: the HLS ap_ctrl_hs protocol, which the RTL top implements identically.
CTRL_BITS = (("CTRL_START", 0, "CTRL bit: write 1 to start; reads 1 until the accelerator accepts"),
             ("CTRL_DONE", 1, "CTRL bit: the Program ended (clear on read)"),
             ("CTRL_IDLE", 2, "CTRL bit: not running"),
             ("CTRL_READY", 3, "CTRL bit: ready for a new start"),
             ("ISR_DONE", 0, "IER/ISR bit: interrupt on done (ISR is toggle on write)"))


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: str        # RW, RO, COR (clear on read), TOW (toggle on write)
    doc: str
    width: int = 32    # the 64-bit values are two registers, _LO then _HI


def _layout() -> list[tuple[str, int, str, str]]:
    """(name, width, access, doc) in address order."""
    regs = [("CTRL", 32, "RW", "control: bit 0 start, bit 1 done (COR), bit 2 idle, bit 3 ready"),
            ("GIE", 32, "RW", "global interrupt enable (bit 0)"),
            ("IER", 32, "RW", "interrupt enable: bit 0 done"),
            ("ISR", 32, "TOW", "interrupt status: bit 0 done (write 1 to clear)"),
            ("TASK", 32, "RW", "the task index the Program runs (selects the per-task gates)"),
            ("PROG", 64, "RW", "base address of program.bin")]
    regs += [(space.upper(), 64, "RW", f"base address of the `{space}` space (byte address in DDR)")
             for space, _ in sorted(isa.SPACES.items(), key=lambda kv: kv[1])]
    regs += [("STATUS", 32, "RO", "status of the last run: isa STATUS code (0 ok; docs/program.md)"),
             ("HW_HASH", 32, "RO", "first 32 bits of the hw config sha256 (= Program header word 2)"),
             ("INSTR_COUNT", 32, "RO", "instructions executed by the last run")]
    regs += [("CYCLES", 64, "RO", "cycles from start to done"),
             ("STALL_CYCLES", 64, "RO", "cycles the datapath waited for DDR"),
             ("DDR_RD_BYTES", 64, "RO", "bytes read from DDR"),
             ("DDR_WR_BYTES", 64, "RO", "bytes written to DDR")]
    regs += [(f"OP_CYCLES_{op.upper()}", 64, "RO", f"cycles spent in `{op}` instructions")
             for op, _ in sorted(isa.OPCODES.items(), key=lambda kv: kv[1])]
    return regs


def registers() -> list[Register]:
    """Every 32-bit register with its byte offset; a 64-bit value is 8-byte aligned, low word first."""
    out: list[Register] = []
    off = 0
    for name, width, access, doc in _layout():
        if width == 64:
            off = (off + 7) // 8 * 8
            out.append(Register(name + "_LO", off, access, doc + ", bits 31:0", 64))
            out.append(Register(name + "_HI", off + 4, access, doc + ", bits 63:32", 64))
            off += 8
        else:
            out.append(Register(name, off, access, doc))
            off += 4
    return out


def map_bytes() -> int:
    r = registers()[-1]
    return r.offset + 4


def hw_hash32(hw: HwConfig) -> int:
    """What HW_HASH reads: the first four bytes of the digest as the little-endian header word 2."""
    return int.from_bytes(bytes.fromhex(hw.hash())[:4], "little")


def ctrl_bits() -> list[tuple[str, int, str]]:
    return [(n, 1 << b, d) for n, b, d in CTRL_BITS]


def _digest() -> str:
    return hashlib.sha256(repr([asdict(r) for r in registers()]).encode()).hexdigest()[:16]


def _padded(items: list[dict], key: str, width: int) -> list[dict]:
    return [{**it, "pad": max(1, width - len(it[key]))} for it in items]


def _context(hw: HwConfig) -> dict:
    regs = [asdict(r) for r in registers()]
    col = max(len(r["name"]) for r in regs) + 2
    bits = [{"name": n, "value": v, "doc": d} for n, v, d in ctrl_bits()]
    size = map_bytes()
    return {"registers": _padded(regs, "name", col), "bits": _padded(bits, "name", col), "hash": hw.hash(),
            "hash32": hw_hash32(hw), "digest": _digest(), "size": size,
            "addr_bits": max(1, (size - 1).bit_length())}


def render_regmap_json(hw: HwConfig) -> str:
    data = {"format": "m3vit-regmap-1", "digest": _digest(), "hw_hash": hw.hash(), "hw_hash32": hw_hash32(hw),
            "bytes": map_bytes(), "ctrl_bits": {n: v for n, v, _ in ctrl_bits()},
            "registers": [asdict(r) for r in registers()]}
    return json.dumps(data, sort_keys=True, indent=1) + "\n"


def render_regmap_header(hw: HwConfig) -> str:
    return _env.get_template("m3v_regmap.h.j2").render(**_context(hw))


def render_regmap_svh(hw: HwConfig) -> str:
    return _env.get_template("m3v_regmap.svh.j2").render(**_context(hw))


def render_regmap_markdown(hw: HwConfig | None = None) -> str:
    """The register table (independent of the configuration but for HW_HASH's value)."""
    return _env.get_template("regmap.md.j2").render(registers=[asdict(r) for r in registers()])


def _isa_context() -> dict:
    consts = [{"name": n, "value": v, "comment": c} for n, v, c in isa.c_constants()]
    col = max(len(c["name"]) + len(str(c["value"])) for c in consts) + 2
    return {"digest": isa.encoding_digest(),
            "constants": [{**c, "pad": max(1, col - len(c["name"]) - len(str(c["value"])))} for c in consts]}


def render_isa_header() -> str:
    return _env.get_template("m3v_isa.h.j2").render(**_isa_context())


def render_isa_svh() -> str:
    return _env.get_template("m3v_isa.svh.j2").render(**_isa_context())


def write_headers(out_dir: str | Path, hw: HwConfig) -> list[Path]:
    """m3v_isa.h, m3v_isa.svh, m3v_regmap.h and m3v_regmap.svh into ``out_dir`` (created); a file
    is rewritten only when its bytes change, so build caches keyed on mtimes stay valid."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    texts = dict(zip(HEADER_NAMES, (render_isa_header(), render_isa_svh(), render_regmap_header(hw),
                                    render_regmap_svh(hw))))
    out = []
    for name, text in texts.items():
        p = d / name
        if not p.is_file() or p.read_text() != text:
            p.write_text(text)
        out.append(p)
    return out
