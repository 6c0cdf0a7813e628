"""mindeye.generator.convert: sgm (generative-models) unCLIP checkpoints -> generator folders.

The sgm-layout state dicts here are built by this file's own diffusers -> LDM name mapping, written from
the LDM `openaimodel` / autoencoder layouts (not by calling diffusers' converter), so the converter is
checked against an independent statement of where every tensor lives.
"""
from __future__ import annotations

import datetime
import re

import pytest
import torch
from omegaconf import OmegaConf

from mindeye.generator import build_pipeline, count_parameters, load_pipeline
from mindeye.generator.convert import ConversionError, convert_sgm_state_dict, ema_key, main

# SDXL's structure at toy size: 3 levels (the first without attention), 2 resnets per level, a 2-layer
# transformer at the last level and in the middle, linear projections, text_time micro-conditioning.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32, 48],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            layers_per_block=2, transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 3],
            norm_num_groups=8, use_linear_projection=True, cross_attention_dim=16,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
           norm_num_groups=4, latent_channels=4, sample_size=16)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="epsilon")
CONFIG = dict(vae=VAE, unet=UNET, schedule=SCHEDULE,
              micro_conditioning={"original_size": [16, 16], "crop_coords": [0, 0]},
              sampling={"sampler": "euler", "steps": 2, "guidance_scale": 2.0})
CLIP = dict(clip_id="test-clip", clip_tokens=4)

# ---- diffusers name -> sgm key, from the LDM layout ---------------------------------------------------
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
RES_BLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_TOP = {"conv_norm_out": "norm_out"}
VAE_RES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def sgm_unet_key(name: str, cfg: dict) -> str:
    """openaimodel: input_blocks.0 = conv_in; then per level `layers` x [ResBlock, SpatialTransformer?] and a
    Downsample block (op); middle_block = [ResBlock, SpatialTransformer, ResBlock]; output_blocks per level
    (layers + 1) x [ResBlock, SpatialTransformer?, Upsample on the last]."""
    parts = name.split(".")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    if module in UNET_TOP:
        return f"model.diffusion_model.{UNET_TOP[module]}.{leaf}"
    layers = cfg["layers_per_block"]

    def res(rest):  # [norm1, weight] -> in_layers.0.weight
        return f"{RES_BLOCK[rest[0]]}.{rest[1]}"

    if parts[0] == "mid_block":
        sub, j, rest = parts[1], int(parts[2]), parts[3:]
        ldm = f"middle_block.{2 * j}.{res(rest)}" if sub == "resnets" else f"middle_block.1.{'.'.join(rest)}"
        return f"model.diffusion_model.{ldm}"
    kind, b, sub, j, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if kind == "down_blocks":
        block, blocks = 1 + b * (layers + 1) + j, "input_blocks"
        if sub == "downsamplers":  # the level's last input block: [Downsample]
            return f"model.diffusion_model.input_blocks.{(b + 1) * (layers + 1)}.0.op.{leaf}"
    else:
        block, blocks = b * (layers + 1) + j, "output_blocks"
        if sub == "upsamplers":  # after the level's last ResBlock (and SpatialTransformer, if any)
            after = 2 if "CrossAttn" in cfg["up_block_types"][b] else 1
            return f"model.diffusion_model.output_blocks.{b * (layers + 1) + layers}.{after}.conv.{leaf}"
    inner = f"0.{res(rest)}" if sub == "resnets" else f"1.{'.'.join(rest)}"
    return f"model.diffusion_model.{blocks}.{block}.{inner}"


def sgm_vae_key(name: str, cfg: dict) -> str:
    """LDM autoencoder: encoder.down.i.block.j / .downsample, decoder.up.i (numbered from the bottom: diffusers'
    up_blocks.0 is up.{n-1}), mid.block_1 / attn_1 / block_2, norm_out; attention q/k/v/proj_out are 1x1 convs."""
    parts = name.split(".")
    coder, leaf = parts[0], parts[-1]
    levels = len(cfg["block_out_channels"])
    if len(parts) == 2:  # quant_conv, post_quant_conv
        return f"first_stage_model.{name}"
    if len(parts) == 3:
        return f"first_stage_model.{coder}.{VAE_TOP.get(parts[1], parts[1])}.{leaf}"
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            inner = f"mid.block_{int(parts[3]) + 1}.{VAE_RES.get(parts[4], parts[4])}"
        else:
            inner = f"mid.attn_1.{VAE_ATTN['.'.join(parts[4:-1])]}"
        return f"first_stage_model.{coder}.{inner}.{leaf}"
    i, sub = int(parts[2]), parts[3]
    level = f"down.{i}" if coder == "encoder" else f"up.{levels - 1 - i}"
    if sub == "resnets":
        inner = f"block.{parts[4]}.{VAE_RES.get(parts[5], parts[5])}"
    else:
        inner = "downsample.conv" if coder == "encoder" else "upsample.conv"
    return f"first_stage_model.{coder}.{level}.{inner}.{leaf}"


def sgm_layout(pipe, cfg: dict) -> dict[tuple[str, str], tuple[str, tuple]]:
    """(component, diffusers name) -> (sgm key, its shape in the checkpoint)."""
    layout = {("unet", name): (sgm_unet_key(name, cfg["unet"]), tuple(p.shape))
              for name, p in pipe.unet.state_dict().items()}
    for name, p in pipe.vae.state_dict().items():
        conv = ".attentions." in name and name.endswith("weight") and p.ndim == 2  # linear (C, C) <- conv (C, C, 1, 1)
        layout["vae", name] = (sgm_vae_key(name, cfg["vae"]), tuple(p.shape) + ((1, 1) if conv else ()))
    return layout


def scaled_linear_sigmas(n=1000, start=0.00085, end=0.012) -> torch.Tensor:
    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1 - betas, 0)
    return ((1 - alphas_bar) / alphas_bar).sqrt().float()


EXTRAS = {  # key -> a word its reason must contain
    "conditioner.embedders.0.model.visual.proj": "mindeye.clip",
    "conditioner.embedders.0.model.visual.transformer.resblocks.0.attn.in_proj_weight": "mindeye.clip",
    "model_ema.decay": "bookkeeping",
    "model_ema.num_updates": "bookkeeping",
    "denoiser.sigmas": "matches",
    "first_stage_model.loss.logvar": "loss",
}


@pytest.fixture(scope="module")
def toy():
    """(layout, sgm state dict with EMA copies and extras) for CONFIG."""
    layout = sgm_layout(build_pipeline(CONFIG, **CLIP, device="meta"), CONFIG)
    g = torch.Generator().manual_seed(0)
    sd = {key: torch.randn(shape, generator=g) for key, shape in layout.values()}
    sd.update({ema_key(key): torch.randn(sd[key].shape, generator=g)
               for key in list(sd) if key.startswith("model.diffusion_model.")})
    sd.update({"conditioner.embedders.0.model.visual.proj": torch.randn(8, 16, generator=g),
               "conditioner.embedders.0.model.visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8),
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(110000),
               "denoiser.sigmas": scaled_linear_sigmas(), "first_stage_model.loss.logvar": torch.zeros(())})
    return layout, sd


def assert_weights_from(pipe, layout, sd, *, ema=False):
    states = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict()}
    for (component, name), (key, _) in layout.items():
        source = sd[ema_key(key) if ema and component == "unet" else key]
        target = states[component][name]
        assert torch.equal(target, source.reshape(target.shape)), (component, name, key)


def test_every_parameter_comes_from_its_sgm_tensor(toy, one_thread):
    layout, sd = toy
    pipe, report = convert_sgm_state_dict(sd, CONFIG, **CLIP)
    assert_weights_from(pipe, layout, sd)
    assert report.counts() == {"unet": len(pipe.unet.state_dict()), "vae": len(pipe.vae.state_dict())}
    assert {(c, n): k for c, mapping in report.sources.items() for n, k in mapping.items()} == {
        cn: key for cn, (key, _) in layout.items()}
    for key, word in EXTRAS.items():
        assert word in report.unmapped[key], (key, report.unmapped[key])
    ema_keys = [k for k in sd if k.startswith("model_ema.diffusion_model")]
    assert ema_keys and all("EMA copy" in report.unmapped[k] for k in ema_keys)
    assert set(report.unmapped) == set(EXTRAS) | set(ema_keys)  # every UNet/VAE tensor was used
    summary = report.summary()
    assert f"unet: {len(pipe.unet.state_dict())} tensors mapped" in summary and "mindeye.clip" in summary


def test_ema_copy_converts_instead(toy, one_thread):
    layout, sd = toy
    pipe, report = convert_sgm_state_dict(sd, CONFIG, ema=True, **CLIP)
    assert_weights_from(pipe, layout, sd, ema=True)
    assert "superseded" in report.unmapped["model.diffusion_model.out.2.weight"]


@pytest.mark.parametrize("key", [
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight",  # 2nd layer, cross-attn
    "model.diffusion_model.output_blocks.4.0.in_layers.0.bias",
    "model.diffusion_model.label_emb.0.2.weight",
    "first_stage_model.decoder.mid.attn_1.k.weight",
])
def test_a_missing_tensor_is_refused_by_name(toy, key, one_thread):
    _, sd = toy
    with pytest.raises(ConversionError, match=re.escape(key)):
        convert_sgm_state_dict({k: v for k, v in sd.items() if k != key}, CONFIG, **CLIP)


def test_a_wrong_shape_or_a_leftover_tensor_is_refused(toy, one_thread):
    _, sd = toy
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"  # (48, 16) here
    with pytest.raises(ConversionError, match=re.escape(key) + r".*shape \(48, 20\)"):
        convert_sgm_state_dict({**sd, key: torch.zeros(48, 20)}, CONFIG, **CLIP)
    extra = "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn1.to_q.weight"  # a 3rd layer
    with pytest.raises(ConversionError, match=re.escape(extra)):
        convert_sgm_state_dict({**sd, extra: torch.zeros(48, 48)}, CONFIG, **CLIP)


def test_cli_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "unclip6_epoch0_step110000.ckpt"
    assert main(["--checkpoint", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err


def test_cli_writes_a_folder_that_loads_and_generates(toy, tmp_path, capsys, one_thread):
    layout, sd = toy
    checkpoint, config, out = tmp_path / "toy.ckpt", tmp_path / "toy.yaml", tmp_path / "generator"
    # a Lightning-like file: one non-tensor object makes the weights-only load fail (the fallback's path)
    torch.save({"state_dict": sd, "global_step": 110000, "hyper_parameters": {"date": datetime.date(2024, 3, 1)}},
               checkpoint)
    OmegaConf.save(OmegaConf.create(CONFIG), config)
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--config", str(config),
            "--clip-id", CLIP["clip_id"], "--clip-tokens", str(CLIP["clip_tokens"])]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "weights_only=False" in captured.err
    assert f"vae: {sum(c == 'vae' for c, _ in layout)} tensors mapped" in captured.out
    assert "conditioner embedder 0" in captured.out and (out / "conversion_report.json").is_file()
    assert main(argv) == 2  # no silent overwrite

    pipe = load_pipeline(out)
    assert_weights_from(pipe, layout, sd)
    images = pipe(torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1)), num_inference_steps=2,
                  guidance_scale=2.0, generator=torch.Generator().manual_seed(2), clip_id="test-clip").images
    assert images.shape == (1, 16, 16, 3) and images.dtype.name == "uint8"


def test_paper_config_maps_key_for_key_on_meta():
    """The real size, shapes only: SDXL base's UNet (2,567,463,684 parameters) with cross-attention k/v
    reading 1664-d tokens instead of 2048-d (70 transformer blocks: 10 at 640, 60 at 1280 channels) and a
    1024-d instead of 2816-d vector input: 2,567,463,684 - 768 x 83,200 - 1792 x 1280 = 2,501,272,324."""
    from mindeye.generator import generator_config

    cfg = generator_config("paper")
    pipe = build_pipeline(cfg, clip_id="bigG", clip_tokens=256, device="meta")
    assert count_parameters(pipe.unet) == 2_501_272_324
    layout = sgm_layout(pipe, cfg)
    sd = {key: torch.empty(shape, device="meta") for key, shape in layout.values()}
    converted, report = convert_sgm_state_dict(sd, "paper", clip_id="bigG", clip_tokens=256)
    assert {(c, n): k for c, mapping in report.sources.items() for n, k in mapping.items()} == {
        cn: key for cn, (key, _) in layout.items()}
    assert report.counts() == {"unet": 1680, "vae": 248} and not report.unmapped
