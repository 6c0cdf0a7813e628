"""The synthetic world's stimuli: deterministic, diverse, scene-like, and described exactly."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion

from mindeye.scenes import (
    LAYOUT_KINDS,
    OBJECT_KINDS,
    TEXTURE_KINDS,
    describe_stimulus,
    object_coverage,
    paint_scene,
    render_stimuli,
    sample_scene,
    save_grid,
)

LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def images_200() -> np.ndarray:
    return render_stimuli(200, 32, seed=0)  # (200, 32, 32, 3)


def pairwise_rms(images: np.ndarray) -> np.ndarray:
    """(n, n) root-mean-square pixel distance, in grey levels."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    squares = (flat**2).sum(1)
    d2 = squares[:, None] + squares[None, :] - 2 * flat @ flat.T
    return np.sqrt(np.maximum(d2, 0) / flat.shape[1])


def power_spectrum_slope(image: np.ndarray) -> float:
    """Log-log slope of the radially averaged power spectrum of the grey image, 2 to n/4 cycles."""
    grey = image.astype(np.float64) @ LUMA
    n = grey.shape[0]
    windowed = (grey - grey.mean()) * np.outer(np.hanning(n), np.hanning(n))
    power = np.abs(np.fft.fftshift(np.fft.fft2(windowed))) ** 2
    y, x = np.indices(power.shape) - n // 2
    radius = np.hypot(x, y).round().astype(int).ravel()
    radial = np.bincount(radius, power.ravel()) / np.bincount(radius)
    freqs = np.arange(2, n // 4 + 1)
    return float(np.polyfit(np.log(freqs), np.log(radial[freqs]), 1)[0])


def assert_plain_json(value) -> None:
    """Only Python's own JSON types (numpy scalars would leak into files and messages)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_plain_json(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            assert_plain_json(item)
    else:
        assert value is None or type(value) in (bool, int, float, str), f"{value!r} is a {type(value)}"


def test_shape_and_dtype():
    images = render_stimuli(5, 40, seed=3)
    assert images.shape == (5, 40, 40, 3) and images.dtype == np.uint8
    assert render_stimuli(0, 40, seed=3).shape == (0, 40, 40, 3)


def test_same_seed_same_bytes_and_image_i_depends_only_on_seed_and_i():
    first = render_stimuli(6, 48, seed=7)
    np.testing.assert_array_equal(first, render_stimuli(6, 48, seed=7))
    np.testing.assert_array_equal(first, render_stimuli(15, 48, seed=7)[:6])


def test_different_seeds_give_different_images():
    distance = np.sqrt(((render_stimuli(8, 48, 0).astype(float) - render_stimuli(8, 48, 1)) ** 2).mean(axis=(1, 2, 3)))
    assert distance.min() > 20


def test_images_are_diverse_and_none_is_a_near_duplicate(images_200):
    rms = pairwise_rms(images_200)[np.triu_indices(200, k=1)]
    # Unrelated natural photographs sit ~60-90 grey levels RMS apart.
    assert rms.mean() > 60
    # Pixel noise (std <= 3 per image) alone puts two renders of one scene ~4 apart; 12 (~5% of the
    # range) is three times that, so anything closer would be the same scene, nudged.
    assert rms.min() > 12


def test_power_spectrum_falls_like_natural_images():
    slopes = np.array([power_spectrum_slope(image) for image in render_stimuli(64, 64, seed=11)])
    # Photographs (skimage's astronaut, camera, coffee, chelsea, rocket, cat) measure -2.1 to -2.6
    # with this estimator at 64 px; white noise measures 0 and a single straight edge -3. These
    # scenes hold fewer, larger things than a photograph and measure about -2.7.
    assert -3.0 < np.median(slopes) < -2.0
    assert np.mean((slopes > -3.5) & (slopes < -1.0)) >= 0.9


def test_colour_statistics_span_the_range(images_200):
    channel_means = images_200.reshape(200, -1, 3).mean(axis=1)  # (200, 3)
    low, high = np.percentile(channel_means, [5, 95], axis=0)
    assert np.all(low < 90) and np.all(high > 165)
    # No blank images: every image has real contrast.
    assert (images_200.reshape(200, -1, 3) @ LUMA).std(axis=1).min() > 5
    # Colourful, not greyscale: the channels disagree by more than noise in most images.
    chroma = (images_200.max(axis=-1).astype(int) - images_200.min(axis=-1)).mean(axis=(1, 2))
    assert np.median(chroma) > 25


def test_render_is_the_painted_description():
    images = render_stimuli(4, 48, seed=5)
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, paint_scene(sample_scene(5, i), 48))
        description = describe_stimulus(5, i)
        assert description == dataclasses.asdict(sample_scene(5, i))
        assert_plain_json(description)
        json.dumps(description)


def test_descriptions_are_well_formed():
    for i in range(50):
        scene = describe_stimulus(2, i)
        assert scene["layout"]["kind"] in LAYOUT_KINDS
        assert 1 <= len(scene["objects"]) <= 6
        for obj in scene["objects"]:
            assert obj["kind"] in OBJECT_KINDS
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in obj["surface"]["colour"])
            texture = obj["surface"]["texture"]
            assert texture is None or texture["kind"] in TEXTURE_KINDS
        depths = [obj["depth"] for obj in scene["objects"]]
        assert depths == sorted(depths)  # far to near: near objects are drawn last and occlude


def test_perspective_nearer_objects_are_larger_and_lower():
    depth, scale, base = [], [], []
    for i in range(150):
        scene = sample_scene(4, i)
        for obj in scene.objects:
            if obj.shadow > 0:  # standing on the ground
                depth.append(obj.depth)
                scale.append(max(obj.size))
                base.append(obj.centre[1] + obj.size[1] / 2)
    assert np.corrcoef(depth, scale)[0, 1] > 0.7
    assert np.corrcoef(depth, base)[0, 1] > 0.5


def test_each_described_object_is_drawn_where_and_in_the_colour_described():
    """Removing object k changes the image inside k's silhouette and nowhere else, and k's visible
    pixels have k's colour (untextured) or lie between its two colours (textured)."""
    size, outside, visible_changed, plain_error, textured_outside = 64, [], [], [], []
    for i in range(24):
        scene = sample_scene(1, i)
        scene = dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, shadow=0.0) for o in scene.objects))
        full = paint_scene(scene, size).astype(int)
        coverage = object_coverage(scene, size)  # (n_objects, size, size)
        for k, obj in enumerate(scene.objects):
            others = scene.objects[:k] + scene.objects[k + 1:]
            changed = np.abs(full - paint_scene(dataclasses.replace(scene, objects=others), size)).max(axis=-1) > 12
            # Lanczos downsampling rings up to 2 px beyond an edge.
            outside.append((changed & ~binary_dilation(coverage[k] > 0, iterations=2)).sum())
            visible = (coverage[k] > 0.99) & (coverage[k + 1:].max(axis=0, initial=0.0) < 0.01)
            if visible.sum() < 20:
                continue
            visible_changed.append((changed & visible).sum() / visible.sum())
            interior = binary_erosion(visible)  # edge pixels mix with what lies behind
            if interior.sum() < 10:
                continue
            median = np.median(full[interior], axis=0)  # (3,)
            colour, texture = np.array(obj.surface.colour), obj.surface.texture
            if texture is None:
                plain_error.append(np.abs(median - colour).max())
            else:
                low, high = np.minimum(colour, texture.colour), np.maximum(colour, texture.colour)
                textured_outside.append(np.maximum(low - median, median - high).max())
    assert sum(outside) == 0
    assert len(visible_changed) > 40 and np.mean(visible_changed) > 0.85
    # Shading and the shade ramp are symmetric about the base colour, so they barely move the median.
    assert len(plain_error) >= 5 and np.median(plain_error) < 5 and max(plain_error) < 20
    assert np.mean(np.array(textured_outside) < 8) > 0.9


def test_one_scene_looks_the_same_at_every_size():
    for i in range(8):
        scene = sample_scene(9, i)
        downsampled = Image.fromarray(paint_scene(scene, 128)).resize((32, 32), Image.Resampling.LANCZOS)
        rms = np.sqrt(((np.asarray(downsampled, float) - paint_scene(scene, 32)) ** 2).mean())
        assert rms < 16  # different scenes: ~80


def test_save_grid_writes_a_png_of_the_documented_size(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
    path = save_grid(images, tmp_path / "grid.png", ncols=4)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.shape == (3 * 26 + 2, 4 * 26 + 2, 3)
    np.testing.assert_array_equal(pixels[2 + 26:2 + 26 + 24, 2 + 26:2 + 26 + 24], images[5])  # row 1, column 1


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: render_stimuli(-1, 32, 0), ValueError, "n_images must be >= 0"),
        (lambda: render_stimuli(2, 4, 0), ValueError, "size must be >= 8"),
        (lambda: render_stimuli(2, 32, 1.5), TypeError, "seed must be an integer"),
        (lambda: describe_stimulus(0, -3), ValueError, "index must be >= 0"),
        (lambda: save_grid(np.zeros((2, 8, 8), np.uint8), "unused.png"), ValueError, r"\(n, h, w, 3\)"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, error, message):
    with pytest.raises(error, match=message):
        call()

