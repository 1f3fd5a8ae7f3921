"""Backbones PTL can wrap: where to tap torchreid's models, and how to load pretrained weights into them.

A backbone is described by its torchreid name and five taps (tuples of attribute names run in order to reach
the stem, stage-1, stage-2, stage-3 and last-stage feature maps). Adding a backbone is one entry in ``BACKBONES``.
"""
import os
import os.path as osp
import socket
import urllib.parse
from dataclasses import dataclass

import torch

from .. import _torchreid
from ..utils.checkpoint import extract_state_dict, load_checkpoint, load_weights


@dataclass(frozen=True)
class BackboneSpec:
    torchreid_name: str
    taps: tuple
    family: str  # 'resnet' or 'osnet': where torchreid keeps the ImageNet weights


_RESNET_TAPS = (("conv1", "bn1", "relu", "maxpool"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
_OSNET_TAPS = (("conv1", "maxpool"), ("conv2",), ("conv3",), ("conv4",), ("conv5",))

BACKBONES = {
    "resnet50": BackboneSpec("resnet50", _RESNET_TAPS, "resnet"),
    "resnet50_fc512": BackboneSpec("resnet50_fc512", _RESNET_TAPS, "resnet"),
    "osnet_x1_0": BackboneSpec("osnet_x1_0", _OSNET_TAPS, "osnet"),
    "osnet_x0_75": BackboneSpec("osnet_x0_75", _OSNET_TAPS, "osnet"),
    "osnet_x0_5": BackboneSpec("osnet_x0_5", _OSNET_TAPS, "osnet"),
    "osnet_x0_25": BackboneSpec("osnet_x0_25", _OSNET_TAPS, "osnet"),
}


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights are neither cached nor downloadable."""


def build_backbone(name, num_classes, loss):
    """A randomly initialised torchreid model (ImageNet weights are loaded separately, see below)."""
    spec = BACKBONES[name]
    return _torchreid.model_factory()[spec.torchreid_name](num_classes=num_classes, loss=loss, pretrained=False)


def imagenet_weights_location(name):
    """(url, cached file) of the ImageNet weights torchreid uses for backbone ``name``; the cache is the same
    place torchreid itself uses, so weights it downloaded before are reused."""
    spec = BACKBONES[name]
    if spec.family == "resnet":
        url = _torchreid.resnet_module().model_urls["resnet50"]
        filename = osp.basename(urllib.parse.urlparse(url).path)
        return url, osp.join(torch.hub.get_dir(), "checkpoints", filename)
    url = _torchreid.osnet_module().pretrained_urls[spec.torchreid_name]
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", osp.join(os.getenv("XDG_CACHE_HOME", "~/.cache"),
                                                                      "torch")))
    return url, osp.join(torch_home, "checkpoints", spec.torchreid_name + "_imagenet.pth")


def _download(url, dst, timeout):
    host = urllib.parse.urlparse(url).hostname
    try:  # probe first so that an offline machine fails in seconds instead of hanging in the downloader
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise PretrainedWeightsUnavailable(
            f"pretrained=True needs ImageNet weights, which are not cached at {dst} and cannot be downloaded from "
            f"{url} "
            f"({e}). Either put the file there, or build with pretrained=False and load a local checkpoint with "
            "model.load_weights (config key) / ptl_torchreid.models.load_pretrained_weights()."
        ) from e
    os.makedirs(osp.dirname(dst), exist_ok=True)
    if "drive.google" in host:
        import gdown  # torchreid hosts OSNet weights on Google Drive

        gdown.download(url, dst, quiet=False)
    else:
        torch.hub.download_url_to_file(url, dst, progress=True)


def load_imagenet_weights(model, name, timeout=10.0, verbose=True):
    """Load torchreid's ImageNet weights for backbone ``name`` into the torchreid model ``model``; downloaded to
    torchreid's cache only when absent. Offline, fails within ``timeout`` seconds with a clear error."""
    url, cached = imagenet_weights_location(name)
    if not osp.isfile(cached):
        _download(url, cached, timeout)
    return load_weights(model, cached, mode="match", verbose=verbose)


def is_ptl_state_dict(state_dict):
    """Whether a state dict is a PTL model's (it has the side stream, or the key names PTL checkpoints had
    before the backbone kept its own names) rather than a plain torchreid model's."""
    return any(k.startswith(("bconv1.", "backbone.")) for k in state_dict)


def load_pretrained_weights(model, path_or_checkpoint, mode="match", trust=False, verbose=True):
    """Load a torchreid checkpoint (ImageNet or ReID model, model-zoo file, ``state_dict`` wrapper, ``module.``
    prefixes; a path or an already loaded checkpoint) into ``model``, reporting what loaded and what did not.

    For a PTL model, a checkpoint of a plain torchreid model fills the backbone (``mode='strict'`` then asks for
    every backbone tensor, not for the side stream); a PTL checkpoint fills the whole model. With
    ``mode='match'``, keys that do not match by name and shape (e.g. a classifier for another number of
    identities) are skipped and listed.
    """
    checkpoint = path_or_checkpoint
    if isinstance(path_or_checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint(path_or_checkpoint, trust=trust)
    state_dict = extract_state_dict(checkpoint)
    target = model
    if getattr(model, "is_ptl", False) and not is_ptl_state_dict(state_dict):
        target = model.backbone  # shares its modules, and their key names, with the PTL model
    return load_weights(target, state_dict, mode=mode, verbose=verbose)
