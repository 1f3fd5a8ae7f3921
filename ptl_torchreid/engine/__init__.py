"""PTL engines: torchreid's image engines plus cell-state handling, freezing, logging and safe checkpoints."""
from ptl_torchreid.engine.engines import PTLImageSoftmaxEngine, PTLImageTripletEngine
from ptl_torchreid.engine.mixin import RESET_POLICIES, PTLEngineMixin, clamp_ranks
from ptl_torchreid.engine.optim import build_optimizer, unwrap_model

__all__ = [
    "ENGINES",
    "PTLEngineMixin",
    "PTLImageSoftmaxEngine",
    "PTLImageTripletEngine",
    "RESET_POLICIES",
    "build_optimizer",
    "clamp_ranks",
    "unwrap_model",
]

# loss.name -> engine class
ENGINES = {"softmax": PTLImageSoftmaxEngine, "triplet": PTLImageTripletEngine}
