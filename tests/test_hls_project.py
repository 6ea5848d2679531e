"""The generated Vitis HLS project: deterministic, self-contained, interfaces from hw.json and
the register map, a Vitis script for the ZCU104 part at the configured clock, and kernel sources
in the synthesizable subset (the same linter as the header library's)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from m3vit.compiler import regmap
from m3vit.hls import project
from m3vit.rtl_sim.hwconfig import HwConfig

from test_hls_ops import lint_kernel_source

KERNEL_SOURCES = ("m3v_top.cpp", "m3v_top.h", "m3v_decoder.h", "m3v_build.h", "m3v_isa.h", "m3v_regmap.h",
                  "m3v_depth.h", "m3v_config.h", "m3v_tables.h")


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    return project.emit_project(tmp_path_factory.mktemp("proj") / "hls", HwConfig.default())


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_output_is_deterministic_and_rewritten_only_on_change(proj, tmp_path):
    other = project.emit_project(tmp_path / "again", HwConfig.default())
    assert _files(proj) == _files(other)
    stamps = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    project.emit_project(other, HwConfig.default())
    assert stamps == {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    # another configuration changes the generated headers, and the C-sim hash with them
    narrow = project.emit_project(tmp_path / "narrow", HwConfig.default().with_parallel("16x16"))
    assert _files(narrow)["m3v_config.h"] != _files(proj)["m3v_config.h"]
    assert project.csim_digest(narrow) != project.csim_digest(proj)


def test_project_is_self_contained(proj):
    names = {p.name for p in proj.iterdir()}
    for name in ("m3v_top.cpp", "m3v_top.h", "m3v_tb.cpp", "run_hls.tcl", "README.md", "m3v_config.h",
                 "m3v_tables.h", "m3v_isa.h", "m3v_regmap.h", "m3v_decoder.h", "m3v_gemm.h"):
        assert name in names, name
    for p in proj.iterdir():
        if p.suffix in (".h", ".cpp"):
            for inc in re.findall(r'#include "([^"]+)"', p.read_text()):
                assert inc in names or inc.startswith("ap_"), f"{p.name} includes {inc}"
    readme = (proj / "README.md").read_text()
    for name in ("m3v_top.cpp", "m3v_top.h", "m3v_tb.cpp", "m3v_decoder.h", "m3v_config.h", "m3v_tables.h",
                 "m3v_isa.h", "m3v_regmap.h", "m3v_build.h", "m3v_depth.h", "tb_input.bin", "run_hls.tcl"):
        assert f"`{name}`" in readme, name


def _pragmas(text: str, kind: str) -> dict[str, dict[str, str]]:
    out = {}
    for m in re.finditer(rf"M3V_HLS\(interface {kind} ([^)]*)\)", text):
        kv = dict(item.split("=", 1) for item in m.group(1).split())
        out[kv["port"]] = kv
    return out


@pytest.mark.parametrize("ports", [1, 2, 3, 4, 6])
def test_m_axi_ports_follow_hw_json(ports, tmp_path):
    hw = HwConfig.default().replace(axi_ports=ports, axi_width_bits=64)
    top = project.project_files(hw)["m3v_top.cpp"]
    m = _pragmas(top, "m_axi")
    assert set(m) == {"prog", "wgt", "arena", "in", "out"}
    assert m["prog"]["bundle"] == m["wgt"]["bundle"] == "gmem0"
    acts = {m[p]["bundle"] for p in ("arena", "in", "out")}
    assert len({b["bundle"] for b in m.values()}) == min(ports, 4)
    if ports > 1:
        assert "gmem0" not in acts  # program and weights never share a port with activations
    assert all(b["offset"] == "slave" for b in m.values())
    assert "ap_uint<AXI_W>" in project.render_build(hw) and "AXI_W = 64;" in project.render_build(hw)


def test_s_axilite_offsets_are_the_register_map(proj):
    regs = {r.name: r.offset for r in regmap.registers()}
    got = {port: int(kv["offset"], 16) for port, kv in _pragmas((proj / "m3v_top.cpp").read_text(),
                                                                 "s_axilite").items() if "offset" in kv}
    want = {"task": regs["TASK"], "prog": regs["PROG_LO"], "wgt": regs["WGT_LO"], "arena": regs["ARENA_LO"],
            "in": regs["IN_LO"], "out": regs["OUT_LO"], "status": regs["STATUS"], "hw_hash": regs["HW_HASH"],
            "instr_count": regs["INSTR_COUNT"]}
    assert got == want
    assert (proj / "m3v_regmap.h").read_text() == regmap.render_regmap_header(HwConfig.default())
    assert (proj / "m3v_isa.h").read_text() == regmap.render_isa_header()


def test_hw_hash_words_match_the_program_header(proj):
    hw = HwConfig.default()
    digest = bytes.fromhex(hw.hash())
    text = (proj / "m3v_build.h").read_text()
    words = [int(w, 16) for w in re.findall(r"i == \d \? 0x([0-9A-F]{8})u", text)]
    assert words == [int.from_bytes(digest[4 * i:4 * i + 4], "little") for i in range(8)]
    assert words[0] == regmap.hw_hash32(hw)


def test_vitis_script(proj):
    tcl = (proj / "run_hls.tcl").read_text()
    assert "set_part xczu7ev-ffvc1156-2-e" in tcl
    assert "create_clock -period 3.333" in tcl
    for step in ("csim_design", "csynth_design", "cosim_design", "export_design", "set_top m3v_top"):
        assert step in tcl, step
    hw = HwConfig.default().replace(clock_mhz=250)
    assert "create_clock -period 4.000" in project.project_files(hw)["run_hls.tcl"]


def test_kernel_sources_are_synthesizable_style(proj):
    errs = []
    for name in KERNEL_SOURCES:
        errs += lint_kernel_source(name, (proj / name).read_text())
    assert not errs, "\n".join(errs)
    dec = (proj / "m3v_decoder.h").read_text()
    # the decoder's own loops carry trip counts and its pipelines are marked
    assert dec.count("M3V_TRIPCOUNT(") >= 12 and dec.count("M3V_HLS(pipeline") >= 4
    # the linter notices what the kernel must not contain
    bad = dec.replace("ifield_t f[W];", "std::vector<int> v; ifield_t *f = new ifield_t[W];")
    found = "\n".join(lint_kernel_source("m3v_decoder.h", bad))
    assert "standard library" in found and "dynamic memory" in found
    loose = dec.replace("        M3V_TRIPCOUNT(1, MAX_INSTR)\n", "")
    assert "without M3V_TRIPCOUNT" in "\n".join(lint_kernel_source("m3v_decoder.h", loose))


def _syntax_errors(pdir: Path) -> str:
    from m3vit.hls.csim_ops import CXX, ap_types_dir
    res = subprocess.run(["nice", "-n", "10", CXX, "-std=c++14", "-fsyntax-only", "-isystem", str(ap_types_dir()),
                          "-I", str(pdir), str(pdir / "m3v_top.cpp")], capture_output=True, text=True)
    return res.stderr if res.returncode else ""


def test_on_chip_buffers_are_bounded_by_hw_json(proj, tmp_path):
    """The decoder's buffers are generated from hw.json's buffers and token_block; a hw.json whose
    buffers cannot hold one weight tile, or one key of a head, does not compile."""
    hw = HwConfig.default()
    b = project.decoder_buffers(hw)
    assert b["total"] <= hw.buffers.weights + hw.buffers.activations + hw.buffers.scores
    # the GEMM's weight ping-pong: two MAX_IN x P_OUT tiles of 16-bit weights
    max_in = max(hw.limits.max_dim, hw.limits.max_hidden)
    assert b["weights"] == 2 * -(-max_in // hw.p_in) * hw.p_in * hw.p_out * 2 <= hw.buffers.weights
    assert f"ONCHIP_BYTES = {b['total']};" in (proj / "m3v_build.h").read_text()
    cfg = (proj / "m3v_config.h").read_text()
    for name, v in (("TOKEN_BLOCK", hw.token_block), ("BUF_WEIGHTS", hw.buffers.weights),
                    ("BUF_ACTIVATIONS", hw.buffers.activations), ("BUF_SCORES", hw.buffers.scores)):
        assert re.search(rf"{name} = {v};", cfg), name
    # token_block and the buffers are part of the build
    other = project.emit_project(tmp_path / "tb8", hw.replace(token_block=8))
    assert project.csim_digest(other) != project.csim_digest(proj)
    assert not _syntax_errors(proj)
    small_w = project.emit_project(tmp_path / "w", hw.replace(buffers=dataclasses.replace(hw.buffers, weights=4096)))
    assert "exceeds buffers.weights" in _syntax_errors(small_w)
    small_a = project.emit_project(tmp_path / "a",
                                   hw.replace(buffers=dataclasses.replace(hw.buffers, activations=64 << 10)))
    assert "buffers.activations" in _syntax_errors(small_a)
