"""The token readout: scikit-learn's ridge and leave-one-out choice of alpha in kernel form, its file in the
checkpoint and the bundle, and the decode backends drawing the generator's tokens from it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import Ridge, RidgeCV

from export.cli import export_bundle
from mindeye.errors import ConfigValueError, FormatError, MissingFileError
from mindeye.generator import GenerationSettings, build_pipeline, load_pipeline
from mindeye.latents import PixelCodec
from mindeye.models import build_model, save_calibration, save_checkpoint
from mindeye.models.readout import (READOUT_FILE, fit_token_readout, load_readouts, require_readout,
                                    save_readouts)
from realtime.backends import TorchBackend, load_backend

VOXELS = {"subj01": 40, "subj02": 50}
TOKENS, DIM = 16, 32  # the tiny config's CLIP token shape
CLIP_ID = "test-encoder"
ALPHAS = [0.1, 10.0, 1e3, 1e5]

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_problem(n: int, p: int, q: int, noise: float, seed: int = 0):
    """Features with uneven scales and offsets, targets linear in them plus noise, and new features."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(p, q)) / np.sqrt(p)
    scale, offset = rng.uniform(0.5, 2.0, p), rng.normal(size=p)
    x, x_new = (rng.normal(size=(m, p)) * scale + offset for m in (n, 20))
    return x, x @ weights + noise * rng.normal(size=(n, q)) + 3.0, x_new


def zscored(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return (x - like.mean(0)) / (like.std(0) + 1e-6)


@pytest.mark.parametrize("noise", [0.05, 0.5, 3.0])
def test_the_readout_is_scikit_learns_ridge_with_the_alpha_its_leave_one_out_picks(noise):
    x, y, x_new = linear_problem(n=60, p=200, q=12, noise=noise)  # more features than trials: kernel form
    readout, loo = fit_token_readout(torch.tensor(x).reshape(60, 10, 20), torch.tensor(y).reshape(60, 3, 4), ALPHAS)
    reference = RidgeCV(alphas=ALPHAS).fit(zscored(x, x), y)  # efficient LOO over the same alphas, intercept fitted
    assert readout.alpha == reference.alpha_
    assert loo[readout.alpha] == pytest.approx(-reference.best_score_, rel=1e-9)
    assert readout.token_shape == (3, 4) and readout.n_trials == 60
    features = torch.tensor(x_new, dtype=torch.float32).reshape(20, 10, 20)
    with torch.no_grad():
        ridge, tokens = readout.ridge(features).numpy(), readout(features).numpy()
    want = Ridge(alpha=readout.alpha).fit(zscored(x, x), y).predict(zscored(x_new, x)).reshape(20, 3, 4)
    np.testing.assert_allclose(ridge, want, atol=1e-4 * np.abs(want).max())
    # the tokens the generator gets: the ridge's directions at the training targets' mean norm per position
    unit = want / np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(tokens, unit * np.linalg.norm(y.reshape(60, 3, 4), axis=-1).mean(0)[:, None],
                               rtol=1e-4)


def test_leave_one_out_follows_the_noise_to_a_stronger_penalty():
    alphas = [fit_token_readout(*(torch.tensor(a) for a in linear_problem(60, 200, 12, noise)[:2]), ALPHAS)[0].alpha
              for noise in (0.01, 10.0)]
    assert alphas[0] < alphas[1]


def test_readouts_round_trip_through_the_checkpoint_and_say_what_is_missing(tmp_path):
    x, y, x_new = linear_problem(40, 64, 8, 0.5)
    readout, _ = fit_token_readout(torch.tensor(x).reshape(40, 4, 16), torch.tensor(y).reshape(40, 2, 4), ALPHAS)
    assert load_readouts(tmp_path) == {}
    with pytest.raises(MissingFileError, match="token readouts.*mindeye-train fits one"):
        require_readout(tmp_path, "subj08")
    save_readouts(tmp_path, {"subj08": readout})
    loaded = require_readout(tmp_path, "subj08")
    assert (loaded.alpha, loaded.token_shape) == (readout.alpha, readout.token_shape)
    features = torch.tensor(x_new, dtype=torch.float32).reshape(20, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), readout(features), rtol=0, atol=0)
    with pytest.raises(ConfigValueError, match=r"has token readouts for \['subj08'\], not subj01"):
        require_readout(tmp_path, "subj01")
    with pytest.raises(ValueError, match="takes 64 backbone features a trial, got"):
        loaded(torch.zeros(2, 4, 15))
    save_file({"subj08.coef": torch.zeros(2, 2)}, str(tmp_path / READOUT_FILE))
    with pytest.raises(FormatError, match="subj08: 'subj08.feature_mean'"):
        load_readouts(tmp_path)
    save_readouts(tmp_path, {})  # a checkpoint saved without readouts keeps none from before
    assert not (tmp_path / READOUT_FILE).exists()


@pytest.fixture
def checkpoint_with_readouts(tmp_path, small_generator_cfg):
    """A tiny model with live calibration, each subject's readout fitted on random betas' backbone tokens and
    random targets, and an 8 px student-shaped generator; random weights."""
    torch.manual_seed(0)
    model = build_model("tiny", voxels_per_subject=VOXELS, low_level={"latent_channels": 3}).eval()
    rng = np.random.default_rng(1)
    calibration = {s: (rng.normal(2, 1, n).astype(np.float32), rng.uniform(0.5, 3, n).astype(np.float32))
                   for s, n in VOXELS.items()}
    readouts = {}
    with torch.no_grad():
        for subject, n in VOXELS.items():
            backbone = model(torch.from_numpy(rng.normal(size=(30, n)).astype(np.float32)), subject).backbone_tokens
            readouts[subject] = fit_token_readout(backbone, torch.from_numpy(rng.normal(size=(30, TOKENS, DIM))),
                                                  ALPHAS)[0]
    path = tmp_path / "ckpt"
    save_checkpoint(model, path)
    save_calibration(path, calibration, units="percent_signal_change", estimator="realtime_glm")
    save_readouts(path, readouts)
    pipe = build_pipeline(small_generator_cfg(cross_attention_dim=DIM, time_cond_proj_dim=16), clip_id=CLIP_ID,
                          clip_tokens=TOKENS, sampler="lcm")
    pipe.save_pretrained(tmp_path / "gen")
    return path, tmp_path / "gen", model, calibration, readouts


def test_the_backend_draws_the_generator_s_tokens_from_the_readout_instead_of_the_prior(checkpoint_with_readouts):
    path, generator, model, calibration, readouts = checkpoint_with_readouts
    kwargs = dict(codec=PixelCodec(8), image_size=16, prior_steps=4, generator=load_pipeline(generator),
                  generation=GenerationSettings(2, 2.0, 0.25))
    x = np.random.default_rng(3).normal(2, 2, (3, 50)).astype(np.float32)
    from_readout = TorchBackend.from_checkpoint(path, readouts=load_readouts(path), **kwargs).decode("subj02", x)
    from_prior = TorchBackend.from_checkpoint(path, **kwargs).decode("subj02", x)
    mean_v, std_v = calibration["subj02"]
    with torch.no_grad():
        backbone = model(torch.from_numpy((x - mean_v) / std_v), "subj02").backbone_tokens
        want = readouts["subj02"](backbone).numpy()
    np.testing.assert_allclose(from_readout.image_tokens_bld, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_readout.embedding_norm_b, np.linalg.norm(want.reshape(3, -1), axis=1), rtol=1e-5)
    assert np.abs(from_readout.image_tokens_bld - from_prior.image_tokens_bld).max() > 0.1
    assert from_readout.reconstruction_bhw3.shape == (3, 16, 16, 3)
    assert np.abs(from_readout.reconstruction_bhw3.astype(int) - from_prior.reconstruction_bhw3).max() > 10
    np.testing.assert_array_equal(from_readout.lowlevel_bhw3, from_prior.lowlevel_bhw3)  # the rest is as before
    with pytest.raises(ConfigValueError, match=r"no token readout for \['subj02'\]"):
        TorchBackend.from_checkpoint(path, readouts={"subj01": readouts["subj01"]}, **kwargs)


def test_a_bundle_carries_the_readouts_and_its_backends_decode_with_them(checkpoint_with_readouts, tmp_path):
    path, generator, _, _, readouts = checkpoint_with_readouts
    bundle = export_bundle(path, tmp_path / "bundle", clip_id=CLIP_ID, generator=generator, backend="eager")
    record = bundle.manifest["readouts"]
    assert record["file"] == f"checkpoint/{READOUT_FILE}" and record["trials"] == {"subj01": 30, "subj02": 30}
    kwargs = dict(codec=PixelCodec(8), image_size=16, prior_steps=4, generation=GenerationSettings(2, 2.0, 0.25))
    x = np.random.default_rng(3).normal(2, 2, (2, 40)).astype(np.float32)
    got = load_backend(bundle.root, "eager", tokens="readout", **kwargs).decode("subj01", x)
    want = TorchBackend.from_checkpoint(path, readouts=load_readouts(path), generator=load_pipeline(generator),
                                        **kwargs).decode("subj01", x)
    np.testing.assert_array_equal(got.image_tokens_bld, want.image_tokens_bld)
    np.testing.assert_array_equal(got.reconstruction_bhw3, want.reconstruction_bhw3)
    auto = load_backend(bundle.root, "eager", tokens="auto", **kwargs).decode("subj01", x)  # the service's default
    np.testing.assert_array_equal(auto.image_tokens_bld, want.image_tokens_bld)
    with pytest.raises(ConfigValueError, match="tokens must be one of auto, prior, readout"):
        load_backend(bundle.root, "eager", tokens="retrieval", **kwargs)
    (path / READOUT_FILE).unlink()
    bare = export_bundle(path, tmp_path / "bare", clip_id=CLIP_ID, backend="eager")
    assert bare.manifest["readouts"] is None
    with pytest.raises(MissingFileError, match="the exported checkpoint has none"):
        load_backend(bare.root, "eager", tokens="readout", **kwargs)
    save_readouts(path, {"subj01": readouts["subj01"]})  # not one for each subject: auto draws from the prior
    partial = export_bundle(path, tmp_path / "partial", clip_id=CLIP_ID, backend="eager")
    for root in (bare.root, partial.root):
        from_auto = load_backend(root, "eager", tokens="auto", **kwargs)
        assert from_auto.readouts is None
        np.testing.assert_array_equal(from_auto.decode("subj01", x).image_tokens_bld,
                                      load_backend(root, "eager", tokens="prior", **kwargs).decode("subj01", x)
                                      .image_tokens_bld)
