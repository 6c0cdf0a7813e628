"""Importing a checkpoint laid out like the official MindEyeV2 one (tiny shapes, official key names).

The official backbone is rebuilt here from torch modules with the official structure and its
forward loop as the official code writes it, so the test can check that the imported model computes
what the official one did (its no-op mixer blocks included).
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from mindeye.models import import_official_checkpoint, import_official_state_dict, load_config
from mindeye.models.official_import import OFFICIAL_SETTINGS
from mindeye.models.prior import cosine_alphas_cumprod

H, N, D = 64, 16, 32  # hidden, tokens, token width (the tiny config)
SUBJECTS = {"subj01": 40, "subj05": 50}  # official ridge.linears.0 and .1, in training order
HEADS, DIM_HEAD, ROTARY, FF_MULT, DEPTH = 2, 16, 8, 2, 1


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**prior):
    """The tiny model with the official shape-neutral settings (decoder GroupNorm 32, relative distance 128)."""
    return load_config("tiny", voxels_per_subject=SUBJECTS, low_level={"decoder_channels": [32, 32, 64],
                       "norm_groups": 32}, prior={"rel_pos_max_distance": 128, **prior})


def official_brain_network() -> nn.Module:
    """Modules named and shaped as the official BrainNetwork(seq_len=1) with a tiny low-level head."""
    def mlp(dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(0.15), nn.Linear(dim, dim))

    net = nn.Module()
    net.mixer_blocks1 = nn.ModuleList([nn.Sequential(nn.LayerNorm(H), mlp(H)) for _ in range(4)])
    net.mixer_blocks2 = nn.ModuleList([nn.Sequential(nn.LayerNorm(1), mlp(1)) for _ in range(4)])
    net.backbone_linear = nn.Linear(H, N * D)
    net.clip_proj = nn.Sequential(*[m for _ in range(3) for m in (nn.LayerNorm(D), nn.GELU(), nn.Linear(D, D))])
    net.blin1 = nn.Linear(H, 8 * 2 * 2)
    net.bnorm = nn.GroupNorm(1, 8)
    net.bupsampler = Decoder(in_channels=8, out_channels=4, up_block_types=("UpDecoderBlock2D",) * 3,
                             block_out_channels=(32, 32, 64), layers_per_block=1)  # official: default groups
    net.b_maps_projector = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.GroupNorm(1, 16), nn.ReLU(),
                                         nn.Conv2d(16, 16, 1, bias=True))
    with torch.no_grad():  # move every parameter off its initial value (LayerNorm biases included)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def official_forward(net: nn.Module, aligned_bh: torch.Tensor):
    """The official BrainNetwork forward (seq_len=1), minus the aux head: tokens, retrieval, blurry latent."""
    x = aligned_bh.unsqueeze(1)  # (b, 1, h)
    residual1, residual2 = x, x.permute(0, 2, 1)
    for block1, block2 in zip(net.mixer_blocks1, net.mixer_blocks2):
        x = block1(x) + residual1
        residual1 = x
        x = x.permute(0, 2, 1)
        x = block2(x) + residual2  # LayerNorm over the length-1 axis: block1's output is dropped here
        residual2 = x
        x = x.permute(0, 2, 1)
    x = x.reshape(len(x), -1)
    tokens = net.backbone_linear(x).reshape(len(x), -1, D)
    blurry = net.bupsampler(net.bnorm(net.blin1(x).reshape(len(x), -1, 2, 2)))
    return tokens, net.clip_proj(tokens), blurry


def official_prior_state() -> dict[str, torch.Tensor]:
    """diffusion_prior.* keys of the official BrainDiffusionPrior(PriorNetwork(learned_query_mode='pos_emb'))."""
    p, inner = "diffusion_prior.net.", HEADS * DIM_HEAD
    shapes = {"learned_query": (N, D), "null_brain_embeds": (N, D), "null_image_embed": (N, D),
              "to_time_embeds.0.1.net.0.0.weight": (2 * D, D), "to_time_embeds.0.1.net.0.0.bias": (2 * D,),
              "to_time_embeds.0.1.net.1.0.weight": (2 * D, 2 * D), "to_time_embeds.0.1.net.1.0.bias": (2 * D,),
              "to_time_embeds.0.1.net.2.weight": (D, 2 * D), "to_time_embeds.0.1.net.2.bias": (D,),
              "causal_transformer.rel_pos_bias.relative_attention_bias.weight": (8, HEADS),
              "causal_transformer.norm.g": (D,), "causal_transformer.project_out.weight": (D, D)}
    for i in range(DEPTH):
        layer = f"causal_transformer.layers.{i}."
        shapes.update({layer + "0.null_kv": (2, DIM_HEAD), layer + "0.norm.g": (D,),
                       layer + "0.to_q.weight": (inner, D), layer + "0.to_kv.weight": (2 * DIM_HEAD, D),
                       layer + "0.to_out.0.weight": (D, inner), layer + "0.to_out.1.g": (D,),
                       layer + "1.0.g": (D,), layer + "1.1.weight": (2 * FF_MULT * D, D),
                       layer + "1.5.weight": (D, FF_MULT * D)})
    state = {p + key: torch.randn(shape) for key, shape in shapes.items()}
    freqs = 1.0 / 10000 ** (torch.arange(0, ROTARY, 2).float() / ROTARY)
    state.update({p + f"causal_transformer.layers.{i}.0.rotary_emb.freqs": freqs for i in range(DEPTH)})
    steps = torch.linspace(0, 100, 101, dtype=torch.float64)
    f = torch.cos((steps / 100 + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    state["diffusion_prior.noise_scheduler.betas"] = betas.float()
    state["diffusion_prior.noise_scheduler.alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return state


@pytest.fixture
def official():
    torch.manual_seed(0)
    ridge = nn.ModuleList([nn.Linear(n, H) for n in SUBJECTS.values()])
    net = official_brain_network()
    state = {f"ridge.linears.{k}": v for k, v in ridge.state_dict().items()}
    state.update({f"backbone.{k}": v for k, v in net.state_dict().items()})
    state.update(official_prior_state())
    return ridge, net, state


def test_import_maps_weights_exactly_and_reports_every_key(official, tmp_path):
    _, _, state = official
    path = tmp_path / "last.pth"
    torch.save({"epoch": 149, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 1000}, "train_losses": [1.5, 1.2], "lrs": [3e-4]}, path)
    model, report = import_official_checkpoint(path, list(SUBJECTS), config())

    categories = [report.mapped, report.folded, report.derived, report.unmapped]
    assert sorted(k for c in categories for k in c) == sorted(state)  # every key reported exactly once
    ours = model.state_dict()
    for official_key, our_key in report.mapped.items():
        torch.testing.assert_close(ours[our_key], state[official_key], rtol=0, atol=0)
    assert report.mapped["ridge.linears.1.weight"] == "aligner.linears.subj05.weight"
    assert report.mapped["backbone.backbone_linear.weight"] == "backbone.to_tokens.weight"
    assert report.mapped["backbone.bupsampler.mid_block.attentions.0.to_q.weight"] == \
        "low_level_head.upsampler.mid_block.attentions.0.to_q.weight"
    assert report.mapped["diffusion_prior.net.causal_transformer.layers.0.1.5.weight"] == "prior.blocks.0.ff_out.weight"
    prior_keys = [k for k in state if k.startswith("diffusion_prior.net.")
                  and not k.endswith(("null_image_embed", "rotary_emb.freqs"))]
    assert set(prior_keys) <= set(report.mapped)
    assert not any(k.startswith("prior.") for k in report.fresh)  # the whole prior came from the checkpoint

    assert {k for k in report.unmapped if k.startswith("backbone.mixer_blocks1.")} == \
        {k for k in state if k.startswith("backbone.mixer_blocks1.")}
    assert "discards" in report.unmapped["backbone.mixer_blocks1.0.1.0.weight"]
    assert "ConvNeXt" in report.unmapped["backbone.b_maps_projector.0.weight"]
    assert "null_image_embed" not in report.mapped and "diffusion_prior.net.null_image_embed" in report.unmapped
    folded = {"backbone.backbone_linear.bias", "backbone.blin1.bias", "backbone.mixer_blocks2.3.1.3.bias"}
    assert folded <= set(report.folded)
    assert "checked equal" in report.derived["diffusion_prior.noise_scheduler.alphas_cumprod"]
    assert set(report.fresh) == {k for k in ours if k.startswith("backbone.blocks.")}
    summary = report.summary()
    assert f"mapped: {len(report.mapped)} tensors" in summary and f"unmapped: {len(report.unmapped)} tensors" in summary
    assert "backbone.mixer_blocks1.0.0.weight" in summary


def test_imported_model_computes_what_the_official_model_computed(official):
    ridge, net, state = official
    model, _ = import_official_state_dict(state, list(SUBJECTS), config())
    model.eval()
    voxels = torch.randn(3, 50)
    with torch.no_grad():
        tokens, retrieval, blurry = official_forward(net, ridge[1](voxels))
        out = model(voxels, "subj05")
    torch.testing.assert_close(out.backbone_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.retrieval_tokens, retrieval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.low_level_latent, blurry, rtol=1e-4, atol=1e-4)


def test_official_blocks_have_no_effect_while_imported_blocks_train(official):
    """The defect the importer relies on, shown on the official forward; our blocks train from identity."""
    ridge, net, state = official
    aligned = ridge[0](torch.randn(4, 40)).detach()
    tokens, _, _ = official_forward(net.train(), aligned)
    tokens.square().mean().backward()  # zero gradient, up to float rounding in the size-1 LayerNorm's backward
    block_grad = max(p.grad.abs().max() for p in net.mixer_blocks1.parameters())
    assert block_grad < 1e-3 * net.backbone_linear.weight.grad.abs().max()
    with torch.no_grad():
        before = official_forward(net.eval(), aligned)[0]
        for p in net.mixer_blocks1.parameters():
            p.add_(torch.randn_like(p))
        after = official_forward(net, aligned)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # whatever these weights are, nothing changes

    model, _ = import_official_state_dict(state, list(SUBJECTS), config())
    model(torch.randn(4, 40), "subj01").backbone_tokens.square().mean().backward()
    assert all(block.fc2.weight.grad.abs().max() > 1e-4 for block in model.backbone.blocks)


def test_subject_list_must_match_the_ridge_layers(official):
    _, _, state = official
    with pytest.raises(ValueError, match="2 ridge linears .* 1 subjects"):
        import_official_state_dict(state, ["subj01"], config())
    with pytest.raises(ValueError, match="ridge.linears.0 takes 40 voxels .* training order"):
        import_official_state_dict(state, ["subj05", "subj01"], config())
    with pytest.raises(ValueError, match="'subj09' is not in the config"):
        import_official_state_dict(state, ["subj01", "subj09"], config())


def test_parts_missing_from_the_checkpoint_warn_and_are_listed(official):
    _, _, state = official
    without_low_level = {k: v for k, v in state.items() if not k.startswith(("backbone.blin1", "backbone.bupsampler"))}
    with pytest.warns(UserWarning, match="random initial values"):
        _, report = import_official_state_dict(without_low_level, list(SUBJECTS), config())
    assert report.fresh["low_level_head.to_features.weight"] == "not in the official checkpoint"
    assert "low_level_head.upsampler.conv_out.weight" in report.fresh


def test_schedule_mismatch_is_an_error(official):
    _, _, state = official
    key = "diffusion_prior.noise_scheduler.alphas_cumprod"
    state[key] = state[key][:50]
    with pytest.raises(ValueError, match="not the cosine schedule of prior.timesteps=100"):
        import_official_state_dict(state, list(SUBJECTS), config())


def test_paper_config_has_the_official_shape_neutral_settings():
    paper = load_config("paper")
    for setting, official in OFFICIAL_SETTINGS.items():
        part, name = setting.split(".")
        assert getattr(getattr(paper, part), name) == official.value, setting


@pytest.mark.parametrize("setting, ours", [("low_level.norm_groups", 16), ("prior.rel_pos_max_distance", 64),
                                           ("prior.timesteps", 50)])
def test_shape_neutral_mismatch_is_refused(official, setting, ours):
    _, _, state = official
    for key in ("betas", "alphas_cumprod"):  # without its schedule the file cannot state its timesteps
        del state[f"diffusion_prior.noise_scheduler.{key}"]
    part, name = setting.split(".")
    wrong = load_config(config(), **{part: {name: ours}})
    setting_re, official_value = re.escape(setting), OFFICIAL_SETTINGS[setting].value
    with pytest.raises(ValueError, match=rf"^{setting_re}={ours} but the official model used {official_value} "
                                         rf".*paper\.yaml or set {setting_re}={official_value}$"):
        import_official_state_dict(state, list(SUBJECTS), wrong)
    import_official_state_dict(state, list(SUBJECTS), config())  # the official values import


def test_timesteps_recorded_in_the_checkpoint_take_precedence(official):
    _, _, state = official
    state["diffusion_prior.noise_scheduler.alphas_cumprod"] = cosine_alphas_cumprod(50).float()
    _, report = import_official_state_dict(state, list(SUBJECTS), config(timesteps=50))
    assert "checked equal" in report.derived["diffusion_prior.noise_scheduler.alphas_cumprod"]


def test_a_config_whose_shapes_differ_from_the_checkpoint_is_refused_not_left_random(official):
    _, _, state = official
    fewer_buckets = load_config(config(), prior={"rel_pos_buckets": 16})
    with pytest.raises(ValueError, match=r"rel_pos_bias.* has shape \(8, 2\) .*has \(16, 2\).*does not describe"):
        import_official_state_dict(state, list(SUBJECTS), fewer_buckets)


def test_settings_of_parts_not_imported_are_not_checked(official):
    _, _, state = official
    without_decoder = {k: v for k, v in state.items() if not k.startswith("backbone.bupsampler.")}
    other_groups = load_config(config(), low_level={"norm_groups": 16})
    with pytest.warns(UserWarning, match="random initial values"):
        import_official_state_dict(without_decoder, list(SUBJECTS), other_groups)


class SchedulerState:  # stands in for the official lr_scheduler's pickled Python objects
    def __init__(self):
        self.anneal = "cos"


def test_pickled_objects_need_explicit_trust(official, tmp_path):
    _, _, state = official
    path = tmp_path / "last.pth"
    torch.save({"epoch": 1, "model_state_dict": state, "lr_scheduler": SchedulerState()}, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        import_official_checkpoint(path, list(SUBJECTS), config())
    model, report = import_official_checkpoint(path, list(SUBJECTS), config(), trust_pickle=True)
    assert "ridge.linears.0.weight" in report.mapped
