"""Images for the checks, from a torchreid ``ImageDataManager``: the test sets, a few test images for the
batch-size parity check, and a calibration subset of the training set (test-time transform, no augmentation)."""
import numpy as np
import torch

from .. import _torchreid

__all__ = ["test_sets", "first_images", "calibration_batches"]


def test_sets(datamanager):
    """``[(target name, query loader, gallery loader)]`` of every evaluation target."""
    return [(name, loaders["query"], loaders["gallery"]) for name, loaders in datamanager.test_loader.items()]


def first_images(loaders, count):
    """The first ``count`` preprocessed images of the loaders, in order (fewer if they hold fewer), as numpy."""
    out, total = [], 0
    for loader in loaders:
        for batch in loader:
            imgs = batch["img"] if isinstance(batch, dict) else batch[0]
            out.append(imgs.numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs))
            total += len(out[-1])
            if total >= count:
                return np.concatenate(out)[:count]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def calibration_batches(datamanager, num_images=300, batch_size=8, seed=0):
    """A seeded random subset of ``num_images`` training images, preprocessed with the test transform, as numpy
    batches of ``batch_size`` (the data NNCF calibrates INT8 ranges on)."""
    items = datamanager.train_loader.dataset.train
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(items), size=min(int(num_images), len(items)), replace=False)
    read_image = _torchreid.torchreid.utils.read_image
    images = [datamanager.transform_te(read_image(items[i][0])).numpy() for i in sorted(picked)]
    return [np.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
