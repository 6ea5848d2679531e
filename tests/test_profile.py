"""The profiler's analytic count against the executed model, parameters, routing stats and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from m3vit.cli import main
from m3vit.model.config import ROUTING_MODES, ModelConfig, Task, dense_counterpart, preset_config, validate
from m3vit.model.profile import (
    OP_CLASSES,
    MacCounter,
    analytic_layers,
    count_executed,
    expert_params,
    expert_usage,
    op_class_of,
    param_breakdown,
    profile_model,
)
from m3vit.model.vit import build_model


@pytest.fixture(autouse=True)
def one_thread():
    # Many tiny kernels on a shared 2-core machine: OpenMP barriers would dominate the runtime.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def frame(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(seed))


def assert_exact(cfg: ModelConfig, with_head: bool = True, seeds=(0,)) -> None:
    """Every task, on every frame: instrumented per-layer MACs == analytic, on the sparse path."""
    model = build_model(cfg, with_heads=with_head)
    assert all(m.sparse for m in model.moe_layers)
    for t in range(len(cfg.tasks)):
        expected = {l["name"]: l["macs"] for l in analytic_layers(cfg, t, with_head)}
        for seed in seeds:
            counter = count_executed(model, frame(cfg, seed), t)
            assert counter.unhandled == set()
            assert dict(counter.layers) == expected, (cfg, t, seed)
            assert counter.total == sum(expected.values())


# ---- 1. analytic == instrumented ----------------------------------------------------------------
@pytest.mark.parametrize("routing", ROUTING_MODES)
@pytest.mark.parametrize("with_head", [True, False])
def test_tiny_every_task_exact(routing, with_head):
    cfg = dataclasses.replace(preset_config("tiny"), routing=routing)
    assert_exact(cfg, with_head, seeds=(0, 1, 2))


def test_edge_moe_both_tasks_exact():
    assert_exact(preset_config("edge-moe"), with_head=True)


@st.composite
def random_configs(draw):
    heads = draw(st.integers(1, 3))
    patch = draw(st.integers(2, 5))  # 3 and 5 exercise the head's final resample onto the input grid
    n_exp = draw(st.integers(1, 5))
    odd = st.integers(0, 6).map(lambda i: 2 * i + 1)
    n_tasks = draw(st.integers(1, 4))
    cfg = ModelConfig(
        name="random",
        img_size=(patch * draw(st.integers(1, 3)), patch * draw(st.integers(1, 3))),
        patch=patch,
        in_chans=draw(st.integers(1, 4)),
        dim=heads * draw(odd),
        depth=draw(st.integers(1, 4)),
        heads=heads,
        mlp_hidden=draw(odd),
        num_experts=n_exp,
        expert_hidden=draw(odd),
        top_k=draw(st.integers(1, n_exp)),
        routing=draw(st.sampled_from(ROUTING_MODES)),
        task_embed_dim=draw(odd),
        gate_noise=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        head_channels=draw(odd),
        tasks=tuple(Task(f"t{i}", draw(st.integers(1, 5)), "l1") for i in range(n_tasks)),
    )
    return validate(cfg), draw(st.booleans())


@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_configs())
def test_random_config_exact(case):
    cfg, with_head = case
    assert_exact(cfg, with_head, seeds=(0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["pascal", "nyud"])
def test_m3vit_small_every_task_exact(dataset):
    assert_exact(preset_config("m3vit-small", dataset), with_head=True)


def test_counter_sees_the_dense_masked_experts():
    """The counter measures what ran: the dense-masked MoE runs all N experts on every token plus the
    combine einsum, so it must count exactly that much more than the sparse path."""
    cfg = preset_config("tiny")
    model = build_model(cfg)
    x = frame(cfg)
    sparse = count_executed(model, x, 0)
    dense = count_executed(model.set_sparse(False), x, 0)
    model.set_sparse(True)
    T, D, H, N, k = cfg.num_tokens, cfg.dim, cfg.expert_hidden, cfg.num_experts, cfg.top_k
    per_layer = (N - k) * T * 2 * D * H + T * N * D
    assert dense.total - sparse.total == len(cfg.moe_blocks) * per_layer
    assert dense.unhandled == set()


def test_counter_rules_for_other_contractions():
    counter = MacCounter()
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    w = torch.randn(4, 2, 3, 3)  # transposed conv: Cin=4, Cout/groups=2, 3x3
    with torch.no_grad(), counter:
        F.scaled_dot_product_attention(q, k, v)
        torch.einsum("ij,jk->ik", torch.randn(3, 4), torch.randn(4, 5))
        torch.randn(6, 4) @ torch.randn(4)
        F.conv_transpose2d(torch.randn(1, 4, 5, 5), w)
    assert counter.unhandled == set()
    assert counter.total == 2 * 3 * 5 * 7 * (4 + 6) + 3 * 4 * 5 + 6 * 4 + 4 * 25 * 2 * 9


def test_op_classes_of_names():
    assert op_class_of("blocks.3.moe.experts") == "experts"
    assert op_class_of("blocks.0.attn.qkv") == "qkv"
    assert op_class_of("blocks.10.attn.qk") == "attn_qk"
    assert op_class_of("blocks.2.mlp.fc2") == "mlp"
    assert op_class_of("heads.depth.classifier") == "head"
    assert op_class_of("blocks.0.norm1") == "other"
    layers = analytic_layers(preset_config("edge-moe"), "depth")
    assert {l["op_class"] for l in layers} == set(OP_CLASSES)


# ---- 2. dense ViT against torch's FlopCounterMode -----------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "edge-moe"])
def test_dense_vit_matches_flop_counter(preset):
    cfg = dense_counterpart(preset_config(preset))
    model = build_model(cfg)
    for t in range(len(cfg.tasks)):
        macs = sum(l["macs"] for l in analytic_layers(cfg, t))
        fc = FlopCounterMode(display=False)
        with torch.no_grad(), fc:
            model(frame(cfg), task=t)
        flops = fc.get_total_flops()  # FlopCounterMode counts FLOPs = 2 x MACs
        assert abs(flops - 2 * macs) <= 0.01 * flops


# ---- 3./4. the profile's schema, parameters and routing statistics ------------------------------
@pytest.fixture(scope="module")
def tiny_profile():
    cfg = dataclasses.replace(preset_config("tiny"), num_experts=6, top_k=2)
    model = build_model(cfg)
    images = [frame(cfg, s) for s in range(3)]
    return model, profile_model(model, 1, images, with_head=True, weight_bits=8)


def test_schema_and_totals(tiny_profile):
    model, r = tiny_profile
    for key in ("total_macs", "backbone_macs", "head_macs", "layers", "params_total", "params_active",
                "params_active_per_token", "weight_bytes_per_frame", "ddr_weight_bytes_per_frame",
                "expert_usage", "by_class", "units", "preset", "dataset", "task", "images", "dense_counterpart"):
        assert key in r, key
    assert r["units"] == "MAC" and r["task"] == "depth" and r["images"] == 3
    assert sum(l["macs"] for l in r["layers"]) == r["total_macs"]
    assert r["backbone_macs"] + r["head_macs"] == r["total_macs"]
    assert sum(r["by_class"].values()) == r["total_macs"]
    assert r["head_macs"] == sum(l["macs"] for l in r["layers"] if l["name"].startswith("heads.depth."))
    assert all(set(l) == {"name", "op_class", "macs"} for l in r["layers"])
    assert json.loads(json.dumps(r)) == r


def test_parameter_counts(tiny_profile):
    model, r = tiny_profile
    cfg = model.cfg
    D, T = cfg.dim, cfg.num_tokens
    p = param_breakdown(model, 1)
    assert p["total"] == sum(x.numel() for x in model.parameters()) == r["params_total"]
    assert p["dense"] + p["gates_all"] + p["gate_training_only"] + p["experts"] + p["heads"] == p["total"]
    assert p["experts"] == len(cfg.moe_blocks) * cfg.num_experts * expert_params(cfg)
    # Dense part written out by hand for the tiny preset's shapes.
    block = 4 * D + (D * 3 * D + 3 * D) + (D * D + D)
    mlp = D * cfg.mlp_hidden + cfg.mlp_hidden + cfg.mlp_hidden * D + D
    embed = cfg.in_chans * cfg.patch**2 * D + D + D + T * D
    assert p["dense"] == embed + cfg.depth * block + (cfg.depth - len(cfg.moe_blocks)) * mlp + 2 * D
    assert p["gate"] == len(cfg.moe_blocks) * D * cfg.num_experts  # multi-gate: this task's slice only
    fixed = p["dense"] + p["gate"] + p["head"]
    touched = sum(l["touched_count"] for l in r["expert_usage"]["layers"])
    assert r["params_active"] == fixed + touched * expert_params(cfg)
    per_token = fixed + len(cfg.moe_blocks) * cfg.top_k * expert_params(cfg)
    assert r["params_active_per_token"] == per_token <= r["params_active"] <= r["params_total"]
    # Touched weights per frame lie between k and all N experts per layer, at 1 byte per weight.
    n_moe, pe = len(cfg.moe_blocks), expert_params(cfg)
    assert (fixed + n_moe * cfg.top_k * pe) <= r["weight_bytes_per_frame"] <= (fixed + n_moe * cfg.num_experts * pe)
    assert r["ddr_weight_bytes_per_frame"]["per_token"] == fixed + n_moe * T * cfg.top_k * pe
    assert r["dense_counterpart"]["params_total"] == sum(
        x.numel() for x in build_model(dense_counterpart(cfg)).parameters())


def test_weight_bytes_scale_with_width(tiny_profile):
    model, r8 = tiny_profile
    r4 = profile_model(model, 1, [frame(model.cfg, s) for s in range(3)], weight_bits=4)
    assert r4["weight_bytes_per_frame"] == pytest.approx(r8["weight_bytes_per_frame"] / 2)
    assert r4["expert_usage"] == r8["expert_usage"]


def test_expert_usage_per_image(tiny_profile):
    model, r = tiny_profile
    cfg, u = model.cfg, r["expert_usage"]
    assert [l["block"] for l in u["layers"]] == cfg.moe_blocks
    for layer in u["layers"]:
        assert len(layer["counts_per_image"]) == 3
        for row, distinct in zip(layer["counts_per_image"], layer["distinct_per_frame"]):
            assert sum(row) == cfg.top_k * cfg.num_tokens
            assert cfg.top_k <= distinct == sum(c > 0 for c in row) <= cfg.num_experts
        assert layer["counts"] == [sum(c) for c in zip(*layer["counts_per_image"])]
        assert layer["touched"] == [e for e, c in enumerate(layer["counts"]) if c]


def test_expert_usage_follows_the_routing():
    """One frame: the histogram equals the routing the MoE layers report for that frame."""
    cfg = preset_config("edge-moe")
    model = build_model(cfg, with_heads=False)
    x = frame(cfg, 5)
    u = expert_usage(model, "depth", [x])
    with torch.no_grad():
        model.features(x, 1)
    for layer, moe in zip(u["layers"], model.moe_layers):
        assert layer["counts"] == torch.bincount(moe.last_routing.flatten(), minlength=16).tolist()
        assert layer["distinct_per_frame"] == [len(torch.unique(moe.last_routing))]
    # Meaningful only if some layer leaves experts idle on this frame.
    assert min(l["distinct_per_frame"][0] for l in u["layers"]) < cfg.num_experts


def test_weight_bytes_per_frame_from_the_routing():
    """Touched bytes = fixed weights + the distinct experts of each frame, averaged over frames; with
    reordering each is fetched once per layer, without it each token fetches its k experts."""
    cfg = preset_config("edge-moe")
    model = build_model(cfg, with_heads=False)
    frames = [frame(cfg, s) for s in (5, 6)]
    r = profile_model(model, "depth", frames, weight_bits=16)
    p, pe = param_breakdown(model, "depth"), expert_params(cfg)
    distinct = []
    with torch.no_grad():
        for x in frames:
            model.features(x, 1)
            distinct.append(sum(len(torch.unique(m.last_routing)) for m in model.moe_layers))
    assert not r["with_head"] and p["head"] == 0
    assert r["weight_bytes_per_frame"] == pytest.approx((p["dense"] + p["gate"] + sum(distinct) / 2 * pe) * 2)
    assert r["ddr_weight_bytes_per_frame"]["reordered"] == r["weight_bytes_per_frame"]
    n_moe = len(cfg.moe_blocks)
    assert r["ddr_weight_bytes_per_frame"]["per_token"] == (
        p["dense"] + p["gate"] + n_moe * cfg.num_tokens * cfg.top_k * pe) * 2
    # The frames route differently, so the per-frame mean and the union over frames differ here.
    assert sum(distinct) / 2 < r["params"]["experts_touched"]


def test_dense_model_profile():
    cfg = dense_counterpart(preset_config("tiny"))
    r = profile_model(build_model(cfg), 0, [frame(cfg)], with_head=False)
    assert r["expert_usage"]["layers"] == [] and r["by_class"]["experts"] == 0
    assert r["params_active"] == r["params_active_per_token"] == r["dense_counterpart"]["params_active"]
    assert r["total_macs"] == r["dense_counterpart"]["total_macs"]


# ---- 5. command line ------------------------------------------------------------------------------
def test_cli_json(capsys):
    assert main(["profile", "--preset", "tiny", "--task", "depth", "--images", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["preset"] == "tiny" and r["task"] == "depth" and r["images"] == 2 and r["with_head"]
    assert r["total_macs"] == sum(l["macs"] for l in analytic_layers(preset_config("tiny"), "depth"))


def test_cli_text_no_head(capsys):
    assert main(["profile", "--preset", "tiny", "--images", "1", "--no-head", "--weight-bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "backbone only" in out and "4-bit" in out and "blocks.3.moe" in out


def test_cli_plot(tmp_path, capsys):
    path = tmp_path / "profile.png"
    assert main(["profile", "--preset", "tiny", "--images", "2", "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["profile.png"]  # no temporary file left behind


@pytest.mark.parametrize("argv, words", [
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "m3vit-small", "--dataset", "coco"], "unknown dataset"),
    (["--preset", "tiny", "--task", "normals"], "unknown task"),
    (["--preset", "tiny", "--task", "7"], "out of range"),
    (["--preset", "tiny", "--images", "0"], "--images"),
    (["--preset", "tiny", "--weight-bits", "0"], "--weight-bits"),
    (["--preset", "tiny", "--plot", "/nonexistent-dir/x.png"], "does not exist"),
])
def test_cli_errors_exit_2(argv, words, capsys):
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_cli_plot_into_a_directory_exits_2(tmp_path, capsys):
    assert main(["profile", "--preset", "tiny", "--plot", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
