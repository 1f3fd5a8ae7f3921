"""Filter criteria beyond the paper's, each plugged into COP's global cost-aware selection.

Every criterion gives each unit (a set of coupled channels) of a prunable group a redundancy r in [0, 1]; COP's
importance ``alpha * (1 - r) + beta * (1 - F_hat) + gamma * (1 - P_hat)`` and its greedy global removal stay as
they are, so ``'faster'`` and ``'smaller'`` keep their meaning. With W_c the kernel of a consumer c reading the
group and ``w2_ci`` the squared norm of its input column i (summed over outputs and kernel positions):

* ``cop`` (the paper, data-free): r_i = mean of the top-k |Pearson| correlations of consumer columns.
* ``cop_magnitude`` (data-free): r_i = 1 - ((1 - r_cop_i) + m_i) / 2 with the magnitude
  m_i = sqrt(sum_c w2_ci * e_i), normalised by its largest value in the group, where e_i is the mean square of
  BatchNorm's output after a ReLU for a unit-normal input, E[relu(gamma z + beta)^2] (BatchNorm folded into the
  column). The fold rescales each column, which |Pearson| ignores, so it enters through m.
* ``magnitude`` (data-free): r_i = 1 - m_i, the scale alone (what L1 pruning measures, with the BatchNorm fold and
  the consumer's columns), in COP's cost-aware global selection. Static: not updated on removal.
* ``cop_activation`` (needs data): the data version of COP's idea. On the calibration images, the covariance S of
  the group's channels at each consumer's input gives how well the other channels predict channel i:
  the unexplained variance is 1 / (S^-1)_ii. Removing i and refitting the consumer by least squares (see
  ``compensate``) leaves an output error d_i = sum_c w2_ci / (S_c^-1)_ii (exact for 1x1 kernels and linears),
  and r_i = 1 - sqrt(d_i) / max_j sqrt(d_j). After each removal the precision matrices are downdated, so the
  remaining channels' d rises where they lose the partner that predicted them.
* ``taylor`` (needs data, a reference point): the first-order change of the embedding when channel i is zeroed,
  t_i = sum_n E_v[(sum_positions a * dg/da)^2] with g = <f(x_n), v>, v ~ N(0, I) (so t_i estimates
  sum_n ||d f(x_n) / d mask_i||^2), and r_i = 1 - sqrt(t_i) / max_j sqrt(t_j). Static: not updated on removal.
"""
import math

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .calibration import consumer_columns
from .criterion import StaticState

__all__ = ["CRITERIA", "DATA_CRITERIA", "column_energy", "bn_relu_energy", "magnitude_strength",
           "activation_statistics", "taylor_scores", "ActivationState", "StaticState", "relative_redundancy"]

CRITERIA = ("cop", "cop_magnitude", "magnitude", "cop_activation", "taylor")
DATA_CRITERIA = ("cop_activation", "taylor")


def column_energy(rec, columns):
    """Squared norm of consumer ``rec``'s input columns (summed over outputs and kernel positions)."""
    w = rec.pruner.kernel(rec.module).double()
    return (w[:, torch.as_tensor(columns, dtype=torch.long)] ** 2).sum((0, 2)).cpu().numpy()


def bn_relu_energy(gamma, beta):
    """E[relu(gamma * z + beta)^2] for z ~ N(0, 1), elementwise (numpy arrays)."""
    g = np.abs(np.asarray(gamma, dtype=np.float64))
    b = np.asarray(beta, dtype=np.float64)
    safe = np.maximum(g, 1e-12)
    t = b / safe
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(t / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    return np.where(g > 1e-12, (b * b + g * g) * cdf + b * g * pdf, np.maximum(b, 0.0) ** 2)


def _group_norms(group):
    """Affine BatchNorm-like records over exactly this group's units: (record, local unit per channel)."""
    out = []
    for rec in group.members:
        if rec.kind != "norm" or getattr(rec.module, "weight", None) is None:
            continue
        local = rec.out_units - group.offset
        if len(local) == group.size and ((local >= 0) & (local < group.size)).all():
            out.append((rec, local))
    return out


def magnitude_strength(group):
    """``cop_magnitude``'s m per unit of ``group``: consumer column norm times the BatchNorm-folded scale,
    normalised to a largest value of 1 (all ones when nothing is known)."""
    n = group.size
    w2 = np.zeros(n)
    for rec in group.consumers:
        cols = consumer_columns(rec, group)
        if cols is not None:
            w2[cols[1]] += column_energy(rec, cols[0])
    norms = _group_norms(group)
    energy = np.ones(n)
    if norms:
        energy = np.zeros(n)
        for rec, local in norms:
            e = bn_relu_energy(rec.module.weight.detach().cpu().numpy(), rec.module.bias.detach().cpu().numpy()
                               if rec.module.bias is not None else 0.0)
            energy[local] += e / len(norms)
    m = np.sqrt(w2 * energy)
    return m / m.max() if m.max() > 0 else np.ones(n)


def _consumer_parts(graph):
    """{module: [(group index, record, columns, units)]} for every consumer of a prunable group."""
    parts = {}
    for g in graph.prunable_groups():
        for rec in g.consumers:
            cols = consumer_columns(rec, g)
            if cols is not None:
                parts.setdefault(rec.module, []).append((g.index, rec, cols[0], cols[1]))
    return parts


def _rows(x, columns):
    """(samples, k) matrix of the selected channels of a (N, C, ...) tensor."""
    x = x[:, torch.as_tensor(columns, dtype=torch.long, device=x.device)]
    return x.movedim(1, -1).reshape(-1, len(columns)) if x.dim() > 2 else x


@torch.no_grad()
def activation_statistics(graph, images, batch_size=32):
    """Channel covariances at each consumer input on ``images``: {group index: [(cov, units, w2)]}."""
    parts = _consumer_parts(graph)
    acc = {}  # (module, part index) -> [count, sum, sum of outer products]

    def hook(module, args):
        x = args[0]
        for p, (gi, rec, columns, units) in enumerate(parts[module]):
            rows = _rows(x, columns).double()
            entry = acc.setdefault((module, p), [0, 0.0, 0.0])
            entry[0] += rows.shape[0]
            entry[1] = entry[1] + rows.sum(0)
            entry[2] = entry[2] + rows.t() @ rows

    model = graph.model
    handles = [m.register_forward_pre_hook(hook) for m in parts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = {}
    for (module, p), (count, total, outer) in acc.items():
        gi, rec, columns, units = parts[module][p]
        mean = total / count
        cov = (outer / count - torch.outer(mean, mean)).cpu().numpy()
        stats.setdefault(gi, []).append((cov, units, column_energy(rec, columns)))
    return stats


def taylor_scores(graph, images, batch_size=16, projections=4, seed=0):
    """``taylor``'s t per unit: {group index: array}. See the module docstring. ``projections=None`` uses every
    embedding axis as v instead of random directions (exact, one backward pass per embedding dimension)."""
    parts = _consumer_parts(graph)
    model = graph.model
    masks = []

    def hook(module, args):
        x = args[0]
        mask = torch.ones(x.shape[:2] + (1,) * (x.dim() - 2), dtype=x.dtype, device=x.device, requires_grad=True)
        masks.append((module, mask))
        return (x * mask,) + tuple(args[1:])

    scores = {g.index: np.zeros(g.size) for g in graph.prunable_groups()}
    gen = torch.Generator().manual_seed(seed)
    handles = [m.register_forward_pre_hook(hook) for m in parts]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size]
                passes = projections
                p = 0
                while p < (passes or 1):
                    masks.clear()
                    out = [o for o in tree_flatten(model(x))[0] if isinstance(o, torch.Tensor)][0]
                    if projections is None:  # axis p of the embedding
                        passes = out[0].numel()
                        v = torch.zeros_like(out).reshape(len(out), -1)
                        v[:, p] = 1.0
                        v = v.reshape(out.shape)
                    else:
                        v = torch.randn(out.shape, generator=gen).to(out)
                    p += 1
                    grads = torch.autograd.grad((out * v).sum(), [m for _, m in masks], allow_unused=True)
                    contrib = {gi: np.zeros((len(x), s.size)) for gi, s in scores.items()}
                    for (module, _), grad in zip(masks, grads):
                        if grad is None:
                            continue
                        grad = grad.reshape(grad.shape[0], grad.shape[1]).double().cpu().numpy()
                        for gi, rec, columns, units in parts[module]:
                            np.add.at(contrib[gi], (slice(None), units), grad[:, columns])
                    for gi, c in contrib.items():
                        scores[gi] += (c ** 2).sum(0) / (projections or 1)
    finally:
        masks.clear()
        for h in handles:
            h.remove()
        model.train(was_training)
    return scores


def relative_redundancy(value, reference=None):
    """r = 1 - sqrt(value) / sqrt(reference) (reference: the largest value), clipped to [0, 1]."""
    value = np.sqrt(np.maximum(np.asarray(value, dtype=np.float64), 0.0))
    ref = value.max() if reference is None else math.sqrt(max(reference, 0.0))
    if ref <= 0:
        return np.ones_like(value)
    return np.clip(1.0 - value / ref, 0.0, 1.0)


class ActivationState(StaticState):
    """``cop_activation``: unexplained variance from the channel covariances, downdated as units go.

    Args:
        parts: [(covariance over ``units``, local unit indices, consumer column energies w2)], one per consumer.
        ridge: added to each covariance's diagonal, relative to its mean variance (keeps the inverse finite when
            channels are exactly collinear: a copy then has unexplained variance near 0, as it should).
    """

    def __init__(self, group, parts, ridge=1e-6):
        self.parts = []
        for cov, units, w2 in parts:
            cov = np.asarray(cov, dtype=np.float64)
            scale = max(float(np.mean(np.diag(cov))), 1e-12)
            precision = np.linalg.inv(cov + ridge * scale * np.eye(len(units)))
            self.parts.append([precision, np.asarray(units), np.asarray(w2, dtype=np.float64),
                               np.ones(len(units), dtype=bool)])
        self.covered = np.zeros(group.size, dtype=bool)
        for _, units, _, _ in self.parts:
            self.covered[units] = True
        damage = self.damage()
        self.reference = float(damage[self.covered].max()) if self.covered.any() else 0.0
        super().__init__(group, self._redundancy(damage))

    def damage(self):
        d = np.zeros(self.covered.shape[0])
        for precision, units, w2, live in self.parts:
            d[units[live]] += w2[live] / np.maximum(np.diag(precision)[live], 1e-300)
        return d

    def _redundancy(self, damage):
        r = relative_redundancy(damage, self.reference)
        r[~self.covered] = 0.0  # no statistics: treated as the most important units of the group
        return r

    def remove(self, u):
        super().remove(u)
        for part in self.parts:
            precision, units, _, live = part
            hit = np.flatnonzero(units == u)
            if not len(hit):
                continue
            j = int(hit[0])
            pivot = precision[j, j]
            if pivot > 0:
                precision -= np.outer(precision[:, j], precision[j, :]) / pivot
            precision[j, :] = 0.0
            precision[:, j] = 0.0
            live[j] = False
        r = self._redundancy(self.damage())
        self.r = np.where(self.alive, r, self.r)
        self.r_live = np.where(self.alive, r, -np.inf)
