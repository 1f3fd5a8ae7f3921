"""PTL engines: torchreid's image engines plus cell-state handling, freezing, logging and safe checkpoints."""
from ptl_torchreid.engine.engines import PTLImageSoftmaxEngine, PTLImageTripletEngine
from ptl_torchreid.engine.mixin import (
    RESET_POLICIES,
    NonFiniteLossError,
    PTLEngineMixin,
    TrainingInterrupted,
    clamp_ranks,
    resolve_precision,
)
from ptl_torchreid.engine.optim import build_optimizer

__all__ = [
    "ENGINES",
    "NonFiniteLossError",
    "PTLEngineMixin",
    "PTLImageSoftmaxEngine",
    "PTLImageTripletEngine",
    "RESET_POLICIES",
    "TrainingInterrupted",
    "build_optimizer",
    "clamp_ranks",
    "resolve_precision",
]

# loss.name -> engine class
ENGINES = {"softmax": PTLImageSoftmaxEngine, "triplet": PTLImageTripletEngine}
