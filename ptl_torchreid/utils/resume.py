"""Exact resume: random-number-generator states and a training data order that can restart mid-epoch.

A run resumed from a checkpoint continues exactly as if it had never stopped when three things come back:

* the global RNG states (Python ``random``, numpy, torch CPU and CUDA), captured with :func:`capture_rng_state`
  into plain values a weights-only checkpoint can hold, and put back with :func:`restore_rng_state`;
* the order of the epoch's samples: :class:`EpochLoader` draws it from the torchreid sampler under an RNG seeded
  from ``(seed, epoch)`` alone, so the resumed process recomputes the same order and skips the batches already
  consumed, at the index level (no image of a skipped batch is read);
* the random augmentation of each sample: every sample is transformed under an RNG seeded from
  ``(seed, epoch, position in the epoch)``, so what a sample gets does not depend on which DataLoader worker
  loads it, on how many batches came before it in this process, or on the number of workers.

Nothing here touches the global RNG streams the model uses: orders and augmentations run in forked RNG states.
"""
import contextlib
import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .distributed import get_rank

__all__ = ["capture_rng_state", "restore_rng_state", "derive_seed", "seeded_rng", "EpochLoader"]

# Distinct streams derived from one (seed, epoch).
_ORDER, _SAMPLES, _LOADER = 0, 1, 2


def derive_seed(*keys):
    """A 63-bit seed from non-negative integers (``numpy.random.SeedSequence``: well mixed, order-sensitive)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_rng(seed):
    """Run the block with Python ``random``, numpy's global RNG and torch's CPU generator seeded from ``seed``;
    restore their previous states afterwards, so the surrounding code sees no RNG consumption."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.default_generator.set_state(cpu)


def capture_rng_state():
    """The global RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state):
    """Inverse of :func:`capture_rng_state`. A CUDA state is restored when this process has as many CUDA devices
    as the one that saved it; otherwise a warning says that CUDA random streams will differ."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])
        else:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warnings.warn(
                f"the checkpoint holds the RNG states of {len(cuda)} CUDA device(s) but this process has {have}; "
                "CUDA random streams (e.g. dropout on the GPU) will differ from the interrupted run"
            )


class _SeededSamples(Dataset):
    """Items are ``(index, seed)``: ``dataset[index]`` computed under :func:`seeded_rng` ``(seed)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with seeded_rng(seed):
            return self.dataset[index]


class _Batches:
    """A fixed list of batches, used as a DataLoader ``batch_sampler``."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class EpochLoader:
    """The batches of a training DataLoader as a function of ``(seed, epoch)``, startable at any batch.

    Args:
        loader: the torchreid training DataLoader (its dataset, batch sampler, workers, collation and pinning are
            used; a sampler with ``set_epoch`` gets the epoch first, as DistributedSampler needs).
        seed: the run's seed (``train.seed``).

    ``plan(epoch)`` is the list of batches (dataset indices); ``batches(epoch, start)`` is an iterable over the
    loaded batches ``start, start + 1, ...`` of that plan. The plan of an epoch is cached, so ``plan`` and
    ``batches`` agree even for samplers whose length varies between epochs (torchreid's RandomIdentitySampler).
    """

    def __init__(self, loader, seed):
        if loader.batch_sampler is None:
            raise ValueError("EpochLoader needs a DataLoader that batches (batch_size or batch_sampler)")
        self.loader = loader
        self.seed = int(seed)
        self._cached = (None, None)

    def plan(self, epoch):
        epoch = int(epoch)
        if self._cached[0] != epoch:
            sampler = self.loader.sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            with seeded_rng(derive_seed(self.seed, epoch, get_rank(), _ORDER)):
                batches = [[int(i) for i in batch] for batch in self.loader.batch_sampler]
            self._cached = (epoch, batches)
        return self._cached[1]

    def sample_seeds(self, epoch, num_samples):
        """One seed per sample position of the epoch (a pure function of the seed, the epoch and the rank)."""
        rng = np.random.default_rng([self.seed, int(epoch), get_rank(), _SAMPLES])
        return rng.integers(0, 1 << 63, size=num_samples, dtype=np.int64).tolist()

    def batches(self, epoch, start=0):
        """A DataLoader over batches ``start..`` of ``plan(epoch)``; each sample is augmented under its own seed."""
        plan = self.plan(epoch)
        seeds = iter(self.sample_seeds(epoch, sum(len(b) for b in plan)))
        seeded = [[(i, next(seeds)) for i in batch] for batch in plan]
        src = self.loader
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, epoch, get_rank(), _LOADER))
        kwargs = dict(
            batch_sampler=_Batches(seeded[int(start) :]),
            num_workers=src.num_workers,
            collate_fn=src.collate_fn,
            pin_memory=src.pin_memory,
            timeout=src.timeout,
            worker_init_fn=src.worker_init_fn,
            multiprocessing_context=src.multiprocessing_context,
            generator=generator,
        )
        if src.num_workers > 0:
            kwargs["prefetch_factor"] = src.prefetch_factor
        return DataLoader(_SeededSamples(src.dataset), **kwargs)
