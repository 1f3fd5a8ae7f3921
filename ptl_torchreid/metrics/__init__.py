"""Evaluation metrics: vectorised CMC / mAP with torchreid's protocol."""
from .rank import evaluate_rank

__all__ = ["evaluate_rank"]
