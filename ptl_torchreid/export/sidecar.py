"""The JSON written next to every exported model: what a tracker needs to feed it and to use its output.

Preprocessing stays outside the graph, as BoxMOT and torchreid do it: RGB, resize to height x width (bilinear),
divide by 255, subtract ``mean`` and divide by ``std`` per channel, NCHW float32.
"""
import hashlib
import json
import os
import os.path as osp

from ..utils.checkpoint import atomic_write_text

__all__ = ["SIDECAR_FORMAT", "IMAGENET_MEAN", "IMAGENET_STD", "file_sha256", "model_stem", "sidecar_path",
           "make_sidecar", "write_sidecar", "read_sidecar"]

SIDECAR_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(str(path), "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def model_stem(arch, dataset):
    """``<arch>_<dataset>``, the name trackers such as BoxMOT read the architecture from."""
    return f"{arch}_{dataset}" if dataset else str(arch)


def sidecar_path(model_path):
    """``x.onnx`` -> ``x.json``; ``dir/x.xml`` -> ``dir/x.json``."""
    return osp.splitext(str(model_path))[0] + ".json"


def make_sidecar(model_path, arch, input_size, feature_dim, *, dataset=None, runtime="onnx", precision="fp32",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, l2_normalize=False, dist_metric="euclidean",
                 dynamic_batch=True, source_checkpoint=None, ptl=None, pruning=None, verification=None,
                 exporter=None):
    """The sidecar as a dict (plain JSON types). ``model_path`` must exist (its SHA-256 is recorded)."""
    source = None
    if source_checkpoint:
        source = {"file": osp.basename(str(source_checkpoint)), "sha256": file_sha256(source_checkpoint)}
    weights = osp.splitext(str(model_path))[0] + ".bin"  # an OpenVINO IR keeps its weights beside the .xml
    has_weights = str(model_path).endswith(".xml") and osp.isfile(weights)
    return {
        "format": SIDECAR_FORMAT,
        "model_file": osp.basename(str(model_path)),
        "model_sha256": file_sha256(model_path),
        "weights_file": osp.basename(weights) if has_weights else None,
        "weights_sha256": file_sha256(weights) if has_weights else None,
        "runtime": runtime,
        "precision": precision,
        "arch": str(arch),
        "dataset": dataset,
        "input": {
            "name": "images", "layout": "NCHW", "dtype": "float32",
            "shape": ["batch" if dynamic_batch else 1, 3, int(input_size[0]), int(input_size[1])],
            "height": int(input_size[0]), "width": int(input_size[1]), "pixel_order": "RGB",
            "resize": "bilinear", "scale": 1.0 / 255.0,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        },
        "output": {"name": "features", "feature_dim": int(feature_dim), "l2_normalize": bool(l2_normalize),
                   "dist_metric": dist_metric},
        "dynamic_batch": bool(dynamic_batch),
        "source_checkpoint": source,
        "ptl": ptl,
        "pruning": pruning,
        "verification": verification,
        "exporter": exporter,
    }


def write_sidecar(model_path, sidecar):
    """Write ``sidecar`` (from :func:`make_sidecar`) next to ``model_path``, atomically; returns its path."""
    path = sidecar_path(model_path)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(sidecar, indent=2) + "\n")
    return path


def read_sidecar(model_path):
    with open(sidecar_path(model_path)) as f:
        return json.load(f)
