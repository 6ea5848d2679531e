"""M3ViT / Edge-MoE: a pre-norm ViT whose odd blocks carry a task-gated MoE layer.

`model(x, task=t)` runs one task's pathway: its gate in every MoE layer and its head only.
`model(x)` runs every task and returns a dict. A task is a name or an index; inside the
ONNX export it may be a 0-d tensor, which selects the gate by a Gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m3vit.model.config import ModelConfig
from m3vit.model.heads import PUPHead
from m3vit.model.moe import MoE


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        if cfg.is_moe_block(index):
            self.moe = MoE(cfg)
        else:
            self.mlp = Mlp(cfg.dim, cfg.mlp_hidden)

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "moe")

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + (self.moe(h, task) if self.is_moe else self.mlp(h))


class M3ViT(nn.Module):
    def __init__(self, cfg: ModelConfig, with_heads: bool = True):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.heads = nn.ModuleDict({t.name: PUPHead(cfg, t) for t in cfg.tasks}) if with_heads else None

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.moe for b in self.blocks if b.is_moe]

    def set_sparse(self, sparse: bool) -> "M3ViT":
        """Switch every MoE layer between sparse gather/scatter and the dense-masked reference."""
        for m in self.moe_layers:
            m.sparse = sparse
        return self

    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the last training forward, weighted as configured."""
        losses = [m.aux_loss for m in self.moe_layers]
        return self.cfg.balance_weight * sum(losses) if losses else torch.zeros(())

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS token and position embedding: the backbone's input tokens."""
        b, _, h, w = x.shape
        if (h, w) != tuple(self.cfg.img_size):
            raise ValueError(f"input is {h}x{w}, but the model '{self.cfg.name}' takes {self.cfg.img_size[0]}x{self.cfg.img_size[1]}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed

    def features(self, x: torch.Tensor, task) -> torch.Tensor:
        """One task's backbone pathway: LN'd tokens (CLS first), B x (1+N) x D."""
        if not isinstance(task, torch.Tensor):
            task = self.cfg.task_index(task)
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x, task)
        return self.norm(x)

    def forward(self, x: torch.Tensor, task=None):
        if task is None:
            return {name: self.forward(x, i) for i, name in enumerate(self.cfg.task_names)}
        t = self.cfg.task_index(task)
        feats = self.features(x, t)
        if self.heads is None:
            return feats
        return self.heads[self.cfg.task_names[t]](feats)


def build_model(cfg: ModelConfig, with_heads: bool = True, seed: int = 0) -> M3ViT:
    """A model with deterministic initial weights (the same seed gives the same model)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = M3ViT(cfg, with_heads=with_heads)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()
