"""Procedurally generated scene-like images: the synthetic NSD world's stimuli, and the endless
supply of new scenes its unCLIP generator is trained and distilled on (`SceneBatches`).

NSD shows COCO photographs; the world shows small painted scenes with the statistics of
scenes rather than of white noise: a background layout (sky and ground, a split, a vignette
or a gradient) with textured surfaces, then 1-6 shaded, textured objects placed with a crude
perspective (nearer objects are larger, lower in frame and drawn later, so they occlude).

Image i of a seed is a pure function of (seed, i): `sample_scene` draws a `Scene` (every
parameter, texture seeds included) from `SeedSequence([seed, i])`, and `paint_scene` draws
a `Scene` with no randomness of its own. `render_stimuli` and `describe_stimulus` both go
through `sample_scene`, so a description is exactly what was drawn. Geometry is in image
fractions (x to the right, y down, both in [0, 1]) and texture frequencies are in cycles
across the textured region, so one scene painted at 64 and at 224 px shows the same picture.
"""
from __future__ import annotations

import colorsys
import itertools
import math
import operator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch.utils.data
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

RGB = tuple[int, int, int]

LAYOUT_KINDS = ("horizon", "vertical_split", "diagonal_split", "radial", "gradient")
TEXTURE_KINDS = ("pink", "leaves", "grating", "checker", "speckle")
OBJECT_KINDS = ("ellipse", "rectangle", "polygon", "star", "ring", "blob")
SUPERSAMPLING = 2  # scenes are painted at 2x and downsampled with Lanczos, which anti-aliases edges
MIN_SIZE = 8

# Colour families as HSV ranges: (hue in degrees, saturation, value). Hue ranges may wrap past 360.
COLOUR_FAMILIES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "sky": ((190, 230), (0.2, 0.65), (0.65, 1.0)),
    "dusk": ((345, 405), (0.3, 0.7), (0.6, 1.0)),  # pinks through oranges
    "water": ((175, 220), (0.35, 0.8), (0.3, 0.7)),
    "foliage": ((65, 150), (0.3, 0.85), (0.2, 0.7)),
    "earth": ((15, 45), (0.3, 0.75), (0.2, 0.65)),
    "sand": ((30, 55), (0.15, 0.5), (0.6, 0.92)),
    "stone": ((0, 360), (0.0, 0.12), (0.25, 0.85)),
    "skin": ((10, 35), (0.25, 0.55), (0.45, 0.95)),
    "vivid": ((0, 360), (0.6, 1.0), (0.5, 1.0)),
    "dark": ((0, 360), (0.0, 0.5), (0.04, 0.28)),
    "white": ((0, 360), (0.0, 0.08), (0.85, 1.0)),
}
UPPER_FAMILIES = ("sky", "sky", "dusk", "stone", "white")  # sky, back walls
LOWER_FAMILIES = ("foliage", "foliage", "earth", "sand", "stone", "water")  # ground, floors
ANY_FAMILIES = tuple(COLOUR_FAMILIES)
OBJECT_FAMILIES = ("vivid", "vivid", "foliage", "earth", "stone", "skin", "dark", "white")


@dataclass(frozen=True)
class Texture:
    """A pattern that mixes a second colour into a surface."""

    kind: str  # one of TEXTURE_KINDS
    colour: RGB  # the colour mixed in where the pattern is high
    contrast: float  # weight of `colour` at the pattern's peaks, in [0, 1]
    frequency: float  # cycles across the region; pink: of the coarsest octave; leaves: 1 / the
    #                   smallest disc radius; speckle: lattice cells across
    angle: float  # orientation of gratings and checkers, radians
    seed: int  # the pattern's own randomness: phase, sharpness, spectral slope, lattices, discs


@dataclass(frozen=True)
class Surface:
    """A colour, optionally textured, with a top-to-bottom brightness ramp."""

    colour: RGB
    texture: Texture | None
    shade: float  # brightness at the region's bottom minus at its top, as a fraction


@dataclass(frozen=True)
class Layout:
    """The background: a weight field w(x, y) in [0, 1] blends `first` (w=0) into `second` (w=1)."""

    kind: str  # one of LAYOUT_KINDS
    centre: tuple[float, float]  # a point on the boundary (splits), the centre (radial, gradient)
    angle: float  # direction in which w grows, radians; the horizon grows downward (~pi/2)
    extent: float  # edge softness (horizon, splits), radius (radial), ramp length (gradient)
    first: Surface  # sky / near side / centre / start of the ramp
    second: Surface  # ground / far side / surround / end of the ramp


@dataclass(frozen=True)
class SceneObject:
    """A foreground object; `size` is (width, height) before rotation, in image fractions."""

    kind: str  # one of OBJECT_KINDS
    centre: tuple[float, float]
    size: tuple[float, float]
    angle: float  # rotation, radians
    depth: float  # 0 far .. 1 near
    surface: Surface
    shading: float  # brightness gain toward the light across the object's radius
    shadow: float  # opacity of the soft contact shadow at the object's base (0: none)
    vertices: int  # polygon corners, star points; 0 for other kinds
    inner: float  # inner/outer radius of stars and rings; 0 for other kinds
    seed: int  # blob outline waves; 0 for other kinds


@dataclass(frozen=True)
class Scene:
    """Everything `paint_scene` needs to draw one stimulus."""

    seed: int
    index: int
    layout: Layout
    light_angle: float  # direction from the scene toward the light, radians (y down)
    objects: tuple[SceneObject, ...]  # far to near: later objects occlude earlier ones
    blur: float  # Gaussian blur radius after downsampling, as a fraction of the image size
    noise: float  # standard deviation of additive pixel noise, grey levels
    noise_seed: int


# ---------------------------------------------------------------------------------- sampling


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def _rgb(red: float, green: float, blue: float) -> RGB:
    def level(value: float) -> int:
        return int(round(min(max(value, 0.0), 255.0)))

    return level(red), level(green), level(blue)


def _colour(rng: np.random.Generator, family: str) -> RGB:
    (h0, h1), (s0, s1), (v0, v1) = COLOUR_FAMILIES[family]
    hsv = (rng.uniform(h0, h1) % 360 / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return _rgb(*(255 * c for c in colorsys.hsv_to_rgb(*hsv)))


def _sample_texture(rng: np.random.Generator, colour: RGB, max_frequency: float) -> Texture | None:
    """None, or a pattern mixing in a darker or lighter tone of `colour` or an unrelated colour."""
    kind = str(rng.choice(TEXTURE_KINDS + ("none",), p=(0.3, 0.2, 0.15, 0.07, 0.13, 0.15)))
    if kind == "none":
        return None
    if rng.random() < 0.7:
        tone = rng.uniform(0.3, 0.6) if rng.random() < 0.6 else rng.uniform(1.3, 1.8)
        second = _rgb(*(c * tone + (20 if tone > 1 else 0) for c in colour))
    else:
        second = _colour(rng, str(rng.choice(ANY_FAMILIES)))
    frequency = {
        "pink": rng.uniform(1, 4),
        "leaves": rng.uniform(4, 4 * max_frequency),
        "grating": rng.uniform(2, max_frequency),
        "checker": rng.uniform(1.5, max_frequency / 2),
        "speckle": rng.uniform(20, 8 * max_frequency),
    }[kind]
    return Texture(kind, second, rng.uniform(0.3, 0.9), frequency, rng.uniform(0, math.pi), _seed(rng))


def _sample_surface(rng: np.random.Generator, families: tuple[str, ...], max_frequency: float) -> Surface:
    colour = _colour(rng, str(rng.choice(families)))
    return Surface(colour, _sample_texture(rng, colour, max_frequency), rng.uniform(-0.3, 0.3))


def _sample_layout(rng: np.random.Generator) -> Layout:
    kind = str(rng.choice(LAYOUT_KINDS, p=(0.45, 0.15, 0.15, 0.12, 0.13)))
    centre = (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
    if kind == "horizon":
        first = _sample_surface(rng, UPPER_FAMILIES, 6)
        second = _sample_surface(rng, LOWER_FAMILIES, 20)
        return Layout(kind, (0.5, rng.uniform(0.25, 0.75)), math.pi / 2 + rng.normal(0, 0.08),
                      rng.uniform(0.002, 0.02), first, second)
    first = _sample_surface(rng, ANY_FAMILIES, 24)
    second = _sample_surface(rng, ANY_FAMILIES, 24)
    if kind == "vertical_split":
        angle, extent = rng.choice((0.0, math.pi)) + rng.normal(0, 0.05), rng.uniform(0.002, 0.01)
    elif kind == "diagonal_split":
        angle, extent = rng.uniform(0, 2 * math.pi), rng.uniform(0.002, 0.02)
    elif kind == "radial":
        angle, extent = 0.0, rng.uniform(0.3, 0.9)
    else:
        angle, extent = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.5)
    return Layout(kind, centre, float(angle), extent, first, second)


def _sample_object(rng: np.random.Generator, depth: float, horizon: float, haze: RGB) -> SceneObject:
    kind = str(rng.choice(OBJECT_KINDS))
    scale = (0.07 + 0.4 * depth) * rng.uniform(0.7, 1.3)
    aspect = math.exp(rng.normal(0, 0.5))
    width, height = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
    if rng.random() < 0.8:  # standing on the ground: the base drops from the horizon as depth grows
        base = horizon + (1.0 - horizon) * (0.05 + 0.85 * depth)
        centre = (rng.uniform(0.08, 0.92), min(base, 0.97) - height / 2)
        shadow = rng.uniform(0.25, 0.6)
    else:  # floating: anywhere, no shadow
        centre, shadow = (rng.uniform(0.08, 0.92), rng.uniform(0.08, 0.92)), 0.0
    surface = _sample_surface(rng, OBJECT_FAMILIES, 12)
    # Aerial perspective: far objects fade toward `haze` (the sky, on horizon layouts).
    fade = 0.5 * (1.0 - depth) ** 2
    faded = _rgb(*((1 - fade) * c + fade * h for c, h in zip(surface.colour, haze)))
    surface = Surface(faded, surface.texture, surface.shade)
    vertices = {"polygon": int(rng.integers(3, 9)), "star": int(rng.integers(4, 9))}.get(kind, 0)
    inner = {"star": rng.uniform(0.35, 0.6), "ring": rng.uniform(0.4, 0.8)}.get(kind, 0.0)
    return SceneObject(kind, centre, (width, height), rng.uniform(0, 2 * math.pi), depth, surface,
                       rng.uniform(0.1, 0.5), shadow, vertices, inner, _seed(rng) if kind == "blob" else 0)


def sample_scene(seed: int, index: int) -> Scene:
    """The scene for image `index` of `seed`; depends on nothing else."""
    seed, index = _check_int("seed", seed, 0), _check_int("index", index, 0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    layout = _sample_layout(rng)
    horizon = layout.centre[1] if layout.kind == "horizon" else rng.uniform(0.3, 0.6)
    depths = np.sort(rng.uniform(0, 1, int(rng.integers(1, 7))))
    objects = tuple(_sample_object(rng, float(d), horizon, layout.first.colour) for d in depths)
    return Scene(seed, index, layout, rng.uniform(0, 2 * math.pi), objects,
                 rng.uniform(0, 0.004), rng.uniform(0.5, 3.0), _seed(rng))


def describe_stimulus(seed: int, index: int) -> dict:
    """The sampled parameters of image `index` of `seed` as plain JSON-serialisable data."""
    return asdict(sample_scene(seed, index))


# ---------------------------------------------------------------------------------- painting


def _resize(lattice: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(lattice.astype(np.float32), mode="F").resize((width, height), resample))


def _texture_field(texture: Texture, height: int, width: int) -> np.ndarray:
    """(height, width) pattern in [0, 1] spanning the region."""
    rng = np.random.default_rng(texture.seed)
    if texture.kind == "pink":
        # Octaves of lattice noise, each lattice twice as fine as the last, summed coarse to fine
        # by upsampling the running sum. A power spectrum 1/f^beta puts variance 2^(-(beta - 2) k)
        # in octave k; natural images have beta ~ 2 (equal contrast per octave). The lattices
        # depend on `frequency` and the seed only, so every size shares its coarse octaves.
        ratio = 2 ** (-(rng.uniform(1.6, 2.6) - 2) / 2)
        cells, amplitude = texture.frequency, 1.0
        field = rng.standard_normal((int(math.ceil(cells)) + 2,) * 2)
        while 2 * cells <= min(height, width) / 2:
            cells, amplitude = 2 * cells, amplitude * ratio
            n = int(math.ceil(cells)) + 2
            field = _resize(field, n, n, Image.Resampling.BICUBIC) + amplitude * rng.standard_normal((n, n))
        field = _resize(field, height, width, Image.Resampling.BICUBIC)
        return np.clip(0.5 + field / (4 * field.std() + 1e-6), 0, 1)
    if texture.kind == "leaves":
        # Dead leaves: occluding discs of random tone with radius density ~ r^-3, a scale-invariant
        # model of natural images (Lee, Mumford & Huang 2001), radii from 1 / frequency to 1/4.
        r_min, r_max, count = 1 / texture.frequency, 0.25, 250
        radii = (r_min**-2 - rng.random(count) * (r_min**-2 - r_max**-2)) ** -0.5
        centres, tones = rng.random((count, 2)), rng.integers(0, 256, count)
        image = Image.new("L", (width, height), 128)
        draw = ImageDraw.Draw(image)
        drawn = radii * min(width, height) >= 0.5  # smaller discs would not cover a pixel at this size
        for (x, y), r, tone in zip(centres[drawn], radii[drawn], tones[drawn]):
            box = ((x - r) * width, (y - r) * height, (x + r) * width, (y + r) * height)
            draw.ellipse(box, fill=int(tone))
        return np.asarray(image, np.float32) / 255
    if texture.kind == "speckle":
        n = int(round(texture.frequency))
        return np.clip(_resize(rng.random((n, n)) ** 6, height, width, Image.Resampling.BICUBIC) * 1.5, 0, 1)
    ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    u = xs * math.cos(texture.angle) + ys * math.sin(texture.angle)
    wave = np.sin(2 * math.pi * texture.frequency * u + rng.uniform(0, 2 * math.pi))
    if texture.kind == "grating":  # from sinusoidal (sharpness 1) to nearly square stripes (8)
        sharpness = rng.uniform(1, 8)
        return 0.5 + 0.5 * np.tanh(sharpness * wave) / math.tanh(sharpness)
    v = -xs * math.sin(texture.angle) + ys * math.cos(texture.angle)
    return 0.5 + 0.5 * np.tanh(8 * wave * np.sin(2 * math.pi * texture.frequency * v))


def _surface_pixels(surface: Surface, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float colours in [0, 1] of a surface spanning the region."""
    colour = np.asarray(surface.colour, np.float32) / 255
    pixels = np.empty((height, width, 3), np.float32)
    if surface.texture is None:
        pixels[:] = colour
    else:
        weight = surface.texture.contrast * _texture_field(surface.texture, height, width)
        second = np.asarray(surface.texture.colour, np.float32) / 255
        np.multiply(weight[..., None], second - colour, out=pixels)
        pixels += colour
    pixels *= 1 + surface.shade * np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    return pixels


def _layout_weight(layout: Layout, n: int) -> np.ndarray:
    """(n, n) blend weight of `layout.second`."""
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    dx, dy = coords[None, :] - layout.centre[0], coords[:, None] - layout.centre[1]
    if layout.kind == "radial":
        return np.clip(np.hypot(dx, dy) / layout.extent, 0, 1) ** 1.5
    along = dx * math.cos(layout.angle) + dy * math.sin(layout.angle)
    if layout.kind == "gradient":
        return np.clip(0.5 + along / layout.extent, 0, 1)
    return 0.5 + 0.5 * np.tanh(along / layout.extent)


def _outline(obj: SceneObject) -> list[np.ndarray]:
    """Polygons in object units (unit half-size, unrotated); the second of a ring is its hole."""
    if obj.kind == "rectangle":
        return [np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float64)]
    turns = {"ellipse": 48, "ring": 48, "polygon": obj.vertices, "star": 2 * obj.vertices}[obj.kind]
    theta = np.arange(turns) * 2 * math.pi / turns
    radius = np.where(np.arange(turns) % 2, obj.inner, 1.0) if obj.kind == "star" else np.ones(turns)
    circle = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    return [circle, obj.inner * circle] if obj.kind == "ring" else [circle]


def _object_box(obj: SceneObject, n: int) -> tuple[int, int, int, tuple[float, float]]:
    """Top, left and side in pixels of a square holding the object however it is rotated, and
    the object's centre (x, y) in that square's pixel coordinates (pixel j spans [j, j + 1))."""
    radius = math.hypot(*obj.size) * n / 2
    cx, cy = obj.centre[0] * n, obj.centre[1] * n
    left, top = math.floor(cx - radius), math.floor(cy - radius)
    side = max(math.ceil(cx + radius) - left, math.ceil(cy + radius) - top)
    return top, left, side, (cx - left, cy - top)


def _object_mask(obj: SceneObject, side: int, centre: tuple[float, float], n: int) -> np.ndarray:
    """(side, side) coverage in [0, 1] of the object in its box, at canvas resolution n."""
    half_w, half_h = obj.size[0] * n / 2, obj.size[1] * n / 2
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    if obj.kind == "blob":  # a dome plus smooth random waves, thresholded: a compact random outline
        x = np.arange(side, dtype=np.float32)[None, :] + 0.5 - centre[0]
        y = np.arange(side, dtype=np.float32)[:, None] + 0.5 - centre[1]
        u, v = (x * cos + y * sin) / half_w, (y * cos - x * sin) / half_h  # object units
        field = 1 - u**2 - v**2
        rng = np.random.default_rng(obj.seed)
        for direction, cycles, phase in rng.uniform((0, 0.3, 0), (2 * math.pi, 1.0, 2 * math.pi), (5, 3)):
            along = u * math.cos(direction) + v * math.sin(direction)
            field = field + 0.2 * np.sin(2 * math.pi * cycles * along + phase)
        return (field > 0.3).astype(np.float32)
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    for fill, polygon in zip((255, 0), _outline(obj)):
        x, y = polygon[:, 0] * half_w, polygon[:, 1] * half_h
        points = np.stack([x * cos - y * sin + centre[0], x * sin + y * cos + centre[1]], axis=1)
        draw.polygon([tuple(p) for p in points], fill=fill)
    return np.asarray(image, np.float32) / 255


def _paste(canvas: np.ndarray, top: int, left: int, layer: np.ndarray, alpha: np.ndarray) -> None:
    """canvas <- alpha * layer + (1 - alpha) * canvas on the part of the box inside the canvas.

    canvas (n, n, c); alpha (side, side); layer (side, side, c), or (c,) for one flat colour.
    """
    n, side = canvas.shape[0], alpha.shape[0]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, n), min(left + side, n)
    if y0 >= y1 or x0 >= x1:
        return
    a = alpha[y0 - top:y1 - top, x0 - left:x1 - left, None]
    part = layer[y0 - top:y1 - top, x0 - left:x1 - left] if layer.ndim == 3 else layer
    canvas[y0:y1, x0:x1] = a * part + (1 - a) * canvas[y0:y1, x0:x1]


def _paint_shadow(canvas: np.ndarray, obj: SceneObject, light_angle: float) -> None:
    """A blurred dark ellipse at the object's base, pushed away from the light."""
    n = canvas.shape[0]
    width = obj.size[0] * n * 1.1
    side = int(math.ceil(width * 1.6)) + 2
    cx = obj.centre[0] * n - 0.25 * width * math.cos(light_angle)
    cy = (obj.centre[1] + obj.size[1] / 2) * n
    image = Image.new("L", (side, side), 0)
    box = (side / 2 - width / 2, side / 2 - width / 8, side / 2 + width / 2, side / 2 + width / 8)
    ImageDraw.Draw(image).ellipse(box, fill=int(255 * obj.shadow))
    alpha = np.asarray(image.filter(ImageFilter.GaussianBlur(width / 10)), np.float32) / 255
    _paste(canvas, int(round(cy)) - side // 2, int(round(cx)) - side // 2, np.zeros(3, np.float32), alpha)


def _paint_object(canvas: np.ndarray, obj: SceneObject, light_angle: float) -> None:
    n = canvas.shape[0]
    top, left, side, centre = _object_box(obj, n)
    pixels = _surface_pixels(obj.surface, side, side)  # the texture is anchored to the box
    offsets = np.arange(side, dtype=np.float32) + 0.5
    radius = max(obj.size) * n / 2
    toward_light = ((offsets[None, :] - centre[0]) * math.cos(light_angle)
                    + (offsets[:, None] - centre[1]) * math.sin(light_angle)) / radius
    pixels = pixels * (1 + obj.shading * np.clip(toward_light, -1, 1))[..., None]
    _paste(canvas, top, left, pixels, _object_mask(obj, side, centre, n))


def paint_scene(scene: Scene, size: int) -> np.ndarray:
    """(size, size, 3) uint8 image of `scene`; deterministic, draws no random numbers but the scene's."""
    size = _check_int("size", size, MIN_SIZE)
    n = SUPERSAMPLING * size
    canvas = _surface_pixels(scene.layout.first, n, n)  # (n, n, 3) in [0, 1], float32
    second = _surface_pixels(scene.layout.second, n, n)
    canvas += _layout_weight(scene.layout, n)[..., None] * (second - canvas)
    for obj in scene.objects:
        if obj.shadow > 0:
            _paint_shadow(canvas, obj, scene.light_angle)
        _paint_object(canvas, obj, scene.light_angle)
    canvas *= 255
    canvas += 0.5
    image = Image.fromarray(np.clip(canvas, 0, 255, out=canvas).astype(np.uint8))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if scene.blur * size >= 0.1:
        image = image.filter(ImageFilter.GaussianBlur(scene.blur * size))
    noise = np.random.default_rng(scene.noise_seed).normal(0, scene.noise, (size, size, 3))
    return np.clip(np.asarray(image, np.float32) + noise + 0.5, 0, 255).astype(np.uint8)


def object_coverage(scene: Scene, size: int) -> np.ndarray:
    """(n_objects, size, size) coverage in [0, 1] of each object's own silhouette, occlusion ignored."""
    size = _check_int("size", size, MIN_SIZE)
    coverage = np.zeros((len(scene.objects), size, size), np.float32)
    for k, obj in enumerate(scene.objects):
        top, left, side, centre = _object_box(obj, size)
        layer = np.zeros((size, size, 1), np.float32)
        _paste(layer, top, left, np.ones(1, np.float32), _object_mask(obj, side, centre, size))
        coverage[k] = layer[..., 0]
    return coverage


# ---------------------------------------------------------------------------------- public API


def render_stimuli(n_images: int, size: int, seed: int, *, progress: bool = False) -> np.ndarray:
    """(n_images, size, size, 3) uint8 scenes; image i depends only on (seed, i)."""
    n_images, seed = _check_int("n_images", n_images, 0), _check_int("seed", seed, 0)
    size = _check_int("size", size, MIN_SIZE)
    images = np.empty((n_images, size, size, 3), np.uint8)
    for i in tqdm(range(n_images), desc="stimuli", unit="img", disable=not progress):
        images[i] = paint_scene(sample_scene(seed, i), size)
    return images


class SceneBatches(torch.utils.data.IterableDataset):
    """Endless uint8 (B, H, W, 3) batches: batch s holds scenes s B .. (s + 1) B - 1 of `seed`, so a
    resumed run continues exactly where it stopped (`first_batch`)."""

    def __init__(self, seed: int, size: int, batch_size: int, first_batch: int = 0):
        self.seed, self.size, self.batch_size, self.first_batch = seed, size, batch_size, first_batch

    def __iter__(self):
        for s in itertools.count(self.first_batch):
            yield np.stack([paint_scene(sample_scene(self.seed, i), self.size)
                            for i in range(s * self.batch_size, (s + 1) * self.batch_size)])


def save_grid(images: np.ndarray, path: str | Path, ncols: int = 8) -> Path:
    """Write images (n, h, w, 3) uint8 as a PNG contact sheet with 2 px white gutters; returns the path.

    The sheet is ncols * (w + 2) + 2 wide and rows * (h + 2) + 2 high, rows = ceil(n / ncols).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"save_grid needs non-empty uint8 images (n, h, w, 3), got {images.dtype} {images.shape}")
    ncols = _check_int("ncols", ncols, 1)
    gutter, (n, h, w, _) = 2, images.shape
    rows = -(-n // ncols)
    sheet = np.full((rows * (h + gutter) + gutter, ncols * (w + gutter) + gutter, 3), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = gutter + (i // ncols) * (h + gutter), gutter + (i % ncols) * (w + gutter)
        sheet[top:top + h, left:left + w] = image
    path = Path(path)
    Image.fromarray(sheet).save(path, format="PNG")
    return path


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got a bool ({value})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
