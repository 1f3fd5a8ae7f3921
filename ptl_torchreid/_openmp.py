"""OpenMP waiting for our entry points: passive unless the user chose, set before torch loads its OpenMP runtime.

torch's OpenMP threads (libgomp) spin while they wait for work. When other processes share the cores, the
spinning burns CPU time those processes (or our own other threads) need. libgomp reads its settings once, when
it is loaded by ``import torch``, so this module runs first in ``ptl_torchreid/__init__.py`` (every entry point:
the ``ptl-torchreid`` script, ``python -m ptl_torchreid``, the ``tools/`` scripts, imports the package before
torch). It uses only the standard library and imports nothing from the package.

It sets ``OMP_WAIT_POLICY=PASSIVE`` only when the user has set none of the variables that control waiting and
the OpenMP runtime is not loaded yet (when torch was imported first, the setting would no longer apply to this
process, only to its child processes, so it is left alone). ``ptl_torchreid.utils.cpu_threads`` reports what
is in effect.
"""
import os
import sys

WAIT_POLICY = "PASSIVE"
# Variables with which a user (or a launcher) has already chosen how OpenMP threads wait: libgomp's, the
# standard one, and Intel OpenMP's.
USER_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def openmp_runtime_loaded():
    """Whether an OpenMP runtime is mapped into this process already (Linux; elsewhere: whether torch is)."""
    if "torch" in sys.modules:
        return True
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return False
    return any(lib in maps for lib in ("libgomp", "libiomp", "libomp."))


def set_openmp_waiting(environ=None):
    """Set passive waiting in ``environ`` (default ``os.environ``) unless the user chose or it is too late.
    Returns what was set, ``{}`` when nothing was."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in USER_WAIT_VARIABLES) or openmp_runtime_loaded():
        return {}
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return {"OMP_WAIT_POLICY": WAIT_POLICY}


set_openmp_waiting()
