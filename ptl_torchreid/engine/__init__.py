"""PTL engines: torchreid's image engines driven by one short training loop whose concerns are hooks.

Extend training with a :class:`HookBase` subclass and ``engine.register_hooks([...])``; ``clamp_ranks`` and
``resolve_precision`` are re-exported from their homes (``metrics``, ``utils.amp``) for code that imported them
from here.
"""
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
from ptl_torchreid.engine.evaluator import EvalOptions, ReIDEvaluator
from ptl_torchreid.engine.hooks import RESET_POLICIES, HookBase, NonFiniteLossError
from ptl_torchreid.engine.optim import build_optimizer
from ptl_torchreid.engine.reliability import TrainingInterrupted
from ptl_torchreid.engine.trainer import PTLEngineMixin
from ptl_torchreid.metrics import clamp_ranks
from ptl_torchreid.utils.amp import resolve_precision

__all__ = [
    "ENGINES",
    "EvalOptions",
    "HookBase",
    "NonFiniteLossError",
    "PTLEngineMixin",
    "PTLImageSoftmaxEngine",
    "PTLImageTripletEngine",
    "RESET_POLICIES",
    "ReIDEvaluator",
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
