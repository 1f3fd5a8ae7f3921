"""The COP criterion (Wang et al., IJCAI 2019): correlation-based redundancy plus cost-aware importance.

For a layer l with filters i, j and its consumer layer's kernel W (out, in, k, k):

    C(i, j) = mean over kernel positions p of |Pearson(W[:, i, p], W[:, j, p])|     (vectors over consumer outputs)
    C <- C / max off-diagonal C                                                       (per-layer normalisation)
    r_i  = mean of the top-k normalised off-diagonal correlations of filter i        (redundancy)
    F_hat = log2 F_l / max_l log2 F_l,  P_hat = log2 P_l / max_l log2 P_l             (FLOPs / params of l + consumer)
    importance_i = alpha * (1 - r_i) + beta * (1 - F_hat_l) + gamma * (1 - P_hat_l)

Filters are removed by global argmin one at a time; the removed filter's row and column of its layer's matrix are
zeroed (so the redundancy of its neighbours drops) and the cost terms are recomputed after every cut.

On top of the paper, the unit of scoring is a dependency-graph *group* (see ``graph``): a plain layer, or layers
coupled by residual additions. A group's correlation averages over all layers that consume its channels (weighted
by their number of output channels), which is the paper's per-layer matrix when there is one consumer. Its
F_l / P_l are the FLOPs / parameters of every layer that touches its channels (producers, consumers, BatchNorm,
depthwise convs) divided by its number of producing layers: the cost of one layer plus its consumer, averaged
over the coupled layers. A filter whose consumers' weights are all zero feeds nothing and gets the highest redundancy.
"""
import math

import numpy as np
import torch

__all__ = ["PRESETS", "PRESET_OPTIONS", "GROUP_COSTS", "pearson_correlation", "normalize_correlation", "redundancy",
           "importance", "group_correlation", "correlation_state", "CostModel", "COPSelector"]

GROUP_COSTS = ("mean", "sum")

PRESETS = {
    "faster": (1.0, 3.0, 0.0),    # weights FLOPs: prefers layers that cost the most computation
    "smaller": (1.0, 0.0, 3.0),   # weights parameters: prefers layers that hold the most weights
    "balanced": (1.0, 1.0, 1.0),
}
# Further per-preset defaults of prune_cop. "faster" keeps channel counts that vectorised kernels like (multiples
# of 16: the channel block of AVX-512 convolution kernels, and a multiple of 8 for GPU tensor cores) and lets a
# coupled (residual) group's cost count every layer its channels touch, i.e. what a cut there really saves; that is
# what turns the FLOP weighting into measured latency (tools/benchmark_prune.py).
PRESET_OPTIONS = {
    "faster": dict(round_to=16, group_cost="sum"),
    "smaller": dict(round_to=1, group_cost="mean"),
    "balanced": dict(round_to=1, group_cost="mean"),
}


def pearson_correlation(columns):
    """Mean over positions of |Pearson| between units.

    Args:
        columns: tensor (n_units, n_outputs, n_positions); ``columns[i, :, p]`` is unit i's weight vector over
            the consumer's outputs at kernel position p.
    Returns: (n_units, n_units) float64 numpy array. A constant vector correlates 0 with everything.
    """
    x = columns.double()
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    x = torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros_like(x))
    n, _, positions = x.shape
    acc = x.new_zeros(n, n)
    for p in range(positions):
        xp = x[:, :, p]
        acc += (xp @ xp.t()).abs()
    return (acc / positions).clamp_(max=1.0).cpu().numpy()


def normalize_correlation(corr):
    """Zero the diagonal and divide by the largest off-diagonal value (if any is positive)."""
    c = np.array(corr, dtype=np.float64, copy=True)
    np.fill_diagonal(c, 0.0)
    peak = c.max() if c.size else 0.0
    return c / peak if peak > 0 else c


def redundancy(corr, k=3):
    """Mean of each row's top-k entries of a normalised correlation matrix (diagonal already zero)."""
    n = corr.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros(n)
    top = np.partition(corr, n - k, axis=1)[:, n - k:]
    return top.mean(1)


def importance(r, f_hat, p_hat, alpha, beta, gamma):
    """alpha * (1 - r) + beta * (1 - F_hat) + gamma * (1 - P_hat)."""
    return alpha * (1.0 - np.asarray(r)) + beta * (1.0 - f_hat) + gamma * (1.0 - p_hat)


# -- correlation of a dependency-graph group --------------------------------------------------------------------
def group_correlation(graph, group):
    """(raw |Pearson| matrix averaged over the group's consumers, boolean 'feeds nothing' per unit)."""
    n = group.size
    total = np.zeros((n, n))
    weight = np.zeros((n, n))
    zero = np.ones(n, dtype=bool)
    for rec in group.consumers:
        local = rec.in_units - group.offset
        inside = (local >= 0) & (local < n)
        units = np.unique(local[inside])
        index = [np.flatnonzero(local == u) for u in units]
        if len({len(i) for i in index}) != 1:
            continue  # units read through different numbers of columns: not comparable
        w = rec.pruner.kernel(rec.module)
        if w.shape[0] < 2:
            continue  # Pearson needs at least two outputs
        idx = torch.from_numpy(np.stack(index)).to(w.device)                 # (units, columns)
        cols = w[:, idx.reshape(-1), :].reshape(w.shape[0], len(units), -1)  # (out, units, columns*positions)
        cols = cols.permute(1, 0, 2)
        zero[units] &= (cols == 0).reshape(len(units), -1).all(1).cpu().numpy()
        corr = pearson_correlation(cols)
        sub = np.ix_(units, units)
        total[sub] += w.shape[0] * corr
        weight[sub] += w.shape[0]
    covered = weight > 0
    total[covered] /= weight[covered]
    zero &= covered.any(1)
    return total, zero


# -- costs ------------------------------------------------------------------------------------------------------
class CostModel:
    """FLOPs (as torch.utils.flop_counter counts them: 2 x multiply-adds of convs and matmuls) and parameters of
    each traced layer, as functions of its current input/output channel counts (its pruner's ``cost``)."""

    def __init__(self, graph):
        self.graph = graph
        self.records = graph.records
        self.in_count = [len(r.in_units) for r in self.records]
        self.out_count = [len(r.out_units) for r in self.records]
        self.cost = [r.pruner.cost(r.module) for r in self.records]
        self.flops = [self._flops(i) for i in range(len(self.records))]
        self.params = [self._params(i) for i in range(len(self.records))]

    def _counts(self, i, d_in, d_out):
        return self.cost[i](self.in_count[i] - d_in, self.out_count[i] - d_out)

    def _flops(self, i, d_in=0, d_out=0):
        return 2 * self._counts(i, d_in, d_out)[0] * self.records[i].positions

    def _params(self, i, d_in=0, d_out=0):
        return self._counts(i, d_in, d_out)[1]

    def saving(self, i, d_in, d_out):
        """(FLOPs, params) record i would lose with ``d_in`` fewer inputs and ``d_out`` fewer outputs."""
        return self.flops[i] - self._flops(i, d_in, d_out), self.params[i] - self._params(i, d_in, d_out)

    def update(self, i, d_in, d_out):
        """Change record i's channel counts; returns (delta flops, delta params)."""
        self.in_count[i] -= d_in
        self.out_count[i] -= d_out
        f, p = self._flops(i), self._params(i)
        df, dp = f - self.flops[i], p - self.params[i]
        self.flops[i], self.params[i] = f, p
        return df, dp

    def total_flops(self):
        return sum(self.flops)

    def total_params(self):
        return sum(self.params)


# -- greedy selection -------------------------------------------------------------------------------------------
class StaticState:
    """Selection state of a group whose redundancy does not change as units go (``taylor``); the base of the
    states that update it."""

    def __init__(self, group, r):
        self.group = group
        self.alive = np.ones(group.size, dtype=bool)
        self.n_alive = group.size
        self.r = np.asarray(r, dtype=np.float64).copy()
        self.r_live = self.r.copy()

    def best(self):
        return int(np.argmax(self.r_live))

    def remove(self, u):
        self.alive[u] = False
        self.n_alive -= 1
        self.r_live[u] = -np.inf


class _GroupState(StaticState):
    """COP's redundancy of one group, updated as units go. ``strength`` (per unit, in [0, 1]) turns it into
    ``cop_magnitude``'s r = 1 - ((1 - r_cop) + strength) / 2."""

    def __init__(self, group, corr, zero, k, strength=None):
        n = group.size
        self.strength = None if strength is None else np.asarray(strength, dtype=np.float64)
        self.group = group
        self.corr = normalize_correlation(corr).astype(np.float32)
        self.zero = zero
        self.k = max(1, min(k, n - 1))
        self.alive = np.ones(n, dtype=bool)
        self.n_alive = n
        self.topk = np.argpartition(self.corr, n - self.k, axis=1)[:, n - self.k:]
        self.r = self._combine(self.corr[np.arange(n)[:, None], self.topk].mean(1).astype(np.float64),
                               slice(None))
        self.r[zero] = 1.0 + 1e-6  # feeds nothing: the most redundant filter there is
        self.r_live = self.r.copy()

    def _combine(self, r, rows):
        if self.strength is None:
            return r
        return 1.0 - ((1.0 - r) + self.strength[rows]) / 2.0

    def remove(self, u):
        super().remove(u)
        self.corr[u, :] = 0.0
        self.corr[:, u] = 0.0
        rows = np.flatnonzero((self.topk == u).any(1) & self.alive)
        if len(rows):
            n = self.corr.shape[0]
            sub = self.corr[rows]
            top = np.argpartition(sub, n - self.k, axis=1)[:, n - self.k:]
            self.topk[rows] = top
            r = self._combine(np.take_along_axis(sub, top, 1).mean(1), rows)
            r[self.zero[rows]] = 1.0 + 1e-6
            self.r[rows] = r
            self.r_live[rows] = r


def correlation_state(graph, group, topk=3, strength=None):
    """COP's selection state of ``group`` (``strength``: see :class:`_GroupState`)."""
    corr, zero = group_correlation(graph, group)
    return _GroupState(group, corr, zero, topk, strength)


class COPSelector:
    """Global greedy COP pruning over a :class:`~ptl_torchreid.compress.graph.ChannelGraph`.

    Args:
        graph: the dependency graph of the model.
        alpha, beta, gamma: weights of redundancy, FLOPs and parameters in the importance.
        topk: k of the redundancy.
        round_to: keep a multiple of this many channels in every group (1 = the paper's filter-by-filter
            removal). With ``round_to=8`` a selected group drops its 8 least important filters (one at a time,
            updating redundancy) so that channel counts stay friendly to vectorised kernels.
        min_channels: never keep fewer channels than this in a group.
        max_prune_ratio: never remove more than this fraction of a group's channels (1.0: no limit, the paper's
            behaviour); like Torch-Pruning's ``max_pruning_ratio``, it stops one layer being cut to a sliver.
        states: {group index: selection state} of another criterion (``compress.scores``); default: COP's
            correlation redundancy.
        weights: {group index: factor} multiplying the importance of a group's filters (``compress.weighting``);
            missing groups keep factor 1.
        group_cost: how a group of coupled layers (a residual stage) gets its F_l / P_l: ``'mean'`` over its
            producing layers (each layer plus its consumer, averaged) or ``'sum'`` (every layer its channels
            touch: what removing one of its channels saves).
    """

    def __init__(self, graph, alpha, beta, gamma, topk=3, round_to=1, min_channels=1, group_cost="mean",
                 max_prune_ratio=1.0, states=None, weights=None):
        if group_cost not in GROUP_COSTS:
            raise ValueError(f"group_cost={group_cost!r} is not valid; choose one of {', '.join(GROUP_COSTS)}")
        self.graph = graph
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.round_to = max(1, int(round_to))
        self.min_channels = max(1, int(min_channels))
        self.max_prune_ratio = float(max_prune_ratio)
        self.alive = np.ones(graph.num_units, dtype=bool)
        self.costs = CostModel(graph)
        self.flops = self.costs.total_flops()
        self.params = self.costs.total_params()
        self.removed_filters = 0
        if states is None:  # the paper's criterion
            states = {g.index: correlation_state(graph, g, topk) for g in graph.prunable_groups()}
        self.states = states
        self.order = sorted(self.states)           # prunable group indices
        self.slot = {gi: s for s, gi in enumerate(self.order)}
        self.weights = np.array([(weights or {}).get(gi, 1.0) for gi in self.order], dtype=np.float64)
        rec_index = {id(r): i for i, r in enumerate(graph.records)}
        # Which prunable groups each record's costs count towards, and each group's F_l / P_l.
        self.rec_groups = [[] for _ in graph.records]
        self.group_flops = np.zeros(len(self.order))
        self.group_params = np.zeros(len(self.order))
        self.group_cost = group_cost
        # 'mean': a coupled group costs what one of its layers plus consumer costs, on average; 'sum': all of it.
        self.group_producers = np.array([max(1, len(graph.groups[gi].producers)) if group_cost == "mean" else 1
                                         for gi in self.order], float)
        for gi in self.order:
            s = self.slot[gi]
            for r in graph.groups[gi].members:
                i = rec_index[id(r)]
                self.rec_groups[i].append(s)
                self.group_flops[s] += self.costs.flops[i]
                self.group_params[s] += self.costs.params[i]
        # Per unit: the records it touches and how many of their input/output channels it is.
        self.unit_touch = [[] for _ in range(graph.num_units)]
        self.unit_filters = np.zeros(graph.num_units, dtype=np.int64)
        for i, r in enumerate(graph.records):
            same = r.out_units is r.in_units
            ins = np.bincount(r.in_units, minlength=graph.num_units)
            outs = ins if same else np.bincount(r.out_units, minlength=graph.num_units)
            for u in np.flatnonzero(ins | outs).tolist():
                self.unit_touch[u].append((i, int(ins[u]), int(outs[u])))
            if r.pruner.produces:  # filters are the outputs of dense layers
                self.unit_filters += outs
        self.total_filters = int(sum(self.unit_filters[g.offset:g.offset + g.size].sum()
                                     for g in graph.prunable_groups()))

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _floor_keep(self, n_alive, size):
        q = self.round_to
        keep = (n_alive - 1) // q * q if q > 1 else n_alive - 1
        if q > 1 and keep < min(q, size):
            return None
        least = max(self.min_channels, math.ceil(size * (1.0 - self.max_prune_ratio) - 1e-9))
        return keep if keep >= least else None

    def next_keep(self, gi):
        """Channels group ``gi`` keeps after its next cut, or None when it cannot shrink further."""
        st = self.states[gi]
        return self._floor_keep(st.n_alive, st.group.size)

    def cost_terms(self):
        """(F_hat, P_hat) per prunable group, from the current costs."""
        logf = np.log2(np.maximum(self.group_flops / self.group_producers, 1.0))
        logp = np.log2(np.maximum(self.group_params / self.group_producers, 1.0))
        f_hat = logf / logf.max() if logf.max() > 0 else np.zeros_like(logf)
        p_hat = logp / logp.max() if logp.max() > 0 else np.zeros_like(logp)
        return f_hat, p_hat

    def group_importance(self):
        """Importance of the next filter each prunable group would lose (inf where it cannot shrink)."""
        f_hat, p_hat = self.cost_terms()
        r = np.array([self.states[gi].r_live.max() for gi in self.order])
        imp = importance(np.minimum(r, 1.0), f_hat, p_hat, self.alpha, self.beta, self.gamma) * self.weights
        blocked = np.array([self.next_keep(gi) is None for gi in self.order], dtype=bool)
        imp[blocked] = np.inf
        return imp

    def unit_importance(self, gi):
        """Importance of every unit of group ``gi`` now (removed units are inf)."""
        f_hat, p_hat = self.cost_terms()
        st = self.states[gi]
        s = self.slot[gi]
        imp = importance(np.minimum(st.r, 1.0), f_hat[s], p_hat[s], self.alpha, self.beta, self.gamma) * self.weights[s]
        imp[~st.alive] = np.inf
        return imp

    def remove_unit(self, gi, u):
        st = self.states[gi]
        st.remove(u)
        gu = st.group.offset + u
        self.alive[gu] = False
        self.removed_filters += int(self.unit_filters[gu])
        for i, d_in, d_out in self.unit_touch[gu]:
            df, dp = self.costs.update(i, d_in, d_out)
            self.flops += df
            self.params += dp
            for s in self.rec_groups[i]:
                self.group_flops[s] += df
                self.group_params[s] += dp

    def chunk_saving(self, gi):
        """(FLOPs, params, filters) the next cut of group ``gi`` would remove (from its current channel counts)."""
        st = self.states[gi]
        q = st.n_alive - self.next_keep(gi)
        d_in, d_out = {}, {}
        units = np.flatnonzero(st.alive)[:q] + st.group.offset
        for gu in units.tolist():
            for i, a, b in self.unit_touch[gu]:
                d_in[i] = d_in.get(i, 0) + a
                d_out[i] = d_out.get(i, 0) + b
        flops = params = 0
        for i in d_in:
            f, p = self.costs.saving(i, d_in[i], d_out[i])
            flops, params = flops + f, params + p
        return flops, params, int(self.unit_filters[units].sum())

    def step(self, accept=None):
        """Cut the globally least important group down to its next allowed size. Returns the list of
        (group index, unit) removed, empty when nothing can be pruned any more.

        ``accept(flops, params, filters)``, when given, judges the saving of a candidate cut; a rejected
        candidate (e.g. one overshooting the target by a whole chunk) passes the turn to the next group in
        importance order. When no candidate is accepted the least important one is cut anyway.
        """
        if not self.order:
            return []
        imp = self.group_importance()
        ranked = [s for s in np.argsort(imp, kind="stable").tolist() if math.isfinite(imp[s])]
        if not ranked:
            return []
        chosen = ranked[0]
        if accept is not None:
            chosen = next((s for s in ranked if accept(*self.chunk_saving(self.order[s]))), ranked[0])
        gi = self.order[chosen]
        st = self.states[gi]
        keep = self.next_keep(gi)
        removed = []
        while st.n_alive > keep:
            u = st.best()
            self.remove_unit(gi, u)
            removed.append((gi, u))
        return removed
