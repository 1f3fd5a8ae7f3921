"""The parameters of a synthetic dataset and the camera style presets they name.

:class:`SyntheticParams` holds everything that determines the generated images and is recorded in the manifest;
:func:`make_params` builds one with checked overrides. ``STYLES`` holds the ranges from which each camera's domain
is drawn.
"""
import dataclasses
import difflib
from typing import Optional

import numpy as np

__all__ = ["SyntheticParams", "PARAM_NAMES", "STYLES", "IMAGE_FORMATS", "make_params"]

IMAGE_FORMATS = ("jpg", "png")  # what the generator writes

# Independent random streams, keyed so that any image can be redrawn without drawing the others first.
STREAM_IDENTITY, STREAM_CAMERA, STREAM_SPLIT, STREAM_TRACK, STREAM_IMAGE = range(5)


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
                f"min_cameras_per_id={self.min_cameras_per_id} exceeds num_cameras={self.num_cameras}; "
                "lower min_cameras_per_id or add cameras"
            )
        if self.max_cameras_per_id is not None and not (
            self.min_cameras_per_id <= self.max_cameras_per_id <= self.num_cameras
        ):
            raise ValueError(
                f"max_cameras_per_id={self.max_cameras_per_id} must lie in [min_cameras_per_id="
                f"{self.min_cameras_per_id}, num_cameras={self.num_cameras}] (or be None)"
            )
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ValueError(
                f"Unknown style {self.style!r}{_suggest(self.style, STYLES)}; valid styles: {', '.join(STYLES)}"
            )
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")

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
            f"Synthetic dataset parameter {key} must be in [{lo}, {hi}], got {value}{': ' + why if why else ''}"
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
                f"Unknown synthetic dataset parameter {key!r}{_suggest(key, PARAM_NAMES)}; valid parameters: "
                f"{', '.join(PARAM_NAMES)}"
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


