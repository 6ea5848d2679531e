"""The hardware configuration (`hw.json`): what one FPGA build of the datapath is.

One build serves every model: the configuration fixes only the parallelism, the container widths,
the on-chip buffer sizes, the AXI ports and the limits the compiler must respect. Fields are
documented in docs/hw_config.md. This module is shared by the RTL flow and the compiler, so it
depends on the standard library only.

    hw = load_hw_config("hw.json")      # or HwConfig.default()
    hw.rtl_params()                     # Verilog parameters of the generated .svh
    hw.hash()                           # stable sha256 of the canonical JSON
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3vit.errors import ConfigError

DEFAULT_PATH = Path(__file__).with_name("hw.json")

# ZCU104 (xczu7ev-ffvc1156-2-e) resources: the budget that synthesis reports are measured against.
# Bytes in each half of patchify's band buffer: a patch row of a 3 x 512-wide image at p = 16 is 48 KB.
PATCH_BAND_BYTES = 65536
ZCU104 = {"dsp": 1728, "lut": 230_400, "ff": 460_800, "bram36": 312, "uram": 96}
BRAM36_BYTES = 36 * 1024 // 8
URAM_BYTES = 288 * 1024 // 8
ON_CHIP_BYTES = ZCU104["bram36"] * BRAM36_BYTES + ZCU104["uram"] * URAM_BYTES
SUPPORTED = {"zcu104": "xczu7ev-ffvc1156-2-e"}

# DSP48E2 multiplier ports (signed): A is 27 bits, B is 18 bits. Within them one MAC is one DSP.
DSP_A_BITS, DSP_B_BITS = 27, 18
SHIFT_BITS = 7          # per-channel requant shift: signed, -64..63 (every value is exact)
COMB_SHIFT_BITS = 6     # combine-term shift: unsigned, 0..63


@dataclass(frozen=True)
class Buffers:
    """On-chip buffer sizes in bytes."""

    weights: int = 1_310_720
    activations: int = 2_097_152
    scores: int = 262_144


@dataclass(frozen=True)
class Limits:
    """The largest model the buffers and counters are sized for."""

    max_tokens: int = 2048
    max_dim: int = 768
    max_hidden: int = 3072
    max_experts: int = 16
    max_k: int = 4
    max_tasks: int = 8
    max_heads: int = 16


@dataclass(frozen=True)
class HwConfig:
    board: str = "zcu104"
    part: str = "xczu7ev-ffvc1156-2-e"
    clock_mhz: int = 300
    p_in: int = 32
    p_out: int = 48
    softmax_lanes: int = 32
    act_bits: int = 16
    weight_bits: int = 16
    acc_bits: int = 48
    score_bits: int = 16
    token_block: int = 32
    buffers: Buffers = field(default_factory=Buffers)
    axi_ports: int = 4
    axi_width_bits: int = 128
    limits: Limits = field(default_factory=Limits)

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls) -> HwConfig:
        """The shipped rtl_sim/hw.json (or, where it is not installed, the same values built in)."""
        return load_hw_config(DEFAULT_PATH) if DEFAULT_PATH.is_file() else cls().validated()

    @classmethod
    def from_dict(cls, data: Any, where: str = "hw config") -> HwConfig:
        """Build and validate; missing keys take the defaults, unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        values = _take(cls, data, where, nested={"buffers": Buffers, "limits": Limits})
        return cls(**values).validated(where)

    def replace(self, **changes: Any) -> HwConfig:
        return dataclasses.replace(self, **changes).validated()

    def with_parallel(self, spec: str) -> HwConfig:
        """`32x48` -> a copy with p_in=32, p_out=48."""
        parts = spec.lower().replace("×", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--parallel must look like PINxPOUT (for example 32x48), got {spec!r}")
        return self.replace(p_in=int(parts[0]), p_out=int(parts[1]))

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces. hash() is over these bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()

    def patch_band_beats(self, channels: int, patch: int, width: int) -> int:
        """AXI beats of one band of patchify's buffer (a patch row of every channel): each channel's
        p·W elements plus one beat for a block that starts mid-beat."""
        per_beat = self.axi_width_bits // 16
        return channels * ((patch * width + 2 * per_beat - 1) // per_beat)

    @property
    def patch_band_capacity(self) -> int:
        """Beats in one half of patchify's double-buffered band buffer."""
        return PATCH_BAND_BYTES * 8 // self.axi_width_bits

    @property
    def macs(self) -> int:
        return self.p_in * self.p_out

    @property
    def dsp_estimate(self) -> int:
        """The compute unit: one DSP48E2 per MAC plus one per output lane for the combine multiplier."""
        return self.p_in * self.p_out + self.p_out

    def dsp_units(self) -> dict[str, int]:
        """DSP48E2 of the numeric units, as synthesised (docs/hw_config.md): the compute unit; the
        attention engine's softmax lanes (two finishing products per lane) and its reciprocal (3);
        the LayerNorm unit, three per lane (min(p_out, 8) lanes) and 22 shared; the top-k gate,
        four. Exp units form their constant product in fabric. The engines' control arithmetic adds
        a few more (22 in eng_gate and eng_ln for the shipped hw.json); `m3vit synth --unit
        m3v_accel` counts the whole design."""
        ln_lanes = min(self.p_out, 8)
        return {"compute_unit": self.dsp_estimate, "attention": 2 * self.softmax_lanes + 3,
                "layernorm_unit": 3 * ln_lanes + 22, "topk_gate": 4}

    @property
    def dsp_datapath(self) -> int:
        return sum(self.dsp_units().values())

    def rtl_params(self) -> dict[str, int]:
        """The Verilog parameters of compute_unit (names as in the RTL)."""
        return {
            "P_IN": self.p_in,
            "P_OUT": self.p_out,
            "SM_P": self.softmax_lanes,
            "ACT_W": self.act_bits,
            "W_W": self.weight_bits,
            "ACC_W": self.acc_bits,
            "SCORE_W": self.score_bits,
            "SHIFT_W": SHIFT_BITS,
            "CSH_W": COMB_SHIFT_BITS,
            "OB_W": max(1, math.ceil(math.log2(self.act_bits + 1))),
            "SLOTS": self.token_block,
            "TAG_W": max(1, math.ceil(math.log2(self.limits.max_tokens))),
        }

    # ------------------------------------------------------------------ validation
    def validated(self, where: str = "hw config") -> HwConfig:
        if self.board not in SUPPORTED:
            raise ConfigError(f"{where}: board must be one of {', '.join(SUPPORTED)}, got {self.board!r}")
        if self.part != SUPPORTED[self.board]:
            raise ConfigError(f"{where}: part for board {self.board} must be {SUPPORTED[self.board]!r}, "
                              f"got {self.part!r}")
        _int_in(where, "clock_mhz", self.clock_mhz, 1, 800)
        _int_in(where, "p_in", self.p_in, 1, 256)
        _int_in(where, "p_out", self.p_out, 1, 256)
        _int_in(where, "softmax_lanes", self.softmax_lanes, 1, 256)
        _int_in(where, "act_bits", self.act_bits, 2, DSP_A_BITS - 1)
        _int_in(where, "weight_bits", self.weight_bits, 2, DSP_B_BITS)
        if self.acc_bits != 48:
            raise ConfigError(f"{where}: acc_bits must be 48 (the DSP48E2 accumulator), got {self.acc_bits!r}")
        if self.score_bits != 16:
            raise ConfigError(f"{where}: score_bits must be 16 (the numeric contract's score format), "
                              f"got {self.score_bits!r}")
        _int_in(where, "token_block", self.token_block, 2, 256)
        if self.token_block & (self.token_block - 1):
            raise ConfigError(f"{where}: token_block must be a power of two, got {self.token_block}")
        _int_in(where, "axi_ports", self.axi_ports, 1, 6)
        if self.axi_width_bits not in (32, 64, 128):
            raise ConfigError(f"{where}: axi_width_bits must be 32, 64 or 128, got {self.axi_width_bits!r}")
        for name in ("weights", "activations", "scores"):
            _int_in(where, f"buffers.{name}", getattr(self.buffers, name), 0, ON_CHIP_BYTES)
        total = self.buffers.weights + self.buffers.activations + self.buffers.scores
        if total > ON_CHIP_BYTES:
            raise ConfigError(f"{where}: buffers take {total} bytes, more than the {ON_CHIP_BYTES} bytes "
                              f"of BRAM and URAM on the {self.board}")
        for f in dataclasses.fields(Limits):
            _int_in(where, f"limits.{f.name}", getattr(self.limits, f.name), 1, 1 << 20)
        if self.limits.max_k > self.limits.max_experts:
            raise ConfigError(f"{where}: limits.max_k ({self.limits.max_k}) exceeds limits.max_experts "
                              f"({self.limits.max_experts})")
        sum_bits = self.act_bits + self.weight_bits + max(0, math.ceil(math.log2(self.p_in)))
        if sum_bits > self.acc_bits:
            raise ConfigError(f"{where}: act_bits + weight_bits + log2(p_in) = {sum_bits} exceeds the "
                              f"{self.acc_bits}-bit accumulator")
        if self.dsp_datapath > ZCU104["dsp"]:
            split = ", ".join(f"{k} {v}" for k, v in self.dsp_units().items())
            raise ConfigError(f"{where}: a {self.p_in}x{self.p_out} array with {self.softmax_lanes} softmax lanes "
                              f"needs {self.dsp_datapath} DSP48E2 ({split}), more than the {ZCU104['dsp']} of the "
                              f"{self.board}")
        return self


def load_hw_config(path: str | Path | None = None) -> HwConfig:
    """Read and validate a hw.json (default: the shipped one)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such hardware config file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return HwConfig.from_dict(data, where)


def _take(cls, data: dict, where: str, nested: dict[str, type] | None = None) -> dict[str, Any]:
    nested = nested or {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(names)})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in nested:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be an object, got {value!r}")
            values[key] = nested[key](**_take(nested[key], value, f"{where}: {key}"))
        else:
            expected = names[key].type
            if expected == "str" and not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
            values[key] = value
    return values


def _int_in(where: str, name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: {name} must be between {lo} and {hi}, got {value}")
