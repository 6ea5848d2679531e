"""Emit the generated headers of the HLS library: `m3v_tables.h` and `m3v_config.h`.

`m3v_tables.h` holds the numeric contract's constants (`CONTRACT`) and its four lookup tables,
taken from the generators `exp2_lut()`, `recip_lut()`, `rsqrt_lut()` and `gelu_lut()` of
`m3vit.compiler.numerics`: no table is typed by hand. `m3v_config.h` holds one hardware build's
parallelism, container widths and size limits, given as a plain dict with the keys of
`CONFIG_KEYS` (either flat or with the limits under "limits", as in hw.json).

Output is a pure function of the inputs (no dates, no paths): identical inputs give
byte-identical files, and `emit` rewrites a file only when its bytes change, so build caches
keyed on the header text stay valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import jinja2

from m3vit.compiler import numerics as nx
from m3vit.compiler.numerics import CONTRACT, Contract
from m3vit.errors import ConfigError

__all__ = ["CONFIG_KEYS", "TABLES_NAME", "CONFIG_NAME", "contract_constants", "table_specs",
           "normalise_config", "config_constants", "render_tables", "render_config", "emit"]

TEMPLATES = Path(__file__).with_name("templates")
TABLES_NAME = "m3v_tables.h"
CONFIG_NAME = "m3v_config.h"

# The hardware-config keys the HLS library needs (the subset of hw.json it reads).
CONFIG_KEYS = ("p_in", "p_out", "act_bits", "weight_bits", "acc_bits", "max_tokens", "max_dim",
               "max_hidden", "max_experts", "max_k", "max_heads")
# Optional keys that bound the decoder's on-chip buffers (hw.json's token_block and buffers.*);
# a config without them gets the defaults of the reference hw.json.
BUFFER_DEFAULTS = {"token_block": 32, "weights": 1_310_720, "activations": 2_097_152, "scores": 262_144}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
)

# One line of meaning per Contract field (the emitted header documents itself).
_FIELD_DOC = {
    "acc_bits": "GEMM / QK^T accumulator width (signed)",
    "max_keys": "longest attention row / widest LayerNorm the widths are sized for",
    "exp_l2e_frac": "C: fraction bits of L2E",
    "exp_lut_bits": "L: exp2 LUT index bits",
    "exp_frac": "P: fraction bits of exp values, exp(0) = 2^P",
    "recip_mant_frac": "M_r: fraction bits of the reciprocal mantissa in [1, 2)",
    "recip_lut_bits": "L_r: reciprocal seed LUT index bits",
    "recip_frac": "R_r: fraction bits of the reciprocal r",
    "rsqrt_mant_frac": "M_s: fraction bits of the rsqrt mantissa in [1, 4)",
    "rsqrt_lut_bits": "L_s: rsqrt seed fraction bits (3 * 2^L_s entries)",
    "rsqrt_frac": "R_s: fraction bits of the rsqrt r",
    "norm_bits": "W_n: LayerNorm normalised-value width",
    "norm_frac": "F_n: LayerNorm normalised-value fraction bits",
    "gelu_step_bits": "H: GELU table step 2^-H",
    "gelu_range": "T_max: GELU table range [0, T_max)",
    "gelu_interp_bits": "F_i: GELU interpolation fraction bits",
    "gelu_frac": "F_d: fraction bits of the GELU delta table",
    "gate_bits": "W_g: gate probability width (unsigned)",
    "gate_frac": "F_g: gate probability fraction bits",
}

_TABLES = (
    # (generator, C++ prefix, doc, extra params exported as constants)
    (nx.exp2_lut, "EXP2", "exp2: LUT[j] = round(2^P * 2^(-j / 2^L)), LUT[0] = 2^P", ()),
    (nx.recip_lut, "RECIP", "reciprocal seed: LUT[j] = round(2^R / (1 + (j + 1/2) 2^-L_r))", ()),
    (nx.rsqrt_lut, "RSQRT", "rsqrt seed: LUT[j] = round(2^R * 2 / (sqrt(a) + sqrt(a + 2^-L_s))), "
                            "a = 1 + j 2^-L_s", ("index_offset",)),
    (nx.gelu_lut, "GELU", "GELU delta: LUT[i] = round(2^F_d * delta(i 2^-H)), delta(t) = t Phi(-t); "
                          "LUT[N] closes the last interval", ()),
)


def _pad(rows: list[dict]) -> list[dict]:
    width = max(len(f"{r['name']} = {r['value']};") for r in rows)
    for r in rows:
        r["pad"] = 1 + width - len(f"{r['name']} = {r['value']};")
    return rows


def contract_constants(contract: Contract = CONTRACT) -> list[dict]:
    """name/value/comment rows: every Contract field, then the derived constants."""
    rows = [dict(name=f.name.upper(), value=int(getattr(contract, f.name)), comment=_FIELD_DOC.get(f.name, f.name))
            for f in dataclasses.fields(contract)]
    rows += [
        dict(name="L2E", value=contract.l2e, comment="round(log2(e) * 2^C)"),
        dict(name="L2E_BITS", value=contract.l2e.bit_length(), comment="width of L2E (unsigned)"),
        dict(name="GELU_GRID_FRAC", value=contract.gelu_grid_frac, comment="G = H + F_i"),
        dict(name="GELU_ENTRIES", value=contract.gelu_entries, comment="N = T_max * 2^H intervals"),
        dict(name="GELU_IN_FRAC_MIN", value=nx.GELU_IN_FRAC[0], comment="supported GELU input fractions"),
        dict(name="GELU_IN_FRAC_MAX", value=nx.GELU_IN_FRAC[1], comment="(keep g within 40 bits)"),
        dict(name="SHIFT_MIN", value=-62, comment="smallest run-time shift"),
        dict(name="SHIFT_MAX", value=62, comment="largest run-time shift"),
    ]
    return _pad(rows)


def table_specs(contract: Contract = CONTRACT) -> list[dict]:
    specs = []
    for gen, prefix, doc, extra in _TABLES:
        values, params = gen(contract)
        vals = [int(v) for v in values]
        bits = int(params["value_bits"])
        if params.get("signed") or min(vals) < 0 or max(vals) >= 1 << bits:
            raise ConfigError(f"{prefix} table does not fit {bits} bits unsigned")
        if len(vals) != int(params["entries"]):
            raise ConfigError(f"{prefix} table has {len(vals)} values, its params say {params['entries']}")
        w = len(str(max(vals)))
        rows = [", ".join(f"{v:>{w}}" for v in vals[i:i + 12]) + ","
                for i in range(0, len(vals), 12)]
        specs.append(dict(prefix=prefix, doc=doc, entries=len(vals), bits=bits, frac=int(params["value_frac"]),
                          min=min(vals), max=max(vals), rows=rows,
                          extra=[(k.upper(), int(params[k])) for k in extra]))
    return specs


def _contract_digest(contract: Contract) -> str:
    blob = json.dumps(dataclasses.asdict(contract), sort_keys=True, separators=(",", ":")).encode()
    for gen, *_ in _TABLES:
        blob += b"|" + ",".join(str(int(v)) for v in gen(contract)[0]).encode()
    return hashlib.sha256(blob).hexdigest()


def render_tables(contract: Contract = CONTRACT) -> str:
    return _env.get_template(TABLES_NAME + ".j2").render(
        source="CONTRACT" if contract == CONTRACT else "a Contract variant",
        digest=_contract_digest(contract), constants=contract_constants(contract),
        tables=table_specs(contract))


def normalise_config(cfg: Mapping) -> dict[str, int]:
    """The CONFIG_KEYS of cfg as a validated flat dict. Keys may sit at the top level or, as in
    hw.json, under "limits"; other hw.json fields (board, buffers, ...) are not the HLS library's
    business and are ignored."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"HLS config must be a mapping, got {type(cfg).__name__}")
    limits = cfg.get("limits", {})
    if not isinstance(limits, Mapping):
        raise ConfigError("HLS config: 'limits' must be a mapping")
    out = {}
    for k in CONFIG_KEYS:
        v = cfg[k] if k in cfg else limits.get(k)
        if v is None:
            raise ConfigError(f"HLS config: missing key '{k}'")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"HLS config: '{k}' must be an integer, got {v!r}")
        out[k] = v

    def need(ok, msg):
        if not ok:
            raise ConfigError(f"HLS config: {msg}")

    need(1 <= out["p_in"] <= 256 and 1 <= out["p_out"] <= 256, "p_in and p_out must be in 1..256")
    need(out["acc_bits"] == CONTRACT.acc_bits, f"acc_bits must be {CONTRACT.acc_bits} (the numeric contract)")
    need(2 <= out["act_bits"] <= 16, "act_bits must be in 2..16 (LayerNorm, GELU and softmax widths "
                                      "are sized for 16-bit containers)")
    need(2 <= out["weight_bits"] <= 16, "weight_bits must be in 2..16")
    need(1 <= out["max_tokens"] <= CONTRACT.max_keys, f"max_tokens must be in 1..{CONTRACT.max_keys}")
    need(1 <= out["max_dim"] <= CONTRACT.max_keys, f"max_dim must be in 1..{CONTRACT.max_keys}")
    need(out["max_hidden"] >= 1, "max_hidden must be >= 1")
    need(1 <= out["max_experts"] <= 256, "max_experts must be in 1..256")
    need(1 <= out["max_k"] <= out["max_experts"], "max_k must be in 1..max_experts")
    need(out["max_k"] <= 8, "max_k must be <= 8 (the combine sum is sized for 8 terms)")
    need(1 <= out["max_heads"] <= out["max_dim"], "max_heads must be in 1..max_dim")
    need(out["max_tokens"] * out["max_k"] < 1 << 16, "max_tokens * max_k must fit the 16-bit queue index")
    buffers = cfg.get("buffers", {})
    if not isinstance(buffers, Mapping):
        raise ConfigError("HLS config: 'buffers' must be a mapping")
    for k, default in BUFFER_DEFAULTS.items():
        v = cfg[k] if k in cfg else buffers.get(k, default)  # flat (a normalised config) or nested
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"HLS config: '{k}' must be an integer, got {v!r}")
        out[k] = v
    need(1 <= out["token_block"] <= 256, "token_block must be in 1..256")
    need(all(0 <= out[k] < 1 << 30 for k in ("weights", "activations", "scores")),
         "buffers.* must be in 0..2^30 bytes")
    return out


def config_constants(cfg: Mapping) -> list[dict]:
    c = normalise_config(cfg)
    rows = [dict(name=k.upper(), value=c[k], comment="hardware config") for k in CONFIG_KEYS]
    rows += [
        dict(name="MAX_ROWS", value=c["max_tokens"], comment="GEMM rows (tokens, or one expert's queue)"),
        dict(name="MAX_IN", value=max(c["max_dim"], c["max_hidden"]),
             comment="GEMM reduction length (dim, hidden, patch C*p*p)"),
        dict(name="MAX_OUT", value=max(3 * c["max_dim"], c["max_hidden"], c["max_tokens"]),
             comment="GEMM output width (qkv 3*dim, hidden, QK^T keys)"),
        dict(name="MAX_KEYS", value=c["max_tokens"], comment="attention keys per row"),
        dict(name="MAX_DH", value=c["max_dim"], comment="attention head width"),
        dict(name="ATT_QT", value=c["p_out"], comment="attention query tile (the array's output lanes)"),
        dict(name="TOKEN_BLOCK", value=c["token_block"], comment="rows per streamed block (hw.token_block)"),
        dict(name="BUF_WEIGHTS", value=c["weights"], comment="on-chip weight bytes (hw.buffers.weights)"),
        dict(name="BUF_ACTIVATIONS", value=c["activations"],
             comment="on-chip activation bytes (hw.buffers.activations)"),
        dict(name="BUF_SCORES", value=c["scores"], comment="on-chip score bytes (hw.buffers.scores)"),
    ]
    return _pad(rows)


def render_config(cfg: Mapping, name: str = "config") -> str:
    canonical = json.dumps(normalise_config(cfg), sort_keys=True, separators=(",", ":"))
    return _env.get_template(CONFIG_NAME + ".j2").render(name=name, canonical=canonical,
                                                         constants=config_constants(cfg))


def _write_if_changed(path: Path, text: str) -> bool:
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{id(data)}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def emit(out_dir: str | Path, cfg: Mapping, contract: Contract = CONTRACT) -> dict[str, Path]:
    """Write m3v_tables.h and m3v_config.h into out_dir (rewriting only changed files)."""
    out = Path(out_dir)
    paths = {TABLES_NAME: out / TABLES_NAME, CONFIG_NAME: out / CONFIG_NAME}
    _write_if_changed(paths[TABLES_NAME], render_tables(contract))
    _write_if_changed(paths[CONFIG_NAME], render_config(cfg))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m3vit.hls.emit_tables", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output include directory")
    ap.add_argument("--config", required=True, help="JSON file: a flat dict of CONFIG_KEYS or a hw.json")
    args = ap.parse_args(argv)
    try:
        cfg = json.loads(Path(args.config).read_text())
        for p in emit(args.out, cfg).values():
            print(p)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
