"""Saving and reloading pruned models without re-running the pruning.

A pruned checkpoint is an ordinary one (``state_dict`` plus plain metadata, loadable with
``torch.load(weights_only=True)``) with a ``pruning`` entry::

    {"format": 1, "method": "cop", "arch": "resnet50", "num_classes": 751, "loss": "softmax",
     "build_kwargs": {...PTL options...}, "channels": {module name: {attr: int}}, "report": {...}}

``load_pruned_model`` builds ``arch`` as usual (random weights), gives every layer the saved channel counts and
loads the weights strictly (``build_pruned_architecture`` does the first two steps alone, from the entry).
``register_pruned_model`` makes the file available to torchreid by name, e.g. for
``torchreid.utils.FeatureExtractor(model_name=name, model_path=path)``.
"""
import os.path as osp
import re

import torch

from .. import _torchreid
from ..models import build_model, is_ptl, unwrap
from ..utils.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint
from .surgery import apply_channel_config, channel_config

__all__ = ["save_pruned_model", "load_pruned_model", "build_pruned_architecture", "pruning_info",
           "is_pruned_checkpoint", "register_pruned_model", "build_kwargs_of", "make_pruning_info"]

FORMAT = 1


def build_kwargs_of(model):
    """The ``build_model`` options that rebuild ``model``'s architecture (PTL options for PTL models)."""
    net = unwrap(model)
    if not is_ptl(net):
        return {}
    return net.build_options()


def _num_classes(net):
    classifier = getattr(net, "classifier", None)
    if classifier is None or not hasattr(classifier, "out_features"):
        raise ValueError("cannot tell the number of classes: the model has no Linear 'classifier'; pass "
                         "num_classes= to save_pruned_model")
    return int(classifier.out_features)


def make_pruning_info(model, arch, num_classes=None, loss=None, build_kwargs=None, report=None):
    """The ``pruning`` entry of a checkpoint (plain types): what :func:`load_pruned_model` needs to rebuild
    ``model``. Put it into any checkpoint of the pruned model (e.g. a training engine's ``checkpoint_extras``)
    to make that checkpoint reloadable too."""
    net = unwrap(model)
    return dict(format=FORMAT, method="cop", arch=str(arch),
                num_classes=int(num_classes if num_classes is not None else _num_classes(net)),
                loss=str(loss if loss is not None else getattr(net, "loss", "softmax")),
                build_kwargs=dict(build_kwargs) if build_kwargs is not None else build_kwargs_of(net),
                channels=channel_config(net),
                report=report.as_dict() if hasattr(report, "as_dict") else report)


def save_pruned_model(model, path, arch, num_classes=None, loss=None, build_kwargs=None, report=None,
                      extra=None):
    """Save a pruned model with its channel configuration.

    Args:
        model: the pruned module (a DataParallel/DDP wrapper is unwrapped).
        path: destination file (written atomically).
        arch: the model name it was built with (``ptl_torchreid.models.build_model`` / torchreid name).
        num_classes, loss: default to the model's classifier size and ``loss`` attribute.
        build_kwargs: extra ``build_model`` options; default: those of a PTL model (input size, widths, cell
            options), none for plain torchreid models.
        report: a :class:`~ptl_torchreid.compress.PruneReport` (or its ``as_dict()``) to keep alongside.
        extra: more plain-typed top-level entries (e.g. ``{"epoch": 10, "rank1": 0.8}``).
    """
    net = unwrap(model)
    state = dict(extra or {})
    state.update(state_dict=net.state_dict(),
                 pruning=make_pruning_info(net, arch, num_classes, loss, build_kwargs, report))
    return save_checkpoint(state, path)


def is_pruned_checkpoint(checkpoint, trust=False):
    """True for a checkpoint (dict, or path to a file) holding a ``pruning`` entry with a channel
    configuration, as written by :func:`save_pruned_model`."""
    if checkpoint is None:
        return False
    if not isinstance(checkpoint, dict):
        if not osp.isfile(str(checkpoint)):
            return False
        checkpoint = load_checkpoint(str(checkpoint), map_location="cpu", trust=trust)
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get("pruning"), dict) and \
        "channels" in checkpoint["pruning"]


def _load(path_or_checkpoint, map_location, trust):
    if isinstance(path_or_checkpoint, dict):
        return path_or_checkpoint, "<checkpoint dict>"
    path = str(path_or_checkpoint)
    if not osp.isfile(path):
        raise FileNotFoundError(f"pruned model file {path} does not exist")
    return load_checkpoint(path, map_location=map_location, trust=trust), path


def pruning_info(path_or_checkpoint, map_location="cpu", trust=False):
    """The ``pruning`` entry of a pruned checkpoint (arch, channels, report, ...)."""
    checkpoint, where = _load(path_or_checkpoint, map_location, trust)
    if not is_pruned_checkpoint(checkpoint):
        raise ValueError(f"{where} is not a pruned-model checkpoint: it has no 'pruning' entry with a channel "
                         "configuration. Save pruned models with ptl_torchreid.compress.save_pruned_model "
                         "(or the 'prune' command).")
    return checkpoint["pruning"]


def build_pruned_architecture(info, where="the pruning info"):
    """The pruned model that ``info`` (a checkpoint's ``pruning`` entry, as :func:`make_pruning_info` makes it)
    describes, with fresh weights: its architecture alone, e.g. to time it. ``where`` names the source in errors."""
    if int(info.get("format", 0)) > FORMAT:
        raise ValueError(f"{where} uses pruned-model format {info['format']}, newer than this version reads "
                         f"({FORMAT}); upgrade ptl_torchreid")
    kwargs = dict(info.get("build_kwargs") or {})
    channels = info["channels"]
    if "input_size" in kwargs:
        kwargs["input_size"] = tuple(kwargs["input_size"])
        if "mode" not in kwargs:  # a PTL model pruned before PTL heads and backbone key names changed
            kwargs.update(mode="branch", head="concat")
            channels = {re.sub(r"^backbone\.", "", k): v for k, v in channels.items()}
    model = build_model(info["arch"], num_classes=int(info["num_classes"]), loss=info.get("loss", "softmax"),
                        pretrained=False, **kwargs)
    apply_channel_config(model, channels)
    return model


def load_pruned_model(path_or_checkpoint, map_location="cpu", trust=False, num_classes=None, loss=None):
    """Rebuild a pruned model from a checkpoint holding a ``pruning`` entry (no pruning run needed).

    Args:
        path_or_checkpoint: a file written by :func:`save_pruned_model` (or by a training engine given
            :func:`make_pruning_info` as a checkpoint extra), or the loaded dict.
        num_classes: when given and different from the saved classifier's, the classifier is replaced by a
            freshly initialised one of this size (fine-tuning on other identities); the rest loads strictly.
        loss: sets the model's ``loss`` (torchreid's forward contract) when given.
    """
    checkpoint, where = _load(path_or_checkpoint, map_location, trust)
    info = pruning_info(checkpoint)
    model = build_pruned_architecture(info, where)
    state_dict = extract_state_dict(checkpoint)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"weights in {where} do not fit {info['arch']} with the saved channel configuration: "
                           f"{e}") from e
    if num_classes is not None and int(num_classes) != int(info["num_classes"]):
        old = model.classifier
        model.classifier = torch.nn.Linear(old.in_features, int(num_classes), bias=old.bias is not None)
        torch.nn.init.normal_(model.classifier.weight, 0, 0.01)
        if old.bias is not None:
            torch.nn.init.zeros_(model.classifier.bias)
    if loss is not None:
        model.loss = loss
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model


def register_pruned_model(path, name=None, trust=False):
    """Register the pruned model in ``path`` in torchreid's model factory and return its name.

    ``torchreid.models.build_model(name, ...)`` then returns the pruned model (``num_classes`` is ignored: the
    saved classifier is kept; ``loss`` is applied), so torchreid's own tools work with it::

        name = register_pruned_model("pruned.pth")
        extractor = torchreid.utils.FeatureExtractor(model_name=name, model_path="pruned.pth", device="cpu")
    """
    path = osp.abspath(str(path))
    pruning_info(path, trust=trust)  # fail now, not at build time
    if name is None:
        stem = re.sub(r"[^0-9A-Za-z_]+", "_", osp.splitext(osp.basename(path))[0])
        name = "pruned_" + stem

    def factory(num_classes=None, loss=None, pretrained=False, use_gpu=None, **kwargs):
        model = load_pruned_model(path, trust=trust)
        if loss is not None and hasattr(model, "loss"):
            model.loss = loss
        return model

    factory.__name__ = name
    factory.__doc__ = f"Pruned model loaded from {path}"
    _torchreid.model_factory()[name] = factory
    return name
