"""The only module that knows torchreid's internal package layout.

torchreid 0.2.5 (PyPI) ships deep-person-reid 1.4.0 under ``torchreid.reid.*``; importing its submodules by
path is fragile, so everything here goes through attribute access from the top-level package. Code elsewhere
in ptl_torchreid asks this module instead of reaching into torchreid's internals itself.
"""
import warnings

with warnings.catch_warnings():
    # torchreid warns at import that its Cython ranking is missing; we ship our own vectorised ranking.
    warnings.filterwarnings("ignore", message="Cython evaluation")
    import torchreid

__all__ = ["torchreid", "model_factory", "dataset_module", "osnet_module", "resnet_module"]


def model_factory():
    """torchreid's name -> constructor dict used by ``torchreid.models.build_model``."""
    return vars(torchreid.models)["__model_factory"]


def dataset_module():
    """The module defining torchreid's ``Dataset`` classes (it binds ``read_image`` at import)."""
    return torchreid.data.datasets.dataset


def osnet_module():
    """torchreid's OSNet module (constructors, ``init_pretrained_weights``, ``pretrained_urls``)."""
    return torchreid.models.osnet


def resnet_module():
    """torchreid's ResNet module (constructors, ``model_urls``)."""
    return torchreid.models.resnet
