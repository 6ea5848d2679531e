"""Generated HDL inputs: the configuration header `m3v_hw_config.svh` and the contract's LUT .mem files.

Output is a pure function of its inputs (no dates, no paths), so identical configurations give
byte-identical files, and files are only rewritten when their bytes change (keeping build caches
valid).
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from m3vit.rtl_sim.hwconfig import PATCH_BAND_BYTES, HwConfig

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


def contract_params() -> dict[str, int]:
    """Numeric-contract constants the nonlinear units need (docs/numerics.md section 3)."""
    from m3vit.compiler.numerics import CONTRACT, gelu_lut

    c = CONTRACT
    _, gelu = gelu_lut(c)
    return {
        "GELU_H": c.gelu_step_bits,
        "GELU_FI": c.gelu_interp_bits,
        "GELU_FD": c.gelu_frac,
        "GELU_N": c.gelu_entries,
        "GELU_LUT_W": gelu["value_bits"],
        "EXP_C": c.exp_l2e_frac,
        "EXP_L": c.exp_lut_bits,
        "EXP_P": c.exp_frac,
        "EXP_L2E": c.l2e,
        "RECIP_M": c.recip_mant_frac,
        "RECIP_R": c.recip_frac,
        "RECIP_LR": c.recip_lut_bits,
        "MAX_KEYS": c.max_keys,
        "GATE_BITS": c.gate_bits,
        "GATE_FRAC": c.gate_frac,
        "RSQRT_M": c.rsqrt_mant_frac,
        "RSQRT_R": c.rsqrt_frac,
        "RSQRT_LS": c.rsqrt_lut_bits,
        "NORM_W": c.norm_bits,
        "NORM_F": c.norm_frac,
    }


def x_width(hw: HwConfig) -> int:
    """Width of the compute unit's x operand: an activation, or an attention probability of the
    contract (exp_int gives 0..2^exp_frac, exp_frac + 1 bits unsigned, so exp_frac + 2 signed)."""
    from m3vit.compiler.numerics import CONTRACT

    return max(hw.act_bits, CONTRACT.exp_frac + 2)


def render_svh(hw: HwConfig) -> str:
    # the limits size the gate unit (experts, top-k, token counters and queue RAMs), the
    # LayerNorm row buffer (max_dim) and the GEMM engine's K extent (max_dim, max_hidden); the
    # buffer sizes (bytes) size the attention engine's score buffer and its per-head Q / K / V buffers,
    # the GEMM engine's weight store, and patchify's band buffer
    limits = {"MAX_EXPERTS": hw.limits.max_experts, "MAX_K": hw.limits.max_k,
              "MAX_TOKENS": hw.limits.max_tokens, "MAX_DIM": hw.limits.max_dim,
              "MAX_HIDDEN": hw.limits.max_hidden,
              "BUF_SCORES": hw.buffers.scores, "BUF_ACTIVATIONS": hw.buffers.activations,
              "BUF_WEIGHTS": hw.buffers.weights,
              "PATCH_BAND_BYTES": PATCH_BAND_BYTES}
    params = sorted({**hw.rtl_params(), **limits, "X_W": x_width(hw)}.items())
    contract = sorted(contract_params().items())
    return _env.get_template("hw_config.svh.j2").render(hw=hw, hash=hw.hash(), params=params,
                                                         contract=contract)


def mem_tables() -> dict[str, tuple[list[int], int]]:
    """The contract's lookup tables as $readmemh files: name -> (values, width in bits)."""
    from m3vit.compiler.numerics import exp2_lut, gelu_lut, recip_lut, rsqrt_lut

    lut, params = gelu_lut()
    tables = {"m3v_gelu_lut.mem": ([int(v) for v in lut], params["value_bits"])}
    for name, gen in (("m3v_exp2_lut.mem", exp2_lut), ("m3v_recip_lut.mem", recip_lut),
                      ("m3v_rsqrt_lut.mem", rsqrt_lut)):
        lut, params = gen()
        tables[name] = ([int(v) for v in lut], params["value_bits"])
    return tables


def render_mem(name: str, values: list[int], width: int) -> str:
    return _env.get_template("table.mem.j2").render(name=name, values=values, width=width,
                                                    digits=(width + 3) // 4)


def emit_mems(out_dir: str | Path) -> list[Path]:
    """Write every contract table as a .mem file into out_dir; returns their paths."""
    paths = []
    for name, (values, width) in mem_tables().items():
        if any(v < 0 or v >= 1 << width for v in values):
            raise ValueError(f"{name}: a value does not fit {width} unsigned bits")
        path = Path(out_dir) / name
        write_if_changed(path, render_mem(name, values, width))
        paths.append(path)
    return paths


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
    emit_mems(out_dir)   # the tables travel with the header: every build and yosys run reads both
    return path
