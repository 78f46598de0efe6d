"""Procedural shapes dataset: one or two objects on a textured background, rendered on the fly.

Each image shows a *first object* whose discrete attributes (see `attributes.py`) a prompt can
name: shape (six geometric shapes or a glyph), color, position on a 3x3 grid, size (small/large),
background and fill pattern; glyph objects also carry a character. On top of that, every image
has continuous variation that prompts do not name and that a coarse discrete code cannot pin
down: sub-cell offset, rotation, scale and hue/saturation/brightness jitter, pattern period,
angle and phase, background level, tint, gradient and noise texture. That variation is what the
diffusion refiner has to supply.

Rules that keep the first object recognisable (an attribute classifier should reach >= 99%):
- it stays inside its grid cell: its rotated bounding box (glyphs: plus their outline) lies in
  the cell with a margin for the anti-aliased edge, at a uniformly jittered sub-cell offset;
- small and large differ by about 1.3x in extent (shapes: 0.68-0.72 vs 0.88-0.95 of the cell,
  glyphs: 0.64-0.70 vs 0.86-0.94; the larger values are capped so that the object still fits
  the cell, which at 32x32 caps large glyphs near 0.83);
- patterns keep the silhouette whole: their second color contrasts with both the object and
  the background (a dark shade on gray/white; on black a light tint of dark colors and a
  half-dark shade of bright ones) and a thin rim of the object's color runs along the edge;
  pattern cells are at least 3.6-4.4 px at 32x32, stay within 15 degrees of the image axes and
  sit near a canonical phase (two dark bands, a central dot, or a checker corner at the
  center): diagonal stripes and turned checkers alias into each other at 32x32;
- rotation is limited where it would change the shape's name or hide its pattern: a square
  turned 45 degrees is a diamond, so squares and diamonds turn at most 10 degrees (and diamonds
  are rhombi 0.8 as wide as tall), triangles 15, stars 12 (fat five-point stars, inner radius
  0.6), crosses 12 (a plus sign with bars 0.42 of its extent wide); circles turn freely. The
  six shapes differ by more than a pixel at the small size: a hexagon, tried first, differs from
  a circle by under 0.6 px at 32x32 and the oracle confused the two on ~3% of fresh images;
- glyphs are upright (at most 4 degrees), drawn in a bold stroke of Pillow's default font
  (`ImageFont.load_default(size=...)`, Aileron) with a solid fill: their `fill` attribute is
  always 0 ("solid") and captions do not mention it. On gray and white backgrounds they get a
  thin dark outline so that light colors (yellow on white) stay readable. GLYPHS (attributes.py)
  leaves out 0 and 1, which read as O and I;
- stars are solid too (data version 2): at 32x32 a star's five narrow tips and small inner
  pentagon hold about one pattern cell, and the version-1 oracle misread their pattern on 11.7%
  of small and 1.6% of large stars (5,000 fresh images), against at most 3.7% for any other
  shape and size (small diamonds);
- the optional second object is a *distractor*: another cell, never a glyph, solid, drawn faded
  (40-50% opacity) under the first one, so that the first object is the one at full contrast.
  Captions describe the first object only.

Measured on an earlier version of these rules (32x32; a ResNet-18-like classifier trained for
100 s on 300k images; 30k fresh val images): shape, color, position, size, background and
glyph >= 99.99%, fill 98.4% (stripes vs checker vs dots). The pattern rules above were then
tightened against the measured confusions; on a small CPU probe (fill only, the object's cell
cropped, 5 epochs of 40k) they took fill from 90.0% to 97.5-97.9%, the rest of the errors on
small stars and diamonds; the probe is far weaker than the GPU classifier. With those rules (data
version 1) the oracle (`python -m hybrid.eval.oracle train`: resnet10t, 2000 steps on a 2-core CPU)
reached >= 99.96% on every attribute of 5,000 fresh images but fill (98.50%; 97.05% on the
held-out color:shape pairs), whose errors were mostly on stars. With stars solid (version 2) the
same recipe (23.4 min) reaches fill 99.26% fresh / 99.55% held out and >= 99.90% on every other
attribute.

Everything random is drawn from a `numpy.random.Generator` (PCG64) whose state is a hash of
(seed, split, index) (`sample_state`), so a sample is a pure function of those three numbers.

Rendering is vectorised numpy at the target resolution, on each object's bounding box, with
signed-distance anti-aliasing; glyphs are resampled from cached 2x masks by PIL's affine
transform and box-averaged (2x2 supersampling). It renders several thousand 32x32 images per
second on one core (`python -m benchmarks.data_throughput`).
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from functools import cache, lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from hybrid.data.attributes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    FILLS,
    GLYPHS,
    POSITIONS,
    SHAPES,
    SIZES,
    class_id,
    parse_holdout,  # noqa: F401 - defined with the vocabulary (the config checks it without torch); read here
)

SPLITS: dict[str, int] = {"train": 0, "val": 1}
GLYPH = SHAPES.index("glyph")
GEOMETRIC: tuple[int, ...] = tuple(i for i, s in enumerate(SHAPES) if s != "glyph")
# Objects drawn solid only (fill 0, never named in captions): glyphs, and stars, whose five narrow
# tips and small inner pentagon hold about one pattern cell at 32x32 (the data-version-1 oracle
# misread a star's pattern on 11.7% of small and 1.6% of large stars; every other shape <= 3.7%).
SOLID_ONLY: frozenset[int] = frozenset({GLYPH, SHAPES.index("star")})
# Bumped whenever a rule changes which images a (seed, split, index) gives; the oracle records the
# version it was trained on and its cache file carries it. 2: stars are solid.
DATA_VERSION = 2

# Caption words for the grid cells ("at the top left", "on the left", ...).
POSITION_PHRASES: tuple[str, ...] = (
    "at the top left", "at the top", "at the top right",
    "on the left", "at the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)

# Extent (max side of the rotated bounding box) as a fraction of the grid cell, per size id.
SHAPE_EXTENT: tuple[tuple[float, float], ...] = ((0.68, 0.72), (0.88, 0.95))
GLYPH_EXTENT: tuple[tuple[float, float], ...] = ((0.64, 0.70), (0.86, 0.94))
# Background luminance range per background id, and how much the objects' colors may vary.
BACKGROUND_LEVEL: tuple[tuple[float, float], ...] = ((0.04, 0.14), (0.42, 0.55), (0.86, 0.96))
# Base hue (degrees) of each color; saturation and value are drawn per image.
COLOR_HUE: dict[str, float] = {"red": 0.0, "green": 125.0, "blue": 222.0, "yellow": 54.0,
                               "purple": 282.0, "orange": 28.0}
HUE_JITTER = 6.0  # degrees; the closest hues (red/orange/yellow) are 26 degrees apart
# Maximal rotation (radians) per shape; None = any angle (the shape looks the same).
MAX_ROTATION: dict[str, float | None] = {"circle": None, "square": math.radians(10), "triangle": math.radians(15),
                                         "diamond": math.radians(10), "star": math.radians(12),
                                         "cross": math.radians(12), "glyph": math.radians(4)}
SECOND_OPACITY = (0.40, 0.50)
PATTERN_RIM = 0.4  # pixels at 32x32 (scaled with the image)
PATTERN_MAX_ROTATION = math.radians(15)  # patterns stay near the image axes (stripes: either axis)
DOT_RADIUS = 0.33  # of the dot lattice's period (0.28 left the central dot of small stars near invisible)
CROSS_ARM = 0.42  # half-width of a cross's bars (unit frame): fat enough to carry a fill pattern


# ----------------------------------------------------------------------------------------------
# Attributes and captions
# ----------------------------------------------------------------------------------------------


def _holdout_set(holdout) -> frozenset[tuple[int, int]]:
    if isinstance(holdout, frozenset):
        return holdout
    if isinstance(holdout, str):
        holdout = [holdout]
    return parse_holdout(holdout)


@lru_cache(maxsize=64)
def _allowed_pairs(holdout: frozenset[tuple[int, int]], only_holdout: bool) -> tuple[tuple, tuple]:
    """(geometric pairs, glyph pairs) of (shape, color) that may be drawn."""
    pairs = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLORS))]
    keep = [p for p in pairs if (p in holdout) == only_holdout]
    return tuple(p for p in keep if p[0] != GLYPH), tuple(p for p in keep if p[0] == GLYPH)


def sample_attributes(rng: np.random.Generator, holdout: Iterable[str] | frozenset = (), only_holdout: bool = False,
                      glyph_prob: float = 0.2) -> dict[str, int]:
    """Draw the first object's attributes: a dict with every key of ATTRIBUTES (ints).

    The object is a glyph with probability `glyph_prob` (if any glyph combination is allowed),
    else one of the geometric shapes; (shape, color) is uniform over the allowed combinations.
    `holdout` lists "color:shape" combinations that are never drawn; with `only_holdout=True`
    only those are drawn (for compositional tests). Glyphs and stars (SOLID_ONLY) get fill 0
    ("solid"); glyph objects get a character from GLYPHS[1:], other objects glyph 0 ("none").
    """
    held = _holdout_set(holdout)
    if only_holdout and not held:
        raise ValueError("sample_attributes(only_holdout=True) needs a non-empty holdout list")
    geometric, glyphs = _allowed_pairs(held, only_holdout)
    u = rng.random(8)
    if glyphs and (not geometric or u[0] < glyph_prob):
        shape, color = glyphs[int(u[1] * len(glyphs))]
    else:
        shape, color = geometric[int(u[1] * len(geometric))]
    is_glyph = shape == GLYPH
    return {
        "shape": shape,
        "color": color,
        "position": int(u[2] * len(POSITIONS)),
        "size": int(u[3] * len(SIZES)),
        "background": int(u[4] * len(BACKGROUNDS)),
        "fill": 0 if shape in SOLID_ONLY else int(u[5] * len(FILLS)),
        "glyph": 1 + int(u[6] * (len(GLYPHS) - 1)) if is_glyph else 0,
    }


def sample_second(rng: np.random.Generator, first: dict[str, int], holdout: Iterable[str] | frozenset = ()) -> dict:
    """A distractor object for `first`: another cell, a geometric shape, solid; (shape, color) not held out."""
    geometric, _ = _allowed_pairs(_holdout_set(holdout), False)
    u = rng.random(4)
    shape, color = geometric[int(u[0] * len(geometric))]
    position = int(u[1] * (len(POSITIONS) - 1))
    position += position >= first["position"]
    return {"shape": shape, "color": color, "position": position, "size": int(u[2] * len(SIZES)),
            "background": first["background"], "fill": 0, "glyph": 0}


def glyph_noun(glyph: int) -> str:
    """'letter K' or 'digit 7'."""
    ch = GLYPHS[glyph]
    return f"digit {ch}" if ch.isdigit() else f"letter {ch}"


def caption(attrs: dict[str, int], rng: np.random.Generator | None = None, keep: float = 1.0) -> str:
    """Caption of the first object, e.g. 'a small red striped triangle at the top left on a gray background'.

    Each attribute word (size, color, fill, position, background) is kept with probability
    `keep` (drawn from `rng`); the noun (shape, or 'letter K' / 'digit 7' for glyphs) always
    stays. `keep=1.0` names every attribute (no rng needed). Captions of SOLID_ONLY objects (glyphs,
    stars) never name the fill.
    """
    if keep < 1.0 and rng is None:
        raise ValueError("caption(keep < 1) needs an rng")
    u = rng.random(5) if keep < 1.0 else np.zeros(5)
    is_glyph = attrs["shape"] == GLYPH
    words = []
    if u[0] < keep:
        words.append(SIZES[attrs["size"]])
    if u[1] < keep:
        words.append(COLORS[attrs["color"]])
    if u[2] < keep and attrs["shape"] not in SOLID_ONLY:
        words.append(FILLS[attrs["fill"]])
    words.append(glyph_noun(attrs["glyph"]) if is_glyph else SHAPES[attrs["shape"]])
    article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([article] + words)
    if u[3] < keep:
        text += " " + POSITION_PHRASES[attrs["position"]]
    if u[4] < keep:
        text += f" on a {BACKGROUNDS[attrs['background']]} background"
    return text


# ----------------------------------------------------------------------------------------------
# Geometry: unit shapes as unions of convex polygons
# ----------------------------------------------------------------------------------------------


def _regular(n: int, radius: float = 1.0, start_deg: float = -90.0) -> np.ndarray:
    a = np.radians(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _convex_edges(vertices: np.ndarray) -> np.ndarray:
    """(E, 3) rows (nx, ny, c): a point p is inside iff n . p <= c for every edge (outward unit normals)."""
    centroid = vertices.mean(0)
    rows = []
    for a, b in zip(vertices, np.roll(vertices, -1, 0)):
        n = np.array([b[1] - a[1], a[0] - b[0]])
        n /= np.linalg.norm(n)
        if n @ (centroid - a) > 0:
            n = -n
        rows.append((n[0], n[1], n @ a))
    return np.array(rows)


def _star_pieces(inner: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    outer = _regular(5, 1.0)
    inner_pts = _regular(5, inner, -90.0 + 36.0)  # inner_pts[k] lies between tips k and k+1
    kites = [np.stack([np.zeros(2), inner_pts[k - 1], outer[k], inner_pts[k]]) for k in range(5)]
    verts = np.concatenate([outer, inner_pts])
    return verts, np.stack([_convex_edges(k) for k in kites])  # (10, 2), (5, 4, 3)


def _cross_pieces(arm: float = CROSS_ARM) -> tuple[np.ndarray, np.ndarray]:
    """A plus sign: the union of a horizontal and a vertical bar, each `2 * arm` wide (unit frame)."""
    bars = [np.array([[-1, -arm], [1, -arm], [1, arm], [-1, arm]], float),
            np.array([[-arm, -1], [arm, -1], [arm, 1], [-arm, 1]], float)]
    return np.concatenate(bars), np.stack([_convex_edges(b) for b in bars])  # (8, 2), (2, 4, 3)


def _build_shapes() -> dict[str, tuple[list, np.ndarray, np.ndarray, int]]:
    """shape name -> (vertices [(x, y)], edge normals (K,) as complex x + iy, edge offsets (K,), pieces P).

    Unit frame, y pointing down. The K = P * E edges are grouped by piece: a point is inside a
    piece when n . p <= offset for all of its E edges; the shape is the union of its pieces.
    """
    h = math.sqrt(3.0) / 2.0
    polys = {
        "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float),
        "triangle": np.array([[0, -h], [1, h], [-1, h]], float),
        "diamond": np.array([[0, -1], [0.8, 0], [0, 1], [-0.8, 0]], float),
    }
    pieces = {name: (v, _convex_edges(v)[None]) for name, v in polys.items()}
    pieces["star"] = _star_pieces()
    pieces["cross"] = _cross_pieces()
    return {name: ([tuple(p) for p in v.tolist()], (e[..., 0] + 1j * e[..., 1]).reshape(-1).astype(np.complex64),
                   e[..., 2].reshape(-1).astype(np.float32), e.shape[0]) for name, (v, e) in pieces.items()}


UNIT_SHAPES = _build_shapes()


# ----------------------------------------------------------------------------------------------
# Glyph masks
# ----------------------------------------------------------------------------------------------

_GLYPH_FONT_SIZE = 128
_GLYPH_BUCKET = math.log(1.04)  # masks are cached at extents 4% apart; the rest is continuous scaling


@cache
def _glyph_master(ch: str) -> Image.Image:
    """A bold, ink-cropped, high-resolution mask (mode L) of one character in Pillow's default font."""
    font = ImageFont.load_default(size=_GLYPH_FONT_SIZE)
    stroke = round(_GLYPH_FONT_SIZE * 0.05)
    left, top, right, bottom = font.getbbox(ch, stroke_width=stroke)
    img = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(img).text((4 - left, 4 - top), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return img.crop(img.getbbox())


@lru_cache(maxsize=4096)
def _glyph_mask(glyph: int, bucket: int, image_size: int) -> tuple[Image.Image, float, float, float]:
    """(masks, extent in mask pixels, ink width, ink height) at 2x resolution.

    masks: a PIL 'LA' image (one transform call resamples both), zero-padded and centered on the
    ink's bounding box, whose larger side is exp(bucket * log 1.04) image pixels. Band L is the
    glyph, band A the glyph dilated by half an image pixel at 32x32 (the dark outline drawn
    under glyphs on gray and white backgrounds).
    """
    master = _glyph_master(GLYPHS[glyph])
    extent2 = 2.0 * math.exp(bucket * _GLYPH_BUCKET)  # the ink's larger side, in mask pixels
    scale = extent2 / max(master.size)
    ink_w, ink_h = max(1, round(master.size[0] * scale)), max(1, round(master.size[1] * scale))
    radius = image_size / 32.0  # outline width in mask pixels
    pad = math.ceil(radius) + 2
    fill = np.pad(np.asarray(master.resize((ink_w, ink_h), Image.Resampling.BOX)), pad)
    grown = fill.copy()
    r = math.ceil(radius)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= radius * radius + 1e-6:
                np.maximum(grown, np.roll(fill, (dy, dx), (0, 1)), out=grown)
    return Image.fromarray(np.stack([fill, grown], -1), "LA"), extent2, float(ink_w), float(ink_h)


# ----------------------------------------------------------------------------------------------
# Rendering (channel-first float32 internally; every array op is on the object's bounding box)
# ----------------------------------------------------------------------------------------------

_NOISE_TABLE = 768  # fine-grain noise comes from a random window of one fixed table (cheaper than drawing it)
_NODES = np.arange(4, dtype=np.float64) / 3.0 - 0.5  # low-resolution background grid, in image widths


@lru_cache(maxsize=1)
def _noise_table() -> np.ndarray:
    return np.random.default_rng(20240611).standard_normal((_NOISE_TABLE, _NOISE_TABLE), dtype=np.float32)


@lru_cache(maxsize=16)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-center coordinates (size,) and a (size, 4) piecewise-linear upsampling matrix."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    t = coords * (3.0 / size)
    up = np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(4, dtype=np.float32)[None, :]))
    return coords, up.astype(np.float32)


def _clip01(x: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] in place (np.clip has a large per-call overhead on small arrays)."""
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


def _color_rgb(color: int, u: np.ndarray) -> tuple[float, float, float]:
    """Jittered RGB of a color id from three uniforms (hue, saturation, value)."""
    hue = (COLOR_HUE[COLORS[color]] + (2.0 * u[0] - 1.0) * HUE_JITTER) / 360.0 % 1.0
    sat = 0.78 + 0.22 * u[1]
    val = 0.88 + 0.12 * u[2]
    return colorsys.hsv_to_rgb(hue, sat, val)


def _background(background: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """(3, size, size) float32: tinted level + linear gradient + smooth noise + fine grain."""
    _, up = _grids(size)
    u = rng.random(8)
    lo, hi = BACKGROUND_LEVEL[background]
    angle = 2.0 * math.pi * u[1]
    amp = 0.10 * u[2]  # luminance change across the image
    # Smooth noise on a 4x4 grid plus the gradient, which piecewise-linear upsampling reproduces exactly.
    grid = rng.standard_normal((4, 4)) * (0.035 * u[3])
    grid += np.add.outer(_NODES * (amp * math.sin(angle)), _NODES * (amp * math.cos(angle)))
    field = up @ grid.astype(np.float32) @ up.T  # (S, S)
    oy, ox = rng.integers(0, _NOISE_TABLE - size + 1, 2)
    field += _noise_table()[oy:oy + size, ox:ox + size] * np.float32(0.018 * u[4])
    level = lo + (hi - lo) * u[0]
    base = np.array([level + 0.04 * (v - 0.5) for v in u[5:8]], np.float32)
    return field[None] + base[:, None, None]  # (3, S, S)


def _place(u: np.ndarray, cell: float, position: int, ext_x: float, ext_y: float) -> tuple[float, float]:
    """Center of a box (ext_x, ext_y) placed uniformly inside grid cell `position`, 0.5 px from its edges
    (the anti-aliased edge pixels stay inside too); a box that does not fit is centered."""
    row, col = divmod(position, 3)
    room_x = max(0.0, cell - ext_x - 1.0)
    room_y = max(0.0, cell - ext_y - 1.0)
    return (col + 0.5) * cell + room_x * (u[0] - 0.5), (row + 0.5) * cell + room_y * (u[1] - 0.5)


def _crop(size: int, cx: float, cy: float, ext_x: float, ext_y: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) pixel bounds of a box around (cx, cy), one pixel of margin."""
    return (max(0, int(cy - ext_y / 2) - 1), min(size, int(cy + ext_y / 2) + 2),
            max(0, int(cx - ext_x / 2) - 1), min(size, int(cx + ext_x / 2) + 2))


def _pattern(fill: int, dx: np.ndarray, dy: np.ndarray, u: np.ndarray, extent: float, unit: float) -> np.ndarray:
    """Weight (h, w) in [0, 1] of the secondary color for fill id `fill`, anti-aliased.

    dx (w,), dy (h,): pixel offsets from the object's center. The period scales with the object
    (about two periods across it), with a floor of 3.6 (stripes), 4.0 (dots) and 4.4 (checker)
    pixels at 32x32 so that the pattern stays resolvable. The phase is within +-0.15 period of a
    canonical alignment (a dark stripe, a dot or a checker corner at the object's center), so the
    two or three pattern cells an object shows always read the same way (a uniform random phase
    made large objects' fills measurably more confusable at 32x32).
    """
    ja, jb = (u[2] - 0.5) * 0.3, (u[3] - 0.5) * 0.3
    # Every pattern stays within 15 degrees of the image axes: at 32x32, diagonal stripes and a
    # checker turned 45 degrees become pixel staircases that read as each other (or as dots).
    angle = (2.0 * u[0] - 1.0) * PATTERN_MAX_ROTATION
    if fill == 1:  # stripes: horizontal or vertical bands
        angle += 0.5 * math.pi * (u[4] < 0.5)
        ca, sa = math.cos(angle), math.sin(angle)
        period = max(3.6 * unit, extent * (0.36 + 0.08 * u[1]))
        t = (dx * (ca / period))[None, :] + (dy * (sa / period) + 0.5 + ja)[:, None]  # (h, w) in periods
        t -= np.floor(t)
        f = np.abs(t - 0.5)
        f *= period
        f += 0.5 - 0.25 * period
        return _clip01(f)
    ca, sa = math.cos(angle), math.sin(angle)
    if fill == 2:  # dots on a square lattice
        period = max(4.0 * unit, extent * (0.42 + 0.08 * u[1]))
        pa, pb = 0.5 + ja, 0.5 + jb
    else:  # checker
        period = max(4.4 * unit, extent * (0.48 + 0.08 * u[1]))
        pa, pb = 0.25 + ja, 0.25 + jb
    s = 1.0 / period
    fa = (dx * (ca * s))[None, :] + (dy * (sa * s) + pa)[:, None]  # (h, w) in periods
    fb = (dy * (ca * s) + pb)[:, None] - (dx * (sa * s))[None, :]
    fa -= np.floor(fa)
    fb -= np.floor(fb)
    fa -= 0.5
    fb -= 0.5
    if fill == 2:
        dist = np.sqrt(fa * fa + fb * fb)
        dist *= -period
        dist += DOT_RADIUS * period + 0.5
        return _clip01(dist)
    # checker: 0.5 + 2 * (soft square wave a) * (soft square wave b), each in [-0.5, 0.5]
    np.abs(fa, out=fa)
    np.abs(fb, out=fb)
    fa -= 0.25
    fb -= 0.25
    fa *= period
    fb *= period
    np.minimum(np.maximum(fa, -0.5, out=fa), 0.5, out=fa)
    np.minimum(np.maximum(fb, -0.5, out=fb), 0.5, out=fb)
    fa *= fb
    fa *= 2.0
    fa += 0.5
    return fa


def _composite(region: np.ndarray, color, alpha: np.ndarray) -> None:
    """region (3, h, w) += (color - region) * alpha (h, w); color (3,) or (3, h, w)."""
    if not isinstance(color, np.ndarray) or color.ndim == 1:
        color = np.asarray(color, np.float32)[:, None, None]
    region += (color - region) * alpha[None]


def _draw_shape(img: np.ndarray, obj: dict[str, int], rng: np.random.Generator, opacity: float) -> None:
    """Draw a geometric object into img (3, S, S) in place."""
    size = img.shape[1]
    cell = size / 3.0
    unit = size / 32.0
    u = rng.random(12)
    name = SHAPES[obj["shape"]]
    lo, hi = SHAPE_EXTENT[obj["size"]]
    extent = min(cell * (lo + (hi - lo) * u[0]), cell - 1.0)  # rotated bounding box's larger side
    max_rot = MAX_ROTATION[name]
    theta = 2.0 * math.pi * u[1] if max_rot is None else (2.0 * u[1] - 1.0) * max_rot
    ct, st = math.cos(theta), math.sin(theta)
    coords, _ = _grids(size)
    if name == "circle":
        cx, cy = _place(u[5:7], cell, obj["position"], extent, extent)
        y0, y1, x0, x1 = _crop(size, cx, cy, extent, extent)
        dx, dy = coords[x0:x1] - cx, coords[y0:y1] - cy  # (w,), (h,)
        dist = np.sqrt((dy * dy)[:, None] + dx * dx)  # (h, w) signed distance in pixels
        dist -= extent / 2.0
    else:
        verts, normals, offsets, pieces = UNIT_SHAPES[name]
        rv_x = [vx * ct - vy * st for vx, vy in verts]  # rotated vertices (python: V <= 10)
        rv_y = [vx * st + vy * ct for vx, vy in verts]
        lo_x, hi_x, lo_y, hi_y = min(rv_x), max(rv_x), min(rv_y), max(rv_y)
        scale = extent / max(hi_x - lo_x, hi_y - lo_y)
        ext_x, ext_y = (hi_x - lo_x) * scale, (hi_y - lo_y) * scale
        bx, by = _place(u[5:7], cell, obj["position"], ext_x, ext_y)
        cx = bx - (lo_x + hi_x) / 2 * scale  # shape origin, so that the bbox center lands at (bx, by)
        cy = by - (lo_y + hi_y) / 2 * scale
        y0, y1, x0, x1 = _crop(size, bx, by, ext_x, ext_y)
        dx, dy = coords[x0:x1] - cx, coords[y0:y1] - cy
        n = normals * complex(ct, st)  # (K,) complex: edge normals rotated by theta
        ax = np.multiply.outer(n.real, dx)  # (K, w)
        ax -= (offsets * scale)[:, None]
        ay = np.multiply.outer(n.imag, dy)  # (K, h)
        d = ax[:, None, :] + ay[:, :, None]  # (K, h, w) signed distance to each edge's line
        dist = d.max(0) if pieces == 1 else d.reshape(pieces, -1, y1 - y0, x1 - x0).max(1).min(0)
    alpha = _clip01(0.5 - dist)  # (h, w) coverage
    if opacity < 1.0:
        alpha *= opacity
    rgb = _color_rgb(obj["color"], u[2:5])
    region = img[:, y0:y1, x0:x1]
    if obj["fill"] == 0:
        _composite(region, rgb, alpha)
        return
    w = _pattern(obj["fill"], dx, dy, u[7:12], extent, unit)
    w *= _clip01(-dist - (PATTERN_RIM * unit - 0.5))  # a thin rim of the object's own color
    color = np.array(rgb, np.float32)[:, None, None]
    # The pattern's second color contrasts with the object and with the background, so that the
    # silhouette stays whole: a dark shade on gray and white backgrounds; on black, a light tint of
    # dark colors (red, blue, purple) and a half-dark shade of bright ones (yellow, green, orange).
    if obj["background"] > 0:
        second = color * 0.25
    elif 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.5:
        second = color * 0.45
    else:
        second = color * 0.3 + 0.7
    _composite(region, color + (second - color) * w[None], alpha)


def _sample_mask(mask: Image.Image, x0: int, y0: int, w: int, h: int, cx: float, cy: float, k: float, ct: float,
                 st: float) -> np.ndarray:
    """Coverage (h, w, C) in [0, 1] of the image pixels [y0, y0+h) x [x0, x0+w) by a 2x glyph mask (C bands).

    The mask's center lands on (cx, cy), rotated by theta (cos ct, sin st), k mask pixels per
    image pixel. PIL's affine transform (bilinear) renders a 2x crop that is box-averaged: 2x2
    supersampling.
    """
    # Output pixel (X, Y) of the 2x crop is the image point (x0 + (X + 0.5) / 2, y0 + (Y + 0.5) / 2);
    # PIL maps it to the mask point (a, b, c) . (X + 0.5, Y + 0.5, 1), (d, e, f) . (...).
    ox, oy = x0 - cx, y0 - cy
    mw, mh = mask.size
    coeffs = (0.5 * k * ct, 0.5 * k * st, k * (ct * ox + st * oy) + mw / 2.0,
              -0.5 * k * st, 0.5 * k * ct, k * (ct * oy - st * ox) + mh / 2.0)
    crop = mask.transform((2 * w, 2 * h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    cover = np.asarray(crop, dtype=np.float32).reshape(h, 2, w, 2, -1).sum((1, 3))
    cover *= 1.0 / (4.0 * 255.0)
    return cover


def _draw_glyph(img: np.ndarray, obj: dict[str, int], rng: np.random.Generator) -> None:
    """Draw a glyph object (bold character, solid, dark outline on gray/white) into img (3, S, S) in place."""
    size = img.shape[1]
    cell = size / 3.0
    u = rng.random(8)
    lo, hi = GLYPH_EXTENT[obj["size"]]
    theta = (2.0 * u[1] - 1.0) * MAX_ROTATION["glyph"]
    ct, st = math.cos(theta), math.sin(theta)
    ac, as_ = abs(ct), abs(st)
    mw, mh = _glyph_master(GLYPHS[obj["glyph"]]).size
    aw, ah = mw / max(mw, mh), mh / max(mw, mh)  # ink aspect, larger side 1
    grow = max(aw * ac + ah * as_, aw * as_ + ah * ac)  # rotated ink box / larger side
    outline = size / 32.0  # outline on both sides (0.5 px each at 32x32)
    # The ink's larger side, so that the rotated ink plus its outline fits the cell (0.25 px margins).
    extent = min(cell * (lo + (hi - lo) * u[0]), (cell - 0.5 - outline) / grow)
    masks, extent2, ink_w, ink_h = _glyph_mask(obj["glyph"], round(math.log(extent) / _GLYPH_BUCKET), size)
    k = extent2 / extent  # mask pixels per image pixel (about 2)
    ink_w, ink_h = ink_w / k, ink_h / k  # image pixels
    box_x, box_y = ink_w * ac + ink_h * as_ + outline, ink_w * as_ + ink_h * ac + outline
    cx, cy = _place(u[5:7], cell, obj["position"], box_x, box_y)
    box = max(masks.size) / k * (ac + as_)
    y0, y1, x0, x1 = _crop(size, cx, cy, box, box)
    region = img[:, y0:y1, x0:x1]
    cover = _sample_mask(masks, x0, y0, x1 - x0, y1 - y0, cx, cy, k, ct, st)  # (h, w, 2)
    if obj["background"] > 0:
        _composite(region, (0.12, 0.12, 0.12), cover[..., 1])
    _composite(region, _color_rgb(obj["color"], u[2:5]), cover[..., 0])


def _render_chw(attrs: dict[str, int], rng: np.random.Generator, image_size: int,
                second: dict[str, int] | None, second_opacity: float | None) -> np.ndarray:
    if not 16 <= image_size <= 256:
        raise ValueError(f"image_size {image_size} is outside 16..256")
    img = _background(attrs["background"], rng, image_size)
    if second is not None:
        if second_opacity is None:
            lo, hi = SECOND_OPACITY
            second_opacity = lo + (hi - lo) * float(rng.random())
        _draw_shape(img, second, rng, second_opacity)
    if attrs["shape"] == GLYPH:
        _draw_glyph(img, attrs, rng)
    else:
        _draw_shape(img, attrs, rng, 1.0)
    img *= 255.0
    img += 0.5
    np.minimum(np.maximum(img, 0.0, out=img), 255.0, out=img)
    return img.astype(np.uint8)  # (3, S, S)


def render(attrs: dict[str, int], rng: np.random.Generator, image_size: int = 32,
           second: dict[str, int] | None = None, second_opacity: float | None = None) -> np.ndarray:
    """Render one image: uint8 numpy (H, W, 3) with H = W = image_size (16..256).

    attrs: the first object's attributes (every key of ATTRIBUTES). second: an optional
    distractor (`sample_second`), drawn faded (opacity `second_opacity`, default random in
    0.40-0.50) underneath. All continuous variation comes from `rng`.
    """
    return np.ascontiguousarray(_render_chw(attrs, rng, image_size, second, second_opacity).transpose(1, 2, 0))


_SCALE = np.float32(1.0 / 127.5)


def _chw_to_tensor(image: np.ndarray) -> torch.Tensor:
    out = image.astype(np.float32)
    out *= _SCALE
    out -= np.float32(1.0)
    return torch.from_numpy(out)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]; the dataset and the shard reader share it (bit-exact)."""
    return _chw_to_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


def sample_state(seed: int, split: str, index: int) -> dict:
    """PCG64 state of sample `index`: 256 bits of BLAKE2b over (seed, split, index).

    A pure function of the three numbers (no pid, clock or hash randomisation), and much cheaper
    than `np.random.default_rng([seed, split, index])`, whose SeedSequence costs a large share
    of a 32x32 image's budget.
    """
    digest = hashlib.blake2b(struct.pack("<qqq", seed, SPLITS[split], index), digest_size=32,
                             person=b"hybrid-procedure").digest()
    return {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
            "state": {"state": int.from_bytes(digest[:16], "little"), "inc": int.from_bytes(digest[16:], "little") | 1}}


class ProceduralDataset(Dataset):
    """Map-style dataset of procedural images, a pure function of (seed, split, index).

    ds[i] -> {"image": float32 (3, H, W) in [-1, 1], "class_id": int (shape x color of the
    first object), "caption": str, "attrs": dict[str, int] (every key of ATTRIBUTES)}.

    split="train" never draws the `holdout` "color:shape" combinations (neither object) and
    its captions name a random subset of the attributes (each kept with prob `caption_keep`);
    split="val" draws from everything and names every attribute. `only_holdout=True` draws the
    first object from the held-out combinations only (compositional evaluation).
    """

    def __init__(self, image_size: int = 32, size: int = 10_000, seed: int = 0, split: str = "train",
                 holdout: Sequence[str] = (), caption_keep: float = 0.7, two_object_prob: float = 0.3,
                 glyph_prob: float = 0.2, only_holdout: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
        if not 16 <= image_size <= 256:
            raise ValueError(f"image_size {image_size} is outside 16..256")
        if size < 1:
            raise ValueError(f"dataset size must be >= 1, got {size}")
        self.image_size = int(image_size)
        self.size = int(size)
        self.seed = int(seed)
        self.split = split
        self.holdout = parse_holdout(holdout)
        self.caption_keep = float(caption_keep) if split == "train" else 1.0
        self.two_object_prob = float(two_object_prob)
        self.glyph_prob = float(glyph_prob)
        self.only_holdout = only_holdout
        self._banned = self.holdout if split == "train" else frozenset()
        self._generator: np.random.Generator | None = None
        if only_holdout and not self.holdout:
            raise ValueError("ProceduralDataset(only_holdout=True) needs a non-empty holdout list")

    def __len__(self) -> int:
        return self.size

    def rng(self, index: int) -> np.random.Generator:
        """A new generator in the state that fixes sample `index` (see `sample_state`)."""
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = sample_state(self.seed, self.split, index)
        return rng

    def _rng(self, index: int) -> np.random.Generator:
        """Like `rng`, but this dataset's one generator, re-seeded (8 us instead of 40 for a new one)."""
        if self._generator is None:
            self._generator = np.random.Generator(np.random.PCG64())
        self._generator.bit_generator.state = sample_state(self.seed, self.split, index)
        return self._generator

    def sample(self, index: int) -> tuple[np.ndarray, dict[str, int], str]:
        """(uint8 image (H, W, 3), attrs, caption) of sample `index` (what the shard writer stores)."""
        image, attrs, text = self._draw(index)
        return np.ascontiguousarray(image.transpose(1, 2, 0)), attrs, text

    def _draw(self, index: int) -> tuple[np.ndarray, dict[str, int], str]:
        """(uint8 image (3, H, W), attrs, caption)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is out of range for a dataset of size {self.size}")
        rng = self._rng(index)
        if self.only_holdout:
            attrs = sample_attributes(rng, self.holdout, only_holdout=True, glyph_prob=self.glyph_prob)
        else:
            attrs = sample_attributes(rng, self._banned, glyph_prob=self.glyph_prob)
        second = sample_second(rng, attrs, self._banned) if rng.random() < self.two_object_prob else None
        image = _render_chw(attrs, rng, self.image_size, second, None)  # (3, H, W)
        return image, attrs, caption(attrs, rng, self.caption_keep)

    def __getitem__(self, index: int) -> dict:
        image, attrs, text = self._draw(int(index))
        return {"image": _chw_to_tensor(image), "class_id": class_id(attrs["shape"], attrs["color"]),
                "caption": text, "attrs": attrs}


def unknown_attrs() -> dict[str, int]:
    """Attributes of an image that has none (shard or folder data): every key -1."""
    return {key: -1 for key in ATTRIBUTES}
