"""Generated HDL inputs: the configuration header `m3v_hw_config.svh` (and, later, LUT .mem files).

Output is a pure function of its inputs (no dates, no paths), so identical configurations give
byte-identical files, and files are only rewritten when their bytes change (keeping build caches
valid).
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from m3vit.rtl_sim.hwconfig import HwConfig

TEMPLATES = Path(__file__).with_name("templates")
SVH_NAME = "m3v_hw_config.svh"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
)


def render_svh(hw: HwConfig) -> str:
    params = sorted(hw.rtl_params().items())
    return _env.get_template("hw_config.svh.j2").render(hw=hw, hash=hw.hash(), params=params)


def write_if_changed(path: Path, text: str) -> bool:
    """Write text to path unless it already holds exactly that; True when written."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def emit_svh(hw: HwConfig, out_dir: str | Path) -> Path:
    """Write m3v_hw_config.svh for hw into out_dir (an include directory) and return its path."""
    path = Path(out_dir) / SVH_NAME
    write_if_changed(path, render_svh(hw))
    return path
