"""A short synthetic multi-task training loop, so that task gates become non-random on CPU.

Targets come from fixed, seeded functions of the input image (a random 1x1 "teacher" for class maps,
blurred luminance for depth-like maps, gradients for edges), which gives every task something
learnable and different from the others. Inputs are crops of the bundled photographs plus noise.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from m3vit.model.config import Task
from m3vit.model.images import sample_images, MEAN, STD
from m3vit.model.vit import M3ViT


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    stopped: bool = False  # ended early by SIGINT/SIGTERM; `steps` counts the steps done


@contextmanager
def _stop_on_signal():
    """SIGINT/SIGTERM set a flag instead of killing the run, so the loop can finish its current step
    and the caller can still save the weights. SIGINT is handled explicitly because a background job
    of a non-interactive shell starts with it ignored."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {sig: signal.signal(sig, lambda *_: flag.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class SyntheticTasks:
    def __init__(self, tasks: tuple[Task, ...], size: tuple[int, int], seed: int = 0):
        self.size = size
        self.gen = torch.Generator().manual_seed(seed)
        self.teachers = {t.name: torch.randn(t.channels, 3, generator=self.gen) for t in tasks}
        self.tasks = tasks
        self.photos = [torch.from_numpy(img).permute(2, 0, 1) for _, img in sample_images()]

    def images(self, batch: int) -> torch.Tensor:
        out = []
        h, w = self.size
        for _ in range(batch):
            if self.photos:
                photo = self.photos[int(torch.randint(len(self.photos), (1,), generator=self.gen))]
                ph, pw = photo.shape[1:]
                scale = float(torch.empty(1).uniform_(0.4, 1.0, generator=self.gen))
                ch, cw = max(8, int(ph * scale)), max(8, int(pw * scale))
                y0 = int(torch.randint(ph - ch + 1, (1,), generator=self.gen))
                x0 = int(torch.randint(pw - cw + 1, (1,), generator=self.gen))
                crop = photo[:, y0 : y0 + ch, x0 : x0 + cw][None]
                img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
            else:
                img = torch.rand(3, h, w, generator=self.gen)
            out.append(img + 0.05 * torch.randn(img.shape, generator=self.gen))
        rgb = torch.stack(out).clamp(0, 1)
        return rgb

    def targets(self, rgb: torch.Tensor, task: Task) -> torch.Tensor:
        smooth = F.avg_pool2d(rgb, 5, stride=1, padding=2, count_include_pad=False)
        mixed = torch.einsum("ck,bkhw->bchw", self.teachers[task.name], smooth - 0.5)
        if task.loss == "ce":
            return mixed.argmax(1)
        if task.loss == "bce":
            gray = rgb.mean(1, keepdim=True)
            edge = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
            edge = F.pad(edge, (0, 0, 0, 1))
            return (edge + 0.2 * mixed[:, :1] > 0.1).float().expand(-1, task.channels, -1, -1)
        return torch.tanh(mixed)

    @staticmethod
    def normalise(rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]


def task_loss(pred: torch.Tensor, target: torch.Tensor, task: Task) -> torch.Tensor:
    if task.loss == "ce":
        return F.cross_entropy(pred, target)
    if task.loss == "bce":
        return F.binary_cross_entropy_with_logits(pred, target)
    return F.l1_loss(pred, target)


class ProbeHeads(nn.Module):
    """Cheap stand-in for the SETR heads: one linear map per task from each patch token to the
    task's channels at the token grid, trained against targets computed on the image pooled to
    that grid. Used only by `train(probe_heads=True)`; the probes are not saved with the model.

    With ``keep_tokens`` < 1 each step runs the backbone on the CLS token and a random subset of
    the patch tokens (each with its own position embedding), as in masked-image pretraining: a
    quarter of the tokens cuts a 1025-token step about fourfold on CPU."""

    def __init__(self, model: M3ViT, keep_tokens: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        self.grid = model.cfg.grid
        self.probes = nn.ModuleDict({t.name: nn.Linear(model.cfg.dim, t.channels) for t in model.cfg.tasks})
        self.n_patches = self.grid[0] * self.grid[1]
        self.keep = max(1, round(keep_tokens * self.n_patches))
        self.gen = generator

    def forward(self, model: M3ViT, x: torch.Tensor, task: int, target: torch.Tensor):
        """Prediction and target (pooled to the token grid) on the kept tokens: B x C x K, and
        B x K or B x C x K."""
        if self.keep == self.n_patches:
            tokens = model.features(x, task)[:, 1:]
            kept = None
        else:
            kept = torch.randperm(self.n_patches, generator=self.gen)[: self.keep].sort().values
            seq = model.tokens(x)
            seq = torch.cat([seq[:, :1], seq[:, 1 + kept]], dim=1)
            for block in model.blocks:
                seq = block(seq, task)
            tokens = model.norm(seq)[:, 1:]
        out = self.probes[model.cfg.task_names[task]](tokens).transpose(1, 2)
        target = target.flatten(-2)
        return out, target if kept is None else target[..., kept]


def train(model: M3ViT, steps: int = 200, batch: int = 2, lr: float = 3e-4, seed: int = 0,
          progress: bool = True, probe_heads: bool = False, tasks_per_step: int | None = None,
          keep_tokens: float = 1.0) -> TrainResult:
    """Every step visits every task (its own gate pathway and head), plus the balancing loss.

    For large presets on CPU (the SETR heads of m3vit-small at 512x512 cost minutes per step):
    ``probe_heads`` trains the backbone through per-task linear token probes instead of the heads
    (which stay untouched), ``keep_tokens`` (with ``probe_heads``) runs each step on that fraction of
    the patch tokens, and ``tasks_per_step`` visits only that many tasks per step, in turn.
    SIGINT or SIGTERM ends the run after the current step (``TrainResult.stopped``)."""
    if model.heads is None and not probe_heads:
        raise ValueError("training needs the task heads; build the model with heads")
    n_tasks = len(model.cfg.tasks)
    if tasks_per_step is not None and not 1 <= tasks_per_step <= n_tasks:
        raise ValueError(f"tasks_per_step must be between 1 and {n_tasks}")
    if not 0 < keep_tokens <= 1:
        raise ValueError("keep_tokens must be in (0, 1]")
    if keep_tokens < 1 and not probe_heads:
        raise ValueError("keep_tokens < 1 needs probe_heads (the SETR heads take the whole token grid)")
    torch.manual_seed(seed)
    data = SyntheticTasks(model.cfg.tasks, model.cfg.img_size, seed)
    probes = ProbeHeads(model, keep_tokens, data.gen) if probe_heads else None
    params = list(model.parameters()) + (list(probes.parameters()) if probes is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    start = time.perf_counter()
    per_step = tasks_per_step or n_tasks
    done = 0
    with _stop_on_signal() as stop, tqdm(total=steps, desc=f"train {model.cfg.name}", unit="step",
                                         disable=not progress) as bar:
        for step in range(steps):
            if stop.is_set():
                break
            rgb = data.images(batch)
            x = data.normalise(rgb)
            opt.zero_grad()
            loss = torch.zeros(())
            for i in ((step * per_step + j) % n_tasks for j in range(per_step)):
                task = model.cfg.tasks[i]
                if probes is None:
                    pred, target = model(x, i), data.targets(rgb, task)
                else:
                    pooled = data.targets(F.adaptive_avg_pool2d(rgb, model.cfg.grid), task)
                    pred, target = probes(model, x, i, pooled)
                loss = loss + task_loss(pred, target, task) + model.aux_loss()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return TrainResult(done, time.perf_counter() - start, losses[0] if losses else 0.0,
                       sum(losses[-10:]) / max(1, len(losses[-10:])), stopped=done < steps)
