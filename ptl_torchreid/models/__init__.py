"""PTL model factories, registered by name in torchreid's model factory.

After ``import ptl_torchreid``, ``torchreid.models.build_model('ptl_resnet50', num_classes, loss)`` builds a PTL
model, and ``torchreid.models.show_avai_models()`` lists the ``ptl_*`` names. ``build_model`` below is the same
with PTL options (state mode, eval state, momentum, input size) on top, and works for plain torchreid models too.
"""
import difflib
import functools
import warnings

from .. import _torchreid
from ..utils.distributed import unwrap
from . import cell_sync  # noqa: F401  (registers the cells' buffers as rank-synchronised, see cell_sync)
from .backbones import BACKBONES, build_backbone, is_ptl_state_dict, load_imagenet_weights, load_pretrained_weights
from .bconv import EVAL_STATES, RESET_POLICIES, STATE_MODES, BConvCell, check_reset_options, check_state_options
from .options import InvalidOption
from .ptl import (
    CELL_INITS,
    CELL_TYPES,
    HEADS,
    MODES,
    SIDE_POOLS,
    STAGE3_TAPS,
    STAGES,
    PTLNet,
    check_freeze_epochs,
    check_options,
)

__all__ = ["PTLNet", "BConvCell", "PTL_MODELS", "STATE_MODES", "EVAL_STATES", "RESET_POLICIES", "build_model",
           "is_ptl", "unwrap", "register_models", "available_models", "load_pretrained_weights", "is_ptl_state_dict",
           "check_state_options", "check_options", "check_reset_options",
           "check_freeze_epochs", "InvalidOption", "MODES", "HEADS", "SIDE_POOLS", "CELL_INITS",
           "CELL_TYPES", "STAGE3_TAPS", "STAGES"]

# ptl model name -> backbone name
PTL_MODELS = {
    "ptl_resnet50": "resnet50",
    "ptl_resnet50_fc512": "resnet50_fc512",
    "ptl_osnet_x1_0": "osnet_x1_0",
    "ptl_osnet_x0_75": "osnet_x0_75",
    "ptl_osnet_x0_5": "osnet_x0_5",
    "ptl_osnet_x0_25": "osnet_x0_25",
}


def _build_ptl(backbone_name, num_classes, loss="softmax", pretrained=True, use_gpu=None, input_size=(256, 128),
               **options):
    """``options``: those of :class:`PTLNet` (state_mode, eval_state, momentum, mode, head, rectify_stages,
    side_pool, cell_init, cell_type, stage3_tap, widths, feature_dim)."""
    backbone = build_backbone(backbone_name, num_classes, loss)
    if pretrained:
        load_imagenet_weights(backbone, backbone_name)
    return PTLNet(backbone, BACKBONES[backbone_name].taps, num_classes, loss=loss, input_size=input_size,
                  **options)


def _make_factory(name, backbone_name):
    factory = functools.partial(_build_ptl, backbone_name)
    functools.update_wrapper(factory, _build_ptl)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"PTL model over torchreid's {backbone_name} (see PTLNet)."
    factory.ptl_torchreid_factory = True  # marks our own entries, so re-registration is idempotent
    return factory


_FACTORIES = {name: _make_factory(name, bb) for name, bb in PTL_MODELS.items()}


def register_models():
    """Add the ``ptl_*`` factories to torchreid's model factory. Idempotent; an existing entry of the same name
    that is not ours is left in place, with a warning, rather than overwritten."""
    registry = _torchreid.model_factory()
    for name, factory in _FACTORIES.items():
        existing = registry.get(name)
        if existing is not None and not getattr(existing, "ptl_torchreid_factory", False):
            warnings.warn(
                f"torchreid already has a model named {name!r} that is not from ptl_torchreid; it is kept and "
                "ptl_torchreid's is not registered under that name"
            )
            continue
        registry[name] = factory


def available_models():
    return sorted(_torchreid.model_factory())


def is_ptl(model):
    return bool(getattr(unwrap(model), "is_ptl", False))


def build_model(name, num_classes, loss="softmax", pretrained=False, **ptl_options):
    """Build a torchreid or PTL model by name. PTL options: ``input_size`` and those of :class:`PTLNet`;
    passing one for a plain torchreid model is an error."""
    registry = _torchreid.model_factory()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise KeyError(f"unknown model name {name!r}{hint}. Available: {', '.join(sorted(registry))}")
    factory = registry[name]
    if getattr(factory, "ptl_torchreid_factory", False):
        return factory(num_classes=num_classes, loss=loss, pretrained=pretrained, **ptl_options)
    if ptl_options:
        raise ValueError(
            f"{name} is not a PTL model; PTL options {', '.join(sorted(ptl_options))} do not apply to it"
        )
    if pretrained and name in BACKBONES:  # same weights as torchreid, but fails fast when offline
        model = factory(num_classes=num_classes, loss=loss, pretrained=False)
        load_imagenet_weights(model, name)
        return model
    return factory(num_classes=num_classes, loss=loss, pretrained=pretrained)
