"""Quantization: precision presets and overrides, calibration of activation ranges, formats.

Precision is chosen per *unit*: every canonical tensor that an op produces (docs/qgraph.md). A
unit's precision is a weight container width W (its parameters) and an activation container
width A (its output tensor), each 8 or 16 bits. A spec is resolved like hls4ml's configuration
hierarchy, general to specific:

    {"precision": "W8A16",                      # every unit
     "layer_type": {"gate": "W16A16"},          # units of a type (see UNIT_TYPES)
     "layer_name": {"blocks.1.moe": "A16"}}     # a unit, or every unit under a name prefix

An entry is "W<w>A<a>", "W<w>", "A<a>" or {"weight": w, "act": a, "act_range": r}; later
(more specific) entries override only the fields they set. Activation formats are powers of two
chosen from calibrated ranges (``act_range``: "max" or a percentile such as "p99.99"); weights
get one fraction per output channel (``"per_channel": false`` gives one per tensor).

Calibration runs the float model once over sample images for every task and records, per
tensor, its maximum magnitude and a few percentiles. ``Calibration`` keeps those ranges and the
formats they give under one spec; the file (``m3vit calibrate --out calib.json``) is what the
quantization report and the compiler read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3vit.compiler.numerics import CONTRACT, GELU_IN_FRAC, Fmt, frac_for_range
from m3vit.compiler.qgraph import TensorInfo, canonical_json
from m3vit.errors import ConfigError, UsageError

CALIB_FORMAT = "m3vit-calibration-1"
BITS = (8, 16)
PRESETS = {"W8A8": (8, 8), "W8A16": (8, 16), "W16A16": (16, 16)}
ACT_RANGES = ("max", "p99.9", "p99.99", "p99.999")
# Fixed internal widths (the contract's 16-bit ceiling): the GELU input inside a fused epilogue
# and the attention scores never leave their unit, so they do not follow the activation width.
MID_BITS = 16
SCORE_BITS = 16

# The default, chosen by measurement (docs/quantization.md): 16-bit activations and weights except
# the experts' 8-bit weights (two thirds to four fifths of the backbone's weights). It is the
# lightest spec measured that keeps routing >= 98 % on every preset, random and trained; W8A8
# flips 10-25 % of the routes, W8A16 with 16-bit gates misses on random-init m3vit-small.
DEFAULT_SPEC: dict[str, Any] = {"precision": "W16A16", "layer_type": {"expert": "W8"}}

# Unit types, general to specific; a layer_type override applies to every unit listing it.
UNIT_TYPES = ("input", "patch_embed", "embed", "layernorm", "moe_input", "linear", "qkv", "attention", "proj",
              "mlp", "fc1", "fc2", "add", "moe", "gate", "expert", "combine")


def units(cfg) -> dict[str, tuple[str, ...]]:
    """Every precision unit of a model (canonical names, execution order) -> its types."""
    out: dict[str, tuple[str, ...]] = {"input": ("input",), "patch_embed": ("patch_embed",), "embed": ("embed",)}
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        out[f"{b}.norm1"] = ("layernorm",)
        out[f"{b}.attn.qkv"] = ("linear", "qkv")
        out[f"{b}.attn"] = ("attention",)
        out[f"{b}.attn.proj"] = ("linear", "proj")
        out[f"{b}.residual1"] = ("add",)
        if cfg.is_moe_block(i):
            out[f"{b}.norm2"] = ("layernorm", "moe_input")
            out[f"{b}.moe.gate"] = ("moe", "gate")
            for e in range(cfg.num_experts):
                out[f"{b}.moe.e{e}.fc1"] = ("moe", "expert", "fc1")
                out[f"{b}.moe.e{e}.fc2"] = ("moe", "expert", "fc2")
            out[f"{b}.moe"] = ("moe", "combine")
        else:
            out[f"{b}.norm2"] = ("layernorm",)
            out[f"{b}.mlp.fc1"] = ("linear", "mlp", "fc1")
            out[f"{b}.mlp.fc2"] = ("linear", "mlp", "fc2")
        out[f"{b}.residual2"] = ("add",)
    out["norm"] = ("layernorm",)
    return out


@dataclass(frozen=True)
class UnitPrecision:
    weight: int
    act: int
    act_range: str


_ENTRY = re.compile(r"^(?:W(\d+))?(?:A(\d+))?$", re.IGNORECASE)


def _parse_entry(value: Any, where: str) -> dict[str, Any]:
    """One precision entry -> the fields it sets."""
    if isinstance(value, str):
        m = _ENTRY.match(value.strip())
        if not value.strip() or not m or not (m.group(1) or m.group(2)):
            raise ConfigError(f"{where}: precision '{value}' must look like W8A16, W16 or A16 "
                              f"(presets: {', '.join(PRESETS)})")
        out = {}
        if m.group(1):
            out["weight"] = int(m.group(1))
        if m.group(2):
            out["act"] = int(m.group(2))
        value = out
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a precision entry is a string like W8A16 or a mapping, got {value!r}")
    unknown = sorted(set(value) - {"weight", "act", "act_range"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: weight, act, act_range")
    for k in ("weight", "act"):
        if k in value and (isinstance(value[k], bool) or value[k] not in BITS):
            raise ConfigError(f"{where}: {k} width must be one of {', '.join(map(str, BITS))} bits, got {value[k]!r}")
    if "act_range" in value and value["act_range"] not in ACT_RANGES:
        raise ConfigError(f"{where}: act_range must be one of {', '.join(ACT_RANGES)}, got {value['act_range']!r}")
    return dict(value)


def normalise_spec(spec: Any) -> dict[str, Any]:
    """Validate a precision spec (a preset name or a mapping) into its canonical mapping."""
    if isinstance(spec, str):
        spec = {"precision": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"precision: expected a preset name or a mapping, got {type(spec).__name__}")
    known = {"precision", "act_range", "per_channel", "expert_formats", "layer_type", "layer_name"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"precision: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    base = _parse_entry(spec.get("precision", DEFAULT_SPEC["precision"]), "precision")
    if set(base) - {"act_range"} != {"weight", "act"}:
        raise ConfigError("precision: the top-level precision must set both widths, e.g. W8A16")
    out: dict[str, Any] = {"precision": f"W{base['weight']}A{base['act']}"}
    act_range = spec.get("act_range", base.get("act_range", "max"))
    _parse_entry({"act_range": act_range}, "precision: act_range")
    out["act_range"] = act_range
    per_channel = spec.get("per_channel", True)
    if not isinstance(per_channel, bool):
        raise ConfigError(f"precision: per_channel must be true or false, got {per_channel!r}")
    out["per_channel"] = per_channel
    ef = spec.get("expert_formats", "shared")
    if ef not in ("shared", "per_expert"):
        raise ConfigError(f"precision: expert_formats must be 'shared' or 'per_expert', got {ef!r}")
    out["expert_formats"] = ef
    for section in ("layer_type", "layer_name"):
        entries = spec.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"precision: {section} must map names to precision entries")
        for key, val in entries.items():
            if section == "layer_type" and key not in UNIT_TYPES:
                raise ConfigError(f"precision: unknown layer_type '{key}'; valid types: {', '.join(UNIT_TYPES)}")
        out[section] = {k: _parse_entry(v, f"precision: {section} '{k}'") for k, v in sorted(entries.items())}
    return out


def resolve_precision(spec: Any, cfg) -> dict[str, UnitPrecision]:
    """Per unit: the top-level precision, then its types' entries (general first), then the
    layer_name entries that equal it or are a dotted prefix of it (shortest first)."""
    spec = normalise_spec(spec)
    table = units(cfg)
    names = spec["layer_name"]
    for key in names:
        if not any(u == key or u.startswith(key + ".") for u in table):
            sample = ", ".join(list(table)[:6])
            raise ConfigError(f"precision: layer_name '{key}' matches no layer of model '{cfg.name}' "
                              f"(names look like {sample}, ...)")
    top = _parse_entry(spec["precision"], "precision")
    out = {}
    for unit, types in table.items():
        cur = {"weight": top["weight"], "act": top["act"], "act_range": spec["act_range"]}
        for t in types:
            cur.update(spec["layer_type"].get(t, {}))
        for key in sorted((k for k in names if unit == k or unit.startswith(k + ".")), key=len):
            cur.update(names[key])
        out[unit] = UnitPrecision(**cur)
    return out


def load_precision(arg: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """--precision (a preset or a JSON/YAML file; the default spec when absent) plus
    --layer-precision KEY=ENTRY items (KEY a layer type or a layer name)."""
    if arg is None:
        spec = copy.deepcopy(DEFAULT_SPEC)
    elif _ENTRY.match(arg.strip()) and not Path(arg).is_file():
        spec = {"precision": arg}
    else:
        from m3vit.model.config import load_config_file

        if not Path(arg).is_file():
            raise UsageError(f"--precision '{arg}' is neither a preset ({', '.join(PRESETS)}) nor a file")
        spec = load_config_file(arg)
    spec = copy.deepcopy(spec)
    for item in overrides or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise UsageError(f"--layer-precision '{item}' must look like KEY=W16A16 (KEY a layer type or name)")
        section = "layer_type" if key.strip() in UNIT_TYPES and "." not in key else "layer_name"
        spec.setdefault(section, {})[key.strip()] = val.strip()
    return normalise_spec(spec)


# ---------------------------------------------------------------------------- range statistics


class RangeStats:
    """Magnitude statistics of one tensor over calibration: the exact maximum and a histogram of
    log2|x| in quarter octaves (enough to place a percentile within a power-of-two format)."""

    STEPS = 4
    LO, HI = -160, 160  # bins cover 2^-40 .. 2^40

    def __init__(self):
        self.max = 0.0
        self.count = 0
        self.hist = np.zeros(self.HI - self.LO, np.int64)

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float64)).ravel()
        if not a.size:
            return
        if not np.isfinite(a).all():
            raise ValueError("calibration met a non-finite activation")
        self.max = max(self.max, float(a.max()))
        self.count += a.size
        nz = a[a > 0]
        b = np.clip(np.floor(np.log2(nz) * self.STEPS).astype(np.int64), self.LO, self.HI - 1) - self.LO
        self.hist += np.bincount(b, minlength=self.hist.size)

    def percentile(self, p: float) -> float:
        """Smallest bin edge that at least p % of the magnitudes lie below (never above max)."""
        if not self.count:
            return 0.0
        need = math.ceil(self.count * p / 100.0) - (self.count - int(self.hist.sum()))  # zeros count as below
        if need <= 0:
            return 0.0
        b = int(np.searchsorted(np.cumsum(self.hist), need))
        return min(self.max, 2.0 ** ((b + 1 + self.LO) / self.STEPS))

    def summary(self) -> dict[str, float]:
        out = {"max": self.max, "count": self.count}
        for r in ACT_RANGES[1:]:
            out[r] = self.percentile(float(r[1:]))
        return out


# ---------------------------------------------------------------------------- formats


def act_fmt(rng: dict | None, bits: int, how: str) -> int:
    """Fraction of a signed activation container for a calibrated range."""
    return frac_for_range(float(rng[how]) if rng else 0.0, bits)


def weight_fracs(w: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    """One fraction per output channel (the last axis): the largest that does not saturate."""
    w = np.asarray(w, np.float64)
    m = np.abs(w.reshape(-1, w.shape[-1])).max(axis=0) if w.size else np.zeros(w.shape[-1])
    if not per_channel:
        m = np.full_like(m, m.max(initial=0.0))
    return np.array([frac_for_range(float(v), bits) for v in m], np.int64)


def quantize_channels(x: np.ndarray, bits: int, fracs) -> np.ndarray:
    """Round x to ``bits`` with one fraction per output channel (the last axis; fracs of shape
    [..., channels] for stacked matrices [..., in, channels]), through ``Fmt.quantize``."""
    x = np.asarray(x, np.float64)
    fr = np.asarray(fracs, np.int64)
    if fr.ndim and fr.ndim == x.ndim - 1 and x.ndim >= 2:
        fr = fr[..., None, :]
    fr = np.broadcast_to(fr, x.shape)
    out = np.empty(x.shape, np.int64)
    for f in np.unique(fr):
        sel = fr == f
        out[sel] = Fmt(bits, int(f)).quantize(x[sel], name="weights")
    return out


def acc_quantize(b: np.ndarray, fracs, name: str) -> np.ndarray:
    """A bias in the accumulator format (one fraction per channel): |b| must stay below 2^47."""
    b = np.asarray(b, np.float64)
    fr = np.broadcast_to(np.asarray(fracs, np.int64), b.shape)
    big = np.abs(np.ldexp(b, fr)) >= 2.0 ** (CONTRACT.acc_bits - 1) - 1
    if big.any():
        raise ConfigError(f"{name}: a bias needs more than the {CONTRACT.acc_bits}-bit accumulator at its "
                          f"weights' scale (the accumulator may reach beyond 2^{CONTRACT.acc_bits - 1}); "
                          f"use wider activations or narrower weights for this layer")
    return quantize_channels(b, CONTRACT.acc_bits, fr)


def weight_formats(cfg, fw: dict[str, np.ndarray], spec: Any) -> dict[str, dict]:
    """Per weight tensor of ``fw`` (``from_torch.float_weights``' layout): {"bits": W, "frac": one
    fraction per output channel} under ``spec``."""
    spec = normalise_spec(spec)
    prec = resolve_precision(spec, cfg)
    pc = spec["per_channel"]
    out: dict[str, dict] = {}
    for key, w in fw.items():
        unit, kind = key.rsplit(".", 1)
        if kind in ("b", "beta", "cls"):
            continue  # biases live in the accumulator format; cls in patch_embed's format
        bits = prec[unit].weight
        if kind == "pos":
            fr = weight_fracs(w.reshape(-1, 1), bits, False)
        elif kind == "gamma":
            fr = weight_fracs(w[None, :], bits, pc)
        elif key.endswith(".gate.w"):
            fr = np.stack([weight_fracs(wt, bits, pc) for wt in w])
        else:
            fr = weight_fracs(w, bits, pc)
        out[key] = {"bits": bits, "frac": fr.tolist()}
    return out


def choose_formats(cfg, ranges: dict[str, Any], spec: dict[str, Any]) -> dict[str, TensorInfo]:
    """Every tensor's format (and the internal GELU-input ``*.pre`` and ``*.attn.score``
    formats) from calibrated ranges under a precision spec."""
    spec = normalise_spec(spec)
    prec = resolve_precision(spec, cfg)
    d, t = cfg.dim, cfg.num_tokens
    c, (h, w) = cfg.in_chans, cfg.img_size
    out: dict[str, TensorInfo] = {}

    def act(name, shape, unit=None, rng_name=None, groups=None):
        u = prec[unit or name]
        rng = ranges.get(rng_name or name)
        if groups:
            fr = tuple(act_fmt(r, u.act, u.act_range) for r in rng)
        else:
            fr = act_fmt(rng, u.act, u.act_range)
        out[name] = TensorInfo(shape, u.act, fr)

    def internal(name, bits, lo=-62, hi=62):
        out[name] = TensorInfo((), bits, int(np.clip(frac_for_range(float(ranges[name]["max"]) if name in ranges else 0.0,
                                                                    bits), lo, hi)))

    act("input", (c, h, w))
    act("patch_embed", (cfg.num_patches, d))
    act("embed", (t, d))
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        act(f"{b}.norm1", (t, d))
        act(f"{b}.attn.qkv", (t, 3 * d), groups=3)
        internal(f"{b}.attn.score", SCORE_BITS)
        act(f"{b}.attn", (t, d))
        act(f"{b}.attn.proj", (t, d))
        act(f"{b}.residual1", (t, d))
        act(f"{b}.norm2", (t, d))
        if cfg.is_moe_block(i):
            n, k, hid = cfg.num_experts, cfg.top_k, cfg.expert_hidden
            act(f"{b}.moe.gate", (t, n))
            out[f"{b}.moe.topk"] = TensorInfo((t, k), max(1, (n - 1).bit_length()), 0, signed=False)
            out[f"{b}.moe.score"] = TensorInfo((t, k), CONTRACT.gate_bits, CONTRACT.gate_frac, signed=False)
            for e in range(n):
                for fc, width in (("fc1", hid), ("fc2", d)):
                    name = f"{b}.moe.e{e}.{fc}"
                    pooled = f"{b}.moe.experts.{fc}"
                    own = ranges.get(name)
                    use = name if spec["expert_formats"] == "per_expert" and own and own.get("count") else pooled
                    act(name, (-1, width), rng_name=use)
                    pre_src = (name if use == name else pooled) + ".pre"
                    out[name + ".pre"] = TensorInfo((), MID_BITS, int(np.clip(
                        frac_for_range(float(ranges.get(pre_src, {"max": 0.0})["max"]), MID_BITS), *GELU_IN_FRAC)))
            act(f"{b}.moe", (t, d))
        else:
            act(f"{b}.mlp.fc1", (t, cfg.mlp_hidden))
            internal(f"{b}.mlp.fc1.pre", MID_BITS, *GELU_IN_FRAC)
            act(f"{b}.mlp.fc2", (t, d))
        act(f"{b}.residual2", (t, d))
    act("norm", (t, d))
    return out


# ---------------------------------------------------------------------------- calibration


def config_hash(cfg) -> str:
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16]


def weights_hash(model) -> str:
    """Digest of the backbone's parameters (heads excluded: the graph does not hold them)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k.startswith("heads."):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Calibration:
    """Calibrated ranges of one model plus the formats they give under ``spec``."""

    config: dict[str, Any]
    config_hash: str
    weights_hash: str
    images: list[str]
    tasks: list[str]
    ranges: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=lambda: normalise_spec(DEFAULT_SPEC))
    formats: dict[str, TensorInfo] = field(default_factory=dict)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    def model_config(self):
        from m3vit.model.config import ModelConfig

        return ModelConfig.from_dict(self.config, "calibration file")

    def check_model(self, model) -> None:
        if config_hash(model.cfg) != self.config_hash:
            raise ConfigError(f"the calibration was made for another model configuration "
                              f"('{self.config.get('name')}', config hash {self.config_hash}); recalibrate")
        if weights_hash(model) != self.weights_hash:
            raise ConfigError("the calibration was made for other weights (a different checkpoint or seed); recalibrate")

    def with_spec(self, model, spec: Any) -> "Calibration":
        """The same ranges under another precision spec (no float runs needed)."""
        self.check_model(model)
        from m3vit.compiler.from_torch import choose_weight_fracs

        new = copy.copy(self)
        new.spec = normalise_spec(spec)
        new.formats = choose_formats(model.cfg, self.ranges, new.spec)
        new.weights = choose_weight_fracs(model, new.spec)
        return new

    def to_json(self) -> dict:
        return {"format": CALIB_FORMAT, "config": self.config, "config_hash": self.config_hash,
                "weights_hash": self.weights_hash, "images": self.images, "tasks": self.tasks,
                "precision": self.spec, "ranges": self.ranges,
                "formats": {k: v.to_json() for k, v in self.formats.items()},
                "weights": self.weights}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(_finite(self.to_json())))
        return path


def _finite(obj):
    """Round floats to 9 significant digits so the file is stable across platforms."""
    if isinstance(obj, float):
        return float(f"{obj:.9g}")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"calibration file {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != CALIB_FORMAT:
        raise UsageError(f"{path} is not a calibration file (expected format {CALIB_FORMAT})")
    return Calibration(doc["config"], doc["config_hash"], doc["weights_hash"], list(doc["images"]),
                       list(doc["tasks"]), doc["ranges"], normalise_spec(doc["precision"]),
                       {k: TensorInfo.from_json(v) for k, v in doc["formats"].items()}, doc["weights"])


def calibration_images(size: tuple[int, int], n: int, seed: int = 0, folder: str | Path | None = None):
    """(name, 1x3xHxW input): the images of ``folder``, or the bundled photographs (whole frames)
    followed by seeded random images, n in all."""
    from m3vit.model.images import image_folder, input_batch, to_input

    if folder is not None:
        return [(name, to_input(img, size)) for name, img in image_folder(folder)[:n]]
    return input_batch(size, n, seed=seed, real=True)


class _Collector:
    """A float_trace sink: range statistics per tensor (per column group for q|k|v, only the
    maximum for attention scores), plus each MoE layer's experts pooled."""

    def __init__(self):
        self.stats: dict[str, Any] = {}

    def _get(self, name, groups=0):
        if name not in self.stats:
            self.stats[name] = [RangeStats() for _ in range(groups)] if groups else RangeStats()
        return self.stats[name]

    def __call__(self, name: str, a: np.ndarray) -> None:
        if name.endswith(".topk"):
            return
        if name.endswith(".attn.qkv"):
            for s, part in zip(self._get(name, 3), np.split(a, 3, axis=-1)):
                s.update(part)
            return
        if name.endswith(".attn.score"):
            s = self._get(name)
            s.max = max(s.max, float(np.abs(a).max(initial=0.0)))
            s.count += 1
            return
        self._get(name).update(a)
        m = re.match(r"^(blocks\.\d+\.moe)\.e\d+\.(fc1|fc2)(\.pre)?$", name)
        if m:
            self._get(f"{m.group(1)}.experts.{m.group(2)}{m.group(3) or ''}").update(a)

    def summary(self) -> dict[str, Any]:
        return {k: ([s.summary() for s in v] if isinstance(v, list) else v.summary())
                for k, v in sorted(self.stats.items())}


def calibrate(model, images=None, spec: Any = None, n_images: int = 16, seed: int = 0,
              folder: str | Path | None = None, progress: bool = False) -> Calibration:
    """Run the float model over the calibration images for every task, collecting ranges at
    every canonical tensor, and choose formats under ``spec`` (default: DEFAULT_SPEC)."""
    from m3vit.compiler.from_torch import float_trace, float_weights

    return calibrate_source(model.cfg, lambda x, t, sink: float_trace(model, x, t, sink=sink, scores=True),
                            float_weights(model), weights_hash(model), images, spec, n_images, seed, folder,
                            progress)


def calibrate_source(cfg, trace, fw: dict[str, np.ndarray], w_hash: str, images=None, spec: Any = None,
                     n_images: int = 16, seed: int = 0, folder: str | Path | None = None,
                     progress: bool = False) -> Calibration:
    """``calibrate`` for any float source: ``cfg`` its configuration, ``trace(x, task, sink)`` one
    float forward handing every canonical tensor to ``sink(name, array)``, ``fw`` its weights in the
    graph's layout (``from_torch.float_weights``), ``w_hash`` their digest."""
    from tqdm import tqdm

    spec = normalise_spec(DEFAULT_SPEC if spec is None else spec)
    resolve_precision(spec, cfg)  # a bad spec fails before the float runs
    if images is None:
        images = calibration_images(cfg.img_size, n_images, seed, folder)
    if not images:
        raise UsageError("calibration needs at least one image")
    col = _Collector()
    jobs = [(name, x, t) for name, x in images for t in range(len(cfg.tasks))]
    for name, x, t in tqdm(jobs, desc=f"calibrate {cfg.name}", unit="run", disable=not progress):
        trace(x, t, col)
    # the CLS token is quantized to the patch embedding's format: its range must cover it
    col("patch_embed", fw["embed.cls"].reshape(-1))
    ranges = col.summary()
    return Calibration(cfg.to_dict(), config_hash(cfg), w_hash, [n for n, _ in images],
                       list(cfg.task_names), ranges, spec, choose_formats(cfg, ranges, spec),
                       weight_formats(cfg, fw, spec))
