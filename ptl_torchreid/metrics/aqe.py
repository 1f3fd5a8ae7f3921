"""alpha-query expansion (Radenovic et al., TPAMI 2018, as fast-reid's ``test.AQE``).

Every feature (queries and gallery together) is replaced by the L2-normalised sum of its ``k`` most similar
L2-normalised features (itself included), each weighted by its cosine similarity to the power ``alpha``.
The neighbours come from an exact top-k over blocks of rows, so memory is O(N * k) plus one block.
"""
import torch
import torch.nn.functional as F

__all__ = ["alpha_query_expansion"]

_BLOCK = 2048


def alpha_query_expansion(qf, gf, k=5, alpha=3.0, times=1):
    """Expanded ``(qf, gf)`` (float32 tensors, unit length)."""
    if k < 1 or times < 1:
        raise ValueError(f"alpha_query_expansion: k and times must be >= 1, got k={k}, times={times}")
    feats = F.normalize(torch.cat([torch.as_tensor(qf), torch.as_tensor(gf)]).float(), p=2, dim=1)
    k = min(int(k), len(feats))
    for _ in range(times):
        expanded = torch.empty_like(feats)
        for s in range(0, len(feats), _BLOCK):
            block = feats[s:s + _BLOCK]
            sims, idx = torch.topk(block @ feats.t(), k, dim=1)
            weights = sims.pow(alpha)
            expanded[s:s + _BLOCK] = (weights.unsqueeze(-1) * feats[idx]).sum(1)
        feats = F.normalize(expanded, p=2, dim=1)
    return feats[: len(qf)], feats[len(qf):]
