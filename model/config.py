"""Model configurations: the built-in presets, config files, overrides and validation.

A configuration fully describes one M3ViT / Edge-MoE model: backbone sizes, the MoE layers, the
routing mode and the tasks of one dataset. Every consumer (model, exporter, profiler, compiler)
takes a validated :class:`ModelConfig`, so invalid sizes are caught once, here, with one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from m3vit.errors import ConfigError, UsageError

ROUTING_MODES = ("multi-gate", "task-conditioned")


@dataclass(frozen=True)
class Task:
    name: str
    channels: int
    # Loss used by the synthetic training loop: "ce" (classes), "bce" (binary maps), "l1" (regression).
    loss: str = "l1"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    dataset: str = "synthetic"
    img_size: tuple[int, int] = (32, 48)
    patch: int = 8
    in_chans: int = 3
    dim: int = 48
    depth: int = 4
    heads: int = 3
    mlp_hidden: int = 96
    num_experts: int = 4
    expert_hidden: int = 64
    top_k: int = 2
    # Blocks 1, 3, 5, ... carry the MoE layer, as in M3ViT; num_experts = 0 gives a dense ViT.
    routing: str = "multi-gate"
    task_embed_dim: int = 64
    gate_noise: bool = False
    balance_weight: float = 0.01
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    head_channels: int = 256
    tasks: tuple[Task, ...] = field(default_factory=lambda: (Task("semseg", 5, "ce"), Task("depth", 1, "l1")))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch, self.img_size[1] // self.patch

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def has_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_block(self, index: int) -> bool:
        return self.has_moe and index % 2 == 1

    @property
    def moe_blocks(self) -> list[int]:
        return [i for i in range(self.depth) if self.is_moe_block(i)]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_index(self, task: int | str) -> int:
        """Resolve a task given by name or index (an int, or a string of digits)."""
        names = self.task_names
        if isinstance(task, str) and task.strip().lstrip("-").isdigit():
            task = int(task)
        if isinstance(task, int):
            if 0 <= task < len(names):
                return task
            raise UsageError(
                f"task index {task} is out of range: model '{self.name}' has {len(names)} task(s): "
                + ", ".join(f"{i}={n}" for i, n in enumerate(names))
            )
        if task in names:
            return names.index(task)
        raise UsageError(
            f"unknown task '{task}' for model '{self.name}' (dataset {self.dataset}); choose one of: "
            + ", ".join(names)
        )

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["tasks"] = [dataclasses.asdict(t) for t in self.tasks]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        values = dict(data)
        if "img_size" in values:
            values["img_size"] = _parse_img_size(values["img_size"], where)
        if "tasks" in values:
            values["tasks"] = _parse_tasks(values["tasks"], where)
        for f in dataclasses.fields(cls):
            if f.name in values and f.type in ("int", "float", "bool", "str"):
                values[f.name] = _coerce(values[f.name], f.type, f"{where}: {f.name}")
        return validate(cls(**values))


def _coerce(value: Any, type_name: str, where: str) -> Any:
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if type_name == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    return str(value)


def _parse_img_size(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
        value = [p for p in parts if p.strip()]
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: img_size must be H,W or HxW (for example 128x256), got {value!r}") from None
    return (h, w)


def _parse_tasks(value: Any, where: str) -> tuple[Task, ...]:
    """Tasks as a list of {name, channels[, loss]}, or the string 'semseg:19,depth:1'."""
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            name, _, ch = part.partition(":")
            if not name.strip() or not ch.strip():
                raise ConfigError(f"{where}: tasks must look like 'semseg:19,depth:1', got {value!r}")
            items.append({"name": name.strip(), "channels": ch.strip()})
        value = items
    tasks = []
    for item in value:
        if isinstance(item, Task):
            tasks.append(item)
            continue
        if not isinstance(item, dict) or "name" not in item or "channels" not in item:
            raise ConfigError(f"{where}: each task needs a name and channels, got {item!r}")
        channels = _coerce(item["channels"], "int", f"{where}: task {item['name']} channels")
        loss = item.get("loss") or ("ce" if channels > 1 and "seg" in str(item["name"]) else "l1")
        tasks.append(Task(str(item["name"]), channels, str(loss)))
    return tuple(tasks)


def validate(cfg: ModelConfig) -> ModelConfig:
    where = f"model '{cfg.name}'"
    positive = ["patch", "in_chans", "dim", "depth", "heads", "mlp_hidden", "head_channels"]
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{where}: {key} must be at least 1, got {getattr(cfg, key)}")
    h, w = cfg.img_size
    if h < 1 or w < 1:
        raise ConfigError(f"{where}: img_size must be positive, got {h}x{w}")
    if h % cfg.patch or w % cfg.patch:
        raise ConfigError(
            f"{where}: image size {h}x{w} is not divisible by the patch size {cfg.patch}; "
            f"use a multiple of {cfg.patch} in both dimensions"
        )
    if cfg.dim % cfg.heads:
        raise ConfigError(f"{where}: dim {cfg.dim} is not divisible by heads {cfg.heads}")
    if cfg.num_experts < 0:
        raise ConfigError(f"{where}: num_experts must be 0 (dense ViT) or more, got {cfg.num_experts}")
    if cfg.has_moe:
        if cfg.expert_hidden < 1:
            raise ConfigError(f"{where}: expert_hidden must be at least 1, got {cfg.expert_hidden}")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ConfigError(
                f"{where}: top_k must be between 1 and num_experts ({cfg.num_experts}), got {cfg.top_k}"
            )
    if cfg.routing not in ROUTING_MODES:
        raise ConfigError(f"{where}: routing must be one of {', '.join(ROUTING_MODES)}, got '{cfg.routing}'")
    if cfg.routing == "task-conditioned" and cfg.task_embed_dim < 1:
        raise ConfigError(f"{where}: task_embed_dim must be at least 1, got {cfg.task_embed_dim}")
    if not cfg.tasks:
        raise ConfigError(f"{where}: at least one task is needed")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: task names must be unique, got {', '.join(names)}")
    for t in cfg.tasks:
        if t.channels < 1:
            raise ConfigError(f"{where}: task '{t.name}' needs at least 1 channel, got {t.channels}")
        if t.loss not in ("ce", "bce", "l1"):
            raise ConfigError(f"{where}: task '{t.name}' loss must be ce, bce or l1, got '{t.loss}'")
        if t.loss == "ce" and t.channels < 2:
            raise ConfigError(f"{where}: task '{t.name}' uses cross-entropy and needs 2 or more channels")
    if cfg.ln_eps <= 0:
        raise ConfigError(f"{where}: ln_eps must be positive, got {cfg.ln_eps}")
    return cfg


# ---- presets ---------------------------------------------------------------------------------
PASCAL_TASKS = (
    Task("semseg", 21, "ce"),
    Task("human_parts", 7, "ce"),
    Task("saliency", 1, "bce"),
    Task("edges", 1, "bce"),
    Task("normals", 3, "l1"),
)
NYUD_TASKS = (Task("semseg", 40, "ce"), Task("depth", 1, "l1"))
CITYSCAPES_TASKS = (Task("semseg", 19, "ce"), Task("depth", 1, "l1"))

# preset -> (base fields, {dataset: (img_size, tasks)}, default dataset)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, tuple[tuple[int, int], tuple[Task, ...]]], str]] = {
    "tiny": (
        dict(patch=8, dim=48, depth=4, heads=3, mlp_hidden=96, num_experts=4, expert_hidden=64, top_k=2,
             head_channels=32),
        {"synthetic": ((32, 48), (Task("semseg", 5, "ce"), Task("depth", 1, "l1")))},
        "synthetic",
    ),
    "edge-moe": (
        dict(patch=16, dim=192, depth=12, heads=3, mlp_hidden=768, num_experts=16, expert_hidden=384, top_k=2),
        {"cityscapes": ((128, 256), CITYSCAPES_TASKS)},
        "cityscapes",
    ),
    "m3vit-small": (
        dict(patch=16, dim=384, depth=12, heads=12, mlp_hidden=1536, num_experts=16, expert_hidden=384, top_k=4),
        {"pascal": ((512, 512), PASCAL_TASKS), "nyud": ((480, 640), NYUD_TASKS)},
        "pascal",
    ),
}
DEFAULT_PRESET = "edge-moe"


def preset_datasets(preset: str) -> list[str]:
    return list(_preset(preset)[1])


def _preset(preset: str):
    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def preset_config(preset: str, dataset: str | None = None) -> ModelConfig:
    base, datasets, default = _preset(preset)
    dataset = dataset or default
    if dataset not in datasets:
        raise UsageError(
            f"unknown dataset '{dataset}' for preset '{preset}'; choose one of: {', '.join(datasets)}"
        )
    img_size, tasks = datasets[dataset]
    return validate(ModelConfig(name=preset, dataset=dataset, img_size=img_size, tasks=tasks, **base))


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {first}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse CLI overrides 'key=value' (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"override '{item}' must look like key=value (for example dim=256)")
        key = key.strip()
        out[key] = value if key in ("tasks", "img_size") else yaml.safe_load(value)
    return out


def resolve_config(
    preset: str | None = None,
    dataset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] | dict[str, Any] = (),
) -> ModelConfig:
    """Preset (or the file's own 'preset' key, or the default), then the file, then CLI overrides."""
    file_data: dict[str, Any] = load_config_file(config_file) if config_file else {}
    file_data = dict(file_data)
    preset = preset or file_data.pop("preset", None) or DEFAULT_PRESET
    file_data.pop("preset", None)
    dataset = dataset or file_data.pop("dataset_preset", None)
    base = preset_config(preset, dataset)
    merged = base.to_dict()
    extra = dict(file_data)
    extra.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    if not extra:
        return base
    merged.update(extra)
    if "name" not in extra:
        merged["name"] = f"{preset}+custom"
    where = f"config file {config_file}" if config_file else "overrides"
    return ModelConfig.from_dict(merged, where)


def dense_counterpart(cfg: ModelConfig) -> ModelConfig:
    """The dense ViT of the same size: every MoE layer replaced by the dense MLP."""
    return dataclasses.replace(cfg, name=f"{cfg.name}-dense", num_experts=0)


def head_upsample_stages(cfg: ModelConfig) -> int:
    """Number of 2x stages of the SETR-PUP head: log2(patch), at least one."""
    return max(1, int(round(math.log2(cfg.patch))))
