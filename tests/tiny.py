"""Settings of the tiny runs that the engine, CLI, resume and safety tests train: seconds each on a CPU; and
where the shared model-zoo checkpoint lives."""
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

# Tiny synthetic dataset, 64x32 images, P x K = 2 x 2 batches, no loader workers.
TINY_DATA = [
    "data.sources", "['synthetic_reid']", "data.targets", "['synthetic_reid']",
    "data.synthetic.num_train_ids", "4", "data.synthetic.num_test_ids", "3",
    "data.synthetic.num_cameras", "2", "data.synthetic.images_per_id_per_camera", "2",
    "data.height", "64", "data.width", "32", "data.workers", "0",
    "sampler.train_sampler", "RandomIdentitySampler", "sampler.num_instances", "2",
]

# ptl_osnet_x0_25 from scratch on the CPU, one quiet epoch.
TINY_RUN = TINY_DATA + [
    "model.name", "ptl_osnet_x0_25", "model.pretrained", "False", "use_gpu", "False",
    "train.batch_size", "4", "train.max_epoch", "1", "train.progress_bar", "False", "train.print_freq", "1000",
    "test.batch_size", "16",
]


def run_opts(root, save_dir, *extra):
    """TINY_RUN for a data root and a save dir, then ``extra`` overrides (later keys win)."""
    return TINY_RUN + ["data.root", str(root), "data.save_dir", str(save_dir)] + list(extra)


# Runs ``main(args)`` in a subprocess whose ``call``-th checkpoint write stops half-way: it writes a few bytes,
# creates the file ``marker`` and waits (up to 120 s) for the file ``go``, then writes the checkpoint in full.
# argv: marker go args...
PAUSING_SAVE_SCRIPT = """
import os, sys, time
import torch
from ptl_torchreid.cli import main

call, marker, go, args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
real_save, calls = torch.save, []
def save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == call:
        f.write(b"half a checkpoint")
        f.flush()
        open(marker, "w").close()
        deadline = time.time() + 120
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.05)
        f.seek(0)
        f.truncate()
    return real_save(obj, f, *a, **k)
torch.save = save
sys.exit(main(args))
"""


def shared_weights():
    """The torchreid model-zoo file ``osnet_x0_25_msmt17.pth`` beside the checkout (or under $PTL_SHARED_DIR);
    skips the test where it is absent."""
    root = os.environ.get("PTL_SHARED_DIR") or osp.join(osp.dirname(__file__), "..", "..", "shared")
    path = osp.join(root, "weights", "osnet_x0_25_msmt17.pth")
    if not osp.isfile(path):
        pytest.skip("model-zoo file not available: " + path)
    return path


def run_tool(script, *args, timeout=1800):
    """Runs ``tools/<script>`` with ``args`` as a user does, on this checkout's package; returns the finished
    process (stdout and stderr as text)."""
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, osp.join(REPO, "tools", script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
