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

The subpackage, in dependency order: :mod:`.params` (parameters and camera style presets), :mod:`.draw`
(drawing primitives), :mod:`.people` (identities and pedestrians), :mod:`.render` (cameras and one image),
:mod:`.generate` (layout, files, manifest and cache) and :mod:`.dataset` (reading, the torchreid dataset and its
registration).
"""
from ..check import SPLIT_DIRS
from .dataset import (
    DEFAULT_DATASETS,
    SyntheticReID,
    make_contact_sheet,
    read_split,
    register_synthetic_dataset,
    registered_synthetic_datasets,
)
from .generate import FORMAT_VERSION, MANIFEST, prepare_synthetic_dataset
from .params import STYLES, SyntheticParams, make_params

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "SPLIT_DIRS",
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
