"""Identity-balanced sampling for distributed training.

:class:`DistributedRandomIdentitySampler` gives every rank torchreid's ``RandomIdentitySampler`` batches (P
identities x K images, P = batch_size // num_instances), drawn from a shard of the identities that no other rank
sees in that epoch. Every rank computes the same per-epoch random plan from ``seed`` and the epoch set with
:meth:`~DistributedRandomIdentitySampler.set_epoch`, so no communication is needed and epochs are reproducible.
All ranks yield the same number of batches (collectives in the training step would otherwise wait forever for
the rank that ran out).

:func:`build_distributed_train_sampler` maps torchreid's ``sampler.train_sampler`` names to distributed samplers,
:class:`ShardSampler` splits an evaluation set between ranks without padding, :func:`rebuild_loader` makes a
DataLoader like torchreid's with another sampler, and :func:`distribute_train_loaders` gives a torchreid data
manager distributed train loaders.
"""
from collections import defaultdict

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..utils.distributed import get_rank, get_world_size

__all__ = ["DistributedRandomIdentitySampler", "ShardSampler", "build_distributed_train_sampler", "rebuild_loader",
           "distribute_train_loaders", "DISTRIBUTED_TRAIN_SAMPLERS"]

# torchreid sampler name -> what it becomes under distributed training
DISTRIBUTED_TRAIN_SAMPLERS = ("RandomIdentitySampler", "RandomSampler", "SequentialSampler")


def _replicas_and_rank(num_replicas, rank):
    """Fill in the process group's world size / rank where not given, and check them."""
    num_replicas = get_world_size() if num_replicas is None else num_replicas
    rank = get_rank() if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank={rank} is not valid for num_replicas={num_replicas}")
    return int(num_replicas), int(rank)


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
            raise ValueError(
                f"batch_size={batch_size} must be at least num_instances={num_instances} (and num_instances >= 1)"
            )
        if batch_size % num_instances:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of num_instances={num_instances} so that every batch "
                "holds whole identities; change sampler.num_instances or the train batch size"
            )
        num_replicas, rank = _replicas_and_rank(num_replicas, rank)
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
            raise ValueError(
                f"the training set has {len(self.pids)} identities but {self.num_replicas} ranks x "
                f"{self.num_pids_per_batch} identities per batch need at least {needed}; lower the batch size, "
                "raise num_instances, or use fewer processes"
            )
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
        return [idxs[i : i + self.num_instances].tolist() for i in range(0, usable, self.num_instances)]

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
        per_rank = [
            self._batches(np.random.default_rng([self.seed, epoch, r]), shard, chunks) for r, shard in enumerate(shards)
        ]
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

    def __repr__(self):
        return (
            f"{type(self).__name__}(P={self.num_pids_per_batch}, K={self.num_instances}, "
            f"rank={self.rank}/{self.num_replicas}, seed={self.seed}, epoch={self.epoch}, identities={len(self.pids)})"
        )


class ShardSampler(Sampler):
    """Indices ``rank, rank + num_replicas, ...`` of a dataset of ``length`` items, in order, without padding:
    the ranks' shards are disjoint and together cover every item exactly once (for distributed evaluation,
    where duplicated items would distort the metrics). Shards differ in size by at most one item."""

    def __init__(self, length, num_replicas=None, rank=None):
        num_replicas, rank = _replicas_and_rank(num_replicas, rank)
        self.length, self.num_replicas, self.rank = int(length), int(num_replicas), int(rank)

    def __iter__(self):
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.length, self.num_replicas))


def build_distributed_train_sampler(
    data_source, train_sampler, batch_size, num_instances=4, seed=0, num_replicas=None, rank=None
):
    """The distributed counterpart of torchreid's ``build_train_sampler`` for ``train_sampler``:

    - ``RandomIdentitySampler`` -> :class:`DistributedRandomIdentitySampler` (P x K on disjoint identity shards);
    - ``RandomSampler`` -> ``torch.utils.data.DistributedSampler`` (shuffled, ``seed``);
    - ``SequentialSampler`` -> ``DistributedSampler`` without shuffling.

    The DistributedSampler pads the shards to equal length, so with ``drop_last=True`` every rank gets the same
    number of batches. Call ``set_epoch(epoch)`` on the sampler at every epoch start.
    """
    num_replicas, rank = _replicas_and_rank(num_replicas, rank)
    if train_sampler == "RandomIdentitySampler":
        return DistributedRandomIdentitySampler(
            data_source, batch_size, num_instances, num_replicas=num_replicas, rank=rank, seed=seed
        )
    if train_sampler in ("RandomSampler", "SequentialSampler"):
        return DistributedSampler(
            data_source,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=train_sampler == "RandomSampler",
            seed=seed,
            drop_last=False,
        )
    raise ValueError(
        f"sampler.train_sampler={train_sampler!r} has no distributed version; use one of "
        f"{', '.join(DISTRIBUTED_TRAIN_SAMPLERS)} for multi-process training"
    )


def rebuild_loader(loader, sampler, drop_last=None):
    """A DataLoader over ``loader``'s dataset with the same batch size, workers, pinning and collation but
    ``sampler`` (and ``drop_last`` if given)."""
    if loader.batch_size is None:
        raise ValueError("rebuild_loader needs a loader with a batch_size (not a batch_sampler)")
    kwargs = dict(
        batch_size=loader.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last if drop_last is None else drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
    )
    if loader.num_workers > 0:
        kwargs.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    return DataLoader(loader.dataset, **kwargs)


def distribute_train_loaders(
    datamanager, train_sampler, num_instances=4, seed=0, train_sampler_t=None, num_replicas=None, rank=None
):
    """Replace ``datamanager.train_loader`` (and ``train_loader_t`` when the target train sets are loaded) of a
    torchreid data manager by loaders with the distributed samplers of :func:`build_distributed_train_sampler`,
    keeping their per-rank batch size, workers and ``drop_last=True``. Returns the data manager.

    ``train_sampler`` / ``train_sampler_t`` are torchreid's sampler names (``sampler.train_sampler`` /
    ``sampler.train_sampler_t``); ``train_sampler_t`` defaults to ``train_sampler``.
    """
    specs = [("train_loader", train_sampler)]
    if getattr(datamanager, "train_loader_t", None) is not None:
        specs.append(("train_loader_t", train_sampler_t or train_sampler))
    for attr, name in specs:
        loader = getattr(datamanager, attr)
        sampler = build_distributed_train_sampler(
            loader.dataset.train,
            name,
            loader.batch_size,
            num_instances=num_instances,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        setattr(datamanager, attr, rebuild_loader(loader, sampler, drop_last=True))
    return datamanager
