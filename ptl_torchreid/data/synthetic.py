"""Synthetic person re-identification datasets, generated deterministically on first use.

Each dataset is a Market-1501-style folder (``bounding_box_train``, ``query``, ``bounding_box_test``; file names
such as ``0002_c1s1_000451_01.jpg`` holding the person id and camera) that is drawn with numpy and OpenCV from a
seed the first time torchreid asks for it. Nothing is ever downloaded.

What makes it a re-identification problem rather than noise:

* identities differ in clothing colours and patterns (solid, stripes, checks, plaid, dots, colour blocks),
  garment types, body proportions, hair, and accessories (backpack, shoulder bag, handbag, hat, scarf, print);
* every camera has its own domain: scene, illumination, colour cast, shading, saturation, blur, resolution,
  noise, JPEG quality, framing scale and offset, perspective, preferred viewpoint (front/back/side), background
  clutter and occluders (cars, poles, other people...);
* images of one identity differ (pose, position, scale, view, lighting, clutter), more so across cameras;
* query and gallery follow the Market-1501 protocol: every test identity is seen by at least two cameras, the
  query holds one image per chosen camera, and the gallery holds the rest plus optional distractor identities.

The generated folder carries ``manifest.json`` with the generation parameters and a format version. A folder
generated with other parameters is regenerated (or reported, with ``on_mismatch='error'``) instead of being
silently reused; a folder without a manifest is never touched. Generation writes into a temporary sibling folder
that is renamed into place only when complete, so a crash never leaves a half-written dataset behind.
"""
import colorsys
import dataclasses
import difflib
import json
import os
import os.path as osp
import re
import shutil
import tempfile
import time
import zlib
from typing import Optional

import cv2
import numpy as np

from .._torchreid import torchreid
from ..utils.savedir import file_mode
from . import check

__all__ = [
    "FORMAT_VERSION",
    "STYLES",
    "DEFAULT_DATASETS",
    "SyntheticParams",
    "SyntheticReID",
    "make_params",
    "register_synthetic_dataset",
    "registered_synthetic_datasets",
    "prepare_synthetic_dataset",
    "read_split",
    "make_contact_sheet",
]

# Bump whenever the rendering or the layout changes, so that folders written by an older version are redone.
FORMAT_VERSION = 1
GENERATOR = "ptl_torchreid.data.synthetic"
MANIFEST = "manifest.json"
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_IMAGE_EXTS = ("jpg", "png")
_SUPERSAMPLE = 2  # draw at twice the stored size, then area-downsample: cheap anti-aliasing

# Independent random streams, keyed so that any image can be redrawn without drawing the others first.
_IDENTITY, _CAMERA, _SPLIT, _TRACK, _IMAGE = range(5)


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines the generated images (recorded in the manifest).

    Attributes:
        num_train_ids: training identities.
        num_test_ids: test identities (in query and gallery).
        num_cameras: cameras (2..99); each has its own domain shift.
        images_per_id_per_camera: images of an identity in each camera that sees it.
        height, width: stored image size in pixels.
        seed: base random seed.
        style: camera domain preset, one of ``STYLES``.
        min_cameras_per_id: fewest cameras that see an identity (>= 2, as in Market-1501).
        max_cameras_per_id: most cameras that see an identity (None: all cameras).
        queries_per_id: cameras from which one query image is taken per test identity.
        num_distractor_ids: extra identities that appear only in the gallery.
        id_offset: person ids start at ``id_offset + 1``; datasets with disjoint id ranges hold different people.
        image_format: ``'jpg'`` or ``'png'``.
    """

    num_train_ids: int = 80
    num_test_ids: int = 50
    num_cameras: int = 5
    images_per_id_per_camera: int = 3
    height: int = 128
    width: int = 64
    seed: int = 0
    style: str = "mixed"
    min_cameras_per_id: int = 2
    max_cameras_per_id: Optional[int] = None
    queries_per_id: int = 2
    num_distractor_ids: int = 10
    id_offset: int = 0
    image_format: str = "jpg"

    def __post_init__(self):
        limits = {
            "num_train_ids": (2, 100000, "softmax training needs at least two classes"),
            "num_test_ids": (1, 100000, ""),
            "num_cameras": (2, 99, "the Market-1501 protocol needs every test identity in at least two cameras"),
            "images_per_id_per_camera": (1, 1000, ""),
            "height": (32, 2048, ""),
            "width": (16, 2048, ""),
            "seed": (0, 2 ** 63 - 1, ""),
            "min_cameras_per_id": (2, 99, "cross-camera matching needs at least two cameras per identity"),
            "queries_per_id": (1, 99, ""),
            "num_distractor_ids": (0, 100000, ""),
            "id_offset": (0, 10 ** 8, ""),
        }
        if self.max_cameras_per_id is not None:
            limits["max_cameras_per_id"] = (2, 99, "")
        for key, (lo, hi, why) in limits.items():
            _check_int(key, getattr(self, key), lo, hi, why)
            object.__setattr__(self, key, int(getattr(self, key)))  # numpy ints would not survive json
        if self.min_cameras_per_id > self.num_cameras:
            raise ValueError(
                f"min_cameras_per_id={self.min_cameras_per_id} exceeds num_cameras={self.num_cameras}; lower min_cameras_per_id or add cameras"
            )
        if self.max_cameras_per_id is not None and not (
            self.min_cameras_per_id <= self.max_cameras_per_id <= self.num_cameras
        ):
            raise ValueError(
                f"max_cameras_per_id={self.max_cameras_per_id} must lie in [min_cameras_per_id={self.min_cameras_per_id}, num_cameras={self.num_cameras}] (or be None)"
            )
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ValueError(
                "Unknown style {!r}{}; valid styles: {}".format(
                    self.style, _suggest(self.style, STYLES), ", ".join(STYLES)
                )
            )
        if self.image_format not in _IMAGE_EXTS:
            raise ValueError(f"image_format must be one of {_IMAGE_EXTS}, got {self.image_format!r}")

    @property
    def cameras_per_id(self):
        return self.min_cameras_per_id, (self.max_cameras_per_id or self.num_cameras)

    def to_dict(self):
        return dataclasses.asdict(self)


PARAM_NAMES = tuple(f.name for f in dataclasses.fields(SyntheticParams))


def _check_int(key, value, lo, hi, why):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Synthetic dataset parameter {key} must be an integer, got {value!r} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise ValueError(
            "Synthetic dataset parameter {} must be in [{}, {}], got {}{}".format(
                key, lo, hi, value, ": " + why if why else ""
            )
        )


def _suggest(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_params(base=None, **overrides):
    """``SyntheticParams`` from ``base`` (default: the class defaults) with ``overrides``; unknown keys are errors."""
    base = base if base is not None else SyntheticParams()
    for key in overrides:
        if key not in PARAM_NAMES:
            raise TypeError(
                "Unknown synthetic dataset parameter {!r}{}; valid parameters: {}".format(
                    key, _suggest(key, PARAM_NAMES), ", ".join(PARAM_NAMES)
                )
            )
    return dataclasses.replace(base, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Camera domain presets
# ----------------------------------------------------------------------------------------------------------------

# Ranges from which each camera's domain is drawn. cast_hue None spreads the casts of the cameras round the colour
# wheel; a (lo, hi) range in degrees (0 red, 60 yellow, 120 green, 240 blue) keeps them in one family.
_BASE_STYLE = dict(
    scenes=("indoor", "street", "park", "station"),
    gain=(0.75, 1.2),
    contrast=(0.85, 1.1),
    gamma=(0.9, 1.1),
    cast=(0.01, 0.06),
    cast_hue=None,
    saturation=(0.8, 1.1),
    shade=(0.0, 0.3),
    blur=(0.0, 1.1),
    lowres=(1.0, 2.0),
    noise=(1.0, 6.0),
    jpeg=(60, 92),
    scale=(0.8, 0.95),
    perspective=(-0.1, 0.1),
    offset=(-0.08, 0.08),
    occlusion=(0.0, 0.35),
    clutter=(0, 4),
    view_concentration=1.2,
    light_jitter=0.08,
)
STYLES = {
    # cameras drawn from all scene types and moderate photometric ranges: the default, Market-1501-like
    "mixed": dict(_BASE_STYLE),
    # bright, warm, sharp, tidy scenes, little occlusion
    "indoor": dict(
        _BASE_STYLE,
        scenes=("indoor", "station"),
        gain=(0.95, 1.2),
        contrast=(0.9, 1.1),
        gamma=(0.9, 1.05),
        cast=(0.02, 0.08),
        cast_hue=(10.0, 60.0),
        saturation=(0.95, 1.15),
        shade=(0.0, 0.15),
        blur=(0.0, 0.5),
        lowres=(1.0, 1.3),
        noise=(0.5, 2.5),
        jpeg=(80, 95),
        scale=(0.84, 0.95),
        perspective=(-0.04, 0.04),
        offset=(-0.04, 0.04),
        occlusion=(0.0, 0.12),
        clutter=(0, 2),
    ),
    # dimmer or over-exposed, cool, desaturated, soft, low resolution, busy scenes, frequent occlusion
    "outdoor": dict(
        _BASE_STYLE,
        scenes=("street", "park"),
        gain=(0.7, 1.25),
        contrast=(0.8, 1.0),
        gamma=(1.0, 1.2),
        cast=(0.03, 0.1),
        cast_hue=(150.0, 260.0),
        saturation=(0.7, 0.95),
        shade=(0.1, 0.35),
        blur=(0.4, 1.3),
        lowres=(1.3, 2.1),
        noise=(2.0, 7.0),
        jpeg=(55, 80),
        scale=(0.76, 0.9),
        perspective=(-0.12, 0.12),
        offset=(-0.1, 0.1),
        occlusion=(0.15, 0.4),
        clutter=(1, 4),
    ),
    # strong colour casts and exposure differences between cameras: a hard variant of "mixed"
    "harsh": dict(
        _BASE_STYLE,
        gain=(0.6, 1.3),
        contrast=(0.7, 1.15),
        gamma=(0.8, 1.3),
        cast=(0.06, 0.3),
        saturation=(0.55, 1.25),
        scale=(0.74, 0.94),
    ),
    # no camera shift at all: an easy control for ablations and debugging
    "clean": dict(
        _BASE_STYLE,
        scenes=("indoor",),
        gain=(1.0, 1.0),
        contrast=(1.0, 1.0),
        gamma=(1.0, 1.0),
        cast=(0.0, 0.0),
        saturation=(1.0, 1.0),
        shade=(0.0, 0.0),
        blur=(0.0, 0.0),
        lowres=(1.0, 1.0),
        noise=(0.0, 0.0),
        jpeg=(95, 95),
        scale=(0.88, 0.88),
        perspective=(0.0, 0.0),
        offset=(0.0, 0.0),
        occlusion=(0.0, 0.0),
        clutter=(0, 0),
        view_concentration=50.0,
        light_jitter=0.0,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Colours and identities
# ----------------------------------------------------------------------------------------------------------------


def _bgr(r, g, b):
    return np.array([b, g, r], np.float32)


_CLOTH = {
    "black": _bgr(30, 30, 32),
    "white": _bgr(235, 235, 230),
    "grey": _bgr(128, 128, 130),
    "charcoal": _bgr(70, 70, 74),
    "navy": _bgr(25, 40, 90),
    "blue": _bgr(40, 100, 200),
    "lightblue": _bgr(140, 185, 230),
    "red": _bgr(200, 35, 40),
    "maroon": _bgr(120, 30, 45),
    "green": _bgr(50, 140, 60),
    "olive": _bgr(110, 110, 50),
    "yellow": _bgr(230, 205, 50),
    "orange": _bgr(240, 130, 30),
    "pink": _bgr(240, 150, 180),
    "purple": _bgr(110, 50, 130),
    "brown": _bgr(120, 70, 40),
    "beige": _bgr(215, 190, 150),
    "teal": _bgr(20, 130, 130),
}
_CLOTH_NAMES = list(_CLOTH)
_TOP_WEIGHTS = np.array([3, 3, 2, 2, 2, 2, 1.5, 2, 1, 1.5, 1, 1, 1, 1, 1, 1, 1.5, 1], np.float64)
_BOTTOM_NAMES = ["black", "navy", "blue", "charcoal", "grey", "beige", "brown", "olive", "white", "red", "lightblue"]
_BOTTOM_WEIGHTS = np.array([4, 3, 3, 2, 2, 2, 1.5, 1, 0.8, 0.6, 1.2], np.float64)
_SKIN = [
    _bgr(255, 224, 196),
    _bgr(241, 194, 160),
    _bgr(224, 172, 130),
    _bgr(198, 134, 90),
    _bgr(141, 85, 54),
    _bgr(95, 60, 40),
]
_HAIR = [
    _bgr(20, 16, 14),
    _bgr(60, 40, 25),
    _bgr(110, 75, 40),
    _bgr(200, 165, 100),
    _bgr(150, 150, 150),
    _bgr(150, 60, 30),
]
_TOP_PATTERNS = ["solid", "hstripes", "vstripes", "checks", "plaid", "dots", "block", "diagonal"]
_TOP_PATTERN_WEIGHTS = np.array([4, 2, 1, 1, 1, 1, 1.5, 1], np.float64)


def _pick(rng, names, weights=None):
    p = None if weights is None else weights / weights.sum()
    return names[int(rng.choice(len(names), p=p))]


def _jitter_colour(rng, bgr, hue=8.0, sat=0.15, val=0.15):
    """Moves a colour a little in HSV so that two 'blue' shirts are not identical."""
    px = np.clip(bgr, 0, 255).astype(np.uint8).reshape(1, 1, 3)
    h, s, v = cv2.cvtColor(px, cv2.COLOR_BGR2HSV_FULL)[0, 0].astype(np.float32)
    h = (h + rng.uniform(-hue, hue) * 256 / 360) % 256
    s = np.clip(s * rng.uniform(1 - sat, 1 + sat), 0, 255)
    v = np.clip(v * rng.uniform(1 - val, 1 + val), 0, 255)
    hsv = np.array([[[h, s, v]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR_FULL)[0, 0].astype(np.float32)


def _cloth(rng, names=None, weights=None, exclude=None):
    names = names or _CLOTH_NAMES
    weights = weights if weights is not None else (_TOP_WEIGHTS if names is _CLOTH_NAMES else None)
    while True:
        name = _pick(rng, names, weights)
        if name != exclude:
            return name, _jitter_colour(rng, _CLOTH[name])


def _pattern_params(rng, kind):
    return dict(
        kind=kind,
        period=float(rng.uniform(0.04, 0.075) if kind in ("hstripes", "vstripes") else rng.uniform(0.05, 0.09)),
        duty=float(rng.uniform(0.3, 0.6)),
        phase=float(rng.uniform(0, 1)),
        split=float(rng.uniform(0.35, 0.6)),
        slope=float(rng.choice([-1, 1]) * rng.uniform(0.4, 1.2)),
        radius=float(rng.uniform(0.18, 0.32)),
    )


def _make_identity(seed, pid):
    rng = np.random.default_rng(np.random.SeedSequence([seed, _IDENTITY, pid]))
    ident = {}
    top_name, ident["top"] = _cloth(rng)
    ident["top_pattern"] = _pattern_params(rng, _pick(rng, _TOP_PATTERNS, _TOP_PATTERN_WEIGHTS))
    _, ident["top2"] = _cloth(rng, exclude=top_name)
    ident["sleeves"] = _pick(rng, ["long", "short", "none"], np.array([5, 4, 1.0]))
    ident["bottom_kind"] = _pick(rng, ["trousers", "shorts", "skirt"], np.array([6, 2, 1.5]))
    bottom_name, ident["bottom"] = _cloth(rng, _BOTTOM_NAMES, _BOTTOM_WEIGHTS)
    bottom_pattern = "solid" if rng.random() < 0.8 else _pick(rng, ["hstripes", "vstripes", "checks", "plaid"])
    ident["bottom_pattern"] = _pattern_params(rng, bottom_pattern)
    _, ident["bottom2"] = _cloth(rng, exclude=bottom_name)
    ident["shoes"] = _jitter_colour(
        rng, _CLOTH[_pick(rng, ["black", "white", "brown", "grey", "red", "blue"], np.array([4, 3, 2, 1.5, 0.5, 0.5]))]
    )
    ident["skin"] = _jitter_colour(rng, _SKIN[int(rng.integers(len(_SKIN)))], hue=3, sat=0.08, val=0.06)
    ident["hair"] = _jitter_colour(rng, _HAIR[int(rng.integers(len(_HAIR)))], hue=4, sat=0.1, val=0.15)
    ident["hair_style"] = _pick(rng, ["short", "long", "bald", "bun"], np.array([5, 3, 0.7, 1.0]))
    # body proportions, in units of the person's height
    ident["head"] = float(rng.uniform(0.058, 0.074))
    ident["torso"] = float(rng.uniform(0.26, 0.33))
    ident["shoulder"] = float(rng.uniform(0.095, 0.14))
    ident["hip"] = float(rng.uniform(0.72, 1.0))
    ident["build"] = float(rng.uniform(0.032, 0.05))
    ident["arm"] = float(rng.uniform(0.026, 0.038))
    # accessories
    ident["hat"] = (_pick(rng, ["cap", "beanie"]), _cloth(rng)[1]) if rng.random() < 0.22 else None
    ident["backpack"] = (
        (
            _cloth(rng, ["black", "grey", "navy", "red", "green", "blue", "brown", "orange"])[1],
            float(rng.uniform(0.85, 1.15)),
        )
        if rng.random() < 0.3
        else None
    )
    ident["shoulder_bag"] = (
        (_cloth(rng, ["black", "brown", "beige", "white", "red", "grey"])[1], int(rng.choice([-1, 1])))
        if rng.random() < 0.25
        else None
    )
    ident["handbag"] = (_cloth(rng)[1], int(rng.choice([-1, 1]))) if rng.random() < 0.15 else None
    ident["scarf"] = _cloth(rng)[1] if rng.random() < 0.12 else None
    ident["print"] = (
        (
            _pick(rng, ["circle", "square", "triangle", "band"]),
            _cloth(rng, exclude=top_name)[1],
            float(rng.uniform(0.035, 0.06)),
        )
        if rng.random() < 0.3
        else None
    )
    return ident


# ----------------------------------------------------------------------------------------------------------------
# Drawing primitives
# ----------------------------------------------------------------------------------------------------------------

_TRIG = {}


def _ellipse(c, ax, ay, a0=0.0, a1=360.0, n=24):
    key = (a0, a1, n)
    if key not in _TRIG:  # the same few arcs are drawn thousands of times
        t = np.deg2rad(np.linspace(a0, a1, n))
        _TRIG[key] = np.stack([np.cos(t), np.sin(t)], 1)
    return _TRIG[key] * (ax, ay) + (c[0], c[1])


def _circle(c, r):
    return _ellipse(c, r, r, n=16 if r < 12 else 24)


def _quad(p0, p1, w0, w1):
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
    return np.stack([p0 + n * w0, p1 + n * w1, p1 - n * w1, p0 - n * w0])


def _limb(p0, p1, w0, w1):
    return [_quad(p0, p1, w0, w1), _circle(p0, w0), _circle(p1, w1)]


def _rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _round_rect(x0, y0, x1, y1, r):
    r = max(min(r, (x1 - x0) / 2, (y1 - y0) / 2), 0.5)
    return np.concatenate(
        [
            _ellipse((x1 - r, y0 + r), r, r, 270, 360, 7),
            _ellipse((x1 - r, y1 - r), r, r, 0, 90, 7),
            _ellipse((x0 + r, y1 - r), r, r, 90, 180, 7),
            _ellipse((x0 + r, y0 + r), r, r, 180, 270, 7),
        ]
    )


def _pattern_mask(p, u, v):
    """Where the second colour shows, for pattern ``p`` at body coordinates (u, v) in person heights."""
    kind, period = p["kind"], p["period"]
    if kind == "hstripes":
        return ((v / period + p["phase"]) % 1.0) < p["duty"]
    if kind == "vstripes":
        return ((u / period + p["phase"]) % 1.0) < p["duty"]
    if kind == "checks":
        return (np.floor(u / period + p["phase"]) + np.floor(v / period)) % 2 == 0
    if kind == "plaid":
        return (((u / period + p["phase"]) % 1.0) < 0.3) | (((v / period) % 1.0) < 0.3)
    if kind == "dots":
        row = np.floor(v / period)
        fu = (u / period + 0.5 * (row % 2) + p["phase"]) % 1.0 - 0.5
        fv = (v / period) % 1.0 - 0.5
        return fu * fu + fv * fv < p["radius"] ** 2
    if kind == "block":
        return v > p["split"] * 0.3
    if kind == "diagonal":
        return (u * p["slope"] + v) > p["split"] * 0.3
    raise ValueError(kind)


def _flatten(polys):
    if isinstance(polys, np.ndarray):
        return [polys]
    return [p for item in polys for p in _flatten(item)]


class _Painter:
    """Anti-aliased polygon fills (solid or patterned) on a uint8 BGR canvas, optionally mirrored about x=mirror_x.

    Several polygons passed together form their union (each is filled by its own call; one fillPoly call with
    overlapping contours would leave even-odd holes).
    """

    def __init__(self, canvas, mirror_x=None):
        self.canvas = canvas
        self.mirror_x = mirror_x

    def fill(self, polys, colour, colour2=None, pattern=None, origin=(0.0, 0.0), unit=1.0):
        polys = _flatten(polys)
        if self.mirror_x is not None:
            polys = [np.stack([2 * self.mirror_x - p[:, 0], p[:, 1]], 1) for p in polys]
        if pattern is None or pattern["kind"] == "solid" or colour2 is None:
            col = tuple(min(max(float(c), 0.0), 255.0) for c in colour)
            for p in polys:
                cv2.fillPoly(self.canvas, [np.round(p * 16).astype(np.int32)], col, lineType=cv2.LINE_AA, shift=4)
            return
        h, w = self.canvas.shape[:2]
        allp = np.concatenate(polys)
        x0, y0 = max(int(np.floor(allp[:, 0].min())) - 1, 0), max(int(np.floor(allp[:, 1].min())) - 1, 0)
        x1, y1 = min(int(np.ceil(allp[:, 0].max())) + 2, w), min(int(np.ceil(allp[:, 1].max())) + 2, h)
        if x1 <= x0 or y1 <= y0:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for p in polys:
            cv2.fillPoly(mask, [np.round((p - (x0, y0)) * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        if self.mirror_x is not None:
            xx = 2 * self.mirror_x - xx  # keep the pattern attached to the body
        sel = _pattern_mask(pattern, (xx - origin[0]) / unit, (yy - origin[1]) / unit)
        col = np.where(sel[..., None], np.asarray(colour2, np.float32), np.asarray(colour, np.float32))
        a = mask.astype(np.float32)[..., None] * (1.0 / 255.0)
        roi = self.canvas[y0:y1, x0:x1]
        roi[:] = np.clip(roi + (col - roi) * a + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# People
# ----------------------------------------------------------------------------------------------------------------


def _draw_person(pt, ident, view, pose, cx, foot_y, P):
    """Draws a stylised pedestrian of height ``P`` standing at (cx, foot_y). Side views face +x."""
    side = view == "side"
    top_y = foot_y - P
    head_r = ident["head"] * P
    head_c = (cx + pose["lean"] * P, top_y + head_r * 1.05)
    neck_y = top_y + 2 * head_r + 0.008 * P
    sh_y = neck_y + 0.022 * P
    hip_y = sh_y + ident["torso"] * P
    sw = ident["shoulder"] * P * (0.55 if side else 1.0)
    ww = sw * ident["hip"] * (1.05 if side else 1.0)
    ucx = cx + pose["lean"] * P * 0.7  # upper-body centre (lean)
    leg_w = ident["build"] * P
    arm_w = ident["arm"] * P
    skin, hair, top, bottom = ident["skin"], ident["hair"], ident["top"], ident["bottom"]
    top_fill = dict(colour=top, colour2=ident["top2"], pattern=ident["top_pattern"], origin=(ucx, sh_y), unit=P)
    bot_fill = dict(
        colour=bottom, colour2=ident["bottom2"], pattern=ident["bottom_pattern"], origin=(cx, hip_y), unit=P
    )
    leg_len = foot_y - hip_y
    knee_t = 0.48
    far = 0.78  # the far limbs of a side view are in shadow

    # legs and feet
    stride = pose["stride"] * P
    if side:
        hips = [(cx, hip_y), (cx, hip_y)]
        feet = [(cx - stride, foot_y - 0.015 * P), (cx + stride, foot_y - 0.015 * P)]
    else:
        spread = 0.45 * ww
        hips = [(cx - spread, hip_y), (cx + spread, hip_y)]
        feet = [(cx - spread - 0.25 * stride, foot_y - 0.015 * P), (cx + spread + 0.25 * stride, foot_y - 0.015 * P)]
    for i, (hp, ft) in enumerate(zip(hips, feet)):
        dim = far if (side and i == 0) else 1.0
        hp, ft = np.array(hp), np.array(ft)
        knee = hp + (ft - hp) * knee_t
        if ident["bottom_kind"] == "trousers":
            pt.fill(_limb(hp, ft, leg_w, leg_w * 0.75), **_dim(bot_fill, dim))
        else:
            pt.fill(_limb(hp, ft, leg_w * 0.8, leg_w * 0.6), skin * dim)
            if ident["bottom_kind"] == "shorts":
                pt.fill(_limb(hp, knee, leg_w * 1.05, leg_w * 0.95), **_dim(bot_fill, dim))
        shoe_dx = 0.02 * P if side else 0.0
        pt.fill(
            _ellipse((ft[0] + shoe_dx, ft[1] + 0.006 * P), 0.034 * P if side else 0.027 * P, 0.016 * P),
            ident["shoes"] * dim,
        )
    # hip block / skirt
    if ident["bottom_kind"] == "skirt":
        pt.fill(
            np.array(
                [
                    [cx - ww, hip_y - 0.02 * P],
                    [cx + ww, hip_y - 0.02 * P],
                    [cx + ww * 1.45, hip_y + 0.5 * leg_len],
                    [cx - ww * 1.45, hip_y + 0.5 * leg_len],
                ]
            ),
            **bot_fill,
        )
    else:
        pt.fill(_rect(cx - ww, hip_y - 0.02 * P, cx + ww, hip_y + 0.07 * P), **bot_fill)

    # arms: in a side view the far arm goes behind the torso
    swing = pose["swing"] * P
    hand_y = sh_y + 0.36 * P
    if side:
        shoulders = [(ucx, sh_y + 0.02 * P), (ucx, sh_y + 0.02 * P)]
        hands = [(ucx + swing, hand_y), (ucx - swing, hand_y)]
    else:
        shoulders = [(ucx - sw * 0.92, sh_y + 0.02 * P), (ucx + sw * 0.92, sh_y + 0.02 * P)]
        hands = [(ucx - sw - 0.025 * P - 0.3 * abs(swing), hand_y), (ucx + sw + 0.025 * P + 0.3 * abs(swing), hand_y)]

    def arm(i, dim):
        s, hnd = np.array(shoulders[i]), np.array(hands[i])
        if ident["sleeves"] == "long":
            pt.fill(_limb(s, hnd, arm_w, arm_w * 0.8), **_dim(top_fill, dim))
        else:
            pt.fill(_limb(s, hnd, arm_w * 0.85, arm_w * 0.7), skin * dim)
            if ident["sleeves"] == "short":
                pt.fill(_limb(s, s + (hnd - s) * 0.42, arm_w * 1.05, arm_w), **_dim(top_fill, dim))
        pt.fill(_circle(hnd + (0, 0.012 * P), arm_w * 0.85), skin * dim)
        if ident["handbag"] is not None and (ident["handbag"][1] > 0) == (i == 1):
            bag_c = ident["handbag"][0] * dim
            pt.fill(
                _round_rect(hnd[0] - 0.04 * P, hnd[1] + 0.01 * P, hnd[0] + 0.04 * P, hnd[1] + 0.085 * P, 0.01 * P),
                bag_c,
            )

    backpack = ident["backpack"]
    if side:
        if backpack is not None:  # carried on the back, i.e. behind (-x) in a side view facing +x
            bw = 0.09 * P * backpack[1]
            pt.fill(
                _round_rect(
                    ucx - sw - bw, sh_y + 0.01 * P, ucx - sw + 0.02 * P, sh_y + 0.24 * P * backpack[1], 0.02 * P
                ),
                backpack[0],
            )
        arm(0, far)
    # neck, torso
    pt.fill(_rect(head_c[0] - 0.35 * head_r, neck_y - 0.5 * head_r, head_c[0] + 0.35 * head_r, sh_y + 0.02 * P), skin)
    torso = np.array([[ucx - sw, sh_y], [ucx + sw, sh_y], [cx + ww, hip_y + 0.02 * P], [cx - ww, hip_y + 0.02 * P]])
    pt.fill(
        [
            torso,
            _circle((ucx - sw + 0.02 * P, sh_y + 0.02 * P), 0.022 * P),
            _circle((ucx + sw - 0.02 * P, sh_y + 0.02 * P), 0.022 * P),
        ],
        **top_fill,
    )
    if view == "front" and ident["print"] is not None:
        shape, colour, size = ident["print"]
        pc = (ucx + 0.02 * P, sh_y + 0.1 * P)
        s = size * P
        if shape == "circle":
            pt.fill(_circle(pc, s * 0.6), colour)
        elif shape == "square":
            pt.fill(_rect(pc[0] - s * 0.55, pc[1] - s * 0.55, pc[0] + s * 0.55, pc[1] + s * 0.55), colour)
        elif shape == "triangle":
            pt.fill(
                np.array(
                    [[pc[0], pc[1] - s * 0.7], [pc[0] + s * 0.7, pc[1] + s * 0.5], [pc[0] - s * 0.7, pc[1] + s * 0.5]]
                ),
                colour,
            )
        else:
            pt.fill(_rect(ucx - sw * 0.95, pc[1] - s * 0.3, ucx + sw * 0.95, pc[1] + s * 0.3), colour)
    if view == "back" and backpack is not None:
        bw = 0.75 * sw * backpack[1]
        y1 = sh_y + 0.2 * P * backpack[1]
        pt.fill(_round_rect(ucx - bw, sh_y + 0.015 * P, ucx + bw, y1, 0.03 * P), backpack[0])
        pt.fill(
            _round_rect(ucx - bw * 0.7, y1 - 0.07 * P, ucx + bw * 0.7, y1 - 0.01 * P, 0.015 * P), backpack[0] * 0.75
        )
    if view == "front" and backpack is not None:
        for sgn in (-1, 1):
            pt.fill(
                _limb(
                    (ucx + sgn * sw * 0.55, sh_y + 0.005 * P),
                    (ucx + sgn * sw * 0.5, sh_y + 0.17 * P),
                    0.011 * P,
                    0.011 * P,
                ),
                backpack[0] * 0.9,
            )
    bag = ident["shoulder_bag"]
    if bag is not None:
        sgn = bag[1] * (-1 if view == "back" else 1)
        if side:
            pt.fill(_limb((ucx, sh_y + 0.01 * P), (ucx + 0.01 * P, hip_y), 0.007 * P, 0.007 * P), bag[0] * 0.6)
            pt.fill(_round_rect(ucx - 0.045 * P, hip_y - 0.02 * P, ucx + 0.045 * P, hip_y + 0.06 * P, 0.01 * P), bag[0])
        else:
            pt.fill(
                _limb(
                    (ucx + sgn * sw * 0.8, sh_y + 0.005 * P),
                    (cx - sgn * ww * 1.05, hip_y - 0.01 * P),
                    0.008 * P,
                    0.008 * P,
                ),
                bag[0] * 0.6,
            )
            bx = cx - sgn * (ww + 0.035 * P)
            pt.fill(_round_rect(bx - 0.045 * P, hip_y - 0.03 * P, bx + 0.045 * P, hip_y + 0.05 * P, 0.01 * P), bag[0])
    if ident["scarf"] is not None:
        pt.fill(
            _round_rect(
                head_c[0] - 0.75 * head_r, sh_y - 0.022 * P, head_c[0] + 0.75 * head_r, sh_y + 0.02 * P, 0.01 * P
            ),
            ident["scarf"],
        )
        if view == "front":
            pt.fill(
                _rect(head_c[0] + 0.1 * head_r, sh_y, head_c[0] + 0.55 * head_r, sh_y + 0.12 * P), ident["scarf"] * 0.92
            )
    if side:
        arm(1, 1.0)
    else:
        arm(0, 1.0)
        arm(1, 1.0)

    # head and hair
    style = ident["hair_style"]
    if style == "long" and view != "side":
        pt.fill(
            _round_rect(
                head_c[0] - 1.1 * head_r,
                head_c[1] - 0.3 * head_r,
                head_c[0] + 1.1 * head_r,
                sh_y + (0.1 if view == "back" else 0.05) * P,
                0.4 * head_r,
            ),
            hair,
        )
    if style == "long" and side:
        pt.fill(
            _round_rect(
                head_c[0] - 1.05 * head_r,
                head_c[1] - 0.3 * head_r,
                head_c[0] + 0.2 * head_r,
                sh_y + 0.07 * P,
                0.4 * head_r,
            ),
            hair,
        )
    pt.fill(_ellipse(head_c, head_r * (1.0 if not side else 1.05), head_r * 1.08), skin)
    if view == "back" and style != "bald":
        pt.fill(_ellipse(head_c, head_r * 1.04, head_r * 1.1), hair)
    elif style != "bald":
        if side:
            pt.fill(
                _ellipse((head_c[0] - 0.1 * head_r, head_c[1] - 0.1 * head_r), head_r * 1.02, head_r * 1.02, 140, 330),
                hair,
            )
        else:
            pt.fill(_ellipse((head_c[0], head_c[1] - 0.15 * head_r), head_r * 1.06, head_r * 0.95, 180, 360), hair)
    if style == "bun":
        pt.fill(_circle((head_c[0] - (0.6 * head_r if side else 0), head_c[1] - head_r * 1.05), 0.42 * head_r), hair)
    if ident["hat"] is not None:
        kind, colour = ident["hat"]
        pt.fill(
            _ellipse(
                (head_c[0], head_c[1] - 0.25 * head_r),
                head_r * 1.1,
                head_r * (1.0 if kind == "beanie" else 0.85),
                180,
                360,
            ),
            colour,
        )
        if kind == "cap":
            if side:
                pt.fill(
                    _ellipse((head_c[0] + 0.9 * head_r, head_c[1] - 0.3 * head_r), 0.75 * head_r, 0.16 * head_r),
                    colour * 0.85,
                )
            elif view == "front":
                pt.fill(_ellipse((head_c[0], head_c[1] - 0.25 * head_r), 1.15 * head_r, 0.22 * head_r), colour * 0.85)


def _dim(fill, factor):
    if factor == 1.0:
        return fill
    out = dict(fill)
    out["colour"] = fill["colour"] * factor
    out["colour2"] = None if fill["colour2"] is None else fill["colour2"] * factor
    return out


def _random_clothes(rng):
    return _cloth(rng)[1], _cloth(rng, _BOTTOM_NAMES, _BOTTOM_WEIGHTS)[1], _SKIN[int(rng.integers(len(_SKIN)))]


def _draw_blob_person(pt, rng, cx, foot_y, P):
    """A plain passer-by: a confuser behind or in front of the target."""
    top, bottom, skin = _random_clothes(rng)
    hr = 0.065 * P
    sw, hip_y, sh_y = 0.12 * P, foot_y - 0.48 * P, foot_y - P + 0.16 * P
    pt.fill(
        [
            _limb((cx - 0.05 * P, hip_y), (cx - 0.06 * P, foot_y), 0.04 * P, 0.03 * P),
            _limb((cx + 0.05 * P, hip_y), (cx + 0.06 * P, foot_y), 0.04 * P, 0.03 * P),
        ],
        bottom,
    )
    pt.fill(
        [
            np.array(
                [[cx - sw, sh_y], [cx + sw, sh_y], [cx + 0.9 * sw, hip_y + 0.03 * P], [cx - 0.9 * sw, hip_y + 0.03 * P]]
            ),
            _limb((cx - sw, sh_y + 0.02 * P), (cx - sw - 0.03 * P, sh_y + 0.34 * P), 0.03 * P, 0.025 * P),
            _limb((cx + sw, sh_y + 0.02 * P), (cx + sw + 0.03 * P, sh_y + 0.34 * P), 0.03 * P, 0.025 * P),
        ],
        top,
    )
    pt.fill(_circle((cx, foot_y - P + hr * 1.05), hr), skin)


# ----------------------------------------------------------------------------------------------------------------
# Cameras and scenes
# ----------------------------------------------------------------------------------------------------------------


def _noise_field(rng, h, w, cell, amp):
    small = rng.normal(0.0, 1.0, (h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)[..., None] * amp


def _scene_colour(rng, rgb, spread=18.0):
    return np.clip(_bgr(*rgb) + rng.uniform(-spread, spread, 3), 0, 255).astype(np.float32)


def _make_scene(rng, kind, h, w, horizon):
    """A camera's fixed background panorama; each image crops a window of it."""
    img = np.empty((h, w, 3), np.uint8)
    pt = _Painter(img)
    hz = int(horizon)
    if kind == "indoor":
        wall = _scene_colour(
            rng, [(225, 215, 195), (200, 205, 210), (230, 225, 215), (190, 200, 180)][int(rng.integers(4))]
        )
        floor = _scene_colour(rng, [(150, 130, 110), (170, 170, 165), (120, 100, 80)][int(rng.integers(3))])
        img[:hz], img[hz:] = wall, floor
        x = rng.uniform(0, 40)
        while x < w:
            kind_obj = rng.integers(3)
            ow = rng.uniform(0.15, 0.4) * h
            if kind_obj == 0:  # door
                pt.fill(_rect(x, hz - 0.55 * h, x + 0.5 * ow, hz), wall * rng.uniform(0.4, 0.7))
            elif kind_obj == 1:  # poster
                pt.fill(_rect(x, hz - 0.5 * h, x + 0.6 * ow, hz - 0.2 * h), _random_clothes(rng)[0])
            x += ow + rng.uniform(0.1, 0.5) * h
        for i in range(1, 12):  # floor tiles receding to the horizon
            y = hz + (h - hz) * (i / 11.0) ** 1.6
            pt.fill(_rect(0, y - 0.6, w, y + 0.6), floor * 0.8)
        for x in np.arange(rng.uniform(0, 30), w, 30.0):
            pt.fill(
                np.array(
                    [[x - 0.6, hz], [x + 0.6, hz], [x + (x - w / 2) * 0.2 + 0.9, h], [x + (x - w / 2) * 0.2 - 0.9, h]]
                ),
                floor * 0.8,
            )
    elif kind == "street":
        facade = _scene_colour(
            rng, [(170, 90, 70), (160, 160, 160), (200, 180, 150), (120, 110, 100)][int(rng.integers(4))]
        )
        ground = _scene_colour(rng, (110, 110, 112), 10)
        img[:hz], img[hz:] = facade, ground
        win = _scene_colour(rng, [(60, 80, 110), (40, 45, 55), (120, 150, 170)][int(rng.integers(3))], 10)
        step = rng.uniform(0.18, 0.28) * h
        for x in np.arange(rng.uniform(0, step), w, step):
            for y in np.arange(0.04 * h, hz - 0.15 * h, step * 1.2):
                pt.fill(_rect(x, y, x + 0.55 * step, y + 0.7 * step), win)
        if rng.random() < 0.7:  # shop front band
            pt.fill(_rect(0, hz - 0.14 * h, w, hz - 0.04 * h), _random_clothes(rng)[0] * 0.9)
        pt.fill(_rect(0, hz, w, hz + 0.03 * h), ground * 1.3)  # kerb
    elif kind == "park":
        sky = _scene_colour(rng, (170, 200, 230), 15)
        grass = _scene_colour(rng, [(80, 130, 60), (100, 140, 70), (120, 130, 70)][int(rng.integers(3))])
        sky_y = int(hz * rng.uniform(0.3, 0.6))
        img[:sky_y], img[sky_y:hz], img[hz:] = sky, grass * 0.7, grass
        for x in np.arange(rng.uniform(0, 40), w, rng.uniform(40, 90)):
            r = rng.uniform(0.12, 0.22) * h
            pt.fill(_rect(x - 0.02 * h, sky_y, x + 0.02 * h, hz), _bgr(90, 60, 40))
            pt.fill(
                [
                    _circle(
                        (x + rng.uniform(-r, r) * 0.5, sky_y - rng.uniform(0, r) * 0.3 + dy), r * rng.uniform(0.6, 1.0)
                    )
                    for dy in (0, 0.3 * r, -0.3 * r)
                ],
                grass * rng.uniform(0.45, 0.7),
            )
        pt.fill(_rect(0, hz + 0.25 * (h - hz), w, hz + 0.55 * (h - hz)), _scene_colour(rng, (200, 185, 150), 15))
    elif kind == "station":
        wall = _scene_colour(rng, [(80, 80, 90), (110, 100, 90), (60, 70, 80)][int(rng.integers(3))])
        floor = _scene_colour(rng, (150, 150, 145), 15)
        img[:hz], img[hz:] = wall, floor
        for x in np.arange(rng.uniform(0, 60), w, rng.uniform(60, 110)):
            pt.fill(_rect(x, 0, x + 0.12 * h, hz), wall * 1.6)
            pt.fill(_rect(x - 0.1 * h, 0.05 * h, x + 0.25 * h, 0.09 * h), _bgr(250, 250, 230))
        pt.fill(_rect(0, hz + 0.15 * (h - hz), w, hz + 0.22 * (h - hz)), _bgr(230, 200, 40))
    else:
        raise ValueError(kind)
    texture = _noise_field(rng, h, w, 16, 7.0) + _noise_field(rng, h, w, 3, 3.0)
    return np.clip(img + texture + 0.5, 0, 255).astype(np.uint8)


def _make_panorama(rng, main_scene, scenes, h, wc, horizon):
    """A camera's fixed background: a strip of scene segments (mostly its main scene type); every image crops a
    window of it, so the backgrounds of one camera vary but stay recognisably its own."""
    width = 16 * wc
    strip = np.empty((h, width, 3), np.uint8)
    x = 0
    while x < width:
        seg = int(rng.uniform(1.2, 3.0) * wc)
        kind = main_scene if rng.random() < 0.6 else scenes[int(rng.integers(len(scenes)))]
        part = _make_scene(rng, kind, h, seg, horizon + rng.uniform(-0.04, 0.04) * h)
        strip[:, x : x + seg] = part[:, : width - x]
        x += seg
    return strip


@dataclasses.dataclass
class _Camera:
    index: int
    scene: str
    panorama: np.ndarray
    shade: np.ndarray
    gain: float
    contrast: float
    gamma: float
    cast: np.ndarray
    cast_hue: float
    saturation: float
    blur: float
    lowres: float
    noise: float
    jpeg: int
    scale: float
    perspective: float
    warp: Optional[tuple]
    offset: float
    flip: float
    views: np.ndarray
    occlusion: float
    clutter: tuple
    light_jitter: float

    def describe(self):
        """JSON-friendly summary for the manifest."""
        return dict(
            camid=self.index + 1,
            scene=self.scene,
            gain=round(self.gain, 3),
            contrast=round(self.contrast, 3),
            gamma=round(self.gamma, 3),
            cast_bgr=[round(float(c), 3) for c in self.cast],
            saturation=round(self.saturation, 3),
            blur=round(self.blur, 3),
            lowres=round(self.lowres, 3),
            noise=round(self.noise, 3),
            jpeg_quality=self.jpeg,
            person_scale=round(self.scale, 3),
            perspective=round(self.perspective, 3),
            offset=round(self.offset, 3),
            view_probs=dict(zip(("front", "back", "side"), [round(float(v), 3) for v in self.views])),
            occlusion=round(self.occlusion, 3),
        )


def _make_cameras(params):
    style = STYLES[params.style]
    n = params.num_cameras
    hc, wc = params.height * _SUPERSAMPLE, params.width * _SUPERSAMPLE
    style_key = zlib.crc32(params.style.encode())
    layout = np.random.default_rng(np.random.SeedSequence([params.seed, _CAMERA, style_key, n]))
    # stratify brightness and colour cast so that the cameras of one dataset are clearly different
    gain_q = (layout.permutation(n) + layout.uniform(0.2, 0.8, n)) / n
    hue_q = (layout.permutation(n) + layout.uniform(0.2, 0.8, n)) / n
    hue_base = layout.uniform(0, 360)
    scenes = list(style["scenes"])
    cams = []
    for c in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, _CAMERA, style_key, n, c]))

        def u(key):
            lo, hi = style[key]
            return float(rng.uniform(lo, hi)) if hi > lo else float(lo)

        lo, hi = style["gain"]
        gain = float(lo + gain_q[c] * (hi - lo))
        if style["cast_hue"] is None:
            hue = (hue_base + 360.0 * hue_q[c]) % 360.0
        else:
            hue = style["cast_hue"][0] + hue_q[c] * (style["cast_hue"][1] - style["cast_hue"][0])
        rgb = np.array(colorsys.hsv_to_rgb(hue / 360.0, 1.0, 1.0))
        strength = u("cast")
        cast = (1.0 + 2.0 * strength * (rgb - rgb.mean()))[::-1].astype(np.float32)  # BGR gains, mean ~1
        scene = scenes[(c + int(layout.integers(len(scenes)))) % len(scenes)]
        horizon = hc * rng.uniform(0.45, 0.7)
        panorama = _make_panorama(rng, scene, scenes, hc, wc, horizon)
        shade_strength, shade_angle = u("shade"), rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0 : params.height, 0 : params.width].astype(np.float32)
        ramp = (xx / params.width - 0.5) * np.cos(shade_angle) + (yy / params.height - 0.5) * np.sin(shade_angle)
        shade = ((1.0 + shade_strength * ramp) / 255.0)[..., None].astype(np.float32)
        views = rng.dirichlet([style["view_concentration"]] * 3)
        perspective = u("perspective")
        cams.append(
            _Camera(
                index=c,
                scene=scene,
                panorama=panorama,
                shade=shade,
                gain=gain,
                contrast=u("contrast"),
                gamma=u("gamma"),
                cast=cast,
                cast_hue=hue,
                saturation=u("saturation"),
                blur=u("blur"),
                lowres=u("lowres"),
                noise=u("noise"),
                jpeg=int(round(u("jpeg"))),
                scale=u("scale"),
                perspective=perspective,
                warp=_perspective_maps(perspective, hc, wc),
                offset=u("offset"),
                flip=float(rng.uniform(0.15, 0.85)),
                views=views,
                occlusion=u("occlusion"),
                clutter=tuple(style["clutter"]),
                light_jitter=float(style["light_jitter"]),
            )
        )
    return cams


_OCCLUDERS = {
    "indoor": ("person", "pillar", "counter"),
    "street": ("car", "pole", "person", "railing"),
    "park": ("bush", "person", "railing", "pole"),
    "station": ("pillar", "person", "railing"),
}


def _draw_clutter(pt, rng, cam, hc, wc):
    for _ in range(int(rng.integers(cam.clutter[0], cam.clutter[1] + 1))):
        kind = rng.integers(4)
        x = rng.uniform(0, wc)
        if kind == 0:  # distant passer-by
            P = hc * rng.uniform(0.3, 0.55)
            _draw_blob_person(pt, rng, x, hc * rng.uniform(0.55, 0.8), P)
        elif kind == 1:  # sign
            y = hc * rng.uniform(0.05, 0.4)
            s = wc * rng.uniform(0.15, 0.35)
            pt.fill(_rect(x, y, x + s, y + 0.6 * s), _random_clothes(rng)[0])
        elif kind == 2:  # bin / box on the floor
            s = wc * rng.uniform(0.15, 0.3)
            y = hc * rng.uniform(0.75, 0.95)
            pt.fill(_round_rect(x, y - 1.4 * s, x + s, y, 0.1 * s), _random_clothes(rng)[1] * 0.8)
        else:  # lamp post in the distance
            pt.fill(_rect(x, hc * 0.05, x + wc * 0.03, hc * rng.uniform(0.6, 0.8)), _bgr(70, 70, 75))


def _draw_occluder(pt, rng, cam, hc, wc, foot_y, P):
    kind = _OCCLUDERS[cam.scene][int(rng.integers(len(_OCCLUDERS[cam.scene])))]
    if kind in ("pole", "pillar"):
        w = wc * (rng.uniform(0.07, 0.13) if kind == "pole" else rng.uniform(0.18, 0.3))
        x = rng.uniform(0.1, 0.9) * wc
        col = _bgr(90, 95, 100) if kind == "pole" else cam.panorama[0, 0].astype(np.float32) * 1.3
        pt.fill(_rect(x - w / 2, 0, x + w / 2, hc), np.clip(col, 0, 255))
        pt.fill(_rect(x - w / 2, 0, x - w / 4, hc), np.clip(col * 1.25, 0, 255))
    elif kind in ("car", "counter", "bush"):
        top = foot_y - P * rng.uniform(0.18, 0.4)
        if kind == "bush":
            col = _bgr(60, 110, 50) * rng.uniform(0.7, 1.1)
            pt.fill(
                [
                    _circle((x, top + 0.12 * P + rng.uniform(0, 0.08) * P), 0.12 * P * rng.uniform(0.8, 1.3))
                    for x in np.linspace(-0.1 * wc, 1.1 * wc, 6)
                ]
                + [_rect(0, top + 0.1 * P, wc, hc)],
                col,
            )
        else:
            col = _random_clothes(rng)[0] if kind == "car" else _scene_colour(rng, (140, 110, 80), 30)
            pt.fill(_round_rect(-0.2 * wc, top, 1.2 * wc, hc + 10, 0.06 * P if kind == "car" else 1), col)
            if kind == "car":
                pt.fill(_rect(-0.2 * wc, top + 0.03 * P, 1.2 * wc, top + 0.06 * P), col * 1.3)
    elif kind == "railing":
        y = foot_y - P * rng.uniform(0.25, 0.45)
        col = _bgr(60, 60, 65) * rng.uniform(0.7, 1.5)
        pt.fill(
            [_rect(0, y, wc, y + 0.025 * P), _rect(0, y + 0.12 * P, wc, y + 0.14 * P)]
            + [_rect(x, y, x + 0.02 * P, hc) for x in np.arange(rng.uniform(0, 0.2) * wc, wc, 0.35 * wc)],
            col,
        )
    else:  # a passer-by in front, at one edge
        side = rng.choice([-1.0, 1.0])
        x = wc * (0.5 + side * rng.uniform(0.5, 0.7))
        _draw_blob_person(pt, rng, x, foot_y + rng.uniform(0.0, 0.08) * P, P * rng.uniform(1.0, 1.15))


def _perspective_maps(k, h, w):
    """Remap tables that stretch a trapezoid onto the frame: k > 0 magnifies the top (camera looking down),
    k < 0 the bottom. Fixed per camera, so computed once."""
    if abs(k) < 1e-4:
        return None
    d = abs(k) * w
    src = (
        np.float32([[d, 0], [w - d, 0], [w, h], [0, h]]) if k > 0 else np.float32([[0, 0], [w, 0], [w - d, h], [d, h]])
    )
    dst = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    inv = cv2.getPerspectiveTransform(dst, src)  # output pixel -> source pixel
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([xx, yy, np.ones_like(xx)], -1) @ inv.T
    map_x = (pts[..., 0] / pts[..., 2]).astype(np.float32)
    map_y = (pts[..., 1] / pts[..., 2]).astype(np.float32)
    return cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)


_LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)


def _photometric(img, cam, rng, height, width):
    # colour operations after the area downsample: they are (nearly) linear, and it is 4x fewer pixels
    x = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) * cam.shade
    gray = (x @ _LUMA_BGR)[..., None]
    x = gray + cam.saturation * (x - gray)
    m = float(x.mean())
    x = m + cam.contrast * (x - m)
    gain = cam.gain * (1.0 + cam.light_jitter * float(rng.uniform(-1, 1)))
    x = cv2.pow(np.clip(x * (gain * cam.cast), 0.0, 1.0), cam.gamma)
    if cam.blur > 0.05:
        x = cv2.GaussianBlur(x, (0, 0), cam.blur)
    if cam.lowres > 1.05:
        small = (max(int(round(width / cam.lowres)), 4), max(int(round(height / cam.lowres)), 8))
        x = cv2.resize(
            cv2.resize(x, small, interpolation=cv2.INTER_AREA), (width, height), interpolation=cv2.INTER_LINEAR
        )
    if cam.noise > 0:
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(cam.noise / 255.0)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


_VIEWS = ("front", "back", "side")


def _render(ident, cam, track, rng, params):
    """One bounding-box crop of ``ident`` seen by ``cam``; ``track`` holds what stays fixed within a tracklet."""
    hc, wc = params.height * _SUPERSAMPLE, params.width * _SUPERSAMPLE
    x0 = int(rng.integers(0, cam.panorama.shape[1] - wc + 1))
    canvas = cam.panorama[:, x0 : x0 + wc].copy()
    pt = _Painter(canvas)
    _draw_clutter(pt, rng, cam, hc, wc)
    P = cam.scale * hc * rng.uniform(0.95, 1.04)
    foot_y = hc - (hc - P) * rng.uniform(0.3, 0.65)
    cx = wc * (0.5 + cam.offset + track["dx"] + rng.normal(0, 0.025))
    view = track["view"] if rng.random() < 0.85 else _VIEWS[int(rng.integers(3))]
    pose = dict(
        stride=rng.uniform(0.0, 0.14 if view == "side" else 0.08),
        swing=rng.uniform(-0.08, 0.08),
        lean=rng.normal(0, 0.008),
    )
    _draw_person(_Painter(canvas, mirror_x=cx if track["mirror"] else None), ident, view, pose, cx, foot_y, P)
    if rng.random() < cam.occlusion:
        _draw_occluder(pt, rng, cam, hc, wc, foot_y, P)
    if cam.warp is not None:
        canvas = cv2.remap(canvas, cam.warp[0], cam.warp[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return _photometric(canvas, cam, rng, params.height, params.width)


# ----------------------------------------------------------------------------------------------------------------
# Layout (who appears where) and generation
# ----------------------------------------------------------------------------------------------------------------


def _plan(params):
    """Lists (split, pid, cam_index, shot) for every image, in a fixed order."""
    lo, hi = params.cameras_per_id
    first = params.id_offset + 1
    train = range(first, first + params.num_train_ids)
    test = range(train.stop, train.stop + params.num_test_ids)
    distract = range(test.stop, test.stop + params.num_distractor_ids)
    k = params.images_per_id_per_camera
    items = []
    for pid in list(train) + list(test) + list(distract):
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, _SPLIT, pid]))
        n_cams = int(rng.integers(lo, hi + 1))
        cams = sorted(int(c) for c in rng.choice(params.num_cameras, n_cams, replace=False))
        if pid in train:
            items += [("train", pid, c, s) for c in cams for s in range(k)]
            continue
        if pid in distract:
            items += [("gallery", pid, c, s) for c in cams for s in range(k)]
            continue
        # with a single image per camera, keep one camera whole so every query has a cross-camera match
        n_query = min(params.queries_per_id, n_cams if k > 1 else n_cams - 1)
        query_cams = set(int(c) for c in rng.choice(cams, n_query, replace=False))
        query_shot = {c: int(rng.integers(k)) for c in query_cams}
        for c in cams:
            for s in range(k):
                items.append(("query" if query_shot.get(c) == s else "gallery", pid, c, s))
    return items


def _generate(out_dir, params, verbose):
    start = time.time()
    cams = _make_cameras(params)
    for d in SPLIT_DIRS.values():
        os.makedirs(osp.join(out_dir, d))
    frame = [0] * params.num_cameras
    counts = {s: 0 for s in SPLIT_DIRS}
    pids = {s: set() for s in SPLIT_DIRS}
    identities, tracks = {}, {}
    plan = _plan(params)
    for split, pid, c, shot in plan:
        if pid not in identities:
            identities = {pid: _make_identity(params.seed, pid)}  # ids come in order: keep only the current one
        cam = cams[c]
        if (pid, c) not in tracks:
            trng = np.random.default_rng(np.random.SeedSequence([params.seed, _TRACK, pid, c]))
            tracks = {
                (pid, c): dict(
                    view=_VIEWS[int(trng.choice(3, p=cam.views))],
                    mirror=bool(trng.random() < cam.flip),
                    dx=float(trng.normal(0, 0.03)),
                )
            }
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, _IMAGE, pid, c, shot]))
        img = _render(identities[pid], cam, tracks[(pid, c)], rng, params)
        frame[c] += int(rng.integers(5, 60))  # frames advance like a video, names stay unique per camera
        name = f"{pid:04d}_c{c + 1}s1_{frame[c]:06d}_01.{params.image_format}"
        if params.image_format == "jpg":
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, cam.jpeg])
        else:
            ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode {name}")
        with open(osp.join(out_dir, SPLIT_DIRS[split], name), "wb") as f:
            f.write(buf.tobytes())
        counts[split] += 1
        pids[split].add(pid)
    manifest = dict(
        generator=GENERATOR,
        format_version=FORMAT_VERSION,
        params=params.to_dict(),
        style_preset=_style_record(params.style),
        counts=counts,
        num_ids={s: len(v) for s, v in pids.items()},
        cameras=[c.describe() for c in cams],
        seconds=round(time.time() - start, 2),
    )
    # the manifest is written last: its presence marks a complete folder
    with open(osp.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    if verbose:
        print(
            "=> Generated synthetic ReID data in {:.1f}s: {} train / {} query / {} gallery images".format(
                manifest["seconds"], counts["train"], counts["query"], counts["gallery"]
            )
        )
    return manifest


def _style_record(style):
    """The preset's ranges in JSON form, so that a changed preset is noticed like a changed parameter."""
    return json.loads(json.dumps(STYLES[style]))


def _read_manifest(dataset_dir):
    path = osp.join(dataset_dir, MANIFEST)
    if not osp.isfile(path):
        return None, f"no {MANIFEST} (not generated by {GENERATOR})"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"unreadable {path} ({e})"
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        return None, f"{path} was not written by {GENERATOR}"
    return manifest, ""


def _staleness(manifest, dataset_dir, params):
    """Why an existing generated folder cannot be reused as ``params`` ('' when it can)."""
    if manifest.get("format_version") != FORMAT_VERSION:
        return "format version {} on disk, {} expected".format(manifest.get("format_version"), FORMAT_VERSION)
    on_disk, wanted = manifest.get("params", {}), params.to_dict()
    diff = [
        f"{k}: {on_disk.get(k)!r} on disk vs {wanted[k]!r} requested" for k in wanted if on_disk.get(k) != wanted[k]
    ]
    if diff:
        return "generated with other parameters (" + "; ".join(diff) + ")"
    if manifest.get("style_preset") != _style_record(params.style):
        return f"the {params.style!r} camera style preset has changed since generation"
    for split, d in SPLIT_DIRS.items():
        path = osp.join(dataset_dir, d)
        n = len(_list_images(path)) if osp.isdir(path) else 0
        if n != manifest.get("counts", {}).get(split):
            return "{} holds {} images but the manifest records {}".format(path, n, manifest["counts"].get(split))
    return ""


def prepare_synthetic_dataset(dataset_dir, params=None, on_mismatch="regenerate", verbose=True):
    """Makes sure ``dataset_dir`` holds the synthetic dataset for ``params`` and returns its manifest.

    An up-to-date folder is reused. A folder generated by this module with other parameters, an older format
    version, or missing files is regenerated, or reported with ``on_mismatch='error'``. A folder that was not
    generated by this module is never modified.
    """
    params = params if params is not None else SyntheticParams()
    if on_mismatch not in ("regenerate", "error"):
        raise ValueError(f"on_mismatch must be 'regenerate' or 'error', got {on_mismatch!r}")
    dataset_dir = osp.abspath(osp.expanduser(dataset_dir))
    if osp.exists(dataset_dir):
        manifest, problem = _read_manifest(dataset_dir)
        if manifest is None:
            raise RuntimeError(
                f"{dataset_dir} exists but is not a generated synthetic dataset: {problem}. It is left untouched; remove it or choose "
                "another data root (or dataset_dir) for the synthetic data."
            )
        reason = _staleness(manifest, dataset_dir, params)
        if not reason:
            return manifest
        if on_mismatch == "error":
            raise RuntimeError(
                f"The synthetic dataset in {dataset_dir} does not match the requested one: {reason}. Delete the folder, use another "
                "data root, or register the dataset with on_mismatch='regenerate'."
            )
        if verbose:
            print(f"=> Regenerating {dataset_dir}: {reason}")
    parent = osp.dirname(dataset_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(dataset_dir)
    tmp = tempfile.mkdtemp(prefix="." + osp.basename(dataset_dir) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp's 0700 would shut other users of a shared root out
        manifest = _generate(tmp, params, verbose)
        _move_into_place(tmp, dataset_dir, params)
    finally:
        if osp.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


_LEFTOVER_AGE_S = 3600.0


def _remove_leftovers(dataset_dir):
    """Deletes temporary folders that a killed generation of ``dataset_dir`` left behind. Only old ones: a young
    one may belong to a generation still running in another process."""
    parent, base = osp.split(dataset_dir)
    now = time.time()
    for name in os.listdir(parent):
        if name.startswith("." + base + ".tmp-") or name.startswith("." + base + ".old-"):
            path = osp.join(parent, name)
            try:
                if now - os.path.getmtime(path) > _LEFTOVER_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _move_into_place(tmp, dataset_dir, params):
    old = None
    if osp.exists(dataset_dir):
        old = tempfile.mkdtemp(prefix="." + osp.basename(dataset_dir) + ".old-", dir=osp.dirname(dataset_dir))
        os.rmdir(old)
        os.rename(dataset_dir, old)
    try:
        os.rename(tmp, dataset_dir)
    except OSError:
        # another process finished the same folder first; keep theirs if it is what we need
        manifest, _ = _read_manifest(dataset_dir)
        if manifest is None or _staleness(manifest, dataset_dir, params):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _list_images(dir_path):
    return sorted(n for n in os.listdir(dir_path) if n.rsplit(".", 1)[-1] in _IMAGE_EXTS and not n.startswith("."))


def _pid_camid(name):
    """``(pid, camid)`` of a Market-1501-style name, camid counted from 0 as torchreid's datasets do."""
    pid, cam = check.parse_image_name(name, "market-style")
    return pid, cam - 1


def read_split(dir_path, relabel=False):
    """``[(img_path, pid, camid)]`` for a split folder, sorted by name; ``relabel`` maps pids to 0..N-1."""
    data = []
    for name in _list_images(dir_path):
        pid, camid = _pid_camid(name)
        if pid == -1:  # junk, as in Market-1501
            continue
        data.append((osp.join(dir_path, name), pid, camid))
    if relabel:
        label = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in data}))}
        data = [(p, label[pid], cam) for p, pid, cam in data]
    return data


# ----------------------------------------------------------------------------------------------------------------
# torchreid datasets and registration
# ----------------------------------------------------------------------------------------------------------------


class SyntheticReID(torchreid.data.ImageDataset):
    """A generated Market-1501-style dataset under ``<root>/<dataset_dir>``.

    Registered subclasses carry their ``params`` (``SyntheticParams``), ``dataset_dir`` and ``on_mismatch``
    as class attributes; see ``register_synthetic_dataset``. torchreid passes ``root`` and its usual keyword
    arguments (``transform``, ``mode``, ``combineall``, ``verbose``...).
    """

    dataset_dir = "synthetic_reid"
    params = SyntheticParams()
    on_mismatch = "regenerate"

    def __init__(self, root="", **kwargs):
        self.root = osp.abspath(osp.expanduser(root))
        self.dataset_dir = osp.join(self.root, type(self).dataset_dir)
        self.manifest = prepare_synthetic_dataset(
            self.dataset_dir, self.params, self.on_mismatch, verbose=kwargs.get("verbose", True)
        )
        self.train_dir = osp.join(self.dataset_dir, SPLIT_DIRS["train"])
        self.query_dir = osp.join(self.dataset_dir, SPLIT_DIRS["query"])
        self.gallery_dir = osp.join(self.dataset_dir, SPLIT_DIRS["gallery"])
        self.check_before_run([self.train_dir, self.query_dir, self.gallery_dir])
        train = read_split(self.train_dir, relabel=True)
        query = read_split(self.query_dir)
        gallery = read_split(self.gallery_dir)
        super(SyntheticReID, self).__init__(train, query, gallery, **kwargs)


# Our names: (dataset_dir, parameters). The transfer pair differs in camera style and id range (disjoint people).
DEFAULT_DATASETS = {
    "synthetic_reid": ("synthetic_reid", SyntheticParams()),
    "synthetic_source": (
        "synthetic_source",
        SyntheticParams(
            num_train_ids=100, num_test_ids=40, num_cameras=4, style="indoor", id_offset=1000, num_distractor_ids=0
        ),
    ),
    "synthetic_target": (
        "synthetic_target",
        SyntheticParams(
            num_train_ids=60, num_test_ids=50, num_cameras=5, style="outdoor", id_offset=2000, num_distractor_ids=10
        ),
    ),
}

_REGISTERED = {}  # name -> class that this module registered in torchreid
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def register_synthetic_dataset(name, dataset_dir=None, on_mismatch="regenerate", **params):
    """Registers (or re-binds) the torchreid image dataset ``name`` to a synthetic dataset and returns its class.

    Unspecified parameters take the defaults of ``name`` when it is one of ``DEFAULT_DATASETS``, otherwise those
    of ``SyntheticParams``. Re-registering a name this module registered updates the class in place, so the name
    keeps working with ``torchreid.data.ImageDataManager(sources=name, ...)``. A name that torchreid (or anyone
    else) already uses is refused. ``dataset_dir`` (default: ``name``) is the folder under the data root.
    """
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise ValueError(
            f"Synthetic dataset name must be a non-empty string of letters, digits, '_', '.', '-'; got {name!r}"
        )
    default_dir, base = DEFAULT_DATASETS.get(name, (name, SyntheticParams()))
    p = make_params(base, **params)
    dataset_dir = default_dir if dataset_dir is None else dataset_dir
    if (
        not isinstance(dataset_dir, str)
        or not dataset_dir
        or osp.isabs(dataset_dir)
        or ".." in dataset_dir.split(os.sep)
    ):
        raise ValueError(f"dataset_dir must be a relative folder name under the data root, got {dataset_dir!r}")
    if on_mismatch not in ("regenerate", "error"):
        raise ValueError(f"on_mismatch must be 'regenerate' or 'error', got {on_mismatch!r}")
    attrs = dict(params=p, dataset_dir=dataset_dir, on_mismatch=on_mismatch)
    cls = _REGISTERED.get(name)
    if cls is not None:
        for key, value in attrs.items():
            setattr(cls, key, value)
        return cls
    cls = type(
        "SyntheticReID_" + re.sub(r"\W", "_", name),
        (SyntheticReID,),
        dict(attrs, __module__=__name__, __doc__=f"Synthetic ReID dataset registered as {name!r}."),
    )
    try:
        torchreid.data.register_image_dataset(name, cls)
    except ValueError:
        raise ValueError(
            f"The dataset name {name!r} is already registered in torchreid by another dataset; only "
            "synthetic datasets registered by ptl_torchreid can be re-registered. Choose another "
            "name."
        ) from None
    _REGISTERED[name] = cls
    return cls


def registered_synthetic_datasets():
    """``{name: class}`` of the synthetic datasets registered so far."""
    return dict(_REGISTERED)


def _register_defaults():
    for name, (dataset_dir, params) in DEFAULT_DATASETS.items():
        if name not in _REGISTERED:
            register_synthetic_dataset(name, dataset_dir=dataset_dir)


# ----------------------------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------------------------


def make_contact_sheet(dataset_dir, split="train", num_ids=8, pids=None, scale=2, pad=4):
    """A BGR uint8 image: one row per identity, one column per camera (first image there, blank if unseen)."""
    items = read_split(osp.join(dataset_dir, SPLIT_DIRS[split]))
    if not items:
        raise ValueError(f"No images in {osp.join(dataset_dir, SPLIT_DIRS[split])}")
    cams = sorted({c for _, _, c in items})
    first = {}
    for path, pid, cam in items:
        first.setdefault((pid, cam), path)
    if pids is None:
        by_pid = sorted({pid for _, pid, _ in items}, key=lambda p: (-sum((p, c) in first for c in cams), p))
        pids = sorted(by_pid[:num_ids])
    h0, w0 = cv2.imread(items[0][0]).shape[:2]
    h, w = h0 * scale, w0 * scale
    header = 14 * scale
    sheet = np.full((header + len(pids) * (h + pad) + pad, len(cams) * (w + pad) + pad, 3), 255, np.uint8)
    for j, cam in enumerate(cams):
        cv2.putText(
            sheet,
            f"cam {cam + 1}",
            (pad + j * (w + pad) + 2, header - 3 * scale),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.3 * scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        for i, pid in enumerate(pids):
            path = first.get((pid, cam))
            if path is None:
                continue
            img = cv2.resize(cv2.imread(path), (w, h), interpolation=cv2.INTER_NEAREST)
            y, x = header + pad + i * (h + pad), pad + j * (w + pad)
            sheet[y : y + h, x : x + w] = img
    return sheet
