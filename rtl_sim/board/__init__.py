"""The board side of a hardware build: a Vivado script for the ZCU104 system around the accelerator.

`board_files(hw, hls_bundles)` returns name -> contents of the files `m3vit.hls.project` adds to
the emitted project folder:

* ``vivado_bd.tcl`` — project, block design (Zynq UltraScale+ PS, the accelerator as the exported
  HLS IP or as the RTL top, SmartConnects, reset, interrupt), addresses, validation, wrapper,
  synthesis / implementation / bitstream, and the .bit / .hwh / .xsa hand-off;
* ``m3v_accel_bd.v`` — a Verilog wrapper of the RTL top with the HLS IP's interface names (a block
  design module reference needs a Verilog or VHDL top);
* ``m3v_accel_rtl.sv`` — every file of rtl_sim/rtl in one file, with the generated headers
  (``m3v_hw_config.svh``, ``m3v_isa.svh``, ``m3v_regmap.svh``, ``m3v_accel_cfg.svh``), the static
  ``m3v_mem.svh`` and the
  contract's ``.mem`` tables next to it, so the folder builds without this repository.

Output is a pure function of the inputs (no dates, no absolute paths). None of it has been run
against Vivado (docs/bringup.md).
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from m3vit.errors import UsageError

__all__ = ["HP_PORTS", "CTRL_BASE", "CTRL_RANGE", "RTL_TOP", "RTL_MIN_PORTS", "RTL_BUNDLE", "TCL_NAME", "WRAPPER_NAME",
           "master_ports", "render_wrapper", "render_tcl", "rtl_bundle", "board_files"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
HP_PORTS = 4                    # S_AXI_HP0..3_FPD of the Zynq UltraScale+ PS
CTRL_BASE = 0xA000_0000         # the start of the HPM0 FPD window
CTRL_RANGE = "64K"
RTL_TOP = "m3v_accel_bd"
RTL_BUNDLE = "m3v_accel_rtl.sv"
TCL_NAME = "vivado_bd.tcl"
WRAPPER_NAME = "m3v_accel_bd.v"
# the AXI geometry of m3v_accel the wrapper instantiates (its parameter defaults)
ADDR_W, ID_W, MAX_OUT, MAX_BURST = 32, 4, 8, 16
# m3v_accel drives three master ports (Program and operand B, operand A, results): a narrower
# hw.json gets the HLS variant only
RTL_MIN_PORTS = 4

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
)


def _check(hw) -> int:
    n = int(hw.axi_ports)
    if n < 1:
        raise UsageError(f"hw.json axi_ports is {n}; the accelerator needs at least one AXI master port")
    if int(hw.axi_width_bits) not in (32, 64, 128):
        raise UsageError(f"hw.json axi_width_bits is {hw.axi_width_bits}; the ZCU104's HP ports take 32, 64 or 128")
    return n


def master_ports(names: list[str]) -> list[dict]:
    """Master interfaces (gmem names) -> the HP port each goes to: one each while they last, then
    shared round-robin."""
    return [dict(name=n, hp=i % HP_PORTS) for i, n in enumerate(names)]


def _law() -> int:
    from m3vit.compiler import regmap

    return max(1, (regmap.map_bytes() - 1).bit_length())


def _signal(name: str, direction: str, width: int, packed: bool = True, const: str = "") -> dict:
    return dict(name=name, dir=direction, width=width, packed=packed, const=const,
                range=f"[{width - 1}:0]" if width > 1 else "")


def render_wrapper(hw) -> str:
    """m3v_accel_bd.v: Verilog-2001 ports named as the HLS IP's, around m3v_accel."""
    ports = _check(hw)
    dw, law = int(hw.axi_width_bits), _law()
    lite = [_signal("awvalid", "input", 1), _signal("awready", "output", 1), _signal("awaddr", "input", law),
            _signal("wvalid", "input", 1), _signal("wready", "output", 1), _signal("wdata", "input", 32),
            _signal("wstrb", "input", 4), _signal("bvalid", "output", 1), _signal("bready", "input", 1),
            _signal("bresp", "output", 2), _signal("arvalid", "input", 1), _signal("arready", "output", 1),
            _signal("araddr", "input", law), _signal("rvalid", "output", 1), _signal("rready", "input", 1),
            _signal("rdata", "output", 32), _signal("rresp", "output", 2)]
    # AxCACHE 0011 (normal, non-cacheable, bufferable), AxPROT 000 (data, secure, unprivileged)
    master = []
    for ch in ("ar", "aw"):
        master += [_signal(f"{ch}valid", "output", 1), _signal(f"{ch}ready", "input", 1),
                   _signal(f"{ch}addr", "output", ADDR_W), _signal(f"{ch}len", "output", 8),
                   _signal(f"{ch}size", "output", 3), _signal(f"{ch}burst", "output", 2),
                   _signal(f"{ch}id", "output", ID_W),
                   _signal(f"{ch}cache", "output", 4, False, "4'b0011"),
                   _signal(f"{ch}prot", "output", 3, False, "3'b000")]
        if ch == "ar":
            master += [_signal("rvalid", "input", 1), _signal("rready", "output", 1), _signal("rdata", "input", dw),
                       _signal("rid", "input", ID_W), _signal("rlast", "input", 1), _signal("rresp", "input", 2)]
    master += [_signal("wvalid", "output", 1), _signal("wready", "input", 1), _signal("wdata", "output", dw),
               _signal("wstrb", "output", dw // 8), _signal("wlast", "output", 1), _signal("bvalid", "input", 1),
               _signal("bready", "output", 1), _signal("bid", "input", ID_W), _signal("bresp", "input", 2)]
    return _env.get_template("m3v_accel_bd.v.j2").render(
        hw_hash=hw.hash(), ports=ports, dw=dw, aw=ADDR_W, idw=ID_W, max_out=MAX_OUT, max_burst=MAX_BURST, law=law,
        lite=lite, master=master)


def rtl_bundle() -> str:
    """Every RTL source in one file, in name order, each under a banner naming it."""
    from m3vit.rtl_sim.runner import rtl_sources

    parts = ["// m3v_accel_rtl.sv: the accelerator RTL (rtl_sim/rtl/*.sv of m3vit), one file per section.\n"
             "// Generated by m3vit.hls.project; do not edit.\n"]
    for src in rtl_sources():
        text = src.read_text()
        parts.append(f"\n// ==== {src.name}\n{text if text.endswith(chr(10)) else text + chr(10)}")
    return "".join(parts)


def _rtl_headers(hw) -> dict[str, str]:
    from m3vit.compiler.regmap import render_isa_svh, render_regmap_svh
    from m3vit.rtl_sim.emit import SVH_NAME, mem_tables, render_mem, render_svh
    from m3vit.rtl_sim.runner import render_accel_cfg

    files = {SVH_NAME: render_svh(hw), "m3v_isa.svh": render_isa_svh(), "m3v_regmap.svh": render_regmap_svh(hw),
             "m3v_accel_cfg.svh": render_accel_cfg(hw)}
    from m3vit.rtl_sim.runner import RTL_DIR

    for src in sorted(RTL_DIR.glob("*.svh")):   # the static headers (m3v_mem.svh)
        files[src.name] = src.read_text()
    for name, (values, width) in mem_tables().items():
        files[name] = render_mem(name, values, width)
    return files


def render_tcl(hw, hls_bundles: list[str], rtl_files: list[str], hls_top: str = "m3v_top") -> str:
    ports = _check(hw)
    rtl_masters = master_ports([f"gmem{i}" for i in range(ports)])
    hls_masters = master_ports(list(hls_bundles))
    hp_ports = min(ports, HP_PORTS)
    if max(m["hp"] for m in hls_masters) + 1 != hp_ports:
        raise UsageError(f"the HLS kernel has {len(hls_masters)} master ports, the RTL top {ports}: "
                         "they would not use the same HP ports")
    return _env.get_template("vivado_bd.tcl.j2").render(
        board=hw.board, part=hw.part, clock_mhz=int(hw.clock_mhz) if float(hw.clock_mhz).is_integer()
        else hw.clock_mhz, axi_width=int(hw.axi_width_bits), hp_ports=hp_ports, hw_hash=hw.hash(),
        ctrl_base=CTRL_BASE, ctrl_range=CTRL_RANGE, hls_top=hls_top, rtl_top=RTL_TOP, hls_masters=hls_masters,
        rtl_masters=rtl_masters, rtl_files=rtl_files, ports=ports, rtl_min_ports=RTL_MIN_PORTS)


def board_files(hw, hls_bundles: list[str], hls_top: str = "m3v_top") -> dict[str, str]:
    """name -> contents of the board files of one hardware build."""
    files = {WRAPPER_NAME: render_wrapper(hw), RTL_BUNDLE: rtl_bundle(), **_rtl_headers(hw)}
    rtl_files = [WRAPPER_NAME, RTL_BUNDLE] + sorted(n for n in files if n not in (WRAPPER_NAME, RTL_BUNDLE))
    files[TCL_NAME] = render_tcl(hw, hls_bundles, rtl_files, hls_top)
    return files
