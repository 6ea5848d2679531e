"""Checkpoints: the config travels with the weights, so a file alone rebuilds its model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from m3vit.errors import UsageError
from m3vit.model.config import ModelConfig
from m3vit.model.vit import M3ViT, build_model

FORMAT = "m3vit-checkpoint-1"


def save_checkpoint(model: M3ViT, path: str | Path, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "config": model.cfg.to_dict(), "state_dict": model.state_dict(),
               "with_heads": model.heads is not None, "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> M3ViT:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for corrupt files
        raise UsageError(f"checkpoint {path} cannot be read ({type(exc).__name__}); is it an m3vit checkpoint?") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} is not an m3vit checkpoint (expected format {FORMAT})")
    cfg = ModelConfig.from_dict(payload["config"], where=f"checkpoint {path}")
    model = build_model(cfg, with_heads=payload["with_heads"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UsageError(f"checkpoint {path} does not match its own config: {str(exc).splitlines()[0]}") from None
    return model.eval()


def model_from_args(args, with_heads: bool = True) -> M3ViT:
    """The model named by the CLI's model options: a checkpoint, or a preset/config with seeded weights."""
    from m3vit.model.config import resolve_config

    if getattr(args, "checkpoint", None):
        if args.preset or args.dataset or args.config or args.overrides:
            raise UsageError("--checkpoint carries its own config; drop --preset/--dataset/--config/--set")
        model = load_checkpoint(args.checkpoint)
        if not with_heads:
            model.heads = None
        return model
    cfg = resolve_config(args.preset, args.dataset, args.config, args.overrides)
    return build_model(cfg, with_heads=with_heads, seed=args.seed)


def task_from_args(args, cfg: ModelConfig) -> int:
    task = getattr(args, "task", None)
    return 0 if task is None else cfg.task_index(task)
