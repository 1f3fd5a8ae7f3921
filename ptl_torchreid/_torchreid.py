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

__all__ = ["torchreid", "model_factory", "dataset_module", "osnet_module", "resnet_module", "image_dataset_registry",
           "training_choices"]


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


def image_dataset_registry():
    """torchreid's image-dataset registry (name -> class) behind ``torchreid.data.register_image_dataset``."""
    return vars(torchreid.data.datasets)["__image_datasets"]


def training_choices():
    """Names torchreid accepts for samplers, optimizers and LR schedulers (it has no public API for them)."""
    return {
        "samplers": list(torchreid.data.sampler.AVAI_SAMPLERS),
        "optimizers": list(torchreid.optim.optimizer.AVAI_OPTIMS),
        "schedulers": list(torchreid.optim.lr_scheduler.AVAI_SCH),
    }
