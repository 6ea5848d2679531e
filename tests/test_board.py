"""The board files of a build (rtl_sim/board): deterministic, sized by hw.json, and consistent.

Vivado is not available here, so vivado_bd.tcl is executed by a plain Tcl interpreter against a
model of the block-design commands it uses: cells know their pins (the PS's HP ports exist only
when enabled, a SmartConnect has NUM_SI slave ports, the RTL accelerator has the ports its
generated Verilog wrapper declares), and every net, interface connection and address
assignment is recorded and checked. The wrapper itself is linted by Verilator with the RTL.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from m3vit.hls import project
from m3vit.rtl_sim import board
from m3vit.rtl_sim.hwconfig import HwConfig

tkinter = pytest.importorskip("tkinter")

# A model of the Vivado commands vivado_bd.tcl calls. Cells: ::type($cell), ::cfg($cell,$key);
# the log: ::nets (lists of pins), ::intf (pairs), ::addr (target space, segment, offset),
# ::calls (command names in order).
VIVADO_MODEL = r"""
set ::nets {}
set ::intf {}
set ::addr {}
set ::calls {}
array set ::type {}
array set ::cfg {}
proc called {name} { lappend ::calls $name }
foreach c {create_project current_project update_ip_catalog current_fileset update_compile_order
           create_bd_design validate_bd_design save_bd_design launch_runs wait_on_run open_run
           write_hw_platform} {
    proc $c {args} "called $c; return {}"
}
proc add_files {args} { called add_files; foreach f [lindex $args end] { if {![file exists $f]} { error "add_files: no $f" } } }
proc get_files {pattern} { return $pattern }
proc get_runs {name} { return $name }
proc get_board_parts {args} { return $::board_parts }
proc get_ipdefs {args} {
    set pat [lindex $args end]
    if {[string match *m3v_top* $pat]} { return [expr {$::ip_exported ? "xilinx.com:hls:m3v_top:1.0" : ""}] }
    regexp {xilinx.com:ip:([a-z_]+):} $pat -> name
    return [list xilinx.com:ip:${name}:1.0 xilinx.com:ip:${name}:1.1]
}
proc set_property {args} {
    if {[lindex $args 0] eq "-dict"} {
        foreach {k v} [lindex $args 1] { set ::cfg([lindex $args 2],$k) $v }
    } else {
        set ::cfg([lindex $args 2],[lindex $args 0]) [lindex $args 1]
    }
}
proc get_property {name obj} {
    switch -- $name { PROGRESS { return 100% } STATS.WNS { return 0.125 } default { error "get_property $name" } }
}
proc apply_bd_automation {args} { called apply_bd_automation; set ::cfg([lindex $args end],preset) 1 }
proc make_wrapper {args} {
    set f $::here/vivado/m3v_zcu104/m3v_wrapper.v
    file mkdir [file dirname $f]
    close [open $f w]
    return $f
}
proc create_bd_cell {args} {
    set opts [lrange $args 0 end-1]
    set name /[lindex $args end]
    set kind [dict get $opts -type]
    if {$kind eq "module"} {
        set ::type($name) module:[dict get $opts -reference]
    } else {
        regexp {^[^:]+:[^:]+:([^:]+):} [dict get $opts -vlnv] -> ::type($name)
    }
    return $name
}
proc cfg {cell key {default 0}} {
    if {[info exists ::cfg($cell,CONFIG.$key)]} { return $::cfg($cell,CONFIG.$key) }
    return $default
}
proc pins_of {cell} {
    set t $::type($cell)
    switch -glob -- $t {
        zynq_ultra_ps_e {
            set p {pl_clk0 pl_resetn0 pl_ps_irq0 Data}
            if {[cfg $cell PSU__USE__M_AXI_GP0]} { lappend p M_AXI_HPM0_FPD maxihpm0_fpd_aclk }
            for {set i 0} {$i < 4} {incr i} {
                if {[cfg $cell PSU__USE__S_AXI_GP[expr {$i + 2}]]} { lappend p S_AXI_HP${i}_FPD saxihp${i}_fpd_aclk }
            }
            return $p
        }
        proc_sys_reset { return {slowest_sync_clk ext_reset_in peripheral_aresetn interconnect_aresetn} }
        smartconnect {
            set p {aclk aresetn}
            for {set i 0} {$i < [cfg $cell NUM_SI 1]} {incr i} { lappend p [format S%02d_AXI $i] }
            for {set i 0} {$i < [cfg $cell NUM_MI 1]} {incr i} { lappend p [format M%02d_AXI $i] }
            return $p
        }
        m3v_top { return [concat {ap_clk ap_rst_n interrupt s_axi_control} $::hls_masters] }
        module:* { return $::rtl_pins }
    }
    error "no pins for $t"
}
proc pin {path} {
    set cell [file dirname $path]
    set name [file tail $path]
    if {![info exists ::type($cell)]} { error "no cell $cell" }
    if {[lsearch -exact [pins_of $cell] $name] < 0} { error "cell $cell ($::type($cell)) has no pin $name" }
    return $path
}
proc get_bd_pins {path} { return [pin $path] }
proc get_bd_intf_pins {path} { return [pin $path] }
proc connect_bd_net {args} { lappend ::nets $args }
proc connect_bd_intf_net {a b} { lappend ::intf [list $a $b] }
proc get_bd_addr_spaces {args} {
    if {[lindex $args 0] eq "-of_objects"} { return [lindex $args 1]/space }
    return [pin [lindex $args 0]]
}
proc get_bd_addr_segs {args} {
    if {[lindex $args 0] eq "-of_objects"} { return [lindex $args 1]/reg0 }
    set pat [lindex $args end]
    if {![regexp {^(.*)/SAXIGP([0-9])/HP([0-9])_DDR_LOW$} $pat -> cell gp hp]} { error "get_bd_addr_segs $pat" }
    if {$gp != $hp + 2 || ![cfg $cell PSU__USE__S_AXI_GP$gp]} { return {} }
    return $pat
}
proc assign_bd_address {args} {
    set offset {}
    set range {}
    set rest {}
    for {set i 0} {$i < [llength $args]} {incr i} {
        switch -- [lindex $args $i] {
            -offset { set offset [lindex $args [incr i]] }
            -range { set range [lindex $args [incr i]] }
            -target_address_space { set space [lindex $args [incr i]] }
            default { lappend rest [lindex $args $i] }
        }
    }
    lappend ::addr [list $space [join $rest] $offset $range]
}
proc exit {args} { lappend ::calls exit; return -code return }
"""


def _wrapper_ports(text: str) -> list[str]:
    """Interface and signal names of m3v_accel_bd as Vivado would infer them from the attributes."""
    names = set(re.findall(r'X_INTERFACE_INFO = "xilinx.com:interface:aximm:1.0 (\w+) ', text))
    names |= set(re.findall(r'X_INTERFACE_INFO = "xilinx.com:signal:\w+:1.0 (\w+) ', text))
    return sorted(names)


def _run_tcl(folder, source: str, stop: str, hls_masters: list[str], board_parts: str = "xilinx.com:zcu104:part0:1.1",
             ip_exported: bool = True):
    tcl = tkinter.Tcl()
    tcl.eval(VIVADO_MODEL)
    tcl.setvar("here", str(folder))
    tcl.setvar("board_parts", board_parts)
    tcl.setvar("ip_exported", int(ip_exported))
    tcl.eval(f"set ::hls_masters [list {' '.join('m_axi_' + m for m in hls_masters)}]")
    tcl.eval(f"set ::rtl_pins [list {' '.join(_wrapper_ports((folder / board.WRAPPER_NAME).read_text()))}]")
    tcl.eval(f"set ::argv [list {source} {stop}]")
    tcl.eval(f"source {{{folder / board.TCL_NAME}}}")

    def lists(name):
        return [tuple(str(y) for y in tcl.splitlist(x)) for x in tcl.splitlist(tcl.getvar(name))]

    cfg = {k: str(tcl.getvar(f"::cfg({k})")) for k in tcl.splitlist(tcl.eval("array names ::cfg"))}
    types = {k: str(tcl.getvar(f"::type({k})")) for k in tcl.splitlist(tcl.eval("array names ::type"))}
    return dict(nets=lists("::nets"), intf=lists("::intf"), addr=lists("::addr"), cfg=cfg, types=types,
                calls=[str(c) for c in tcl.splitlist(tcl.getvar("::calls"))])


def _emit(tmp_path, hw, name="hls"):
    d = project.emit_project(tmp_path / name, hw)
    (d / "m3v_prj" / "sol1" / "impl" / "ip").mkdir(parents=True)   # where run_hls.tcl exports the IP
    return d


def _hls_bundles(hw) -> list[str]:
    return sorted({p["bundle"] for p in project.axi_ports(hw)})


def test_files_are_emitted_and_deterministic(tmp_path):
    hw = HwConfig.default()
    a = project.emit_project(tmp_path / "a", hw)
    b = project.emit_project(tmp_path / "b", hw)
    for name in board.board_files(hw, _hls_bundles(hw)):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tcl = (a / board.TCL_NAME).read_text()
    assert str(tmp_path) not in tcl and "xczu7ev-ffvc1156-2-e" in tcl
    assert "CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ {300}" in tcl
    # the RTL travels with the project: every source file, in order
    bundle = (a / board.RTL_BUNDLE).read_text()
    from m3vit.rtl_sim.runner import rtl_sources
    for src in rtl_sources():
        assert f"// ==== {src.name}\n" in bundle
    assert re.findall(r"^module (\w+)", bundle, re.M) == [p.stem for p in rtl_sources()]
    # another clock changes the PL clock request and nothing but the configuration-derived text
    fast = board.board_files(hw.replace(clock_mhz=250), _hls_bundles(hw))[board.TCL_NAME]
    assert "CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ {250}" in fast and "{300}" not in fast


@pytest.mark.parametrize("ports", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("source", ["hls", "rtl"])
def test_block_design_follows_hw_json(tmp_path, ports, source):
    hw = HwConfig.default().replace(axi_ports=ports, clock_mhz=250 if ports == 3 else 300)
    d = _emit(tmp_path, hw)
    hls = _hls_bundles(hw)
    if source == "rtl" and ports < board.RTL_MIN_PORTS:
        with pytest.raises(tkinter.TclError, match="use the HLS variant"):
            _run_tcl(d, source, "bd", hls)
        return
    r = _run_tcl(d, source, "bd", hls)
    hp = min(ports, board.HP_PORTS)
    ps, acc = "/zynq_ultra_ps_e_0", "/m3v_accel_0"
    cfg = r["cfg"]
    assert r["types"][acc] == ("m3v_top" if source == "hls" else "module:m3v_accel_bd")
    # PS: the board preset, HPM0 FPD, exactly the HP ports in use at the AXI width, the PL clock
    assert cfg[f"{ps},preset"] == "1" and cfg[f"{ps},CONFIG.PSU__USE__M_AXI_GP0"] == "1"
    for i in range(4):
        assert cfg[f"{ps},CONFIG.PSU__USE__S_AXI_GP{i + 2}"] == ("1" if i < hp else "0")
        if i < hp:
            assert cfg[f"{ps},CONFIG.PSU__SAXIGP{i + 2}__DATA_WIDTH"] == str(hw.axi_width_bits)
    assert cfg[f"{ps},CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ"] == str(hw.clock_mhz)
    assert cfg[f"{ps},CONFIG.PSU__FPGA_PL0_ENABLE"] == "1" and cfg[f"{ps},CONFIG.PSU__USE__IRQ0"] == "1"
    # one clock for everything, the reset from proc_sys_reset, the interrupt on pl_ps_irq0
    clocked = set()
    for net in r["nets"]:
        if f"{ps}/pl_clk0" in net:
            clocked |= set(net)
    smcs = sorted(c for c, t in r["types"].items() if t == "smartconnect")
    want = {f"{ps}/pl_clk0", f"{ps}/maxihpm0_fpd_aclk", "/proc_sys_reset_0/slowest_sync_clk", f"{acc}/ap_clk"}
    want |= {f"{ps}/saxihp{i}_fpd_aclk" for i in range(hp)} | {f"{s}/aclk" for s in smcs}
    assert clocked == want
    assert (f"{acc}/interrupt", f"{ps}/pl_ps_irq0") in r["nets"]
    assert ("/proc_sys_reset_0/peripheral_aresetn", f"{acc}/ap_rst_n") in r["nets"]
    # data path: every master port through a SmartConnect to one HP port; every slave port of each
    # SmartConnect used once; every HP port in use fed
    masters = [f"m_axi_{m}" for m in (hls if source == "hls" else [f"gmem{i}" for i in range(ports)])]
    to_smc = {a.rsplit("/", 1)[1]: b for a, b in r["intf"] if a.startswith(acc + "/m_axi_")}
    assert sorted(to_smc) == sorted(masters)
    assert len(set(to_smc.values())) == len(masters)
    smc_to_hp = {a.rsplit("/", 1)[0]: b for a, b in r["intf"] if b.startswith(f"{ps}/S_AXI_HP")}
    assert sorted(smc_to_hp.values()) == [f"{ps}/S_AXI_HP{i}_FPD" for i in range(hp)]
    for smc in smcs:
        if smc == "/smc_ctrl":
            continue
        used = sorted(v.rsplit("/", 1)[1] for v in to_smc.values() if v.startswith(smc + "/"))
        assert used == [f"S{i:02d}_AXI" for i in range(int(cfg[f"{smc},CONFIG.NUM_SI"]))]
    assert (f"{ps}/M_AXI_HPM0_FPD", "/smc_ctrl/S00_AXI") in r["intf"]
    assert ("/smc_ctrl/M00_AXI", f"{acc}/s_axi_control") in r["intf"]
    # addresses: the registers in the HPM0 FPD window, each master onto its HP port's DDR_LOW
    assert (f"{ps}/Data", f"{acc}/s_axi_control/reg0", "0xA0000000", "64K") in r["addr"]
    for m in masters:
        smc = to_smc[m].rsplit("/", 1)[0]
        hp_port = smc_to_hp[smc].split("S_AXI_HP")[1][0]
        assert (f"{acc}/{m}/space", f"{ps}/SAXIGP{int(hp_port) + 2}/HP{hp_port}_DDR_LOW", "", "") in r["addr"]
    assert r["calls"][-1] == "exit" and "launch_runs" not in r["calls"]


def test_stops_and_refusals(tmp_path):
    hw = HwConfig.default()
    d = _emit(tmp_path, hw)
    hls = _hls_bundles(hw)
    r = _run_tcl(d, "rtl", "bd", hls)
    assert "validate_bd_design" in r["calls"] and "launch_runs" not in r["calls"]
    # without the board files the PS keeps its defaults (no preset), and the script says so
    r = _run_tcl(d, "hls", "bd", hls, board_parts="")
    assert "/zynq_ultra_ps_e_0,preset" not in r["cfg"]
    with pytest.raises(tkinter.TclError, match="holds no IP named m3v_top"):
        _run_tcl(d, "hls", "bd", hls, ip_exported=False)
    shutil.rmtree(d / "m3v_prj")
    with pytest.raises(tkinter.TclError, match="no exported HLS IP"):
        _run_tcl(d, "hls", "bd", hls)
    with pytest.raises(tkinter.TclError, match="unknown argument 'vhdl'"):
        _run_tcl(d, "vhdl", "bd", hls)


def test_hand_off_copies_bit_and_hwh(tmp_path):
    d = _emit(tmp_path, HwConfig.default())
    proj = d / "vivado" / "m3v_zcu104"
    (proj / "m3v_zcu104.runs" / "impl_1").mkdir(parents=True)
    (proj / "m3v_zcu104.runs" / "impl_1" / "m3v_wrapper.bit").write_bytes(b"bit")
    hwh = proj / "m3v_zcu104.gen" / "sources_1" / "bd" / "m3v" / "hw_handoff"
    hwh.mkdir(parents=True)
    (hwh / "m3v.hwh").write_text("hwh")
    r = _run_tcl(d, "hls", "bit", _hls_bundles(HwConfig.default()))
    calls = r["calls"]
    assert calls.index("validate_bd_design") < calls.index("launch_runs") < calls.index("write_hw_platform")
    assert (d / "vivado" / "m3v.bit").read_bytes() == b"bit" and (d / "vivado" / "m3v.hwh").read_text() == "hwh"


@pytest.mark.parametrize("ports,width", [(4, 128), (4, 64)])
def test_wrapper_lints_with_the_rtl(tmp_path, ports, width):
    """m3v_accel_bd.v plus the bundled RTL and headers: Verilator -Wall clean with the wrapper as
    top, read as plain Verilog by yosys for the default configuration."""
    from m3vit.rtl_sim.runner import verilator_env

    hw = HwConfig.default().replace(axi_ports=ports, axi_width_bits=width)
    files = board.board_files(hw, _hls_bundles(hw))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    wrapper = files[board.WRAPPER_NAME]
    assert len(re.findall(r"XIL_INTERFACENAME m_axi_gmem\d+, PROTOCOL AXI4, DATA_WIDTH (\d+)", wrapper)) == ports
    assert set(re.findall(r"DATA_WIDTH (\d+), ADDR_WIDTH 32", wrapper)) == {str(width)}
    with verilator_env() as root:
        # one file holding every module is the bundle's purpose: DECLFILENAME does not apply
        res = subprocess.run([str(root / "bin" / "verilator"), "--lint-only", "-Wall", "-Wno-DECLFILENAME",
                              f"-I{tmp_path}",
                              "--top-module", board.RTL_TOP, str(tmp_path / board.WRAPPER_NAME),
                              str(tmp_path / board.RTL_BUNDLE)], capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "%Warning" not in log and "%Error" not in log, log
    if ports == 4 and shutil.which("yosys"):
        res = subprocess.run(["yosys", "-q", "-p", f"read_verilog -sv -I{tmp_path} {board.RTL_BUNDLE}; "
                              f"read_verilog {board.WRAPPER_NAME}; hierarchy -check -top {board.RTL_TOP}"],
                             capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0 and "ERROR" not in res.stdout + res.stderr, res.stdout + res.stderr
