"""Identity-balanced sampling for distributed training.

:class:`DistributedRandomIdentitySampler` gives every rank torchreid's ``RandomIdentitySampler`` batches (P
identities x K images, P = batch_size // num_instances), drawn from a shard of the identities that no other rank
sees in that epoch. Every rank computes the same per-epoch random plan from ``seed`` and the epoch set with
:meth:`~DistributedRandomIdentitySampler.set_epoch`, so no communication is needed and epochs are reproducible.
All ranks yield the same number of batches (collectives in the training step would otherwise wait forever for
the rank that ran out).
"""
from collections import defaultdict

import numpy as np
from torch.utils.data import Sampler

__all__ = ["DistributedRandomIdentitySampler"]


def _default_replicas_and_rank():
    from ..utils.distributed import get_rank, get_world_size
    return get_world_size(), get_rank()


class DistributedRandomIdentitySampler(Sampler):
    """P x K identity sampler over disjoint per-epoch identity shards.

    Args:
        data_source: torchreid's train list of ``(img_path, pid, camid[, dsetid])`` tuples, the same on every rank.
        batch_size: images per batch on each rank (torchreid's ``train_batch_size``; the global batch is
            ``batch_size * num_replicas``). A multiple of ``num_instances``.
        num_instances: K, images per identity in a batch.
        num_replicas, rank: world size and this process's rank; default from the process group (1 and 0
            without one).
        seed: base seed, the same on all ranks; epoch ``e`` uses the plan of ``(seed, e)``.

    Each epoch the identities are shuffled and dealt to the ranks so that the shards hold nearly equal numbers of
    K-image chunks; each rank then forms batches as ``RandomIdentitySampler`` does (an identity with fewer than K
    images is sampled with replacement, leftover images that do not fill a chunk are dropped, batches stop when
    fewer than P identities have chunks left). Every rank is cut to the smallest rank's batch count.
    Use it with a DataLoader of the same ``batch_size`` and ``drop_last=True`` (as torchreid builds it).
    """

    def __init__(self, data_source, batch_size, num_instances, num_replicas=None, rank=None, seed=0):
        if num_instances < 1 or batch_size < num_instances:
            raise ValueError("batch_size={} must be at least num_instances={} (and num_instances >= 1)".format(
                batch_size, num_instances))
        if batch_size % num_instances:
            raise ValueError("batch_size={} must be a multiple of num_instances={} so that every batch holds whole "
                             "identities; change sampler.num_instances or the train batch size".format(
                                 batch_size, num_instances))
        if num_replicas is None or rank is None:
            world, this_rank = _default_replicas_and_rank()
            num_replicas = world if num_replicas is None else num_replicas
            rank = this_rank if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError("rank={} is not valid for num_replicas={}".format(rank, num_replicas))
        self.data_source = data_source
        self.batch_size = int(batch_size)
        self.num_instances = int(num_instances)
        self.num_pids_per_batch = self.batch_size // self.num_instances
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = 0

        index_dic = defaultdict(list)
        for index, items in enumerate(data_source):
            index_dic[items[1]].append(index)
        self.pids = sorted(index_dic)  # data_source order is the same everywhere; sorting removes any doubt
        self.index_dic = {pid: index_dic[pid] for pid in self.pids}
        needed = self.num_pids_per_batch * self.num_replicas
        if len(self.pids) < needed:
            raise ValueError("the training set has {} identities but {} ranks x {} identities per batch need at "
                             "least {}; lower the batch size, raise num_instances, or use fewer processes".format(
                                 len(self.pids), self.num_replicas, self.num_pids_per_batch, needed))
        self._cache = (None, None)

    def set_epoch(self, epoch):
        """Select the plan of ``epoch``; call it at every epoch start, with the same value on all ranks."""
        self.epoch = int(epoch)

    # -- planning -----------------------------------------------------------------------------------------------
    def _chunks(self, rng, pid):
        idxs = np.asarray(self.index_dic[pid])
        if len(idxs) < self.num_instances:
            idxs = rng.choice(idxs, size=self.num_instances, replace=True)
        idxs = rng.permutation(idxs)
        usable = len(idxs) - len(idxs) % self.num_instances
        return [idxs[i:i + self.num_instances].tolist() for i in range(0, usable, self.num_instances)]

    def _shards(self, rng, chunks):
        """Deal shuffled identities to the rank whose shard has the fewest chunks so far."""
        shards = [[] for _ in range(self.num_replicas)]
        load = [0] * self.num_replicas
        for i in rng.permutation(len(self.pids)):
            pid = self.pids[i]
            r = min(range(self.num_replicas), key=lambda k: (load[k], k))
            shards[r].append(pid)
            load[r] += len(chunks[pid])
        return shards

    def _batches(self, rng, shard, chunks):
        remaining = {pid: list(chunks[pid]) for pid in shard}
        available = list(shard)
        batches = []
        while len(available) >= self.num_pids_per_batch:
            picked = rng.choice(len(available), size=self.num_pids_per_batch, replace=False)
            batch, emptied = [], []
            for j in picked:
                pid = available[j]
                batch.extend(remaining[pid].pop(0))
                if not remaining[pid]:
                    emptied.append(pid)
            for pid in emptied:
                available.remove(pid)
            batches.append(batch)
        return batches

    def plan(self, epoch=None):
        """The batches (lists of dataset indices) of every rank for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        chunks = {pid: self._chunks(rng, pid) for pid in self.pids}
        shards = self._shards(rng, chunks)
        per_rank = [self._batches(np.random.default_rng([self.seed, epoch, r]), shard, chunks)
                    for r, shard in enumerate(shards)]
        n = min(len(b) for b in per_rank)
        return [b[:n] for b in per_rank]

    def _indices(self):
        if self._cache[0] != self.epoch:
            batches = self.plan()[self.rank]
            self._cache = (self.epoch, [i for b in batches for i in b])
        return self._cache[1]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self):
        return len(self._indices())

    @property
    def num_batches(self):
        """Batches per rank in the current epoch (the same on every rank)."""
        return len(self) // self.batch_size

    def __repr__(self):
        return "{}(P={}, K={}, rank={}/{}, seed={}, epoch={}, identities={})".format(
            type(self).__name__, self.num_pids_per_batch, self.num_instances, self.rank, self.num_replicas,
            self.seed, self.epoch, len(self.pids))

