"""The PyTorch model: routing invariants, tie-breaking, sparse = dense, tasks, configs, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from m3vit.cli import main
from m3vit.errors import ConfigError, UsageError
from m3vit.model.checkpoint import load_checkpoint, save_checkpoint
from m3vit.model.config import ModelConfig, preset_config, resolve_config
from m3vit.model.moe import MoE, cv_squared, select_topk
from m3vit.model.train import train
from m3vit.model.vit import build_model


def _tiny(**overrides) -> ModelConfig:
    return resolve_config("tiny", overrides=overrides)


def _routing(model, x, task):
    """Chosen experts per MoE layer for one task's forward."""
    with torch.no_grad():
        model.features(x, task)
    return [m.last_routing.clone() for m in model.moe_layers]


@pytest.mark.parametrize("routing", ["multi-gate", "task-conditioned"])
def test_exactly_k_distinct_experts_per_token(routing):
    cfg = _tiny(routing=routing, num_experts=5, top_k=3)
    model = build_model(cfg)
    x = torch.randn(2, 3, *cfg.img_size)
    for task in range(len(cfg.tasks)):
        for idx in _routing(model, x, task):
            assert idx.shape == (2, cfg.num_tokens, 3)
            assert (idx >= 0).all() and (idx < 5).all()
            assert (idx.sort(-1).values.diff(dim=-1) != 0).all()  # k distinct experts


def test_topk_scores_are_softmax_over_all_experts_without_renormalising():
    cfg = _tiny()
    moe = build_model(cfg).moe_layers[0]
    x = torch.randn(1, cfg.num_tokens, cfg.dim)
    idx, scores, probs = moe.route(x, 0)
    assert torch.allclose(probs.sum(-1), torch.ones(1, cfg.num_tokens), atol=1e-6)
    assert torch.equal(scores, probs.gather(-1, idx))
    assert (scores.sum(-1) < 1 - 1e-4).all()  # k < N experts keep less than all the mass
    # The chosen experts are the k largest probabilities.
    kth = scores[..., -1:]
    others = probs.scatter(-1, idx, -1.0)
    assert (others <= kth).all()


def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0, 5.0]])
    assert select_topk(logits, 2).tolist() == [[1, 2], [0, 1], [1, 3]]
    assert select_topk(logits, 3).tolist() == [[1, 2, 3], [0, 1, 2], [1, 3, 4]]


def test_tie_breaking_inside_the_moe_layer():
    cfg = _tiny(num_experts=4, top_k=2)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.gate.weight.zero_()  # every logit equal: experts 0 and 1 must win, for every token
    idx, scores, _ = moe.route(torch.randn(1, 7, cfg.dim), 0)
    assert (idx == torch.tensor([0, 1])).all()
    assert torch.allclose(scores, torch.full_like(scores, 0.25))


def test_per_task_gates_differ():
    cfg = _tiny(num_experts=8, top_k=2)
    model = build_model(cfg)
    x = torch.randn(1, 3, *cfg.img_size)
    gate = model.moe_layers[0].gate
    assert not torch.equal(gate.token_weight(0), gate.token_weight(1))
    r0, r1 = _routing(model, x, 0), _routing(model, x, 1)
    assert any(not torch.equal(a, b) for a, b in zip(r0, r1))


def test_task_conditioned_folds_into_token_gate_plus_task_bias():
    cfg = _tiny(routing="task-conditioned")
    gate = build_model(cfg).moe_layers[0].gate
    x = torch.randn(3, 5, cfg.dim)
    for task in range(len(cfg.tasks)):
        onehot = torch.nn.functional.one_hot(torch.tensor(task), len(cfg.tasks)).float()
        emb = gate.task_mlp(onehot).expand(3, 5, -1)
        concatenated = torch.cat([x, emb], -1) @ gate.weight
        folded = x @ gate.token_weight(task) + gate.task_bias(task)
        assert torch.allclose(gate(x, task), concatenated, atol=1e-5)
        assert torch.allclose(folded, concatenated, atol=1e-5)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    experts=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    heads=st.integers(1, 3),
    head_dim=st.integers(2, 9),
    routing=st.sampled_from(["multi-gate", "task-conditioned"]),
    n_tasks=st.integers(1, 4),
)
def test_sparse_equals_dense(experts, k_frac, heads, head_dim, routing, n_tasks):
    k = 1 + int(k_frac * (experts - 1))
    tasks = ",".join(f"t{i}:{i + 1}" for i in range(n_tasks))
    cfg = _tiny(num_experts=experts, top_k=k, heads=heads, dim=heads * head_dim, routing=routing,
                tasks=tasks, expert_hidden=11, img_size="24x40")
    model = build_model(cfg, with_heads=False, seed=experts)
    x = torch.randn(2, 3, *cfg.img_size, generator=torch.Generator().manual_seed(experts * 7 + heads))
    # Compared at the input of the final LayerNorm: with a 2-wide token that norm maps nearly equal
    # pairs to +-1 and turns a one-ulp difference into 1e-5 (observed on some CPUs' kernels).
    seen = []
    hook = model.norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for task in range(n_tasks):
            model.set_sparse(True).features(x, task)
            model.set_sparse(False).features(x, task)
            sparse, dense = seen[-2:]
            assert (sparse - dense).abs().max().item() <= 1e-5 * max(1.0, dense.abs().max().item())
    hook.remove()


def test_single_task_runs_only_its_head_and_gate():
    cfg = _tiny()
    model = build_model(cfg)
    x = torch.randn(1, 3, *cfg.img_size)
    called = []
    for name, head in model.heads.items():
        head.register_forward_hook(lambda m, i, o, name=name: called.append(name))
    with torch.no_grad():
        out = model(x, task="depth")
    assert called == ["depth"] and out.shape == (1, 1, *cfg.img_size)
    with torch.no_grad():
        assert torch.equal(model(x, task=1), out) and torch.equal(model(x, task="1"), out)
    with torch.no_grad():
        outs = model(x)
    assert set(outs) == {"semseg", "depth"} and outs["semseg"].shape == (1, 5, *cfg.img_size)


@pytest.mark.parametrize("preset,dataset,tokens,channels", [
    ("tiny", None, 25, [5, 1]),
    ("edge-moe", None, 129, [19, 1]),
    ("m3vit-small", "pascal", 1025, [21, 7, 1, 1, 3]),
    ("m3vit-small", "nyud", 1201, [40, 1]),
])
def test_presets(preset, dataset, tokens, channels):
    cfg = preset_config(preset, dataset)
    assert cfg.num_tokens == tokens
    assert [t.channels for t in cfg.tasks] == channels
    if preset == "edge-moe":
        assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_hidden, cfg.num_experts, cfg.expert_hidden, cfg.top_k) == \
            (192, 12, 3, 768, 16, 384, 2)
        assert cfg.moe_blocks == [1, 3, 5, 7, 9, 11]


def test_edge_moe_output_shapes():
    cfg = preset_config("edge-moe")
    model = build_model(cfg)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 256), task="semseg")
    assert out.shape == (1, 19, 128, 256)


@pytest.mark.parametrize("overrides,message", [
    ({"dim": 50}, "not divisible by heads"),
    ({"top_k": 5}, "top_k must be between 1 and num_experts"),
    ({"img_size": "30x48"}, "not divisible by the patch size"),
    ({"routing": "random"}, "routing must be one of"),
    ({"tasks": "a:2,a:3"}, "unique"),
    ({"colour": 3}, "unknown key"),
    ({"depth": "many"}, "must be an integer"),
])
def test_invalid_configs_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _tiny(**overrides)


def test_unknown_names():
    with pytest.raises(UsageError, match="unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(UsageError, match="unknown dataset 'coco'.*pascal, nyud"):
        preset_config("m3vit-small", "coco")
    with pytest.raises(UsageError, match="unknown task 'normals'"):
        preset_config("tiny").task_index("normals")
    with pytest.raises(UsageError, match="out of range"):
        preset_config("tiny").task_index(2)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: tiny\ndim: 60\nheads: 4\ntasks:\n  - {name: seg, channels: 3}\n")
    cfg = resolve_config(config_file=path, overrides=["top_k=1"])
    assert (cfg.dim, cfg.heads, cfg.top_k, cfg.task_names) == (60, 4, 1, ["seg"])
    jpath = tmp_path / "cfg.json"
    jpath.write_text(json.dumps(cfg.to_dict()))
    assert resolve_config("tiny", config_file=jpath) == ModelConfig.from_dict(cfg.to_dict())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        resolve_config(config_file=bad)


def test_checkpoint_roundtrip(tmp_path):
    model = build_model(_tiny(routing="task-conditioned"), seed=3)
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(path)
    x = torch.randn(1, 3, *model.cfg.img_size)
    with torch.no_grad():
        assert torch.equal(model(x, 1), loaded(x, 1))
    assert loaded.cfg == model.cfg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")


def test_seeded_models_are_reproducible_and_distinct():
    cfg = _tiny()
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.patch_embed.weight, c.patch_embed.weight)


def test_balancing_loss():
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    assert cv_squared(torch.tensor([4.0, 0.0])).item() == pytest.approx(1.0)
    cfg = _tiny()
    model = build_model(cfg).train()
    model(torch.randn(2, 3, *cfg.img_size), 0)
    loss = model.aux_loss()
    assert loss.item() > 0 and loss.requires_grad


def test_gate_noise_only_in_training():
    cfg = _tiny(gate_noise=True)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.moe_layers:
            m.gate.noise_weight.fill_(1.0)
    x = torch.randn(1, 3, *cfg.img_size)
    with torch.no_grad():
        assert torch.equal(model.features(x, 0), model.features(x, 0))
        model.train()
        assert not torch.equal(model.features(x, 0), model.features(x, 0))


def test_training_moves_the_gates_and_lowers_the_loss():
    model = build_model(_tiny(), seed=0)
    before = model.moe_layers[0].gate.weight.detach().clone()
    result = train(model, steps=40, batch=2, progress=False)
    assert not torch.equal(before, model.moe_layers[0].gate.weight)
    assert result.last_loss < result.first_loss


def test_cli_errors_are_one_line_exit_2(capsys, tmp_path):
    cases = [
        ["train", "--preset", "huge", "--out", str(tmp_path / "x.pt")],
        ["train", "--preset", "tiny", "--set", "dim=50", "--out", str(tmp_path / "x.pt")],
        ["train", "--preset", "m3vit-small", "--dataset", "coco", "--out", str(tmp_path / "x.pt")],
        ["train", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")],
        ["train", "--preset", "tiny", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x.pt")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err


def test_cli_train_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    assert main(["train", "--preset", "tiny", "--steps", "3", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and out.exists()
    assert load_checkpoint(out).cfg.name == "tiny"


def test_a_signal_ends_training_after_the_current_step_and_the_cli_still_saves(tmp_path, monkeypatch, capsys):
    import signal

    from m3vit.model import train as train_mod

    calls = []
    images = train_mod.SyntheticTasks.images

    def images_then_signal(self, batch):
        calls.append(batch)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return images(self, batch)

    monkeypatch.setattr(train_mod.SyntheticTasks, "images", images_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "tiny.pt"
    assert main(["train", "--preset", "tiny", "--steps", "50", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["stopped_early"] and len(calls) == 3
    assert signal.getsignal(signal.SIGTERM) is before
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["extra"]["steps"] == 3 and payload["extra"]["requested_steps"] == 50


def test_probe_training_on_a_token_subset_runs_the_subset_only():
    model = build_model(_tiny(), seed=0)
    n = model.cfg.grid[0] * model.cfg.grid[1]
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    before = model.moe_layers[0].gate.weight.detach().clone()
    result = train(model, steps=4, batch=2, progress=False, probe_heads=True, keep_tokens=0.25)
    hook.remove()
    assert seen == [1 + max(1, round(0.25 * n))] * len(seen) and len(seen) == 4 * len(model.cfg.tasks)
    assert not torch.equal(before, model.moe_layers[0].gate.weight) and result.steps == 4
    with pytest.raises(ValueError):
        train(model, steps=1, keep_tokens=0.5)
    with pytest.raises(ValueError):
        train(model, steps=1, probe_heads=True, keep_tokens=0.0)
