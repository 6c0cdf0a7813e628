"""The frozen CLIP image encoder: seeded small ViTs, and real weights or a clear error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mindeye.clip import build_clip_embedder
from mindeye.config import CONFIG_DIR
from mindeye.errors import MissingFileError

TINY = OmegaConf.load(CONFIG_DIR / "clip/tiny_vit.yaml")


def test_random_vit_is_seeded_and_returns_patch_tokens():
    images = np.random.default_rng(0).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)  # resized to 64
    first = build_clip_embedder(TINY).embed_array(images)
    assert first.shape == (3, 16, 64) and first.dtype == np.float16
    np.testing.assert_array_equal(first, build_clip_embedder(TINY).embed_array(images))
    other = build_clip_embedder(OmegaConf.merge(TINY, {"seed": 1})).embed_array(images)
    assert not np.allclose(first, other)
    # Tokens are LayerNorm outputs: per-token mean ~0 and std ~1 (the encoder's final norm).
    assert abs(first.astype(np.float32).mean()) < 0.1


def test_encoder_is_frozen():
    embedder = build_clip_embedder(TINY)
    assert not any(p.requires_grad for p in embedder.parameters())
    assert not embedder.training


def test_random_weights_need_an_explicit_small_vit():
    with pytest.raises(ValueError, match="needs a `vision` config"):
        build_clip_embedder({"name": "ViT-bigG-14", "weights": "random"})


def test_missing_bigG_weights_fail_clearly_without_building():
    bigG = OmegaConf.load(CONFIG_DIR / "clip/bigG.yaml")
    with pytest.raises(MissingFileError) as err:
        build_clip_embedder(bigG)
    assert "CLIP-ViT-bigG-14-laion2B-39B-b160k" in str(err.value) and "huggingface" in str(err.value)
    with pytest.raises(MissingFileError, match="neither a file nor one of the tags"):
        build_clip_embedder({"name": "ViT-bigG-14", "weights": "/nonexistent/open_clip_pytorch_model.bin"})


def test_named_model_loads_local_weights(tmp_path):
    """The real loading path of bigG, on a small named open_clip ViT: weights from a local file."""
    import open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-S-32-alt").eval()
    path = tmp_path / "vit_s_32.pt"
    torch.save(reference.state_dict(), path)
    embedder = build_clip_embedder({"name": "ViT-S-32-alt", "weights": str(path)})
    assert (embedder.n_tokens, embedder.dim) == (49, 384)  # 224 px / 32 = 7 x 7 patches, width 384
    images = torch.rand(2, 3, 224, 224)
    reference.visual.output_tokens = True
    with torch.no_grad():
        _, expected = reference.visual((images - embedder.mean) / embedder.std)
    torch.testing.assert_close(embedder(images), expected)


def test_non_vit_encoder_is_refused(tmp_path):
    import open_clip

    path = tmp_path / "rn50.pt"
    torch.save(open_clip.create_model("RN50").state_dict(), path)
    with pytest.raises(ValueError, match="patch tokens"):
        build_clip_embedder({"name": "RN50", "weights": str(path)})
