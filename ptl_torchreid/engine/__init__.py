"""PTL engines: torchreid's image engines plus cell-state handling, freezing, logging and safe checkpoints;
builders from a config and :func:`run` (``engine.defaults``)."""
from ptl_torchreid.engine.defaults import (
    ENGINES,
    build_datamanager,
    build_engine,
    build_model,
    build_optimizer_and_scheduler,
    distributed_session,
    preflight,
    run,
)
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
    "build_datamanager",
    "build_engine",
    "build_model",
    "build_optimizer",
    "build_optimizer_and_scheduler",
    "clamp_ranks",
    "distributed_session",
    "preflight",
    "resolve_precision",
    "run",
]
