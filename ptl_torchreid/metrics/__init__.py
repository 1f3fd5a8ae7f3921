"""Evaluation metrics: vectorised CMC / mAP / mINP with torchreid's protocol, chunked ranking for large
galleries, exact k-nearest-neighbour search (faiss or torch), scalable k-reciprocal re-ranking, alpha-query
expansion and pair ROC."""
from .aqe import alpha_query_expansion
from .chunked import evaluate_rank_chunked
from .knn import knn_search
from .rank import clamp_ranks, evaluate_rank
from .rerank import rerank
from .roc import DEFAULT_FPRS, PairROC, tpr_at_fpr

__all__ = ["clamp_ranks", "evaluate_rank", "evaluate_rank_chunked", "rerank", "knn_search",
           "alpha_query_expansion", "PairROC", "tpr_at_fpr", "DEFAULT_FPRS"]
