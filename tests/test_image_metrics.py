"""Table 1 metrics against hand-computed cases, the feature-network plumbing with random weights, the report."""
from __future__ import annotations

import json
import re

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial.distance import correlation as scipy_correlation
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision import models

from mindeye.errors import FormatError
from mindeye.evaluation import (
    FEATURE_EXTRACTORS,
    METRIC_COLUMNS,
    MetricUnavailable,
    build_feature_extractor,
    correlation_distance,
    evaluate_reconstructions,
    paired_difference,
    pixcorr,
    save_image_grid,
    ssim,
    two_way_identification,
    two_way_wins,
    write_table,
)
from mindeye.metrics import RetrievalScore

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1 file


@pytest.fixture(autouse=True)
def empty_weight_caches(tmp_path, monkeypatch):
    """No test sees weights this machine may have cached: torch hub and Hugging Face caches are empty dirs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) float images in [0, 1] with structure at several scales (not white noise)."""
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    fine = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    images = 0.8 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + 0.2 * fine
    return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def to_425_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc, dtype=np.float32)).permute(0, 3, 1, 2)
    return F.interpolate(x, size=(425, 425), mode="bilinear", align_corners=False, antialias=True)


# --- PixCorr ---------------------------------------------------------------------------------

def test_pixcorr_of_an_image_with_itself_its_negative_and_an_offset_copy():
    images = smooth_images(3, 64, seed=0)
    assert pixcorr(images, images) == pytest.approx(1.0, abs=1e-9)
    assert pixcorr(1.0 - images, images) == pytest.approx(-1.0, abs=1e-6)
    dim = 0.5 * images
    assert pixcorr(dim + 0.3, dim) == pytest.approx(1.0, abs=1e-6)
    uint8 = (images * 255).round().astype(np.uint8)
    assert pixcorr(uint8, uint8.astype(np.float64) / 255.0) == pytest.approx(1.0, abs=1e-9)


def test_pixcorr_flattens_all_channels_and_averages_pairs_by_hand():
    """Channel-constant images stay channel-constant at 425 px, so r is that of the 3 channel values."""
    target_rgb, recon_rgb = np.array([0.2, 0.4, 0.9]), np.array([0.1, 0.5, 0.3])
    # by hand: deviations (-.3, -.1, .4) and (-.2, .2, 0): r = .04 / sqrt(.26 * .08)
    r_by_hand = 0.04 / np.sqrt(0.26 * 0.08)
    target = np.broadcast_to(target_rgb, (2, 16, 16, 3)).copy()
    recon = np.stack([np.broadcast_to(recon_rgb, (16, 16, 3)), target[1]])  # pair 2 is perfect
    assert pixcorr(recon, target) == pytest.approx((r_by_hand + 1.0) / 2, abs=1e-5)


def test_pixcorr_is_pearson_of_the_425px_images():
    recon, target = smooth_images(4, 96, seed=1), smooth_images(4, 96, seed=2)
    r425, t425 = to_425_nchw(recon).flatten(1).numpy(), to_425_nchw(target).flatten(1).numpy()
    expected = np.mean([np.corrcoef(r, t)[0, 1] for r, t in zip(r425, t425)])
    assert pixcorr(recon, target) == pytest.approx(expected, abs=1e-6)
    native = np.mean([np.corrcoef(r.ravel(), t.ravel())[0, 1] for r, t in zip(recon, target)])
    assert abs(native - expected) > 1e-4  # the resize matters, so the check above pins it


def test_pixel_metrics_reject_bad_input():
    images = smooth_images(2, 32, seed=3)
    with pytest.raises(ValueError, match="2 reconstructions for 1 seen"):
        pixcorr(images, images[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixcorr(images * 255.0, images)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        ssim(images[..., 0], images[..., 0])
    with pytest.raises(ValueError, match="constant"):
        pixcorr(np.full_like(images, 0.5), images)


# --- SSIM ------------------------------------------------------------------------------------

def test_ssim_identical_images_score_one():
    images = smooth_images(2, 64, seed=4)
    assert ssim(images, images) == pytest.approx(1.0, abs=1e-6)


def test_ssim_of_a_noisy_copy_equals_skimage_on_grey_425px_images():
    target = smooth_images(3, 100, seed=5)
    noise = np.random.default_rng(0).normal(0.0, 0.15, target.shape)
    recon = np.clip(target + noise, 0.0, 1.0)
    score = ssim(recon, target)
    recon_grey = rgb2gray(to_425_nchw(recon).permute(0, 2, 3, 1).numpy())
    target_grey = rgb2gray(to_425_nchw(target).permute(0, 2, 3, 1).numpy())
    expected = np.mean([structural_similarity(r, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=1.0) for r, t in zip(recon_grey, target_grey)])
    assert 0.0 < score < 1.0
    assert score == pytest.approx(expected, abs=1e-6)


# --- 2-way identification and correlation distance ------------------------------------------

def test_two_way_identification_perfect_features_score_one():
    feats = np.random.default_rng(1).normal(size=(20, 50))
    assert two_way_identification(feats, feats) == 1.0


def test_two_way_identification_hand_built_three_images():
    targets = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # r(t0, t1) = -1, r(t0, t2) = .5, r(t1, t2) = -.5. Reconstruction 1 looks like image 2:
    # pred 0 beats both others (1 > -1, .5); pred 1 (= t2) has r -.5 with t1 vs .5 and 1: beats none;
    # pred 2 beats both. Mean of 1, 0, 1 = 2/3.
    preds = np.array([targets[0], targets[2], targets[2]])
    assert two_way_identification(preds, targets) == pytest.approx(2.0 / 3.0)
    # ties count as failures: identical predictions with r equal for both targets
    assert two_way_identification(np.array([[0.0, 1.0], [0.0, 1.0]]), np.array([[0.0, 2.0], [0.0, 3.0]])) == 0.0


def test_two_way_identification_of_unrelated_features_is_chance():
    rng = np.random.default_rng(2)
    score = two_way_identification(rng.normal(size=(400, 64)), rng.normal(size=(400, 64)))
    assert abs(score - 0.5) < 0.05


def test_two_way_identification_flattens_features_per_image():
    rng = np.random.default_rng(3)
    target = rng.normal(size=(12, 4, 5, 5))
    pred = target + rng.normal(scale=3.0, size=target.shape)
    assert two_way_identification(pred, target) == two_way_identification(pred.reshape(12, -1),
                                                                           target.reshape(12, -1))


def test_two_way_wins_are_per_image_and_average_to_the_score():
    targets = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    preds = np.array([targets[0], targets[2], targets[2]])  # the hand-built case above
    np.testing.assert_array_equal(two_way_wins(preds, targets), [1.0, 0.0, 1.0])


def test_paired_difference_interval_covers_a_real_gap_and_straddles_none():
    rng = np.random.default_rng(5)
    base_n = rng.uniform(0.6, 0.9, size=40)
    better_n = base_n + 0.05 + rng.normal(scale=0.02, size=40)  # better on every image: 5 points
    mean, low, high = paired_difference(better_n, base_n)
    assert mean == pytest.approx(0.05, abs=0.01) and 0.03 < low < mean < high < 0.07
    noise_n = base_n + rng.normal(scale=0.05, size=40)  # no real difference
    mean, low, high = paired_difference(noise_n, base_n)
    assert low < 0 < high and abs(mean) < 0.03
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(base_n, base_n[:-1])


def test_correlation_distance_matches_its_definition():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(6, 30))
    assert correlation_distance(feats, feats) == pytest.approx(0.0, abs=1e-12)
    assert correlation_distance(-feats, feats) == pytest.approx(2.0, abs=1e-12)
    assert correlation_distance(3.0 * feats + 1.0, feats) == pytest.approx(0.0, abs=1e-12)
    other = rng.normal(size=(6, 30))
    expected = np.mean([scipy_correlation(a, b) for a, b in zip(other, feats)])
    assert correlation_distance(other, feats) == pytest.approx(expected, abs=1e-12)


# --- feature extractors ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory):
    """(a random-weight AlexNet, a weights_dir holding its state dict under torchvision's file name)."""
    torch.manual_seed(0)
    model = models.alexnet(weights=None).eval()
    weights_dir = tmp_path_factory.mktemp("weights")
    torch.save(model.state_dict(), weights_dir / ALEXNET_FILE)
    return model, weights_dir


def imagenet_input(images_nhwc: np.ndarray, size: int) -> torch.Tensor:
    """As the official evaluation feeds the networks: a plain bilinear resize (torchvision 0.16: no antialias)."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc, dtype=np.float32)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def test_alexnet_extractors_load_local_weights_and_read_the_papers_layers(random_alexnet):
    model, weights_dir = random_alexnet
    images = (smooth_images(3, 320, seed=6) * 255).round().astype(np.uint8)
    x = imagenet_input(images.astype(np.float32) / 255.0, 256)  # the paper's AlexNet input: 256 px, no crop
    with torch.no_grad():
        conv2_relu, conv5_relu = model.features[:5](x).flatten(1), model.features[:12](x).flatten(1)
    alex2 = build_feature_extractor("alexnet2", weights_dir)
    feats2 = alex2(images)
    assert (alex2.name, alex2.metric) == ("alexnet2", "two_way")
    assert feats2.shape == (3, 192 * 31 * 31)  # features.4 on 256 px (192 x 27 x 27 at 224 px)
    np.testing.assert_allclose(feats2, conv2_relu.numpy(), rtol=1e-5, atol=1e-6)
    feats5 = build_feature_extractor("alexnet5", weights_dir)(images)
    assert feats5.shape == (3, 256 * 15 * 15)
    np.testing.assert_allclose(feats5, conv5_relu.numpy(), rtol=1e-5, atol=1e-6)


WEIGHT_FILES = {  # the file names torchvision, OpenAI and SwAV's hub loader download to
    "alexnet2": ALEXNET_FILE, "alexnet5": ALEXNET_FILE, "inception": "inception_v3_google-0cc3c7bd.pth",
    "clip": "ViT-L-14.pt", "efficientnet": "efficientnet_b1-c27df63c.pth", "swav": "swav_800ep_pretrain.pth.tar",
}


def test_every_extractor_has_a_weights_file():
    assert set(FEATURE_EXTRACTORS) == set(WEIGHT_FILES)


@pytest.mark.parametrize("name", FEATURE_EXTRACTORS)
def test_missing_weights_raise_metric_unavailable_naming_the_file(name, tmp_path):
    expected = tmp_path / WEIGHT_FILES[name]
    with pytest.raises(MetricUnavailable, match=re.escape(WEIGHT_FILES[name])) as raised:
        build_feature_extractor(name, tmp_path)
    assert raised.value.name == name
    assert raised.value.expected_path == expected
    assert str(tmp_path) in str(raised.value)


def test_weights_are_found_in_the_torch_hub_cache(tmp_path):
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"  # TORCH_HOME is set by the autouse fixture
    checkpoints.mkdir(parents=True)
    torch.manual_seed(1)
    model = models.efficientnet_b1(weights=None).eval()
    torch.save(model.state_dict(), checkpoints / "efficientnet_b1-c27df63c.pth")
    extractor = build_feature_extractor("efficientnet", None)
    images = smooth_images(2, 300, seed=7)  # downsampled to 255 px
    with torch.no_grad():
        expected = model.avgpool(model.features(imagenet_input(images, 255))).flatten(1).numpy()
    feats = extractor(images)
    assert extractor.metric == "distance" and feats.shape == (2, 1280)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)


def test_swav_checkpoint_layout_is_accepted_and_incomplete_backbones_are_not(tmp_path):
    """SwAV's file: 'module.'-prefixed keys, a projection head and prototypes, no classifier."""
    torch.manual_seed(2)
    model = models.resnet50(weights=None).eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)
    state["module.prototypes.weight"] = torch.zeros(3000, 128)
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    images = smooth_images(1, 64, seed=8)
    with torch.no_grad():
        body = torch.nn.Sequential(*list(model.children())[:-1])  # up to and including avgpool
        expected = body(imagenet_input(images, 224)).flatten(1).numpy()
    np.testing.assert_allclose(build_feature_extractor("swav", tmp_path)(images), expected, rtol=1e-4, atol=1e-5)
    del state["module.layer4.2.conv3.weight"]
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    with pytest.raises(FormatError, match="layer4.2.conv3.weight"):
        build_feature_extractor("swav", tmp_path)


def test_a_wrong_state_dict_is_a_format_error(tmp_path):
    torch.save({"not_alexnet.weight": torch.zeros(3)}, tmp_path / ALEXNET_FILE)
    with pytest.raises(FormatError, match=ALEXNET_FILE):
        build_feature_extractor("alexnet2", tmp_path)


# --- evaluation row, table, grid --------------------------------------------------------------

def test_evaluate_reconstructions_scores_what_is_available_and_explains_the_rest(random_alexnet):
    _, weights_dir = random_alexnet
    target = smooth_images(6, 320, seed=9)  # reduced to the paper's 256 px first
    row = evaluate_reconstructions(target, target, weights_dir=weights_dir,
                                   retrieval=RetrievalScore(0.9, 0.8, pool_size=6, repeats=1))
    assert list(row) == [*METRIC_COLUMNS, "notes"]
    assert row["PixCorr"] == pytest.approx(1.0) and row["SSIM"] == pytest.approx(1.0)
    assert row["Alex(2)"] == 1.0 and row["Alex(5)"] == 1.0
    assert (row["Image retrieval"], row["Brain retrieval"]) == (0.9, 0.8)
    for column in ("Incep", "CLIP", "Eff", "SwAV"):
        assert row[column] is None and "not found" in row["notes"][column]
    assert set(row["notes"]) == {"Incep", "CLIP", "Eff", "SwAV"}

    recon = np.clip(target + np.random.default_rng(5).normal(0, 0.2, target.shape), 0, 1)
    row = evaluate_reconstructions(recon, target)
    recon_256, target_256 = (F.interpolate(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2), size=(256, 256),
                                           mode="bilinear", antialias=False).clamp(0, 1).permute(0, 2, 3, 1).numpy()
                             for x in (recon, target))
    assert row["PixCorr"] == pytest.approx(pixcorr(recon_256, target_256), abs=1e-6)  # the paper's 256 px
    assert row["PixCorr"] != pytest.approx(pixcorr(recon, target), abs=1e-4)
    assert row["Image retrieval"] is None and "retrieval" in row["notes"]["Image retrieval"]


def test_write_table_formats_like_the_paper(tmp_path):
    unavailable = "weights swav.pth not found in /w"
    results = {
        "MindEye2, 1 h": {"PixCorr": 0.1951, "SSIM": 0.4187, "Alex(2)": 0.8423, "Alex(5)": 0.906, "Incep": 0.8115,
                          "CLIP": 0.792, "Eff": 0.8104, "SwAV": None, "Image retrieval": 0.79,
                          "Brain retrieval": 0.574, "notes": {"SwAV": unavailable}},
        "blurry": {"PixCorr": -0.0123, "SSIM": 0.5, "Alex(2)": 0.5, "Alex(5)": 0.5, "Incep": 0.5, "CLIP": 0.5,
                   "Eff": 1.0, "SwAV": None, "notes": {"SwAV": unavailable}},
    }
    write_table(results, tmp_path / "t.md", tmp_path / "t.json")
    assert (tmp_path / "t.md").read_text().splitlines() == [
        "| model | PixCorr ↑ | SSIM ↑ | Alex(2) ↑ | Alex(5) ↑ | Incep ↑ | CLIP ↑ | Eff ↓ | SwAV ↓ "
        "| Image retrieval ↑ | Brain retrieval ↑ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| MindEye2, 1 h | .195 | .419 | 84.2 | 90.6 | 81.2 | 79.2 | .810 | n/a (1) | 79.0 | 57.4 |",
        "| blurry | -.012 | .500 | 50.0 | 50.0 | 50.0 | 50.0 | 1.000 | n/a (1) | n/a (2) | n/a (2) |",
        "",
        "2-way identification and retrieval: percent correct. Eff, SwAV: correlation distance.",
        "",
        "Not available:",
        "(1) SwAV: weights swav.pth not found in /w",
        "(2) Image retrieval, Brain retrieval: not computed",
    ]
    as_json = json.loads((tmp_path / "t.json").read_text())
    assert as_json["MindEye2, 1 h"]["Alex(2)"] == 0.8423 and as_json["MindEye2, 1 h"]["SwAV"] is None
    assert as_json["blurry"]["notes"] == {"SwAV": unavailable, "Image retrieval": "not computed",
                                          "Brain retrieval": "not computed"}
    with pytest.raises(ValueError, match="unknown columns"):
        write_table({"typo": {"Pixcorr": 0.3}}, tmp_path / "x.md", tmp_path / "x.json")


def test_save_image_grid_writes_a_png_of_the_documented_size(tmp_path):
    red = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    red[..., 0] = 255
    blue = np.zeros((2, 48, 48, 3))
    blue[..., 2] = 1.0
    size = save_image_grid([red, blue], ["seen", "reconstruction"], tmp_path / "grid.png", cell_px=40, label_px=50)
    with Image.open(tmp_path / "grid.png") as png:
        assert png.format == "PNG" and png.size == size == (50 + 3 * (40 + 4) + 4, 2 * (40 + 4) + 4)
        pixels = np.asarray(png.convert("RGB"))
    assert tuple(pixels[4 + 20, 50 + 4 + 20]) == (255, 0, 0)  # first cell of row 1
    assert tuple(pixels[4 + 44 + 20, 50 + 4 + 44 + 20]) == (0, 0, 255)  # second cell of row 2
    assert tuple(pixels[4 + 44 + 20, 50 + 4 + 2 * 44 + 20]) == (255, 255, 255)  # row 2 has no third image


def test_write_table_adds_the_world_columns_some_row_has_and_shows_chosen_columns(tmp_path):
    results = {"generated": {"PixCorr": 0.25, "SSIM": 0.5, "World CLIP": 0.9512, "Rand. AlexNet": 0.875},
               "blurry": {"PixCorr": 0.5, "SSIM": 0.625}}
    write_table(results, tmp_path / "t.md", tmp_path / "t.json")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].endswith("| Brain retrieval ↑ | World CLIP ↑ | Rand. AlexNet ↑ |")  # after the paper's
    assert lines[2].endswith("| 95.1 | 87.5 |") and lines[3].endswith("| n/a (1) | n/a (1) |")
    write_table(results, tmp_path / "t.md", tmp_path / "t.json", columns=["PixCorr", "World CLIP"])
    assert (tmp_path / "t.md").read_text().splitlines()[:4] == [
        "| model | PixCorr ↑ | World CLIP ↑ |", "| --- | --- | --- |", "| generated | .250 | 95.1 |",
        "| blurry | .500 | n/a (1) |"]
    as_json = json.loads((tmp_path / "t.json").read_text())
    assert as_json["generated"]["Rand. AlexNet"] == 0.875 and "World CLIP" not in as_json["blurry"]
    write_table({"blurry": {"PixCorr": 0.5}}, tmp_path / "t.md", tmp_path / "t.json")
    assert "World CLIP" not in (tmp_path / "t.md").read_text()  # tables without world rows are as before
    with pytest.raises(ValueError, match="unknown columns"):
        write_table(results, tmp_path / "t.md", tmp_path / "t.json", columns=["Pixcorr"])


def test_save_image_grid_with_column_labels_has_a_header_strip(tmp_path):
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    size = save_image_grid([images, images], ["a", "b"], tmp_path / "grid.png", cell_px=40, label_px=50,
                           column_labels=["seen", "true\ntokens"], header_px=30)
    with Image.open(tmp_path / "grid.png") as png:
        assert png.size == size == (50 + 2 * (40 + 4) + 4, 30 + 2 * (40 + 4) + 4)
        pixels = np.asarray(png.convert("RGB"))
    assert tuple(pixels[30 + 4 + 20, 50 + 4 + 20]) == (0, 0, 0)  # the first cell starts below the header
    assert (pixels[:30, 50:] < 128).any()  # the labels are drawn in the header
    with pytest.raises(ValueError, match="column labels"):
        save_image_grid([images], ["a"], tmp_path / "x.png", column_labels=["one"])


def test_save_image_grid_wraps_a_long_column_label_inside_its_column(tmp_path):
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    long_label = "subj08 blend teacher (38 steps, readout tokens)"
    save_image_grid([images], ["a"], tmp_path / "grid.png", cell_px=64, label_px=50,
                    column_labels=[long_label, ""], header_px=60)
    with Image.open(tmp_path / "grid.png") as png:
        header = np.asarray(png.convert("L"))[:60]
    first, second = 50 + 4, 50 + 4 + 64 + 4
    assert (header[:, first:first + 64] < 128).any()
    assert (header[:, second - 4:] > 200).all()  # none of it spills into the padding or the next column's header
    assert (header[:, :first] > 200).all()
