"""CPU thread policy: 'auto' from CPU counts and loads, explicit settings and environment variables winning,
local DDP processes sharing the CPUs, and passive OpenMP waiting set before torch by every entry point."""
import ast
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

import pytest
import torch

from ptl_torchreid import _openmp
from ptl_torchreid.config import ConfigError, load_config
from ptl_torchreid.utils import cpu_threads as ct

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cpus, load, procs, affinity, expected", [
    (2, 0.0, 1, None, 2),    # quiet: one thread per CPU
    (2, 0.4, 1, None, 2),    # 1.6 CPUs free rounds to 2
    (2, 0.6, 1, None, 1),    # 1.4 CPUs free rounds to 1
    (2, 1.0, 1, None, 1),    # one competing busy process
    (2, 5.0, 1, None, 1),    # overloaded: never below 1
    (1, 0.0, 1, None, 1),
    (16, 4.0, 1, None, 12),
    (8, 0.0, 2, None, 4),    # two local DDP processes share 8 CPUs
    (8, 3.0, 2, None, 3),    # 5 free CPUs, 2.5 each, rounded
    (2, 0.0, 4, None, 1),    # more processes than CPUs
    (2, 5.0, 1, 8, 2),       # a 2-CPU quota on 8 CPUs, 3 of them free
    (2, 7.0, 1, 8, 1),       # the same with 1 free
])
def test_auto_resolves_from_cpus_and_load(cpus, load, procs, affinity, expected):
    assert ct.auto_threads(cpus, load, procs, affinity) == expected


def test_explicit_setting_wins_over_environment_and_auto(keep_torch_threads):
    choice = ct.apply_cpu_threads(3, environ={"OMP_NUM_THREADS": "1"}, cpus=2, load=0.0)
    assert (choice.threads, choice.source) == (3, "train.cpu_threads")
    assert torch.get_num_threads() == 3


def test_environment_wins_over_auto(keep_torch_threads):
    torch.set_num_threads(1)  # what torch took from OMP_NUM_THREADS=1 at start-up
    for name in ct.THREAD_VARIABLES:
        choice = ct.apply_cpu_threads("auto", environ={name: "1"}, cpus=16, load=0.0)
        assert (choice.threads, choice.source, choice.load) == (1, name, None)
        assert torch.get_num_threads() == 1


def test_auto_applies_its_choice_and_zero_leaves_torch_alone(keep_torch_threads):
    choice = ct.apply_cpu_threads("auto", environ={}, cpus=2, load=2.0)
    assert (choice.threads, choice.source, torch.get_num_threads()) == (1, "auto", 1)
    choice = ct.apply_cpu_threads("auto", environ={}, cpus=2, load=0.0)
    assert torch.get_num_threads() == 2
    choice = ct.apply_cpu_threads(0, environ={}, cpus=2)
    assert (choice.threads, choice.source, torch.get_num_threads()) == (2, "torch default", 2)


def test_torchruns_own_omp_placeholder_does_not_block_auto():
    env = {"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    assert ct.choose_cpu_threads("auto", environ=env, cpus=8, load=0.0).threads == 4
    env["OMP_NUM_THREADS"] = "2"  # a value torchrun never sets: the user's
    assert ct.choose_cpu_threads("auto", environ=env, cpus=8, load=0.0).source == "OMP_NUM_THREADS"


def test_local_processes_split_the_cpus():
    assert ct.local_processes({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}) == 2
    assert ct.local_processes({"WORLD_SIZE": "3"}) == 3
    assert ct.local_processes({}) == 1
    choice = ct.choose_cpu_threads("auto", environ={"LOCAL_WORLD_SIZE": "4"}, cpus=8, load=0.0)
    assert (choice.threads, choice.local_processes) == (2, 4)


def test_log_line_says_what_was_chosen_and_how_to_override():
    choice = ct.CpuThreads(2, "auto", 2, 0.1, 1)
    line = ct.describe_cpu_threads(choice, environ={"OMP_WAIT_POLICY": "PASSIVE"})
    assert line.startswith("CPU: 2 threads (2 CPUs, load 0.1; train.cpu_threads auto), OpenMP waiting passive")
    assert "train.cpu_threads N" in line and "OMP_NUM_THREADS" in line
    line = ct.describe_cpu_threads(ct.CpuThreads(1, "OMP_NUM_THREADS", 8, None, 2), environ={})
    assert line.startswith("CPU: 1 thread per process (8 CPUs shared by 2 local processes; from OMP_NUM_THREADS)")
    assert "spinning" in line


def test_measured_cpus_and_load_are_plausible():
    cpus = ct.usable_cpus()
    assert 1 <= cpus <= (os.cpu_count() or cpus)
    load = ct.cpu_load(interval=0.05)
    assert 0.0 <= load <= len(os.sched_getaffinity(0)) + 0.5


def test_config_key_accepts_auto_and_counts_and_rejects_the_rest():
    assert load_config(None, []).train.cpu_threads == "auto"
    assert load_config(None, ["train.cpu_threads", "3"]).train.cpu_threads == 3
    assert load_config(None, ["train.cpu_threads", "0"]).train.cpu_threads == 0
    for bad in ("many", "-1", "True"):
        with pytest.raises(ConfigError, match="train.cpu_threads"):
            load_config(None, ["train.cpu_threads", bad])


def test_waiting_is_left_alone_when_chosen_or_too_late():
    assert _openmp.set_openmp_waiting({}, load=2.0) == {}  # torch is loaded in this process: too late
    for name in _openmp.USER_WAIT_VARIABLES:
        env = {name: "1"}
        assert _openmp.set_openmp_waiting(env) == {} and env == {name: "1"}


def test_waiting_is_passive_only_when_other_processes_keep_the_cpus_busy():
    assert _openmp.choose_wait_policy(0.0) is None  # idle cores: libgomp's spinning default is fastest
    assert _openmp.choose_wait_policy(_openmp.BUSY_CPUS - 0.01) is None
    assert _openmp.choose_wait_policy(_openmp.BUSY_CPUS) == "PASSIVE"
    assert _openmp.choose_wait_policy(3.0) == "PASSIVE"


def test_other_cpu_load_sees_a_busy_process_and_not_its_own_work():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 30\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.5)
        assert _openmp.other_cpu_load(0.5) >= 0.5
    finally:
        busy.kill()
        busy.wait()


# Records OMP_WAIT_POLICY at the moment torch is first imported, then runs an entry point.
_PROBE = """
import json, os, runpy, sys
seen = []
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Probe())
sys.argv = [sys.argv[1], "--version"]
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("PROBE " + json.dumps(seen))
"""


def _wait_policy_at_torch_import(entry, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_WAIT", "GOMP_", "KMP_"))}
    clean.update(env, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", _PROBE, entry], env=clean, cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, out.stderr[-2000:]
    return json.loads(lines[-1][len("PROBE "):])


@pytest.mark.slow
def test_entry_points_set_passive_waiting_before_torch_on_busy_cpus_unless_the_user_chose():
    # A competing busy process, so that the entry points see busy CPUs at import.
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 600\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.5)
        assert _wait_policy_at_torch_import("ptl_torchreid") == ["PASSIVE"]  # python -m ptl_torchreid
        assert _wait_policy_at_torch_import(osp.join(REPO, "tools", "prune.py")) == ["PASSIVE"]
        assert _wait_policy_at_torch_import("ptl_torchreid", OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE"]
    finally:
        busy.kill()
        busy.wait()


_FIRST_LOADERS = ("torch", "torchvision", "torchreid", "bench_measure", "bench_report")


@pytest.mark.parametrize("script", sorted(glob.glob(osp.join(REPO, "tools", "*.py"))), ids=osp.basename)
def test_tool_scripts_import_the_package_before_torch(script):
    """A tool run as a script imports ptl_torchreid (which sets OpenMP waiting) before anything loading torch."""
    tree = ast.parse(open(script).read())
    if not any(isinstance(n, ast.If) and "__main__" in ast.dump(n.test) for n in tree.body):
        return  # a helper module, imported by the scripts after the package
    for node in tree.body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        roots = {n.split(".")[0] for n in names}
        if "ptl_torchreid" in roots:
            return
        assert not roots & set(_FIRST_LOADERS), f"{osp.basename(script)} imports {sorted(roots)} before ptl_torchreid"


_TORCHRUN_CHILD = """
import json, os, sys
sys.path.insert(0, {repo!r})
import ptl_torchreid  # noqa: F401
from ptl_torchreid.utils.cpu_threads import apply_cpu_threads
import torch
choice = apply_cpu_threads("auto", cpus=8, load=0.0)
with open(os.path.join({out!r}, "rank" + os.environ["RANK"]), "w") as f:
    json.dump([choice.threads, choice.local_processes, torch.get_num_threads()], f)
"""


@pytest.mark.slow
def test_torchrun_processes_on_one_machine_split_the_cpus(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_TORCHRUN_CHILD.format(repo=REPO, out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}").read_text()) == [4, 2, 4]
