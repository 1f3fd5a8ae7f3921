"""How many CPU threads torch computes with: chosen from the CPUs this process may use and how busy they are.

torch's default is one OpenMP thread per core. When other work shares the cores, those threads wait for each
other at every parallel region while the cores run someone else, and a run gets several times slower than with
fewer threads; on a quiet machine, one thread per core is fastest. ``train.cpu_threads`` picks:

- ``'auto'`` (the default): the CPUs this process may use (its affinity mask, capped by a cgroup CPU quota),
  minus the CPUs other processes keep busy right now (sampled from ``/proc/stat`` over
  :data:`LOAD_SAMPLE_SECONDS`), rounded to the nearest whole CPU, at least 1. The processes of a distributed
  run on one machine (``LOCAL_WORLD_SIZE``, set by torchrun) share those CPUs.
- a number N: N threads. 0: torch's own default, untouched.

``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the environment (read by torch when it starts) win over ``'auto'``,
except the ``OMP_NUM_THREADS=1`` torchrun puts in place when the user set none; an explicit
``train.cpu_threads N`` wins over both. How OpenMP threads wait is set before torch is imported
(``ptl_torchreid/_openmp.py``); :func:`openmp_waiting` reports what is in effect.
"""
import dataclasses
import math
import os
import time

import torch

__all__ = ["CpuThreads", "LOAD_SAMPLE_SECONDS", "THREAD_VARIABLES", "apply_cpu_threads", "auto_threads",
           "choose_cpu_threads", "cpu_load", "describe_cpu_threads", "is_valid_setting", "local_processes",
           "openmp_waiting", "usable_cpus"]

LOAD_SAMPLE_SECONDS = 0.25
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class CpuThreads:
    """A thread-count decision: ``threads`` per process, from ``source`` (``'auto'``, ``'train.cpu_threads'``,
    an environment variable's name, or ``'torch default'``); ``cpus`` usable by this process, ``load`` (CPUs
    busy with other work; None when not measured), ``local_processes`` sharing the CPUs."""
    threads: int
    source: str
    cpus: int
    load: object = None
    local_processes: int = 1


def is_valid_setting(value):
    """Whether ``value`` is a valid ``train.cpu_threads``: ``'auto'`` or an integer >= 0."""
    if isinstance(value, str):
        return value == "auto"
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _cpu_set():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _read_first_line(path):
    try:
        with open(path) as f:
            return f.readline().split()
    except OSError:
        return None


def _cgroup_cpu_limit():
    """The CPU quota of this process's cgroup in CPUs (e.g. ``docker --cpus 2``), or None when unlimited."""
    v2 = _read_first_line("/sys/fs/cgroup/cpu.max")  # "max 100000" or "200000 100000"
    if v2 and len(v2) == 2 and v2[0] != "max":
        return int(v2[0]) / int(v2[1])
    quota = _read_first_line("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    period = _read_first_line("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota[0]) > 0:
        return int(quota[0]) / int(period[0])
    return None


def usable_cpus():
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (rounded up)."""
    cpus = len(_cpu_set())
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def _cpu_times(cpu_ids):
    """``{cpu: (busy, total)}`` clock ticks from ``/proc/stat``; busy counts user, nice, system, irq, softirq
    and steal time (a hypervisor running another guest keeps the CPU from us too)."""
    wanted = {f"cpu{i}": i for i in cpu_ids}
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in wanted:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
                busy = user + nice + system + irq + softirq + steal
                out[wanted[fields[0]]] = (busy, busy + idle + iowait)
    return out


def cpu_load(interval=LOAD_SAMPLE_SECONDS):
    """CPUs kept busy by other processes right now (0 .. number of CPUs in the affinity mask).

    Sampled over ``interval`` seconds from ``/proc/stat`` for this process's CPUs, minus this process's own CPU
    time in that window. Where ``/proc/stat`` is missing, the 1-minute load average (scaled to the share of the
    machine's CPUs this process may use) stands in for it."""
    cpu_ids = _cpu_set()
    try:
        before, own_before = _cpu_times(cpu_ids), time.process_time()
        time.sleep(interval)
        after, own_after = _cpu_times(cpu_ids), time.process_time()
    except (OSError, ValueError):
        return min(float(len(cpu_ids)), os.getloadavg()[0] * len(cpu_ids) / (os.cpu_count() or len(cpu_ids)))
    busy = 0.0
    for cpu, (busy1, total1) in after.items():
        busy0, total0 = before.get(cpu, (busy1, total1))
        if total1 > total0:
            busy += (busy1 - busy0) / (total1 - total0)
    return max(0.0, busy - (own_after - own_before) / interval)


def local_processes(environ=None):
    """Processes of this run on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE`` (a launch
    that sets only the global variables: assume one machine), else 1."""
    environ = os.environ if environ is None else environ
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = environ.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def auto_threads(cpus, load, local_processes=1, affinity_cpus=None):
    """Threads per process for ``'auto'``: the CPUs left free by ``load`` (CPUs busy with other work, measured
    over ``affinity_cpus``, default ``cpus``; a quota may make ``cpus`` smaller), shared by ``local_processes``,
    rounded to the nearest whole CPU; at least 1 and at most an equal share of ``cpus``."""
    affinity_cpus = cpus if affinity_cpus is None else affinity_cpus
    free = min(float(cpus), affinity_cpus - float(load))
    share = max(1, cpus // local_processes)
    return max(1, min(share, math.floor(free / local_processes + 0.5)))


def choose_cpu_threads(setting="auto", environ=None, cpus=None, load=None):
    """The :class:`CpuThreads` for ``setting`` (``train.cpu_threads``); ``cpus`` and ``load`` are measured when
    not given (the load only when ``'auto'`` needs it). Nothing is applied."""
    if not is_valid_setting(setting):
        raise ValueError("train.cpu_threads must be 'auto', a number of threads >= 1, or 0 (torch's own "
                         f"default), got {setting!r}")
    environ = os.environ if environ is None else environ
    procs = local_processes(environ)
    measured_cpus = usable_cpus() if cpus is None else cpus
    if setting == 0:
        return CpuThreads(torch.get_num_threads(), "torch default", measured_cpus, None, procs)
    if setting != "auto":
        return CpuThreads(int(setting), "train.cpu_threads", measured_cpus, None, procs)
    for name in THREAD_VARIABLES:
        if environ.get(name, "").strip() and not _torchrun_placeholder(name, environ):
            return CpuThreads(torch.get_num_threads(), name, measured_cpus, None, procs)
    if load is None:
        load = cpu_load() if measured_cpus > procs else 0.0  # one thread each whatever the load: skip the sample
    affinity = len(_cpu_set()) if cpus is None else cpus
    return CpuThreads(auto_threads(measured_cpus, load, procs, affinity), "auto", measured_cpus, load, procs)


def _torchrun_placeholder(name, environ):
    """torchrun sets OMP_NUM_THREADS=1 for every process when it starts several per machine and the user set
    none; that placeholder is not the user's choice, so 'auto' decides (a user wanting 1 sets train.cpu_threads 1)."""
    return (name == "OMP_NUM_THREADS" and environ.get(name, "").strip() == "1"
            and "TORCHELASTIC_RUN_ID" in environ and local_processes(environ) > 1)


def apply_cpu_threads(setting="auto", environ=None, cpus=None, load=None):
    """Choose (see :func:`choose_cpu_threads`) and set torch's intra-op thread count; returns the choice.
    A count coming from the environment or torch's default is left as torch set it."""
    choice = choose_cpu_threads(setting, environ, cpus, load)
    if choice.source in ("auto", "train.cpu_threads"):
        torch.set_num_threads(choice.threads)
    return choice


def openmp_waiting(environ=None):
    """How idle OpenMP threads wait, from the variables in effect: ``'passive'``, ``'active'`` (spinning), a spin
    count, or libgomp's default (spinning a while, then sleeping)."""
    environ = os.environ if environ is None else environ
    policy = environ.get("OMP_WAIT_POLICY", "").strip().lower()
    if policy in ("passive", "active"):
        return policy + " (OMP_WAIT_POLICY)"
    for name in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        if environ.get(name, "").strip():
            return f"{name}={environ[name].strip()}"
    return "spinning, then sleeping (the OpenMP default: the CPUs were idle at import, or torch came first)"


def describe_cpu_threads(choice, environ=None):
    """The log line: what was chosen, from what, and how to override it."""
    unit = "thread" if choice.threads == 1 else "threads"
    facts = [f"{choice.cpus} CPUs" if choice.cpus != 1 else "1 CPU"]
    if choice.local_processes > 1:
        unit += " per process"
        facts[0] += f" shared by {choice.local_processes} local processes"
    if choice.load is not None:
        facts.append(f"load {choice.load:.1f}")
    via = {"auto": "train.cpu_threads auto", "torch default": "train.cpu_threads 0: torch's default"}.get(
        choice.source, choice.source if choice.source == "train.cpu_threads" else "from " + choice.source)
    return (f"CPU: {choice.threads} {unit} ({', '.join(facts)}; {via}), OpenMP waiting {openmp_waiting(environ)}. "
            "Override with train.cpu_threads N or OMP_NUM_THREADS=N; OMP_WAIT_POLICY is read when torch starts.")
