"""The MoE layer of M3ViT: per-task gates over shared experts, top-k without renormalising.

Experts are stored stacked (w1: N×D×H, w2: N×H×D) so that the sparse eager path, the dense
reference and the static-shape ONNX form all read the same parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from m3vit.model.config import ModelConfig


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var / (mean^2 + 1e-10), the M3ViT balancing statistic."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def select_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits per row; equal logits go to the lower expert index.

    A stable descending sort keeps equal values in index order, which torch.topk does not promise.
    During ONNX export, TopK is used: its specification breaks ties by the lower index too.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.topk(logits, k, dim=-1, largest=True, sorted=True).indices
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]


class TaskGate(nn.Module):
    """Gate logits for one task: LN'd tokens times a per-task matrix (multi-gate), or a shared
    matrix over [token, task embedding] (task-conditioned). No bias in either mode's token part."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.routing = cfg.routing
        n_tasks, dim, n_exp = len(cfg.tasks), cfg.dim, cfg.num_experts
        if cfg.routing == "multi-gate":
            self.weight = nn.Parameter(torch.empty(n_tasks, dim, n_exp))
            nn.init.normal_(self.weight, std=dim**-0.5)
        else:
            e = cfg.task_embed_dim
            self.task_mlp = nn.Sequential(nn.Linear(n_tasks, e), nn.ReLU(), nn.Linear(e, e))
            self.weight = nn.Parameter(torch.empty(dim + e, n_exp))
            nn.init.normal_(self.weight, std=(dim + e) ** -0.5)
        self.noise_weight = nn.Parameter(torch.zeros(n_tasks, dim, n_exp)) if cfg.gate_noise else None
        self.n_tasks = n_tasks
        self.dim = dim

    def task_bias(self, task: int) -> torch.Tensor:
        """Task-conditioned routing folded for inference: the embedding's share of the logits."""
        # arange == task rather than F.one_hot: ONNX OneHot rejects the 0-d task id of the multi-task export.
        onehot = (torch.arange(self.n_tasks, device=self.weight.device) == task).to(self.weight.dtype)
        return self.task_mlp(onehot) @ self.weight[self.dim :]

    def token_weight(self, task: int) -> torch.Tensor:
        return self.weight[task] if self.routing == "multi-gate" else self.weight[: self.dim]

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        logits = x @ self.token_weight(task)
        if self.routing == "task-conditioned":
            logits = logits + self.task_bias(task)
        if self.noise_weight is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(x @ self.noise_weight[task])
        return logits


class MoE(nn.Module):
    """Top-k mixture of GELU-MLP experts; output = sum of score * expert(x) over the chosen experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, h = cfg.num_experts, cfg.dim, cfg.expert_hidden
        self.num_experts, self.top_k = n, cfg.top_k
        self.gate = TaskGate(cfg)
        self.w1 = nn.Parameter(torch.empty(n, d, h))
        self.b1 = nn.Parameter(torch.zeros(n, h))
        self.w2 = nn.Parameter(torch.empty(n, h, d))
        self.b2 = nn.Parameter(torch.zeros(n, d))
        # Same init as nn.Linear, expert by expert.
        for w, fan_in in ((self.w1, d), (self.w2, h)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for b, fan_in in ((self.b1, d), (self.b2, h)):
            nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.sparse = True
        self.aux_loss = torch.zeros(())
        self.last_routing: torch.Tensor | None = None

    def route(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (indices B×T×k, their scores B×T×k, the full softmax B×T×N)."""
        logits = self.gate(x, task)
        probs = logits.softmax(dim=-1)
        idx = select_topk(logits, self.top_k)
        return idx, probs.gather(-1, idx), probs

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, self.w1[e].t(), self.b1[e])), self.w2[e].t(), self.b2[e])

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        idx, scores, probs = self.route(x, task)
        self.last_routing = idx.detach()
        if self.training:
            importance = torch.zeros_like(probs).scatter(-1, idx, scores).flatten(0, -2).sum(0)
            load = F.one_hot(idx, self.num_experts).flatten(0, -3).sum((0, 1)).float()
            self.aux_loss = cv_squared(importance) + cv_squared(load)
        if self.sparse and not torch.onnx.is_in_onnx_export():
            return self.forward_sparse(x, idx, scores)
        return self.forward_dense(x, idx, scores)

    def forward_sparse(self, x: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Each expert runs only on the tokens routed to it: gather, expert, scatter with score."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, scores = idx.reshape(-1, self.top_k), scores.reshape(-1, self.top_k)
        out = torch.zeros_like(flat)
        for e in torch.unique(idx).tolist():
            token, slot = torch.nonzero(idx == e, as_tuple=True)
            y = self.expert(e, flat[token]) * scores[token, slot].unsqueeze(-1)
            out = out.index_add(0, token, y)
        return out.reshape(shape)

    def forward_dense(self, x: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, combined with a score matrix that is zero where not routed.

        Static shapes throughout, which is the form exported to ONNX."""
        combine = torch.zeros(*idx.shape[:-1], self.num_experts, dtype=x.dtype, device=x.device)
        combine = combine.scatter(-1, idx, scores)  # B×T×N
        if torch.onnx.is_in_onnx_export():
            # The same contractions as broadcast MatMuls, not Einsum: the exported graph then carries
            # plain expert-batched MatMuls (B×1×T×D @ N×D×H) that the compiler can match.
            h = F.gelu(x.unsqueeze(1) @ self.w1 + self.b1[None, :, None, :])
            y = h @ self.w2 + self.b2[None, :, None, :]
            return (combine.unsqueeze(-2) @ y.transpose(1, 2)).squeeze(-2)
        h = F.gelu(torch.einsum("btd,ndh->bnth", x, self.w1) + self.b1[None, :, None, :])
        y = torch.einsum("bnth,nhd->bntd", h, self.w2) + self.b2[None, :, None, :]
        return torch.einsum("bntd,btn->btd", y, combine)
