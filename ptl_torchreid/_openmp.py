"""OpenMP waiting for our entry points: chosen from how busy the CPUs are, before torch loads its OpenMP runtime.

torch's OpenMP threads (libgomp) spin a while before they sleep when they wait for work. On idle cores that is
the fastest setting. When other processes share the cores, the spinning burns CPU time those processes (or our
own other threads) need, and a training step gets several times slower (docs/BENCHMARKS.md, "CPU threads"):
there passive waiting is much faster. libgomp reads its settings once, when it is loaded by ``import torch``, so
this module runs first in ``ptl_torchreid/__init__.py`` (every entry point: the ``ptl-torchreid`` script,
``python -m ptl_torchreid``, the ``tools/`` scripts, imports the package before torch). It uses only the
standard library and imports nothing from the package.

It sets ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep at least :data:`BUSY_CPUS` CPUs busy during a
short sample at import, and leaves libgomp's default otherwise. It does nothing when the user has set one of the
variables that control waiting, or when the OpenMP runtime is loaded already (torch was imported first: the
setting would no longer apply to this process, only to its children). ``ptl_torchreid.utils.cpu_threads``
reports what is in effect.
"""
import os
import sys
import time

WAIT_POLICY = "PASSIVE"
# Variables with which a user (or a launcher) has already chosen how OpenMP threads wait: libgomp's, the
# standard one, and Intel OpenMP's.
USER_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Other processes' CPU use from which waiting is passive: half a CPU means another job runs on our cores.
BUSY_CPUS = 0.5
SAMPLE_SECONDS = 0.1


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


def _busy_ticks():
    """(busy, total) clock ticks of all CPUs from the first line of ``/proc/stat``."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def other_cpu_load(interval=SAMPLE_SECONDS):
    """CPUs kept busy by other processes over ``interval`` seconds (this process's own CPU time excluded);
    the 1-minute load average where ``/proc/stat`` is missing."""
    try:
        (busy0, total0), own0 = _busy_ticks(), time.process_time()
        time.sleep(interval)
        (busy1, total1), own1 = _busy_ticks(), time.process_time()
    except (OSError, ValueError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    cpus = os.cpu_count() or 1
    busy = cpus * (busy1 - busy0) / max(1, total1 - total0)
    return max(0.0, busy - (own1 - own0) / interval)


def choose_wait_policy(load):
    """``'PASSIVE'`` when other processes keep ``load`` >= :data:`BUSY_CPUS` CPUs busy, else None (the default)."""
    return WAIT_POLICY if load >= BUSY_CPUS else None


def set_openmp_waiting(environ=None, load=None):
    """Set passive waiting in ``environ`` (default ``os.environ``) when the CPUs are busy (``load``: measured when
    None), unless the user chose or it is too late. Returns what was set, ``{}`` when nothing was."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in USER_WAIT_VARIABLES) or openmp_runtime_loaded():
        return {}
    policy = choose_wait_policy(other_cpu_load() if load is None else load)
    if policy is None:
        return {}
    environ["OMP_WAIT_POLICY"] = policy
    return {"OMP_WAIT_POLICY": policy}


set_openmp_waiting()
