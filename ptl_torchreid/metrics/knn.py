"""Exact k-nearest-neighbour search of query features in a gallery, with faiss when it is installed.

faiss (``pip install "ptl_torchreid[retrieval]"``) searches a flat index (``IndexFlatL2`` for torchreid's squared
Euclidean distance, ``IndexFlatIP`` on L2-normalised features for its cosine distance ``1 - cos``), so the
neighbours are exact, not approximate. Without faiss the same search runs as query blocks of torch distances
and ``torch.topk``, with the block size bounded by ``memory_cap``. Both return torchreid's distance values; the
two differ only by float32 rounding, which can reorder near-equal distances.
"""
import numpy as np
import torch
import torch.nn.functional as F

from .chunked import BYTES_PER_DISTANCE, metric_distance_fn

__all__ = ["knn_search", "KNN_BACKENDS", "faiss_available"]

KNN_BACKENDS = ("auto", "faiss", "torch")


def faiss_available():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def knn_search(qf, gf, k, metric="euclidean", backend="auto", memory_cap=1 << 30):
    """``(indices, distances)``, each (num_query, k'), of the ``k' = min(k, num_gallery)`` closest gallery
    entries of every query, closest first.

    Args:
        qf, gf (torch.Tensor or numpy.ndarray): query / gallery features, (num, dim).
        k (int): neighbours per query.
        metric (str): ``'euclidean'`` (squared, torchreid's default) or ``'cosine'`` (``1 - cos``).
        backend (str): ``'faiss'``, ``'torch'`` or ``'auto'`` (faiss when installed).
        memory_cap (int): bytes of distances held at a time by the torch backend.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"knn_search: metric must be 'euclidean' or 'cosine', got {metric!r}")
    if backend not in KNN_BACKENDS:
        raise ValueError(f"knn_search: backend must be one of {KNN_BACKENDS}, got {backend!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"knn_search: k must be a positive integer, got {k!r}")
    qf, gf = torch.as_tensor(qf).detach().cpu().float(), torch.as_tensor(gf).detach().cpu().float()
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"knn_search: qf and gf must be (num, dim) with the same dim, got {tuple(qf.shape)} and "
                         f"{tuple(gf.shape)}")
    k = min(int(k), len(gf))
    has_faiss = backend != "torch" and faiss_available()
    if backend == "faiss" and not has_faiss:
        raise ImportError('knn_search: backend "faiss" needs faiss: pip install "ptl_torchreid[retrieval]" (or '
                          'faiss-cpu), or use backend "torch"')
    if has_faiss:
        return _faiss_search(qf, gf, k, metric)
    return _torch_search(qf, gf, k, metric, memory_cap)


def _faiss_search(qf, gf, k, metric):
    import faiss

    if metric == "cosine":
        qf, gf = F.normalize(qf, p=2, dim=1), F.normalize(gf, p=2, dim=1)
    # faiss runs its own OpenMP team; give it the threads torch was given (train.cpu_threads, utils.cpu_threads).
    faiss.omp_set_num_threads(torch.get_num_threads())
    g = np.ascontiguousarray(gf.numpy())
    index = faiss.IndexFlatL2(g.shape[1]) if metric == "euclidean" else faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    dist, idx = index.search(np.ascontiguousarray(qf.numpy()), k)
    if metric == "cosine":
        dist = 1 - dist
    return idx.astype(np.int64), dist.astype(np.float32)


def _torch_search(qf, gf, k, metric, memory_cap):
    distance_fn = metric_distance_fn(metric, gf)
    rows = max(1, int(memory_cap // (len(gf) * BYTES_PER_DISTANCE)))
    idx, dist = [], []
    for s in range(0, len(qf), rows):
        v, i = torch.topk(distance_fn(qf[s:s + rows], gf), k, dim=1, largest=False)
        idx.append(i)
        dist.append(v)
    return torch.cat(idx).numpy(), torch.cat(dist).numpy()
