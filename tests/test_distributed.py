"""Distributed training: cell-state synchronisation across 2 gloo processes (checked against one process over the
combined batches), DDP wrapping, gathering, a 2-process run of the command line (train, sharded evaluation,
rank-0 output), the identity-balanced distributed sampler, mixed precision and channels_last, and the GPU
benchmark's CPU path."""
import importlib.util
import io
import math
import os
import os.path as osp
import socket
import sys
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from ptl_torchreid import models
from ptl_torchreid.data.samplers import (
    DistributedRandomIdentitySampler,
    ShardSampler,
    build_distributed_train_sampler,
    rebuild_loader,
)
from ptl_torchreid.models import cell_sync
from ptl_torchreid.models.bconv import BConvCell
from ptl_torchreid.utils import amp
from ptl_torchreid.utils import distributed as pdist
from ptl_torchreid.utils.resume import EpochLoader

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
WORLD = 2
STEPS = 3
B = 4  # per-rank batch


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    """Run ``fn(rank, *args)`` in WORLD processes under a torchrun-like environment."""
    port = free_port()
    mp.spawn(_entry, args=(fn, port) + args, nprocs=WORLD, join=True)


def _entry(rank, fn, port, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = pdist.init_distributed(device="cpu", timeout=60)
    assert ctx.backend == "gloo" and ctx.rank == rank and ctx.world_size == WORLD
    try:
        fn(rank, *args)
    finally:
        pdist.cleanup_distributed()


# -- a bare stack of cells: their inputs are per-sample, so one process over the union batch is the reference -----

class CellStack(nn.Module):
    def __init__(self, state_mode):
        super().__init__()
        self.c1 = BConvCell(3, 4, state_size=(4, 4), stride=2, state_mode=state_mode, momentum=0.1)
        self.c2 = BConvCell(4, 5, state_size=(4, 4), state_mode=state_mode, momentum=None)  # cumulative average
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.c2(self.c1(x)).mean((2, 3)))


def make_stack(state_mode):
    torch.manual_seed(0)
    return CellStack(state_mode)


def global_batches(total):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(total, 3, 8, 8, generator=g), torch.randint(0, 3, (total,), generator=g))
            for _ in range(STEPS)]


def train_steps(model, batches, sync=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sync is not None:
            sync(x.shape[0])
    return model


def cell_snapshot(model):
    net = models.unwrap(model)
    return {"state": [c.state.clone() for c in (net.c1, net.c2)],
            "running": [c.running_state.clone() for c in (net.c1, net.c2)],
            "steps": [int(c.num_batches_tracked) for c in (net.c1, net.c2)],
            "weights": [p.detach().clone() for p in net.parameters()]}


def _ddp_cells_worker(rank, out_dir):
    results = {}
    flag = osp.join(out_dir, "rank0_was_here")
    with pdist.main_process_first():
        if rank == 0:
            time.sleep(0.5)
            open(flag, "w").close()
        results["saw_rank0_first"] = osp.exists(flag)
    for mode in ("dataset", "slot"):
        model = pdist.wrap_ddp(make_stack(mode))
        assert set(cell_sync.cell_buffer_names(model)) <= set(model.parameters_to_ignore)
        mine = [(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]) for x, y in global_batches(WORLD * B)]
        train_steps(model, mine, sync=lambda n: cell_sync.sync_cell_states(model, batch_size=n))
        results[mode] = cell_snapshot(model)
    # unequal batches (3 and 5 samples), forward only: sync weights by batch size
    model = make_stack("dataset").train()
    x = global_batches(8)[0][0]
    with torch.no_grad():
        part = x[:3] if rank == 0 else x[3:]
        model(part)
        cell_sync.sync_cell_states(model, batch_size=part.shape[0])
    results["unequal"] = cell_snapshot(model)
    # gathering tensors of different lengths
    t = torch.arange(rank + 2, dtype=torch.float32).view(-1, 1).repeat(1, 3) + 10 * rank
    results["gathered"] = pdist.all_gather_tensors(t)
    results["gathered_bool"] = pdist.all_gather_tensors(torch.tensor([True, False][: rank + 1]))
    results["mean"] = pdist.all_reduce_mean(float(rank + 1), weight=rank + 1)
    torch.save(results, osp.join(out_dir, f"rank{rank}.pt"))


def _workers(rank, out_dir):
    _ddp_cells_worker(rank, out_dir)
    _ddp_ptl_worker(rank, out_dir)
    _cli_worker(rank, out_dir)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One 2-process gloo run (process start-up dominates the cost) whose per-rank results the tests check."""
    out = tmp_path_factory.mktemp("ddp")
    spawn(_workers, str(out))
    return out


@pytest.fixture(scope="module")
def ddp_cells(spawned):
    return [torch.load(spawned / f"rank{r}.pt") for r in range(WORLD)]


def test_dataset_mode_states_match_single_process_over_union(ddp_cells):
    ref = cell_snapshot(train_steps(make_stack("dataset").train(), global_batches(WORLD * B)))
    for r in range(WORLD):
        got = ddp_cells[r]["dataset"]
        for key in ("state", "running", "weights"):
            for a, b in zip(got[key], ref[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert got["steps"] == ref["steps"] == [STEPS, STEPS]
    for a, b in zip(ddp_cells[0]["dataset"]["state"], ddp_cells[1]["dataset"]["state"]):
        assert torch.equal(a, b)  # identical on the ranks, not just close


def test_dataset_mode_unsynchronised_states_would_differ(ddp_cells):
    """Guards the test above: a rank's own batch alone gives another state than the union."""
    model = make_stack("dataset").train()
    with torch.no_grad():
        model(global_batches(WORLD * B)[0][0][:B])
    solo = model.c2.state
    union = make_stack("dataset").train()
    with torch.no_grad():
        union(global_batches(WORLD * B)[0][0])
    assert not torch.allclose(solo, union.c2.state, atol=1e-4)


def test_slot_mode_ranks_hold_their_slices_and_share_running_state(ddp_cells):
    ref = cell_snapshot(train_steps(make_stack("slot").train(), global_batches(WORLD * B)))
    for i in range(2):
        assert ddp_cells[0]["slot"]["state"][i].shape[0] == B
        joined = torch.cat([ddp_cells[r]["slot"]["state"][i] for r in range(WORLD)], 0)
        torch.testing.assert_close(joined, ref["state"][i], rtol=1e-5, atol=1e-6)
        for r in range(WORLD):
            torch.testing.assert_close(ddp_cells[r]["slot"]["running"][i], ref["running"][i], rtol=1e-5, atol=1e-6)
    # DDP left each rank's own slots in place (its buffer broadcast from rank 0 would have copied rank 0's)
    assert not torch.allclose(ddp_cells[0]["slot"]["state"][0], ddp_cells[1]["slot"]["state"][0])


def test_unequal_batches_are_weighted_by_size(ddp_cells):
    model = make_stack("dataset").train()
    with torch.no_grad():
        model(global_batches(8)[0][0])
    ref = cell_snapshot(model)
    for r in range(WORLD):
        for key in ("state", "running"):
            for a, b in zip(ddp_cells[r]["unequal"][key], ref[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_main_process_first(ddp_cells):
    assert all(ddp_cells[r]["saw_rank0_first"] for r in range(WORLD))


def test_all_gather_variable_sizes_and_weighted_mean(ddp_cells):
    expected = torch.cat([torch.arange(r + 2, dtype=torch.float32).view(-1, 1).repeat(1, 3) + 10 * r
                          for r in range(WORLD)])
    for r in range(WORLD):
        assert torch.equal(ddp_cells[r]["gathered"], expected)
        assert ddp_cells[r]["gathered_bool"].tolist() == [True, True, False]
        assert ddp_cells[r]["mean"] == pytest.approx((1 * 1 + 2 * 2) / 3)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = pdist.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed, ctx.is_main) == (0, 1, None, False, True)
    assert pdist.get_rank() == 0 and pdist.get_world_size() == 1 and pdist.is_main_process()
    pdist.barrier()
    t = torch.arange(3)
    assert pdist.all_gather_tensors(t) is t
    model = make_stack("dataset").train()
    model(torch.randn(2, 3, 8, 8))
    before = model.c1.state.clone()
    cell_sync.sync_cell_states(model, batch_size=2)
    assert torch.equal(model.c1.state, before)
    with pytest.raises(RuntimeError, match="init_distributed"):
        pdist.wrap_ddp(model)


@pytest.mark.parametrize("rank, local_rank, expected", [
    (0, 0, ["block", "barrier", "barrier"]),  # rank 0 first
    (2, 0, ["barrier", "block", "barrier"]),  # then the first process of each other node
    (1, 1, ["barrier", "barrier", "block"]),  # then everyone else
])
def test_main_process_first_phases(monkeypatch, rank, local_rank, expected):
    events = []
    monkeypatch.setattr(pdist, "get_rank", lambda: rank)
    monkeypatch.setattr(pdist, "get_local_rank", lambda: local_rank)
    monkeypatch.setattr(pdist, "barrier", lambda: events.append("barrier"))
    with pdist.main_process_first():
        events.append("block")
    assert events == expected
    events.clear()
    with pytest.raises(KeyError):  # a failing block still releases the ranks waiting for it
        with pdist.main_process_first():
            raise KeyError
    assert events.count("barrier") == 2


def test_init_distributed_reports_missing_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        pdist.init_distributed(device="cpu")
    for v, val in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(v, val)
    with pytest.raises(ValueError, match="gloo"):
        pdist.init_distributed(backend="nccl", device="cpu")


# -- a full PTL model under DDP ---------------------------------------------------------------------------------

PTL_VARIANTS = {"ptl": {}, "ptl_rectify": {"mode": "rectify"}}


def small_ptl(**options):
    torch.manual_seed(0)
    return models.build_model("ptl_osnet_x0_25", num_classes=4, pretrained=False, input_size=(64, 32), **options)


def _ddp_ptl_worker(rank, out_dir):
    for tag, options in PTL_VARIANTS.items():
        model = pdist.wrap_ddp(small_ptl(**options).train())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(10 + rank)  # different data on each rank
        for _ in range(2):
            x, y = torch.randn(4, 3, 64, 32, generator=g), torch.randint(0, 4, (4,), generator=g)
            with amp.autocast_context("cpu", "bf16"):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            cell_sync.sync_cell_states(model, batch_size=x.shape[0])
        net = models.unwrap(model)
        torch.save({"states": [c.state for c in net.cells()], "running": [c.running_state for c in net.cells()],
                    "loss": float(loss), "weight": net.classifier.weight.detach().clone()},
                   osp.join(out_dir, f"{tag}_rank{rank}.pt"))


@pytest.mark.parametrize("tag", sorted(PTL_VARIANTS))
def test_ptl_model_states_agree_across_ranks_under_ddp_and_bf16(spawned, tag):
    r0, r1 = (torch.load(spawned / f"{tag}_rank{r}.pt") for r in range(WORLD))
    assert math.isfinite(r0["loss"]) and math.isfinite(r1["loss"])
    assert r0["loss"] != r1["loss"]  # the ranks did see different data
    torch.testing.assert_close(r0["weight"], r1["weight"])  # DDP kept the weights equal
    assert len(r0["states"]) == 6
    for a, b in zip(r0["states"] + r0["running"], r1["states"] + r1["running"]):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


# -- the command line under 2 processes: train, evaluate, rank-0 output ---------------------------------------------

# Tiny synthetic data and model input; 2 epochs, the first with the backbone frozen (DDP must then skip its
# gradients), so the per-epoch sampler plan and both DDP regimes run.
CLI_OPTS = [
    "data.sources", "['synthetic_reid']", "data.targets", "['synthetic_reid']",
    "data.synthetic.num_train_ids", "6", "data.synthetic.num_test_ids", "3",
    "data.synthetic.num_cameras", "2", "data.synthetic.images_per_id_per_camera", "2",
    "data.height", "64", "data.width", "32", "data.workers", "0", "data.transforms", "['random_flip']",
    "sampler.train_sampler", "RandomIdentitySampler", "sampler.num_instances", "2",
    "model.name", "ptl_osnet_x0_25", "model.pretrained", "False", "use_gpu", "False",
    "train.batch_size", "4", "train.max_epoch", "2", "train.lr", "0.001", "train.progress_bar", "False",
    "train.print_freq", "1", "ptl.freeze_backbone_epochs", "1", "test.batch_size", "5", "test.ranks", "[1, 2]",
]


def _files_under(folder):
    return sorted(osp.relpath(osp.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _cli_worker(rank, out_dir):
    from ptl_torchreid import cli
    from ptl_torchreid.engine import defaults

    engines = []
    build_engine = defaults.build_engine

    def recording_build_engine(*args, **kwargs):
        engines.append(build_engine(*args, **kwargs))
        return engines[-1]

    defaults.build_engine = recording_build_engine  # what the train command's run() builds
    # each rank gets its own save_dir, so that what each rank writes can be told apart
    save_dir = osp.join(out_dir, "cli", f"rank{rank}")
    stdout, sys.stdout = sys.stdout, io.StringIO()
    try:
        status = cli.main(["--root", osp.join(out_dir, "cli-data")] + CLI_OPTS
                          + ["data.save_dir", save_dir, "train.checkpoint_every_n_iters", "2"])
        printed = sys.stdout.getvalue()
    finally:
        sys.stdout = stdout
    assert pdist.is_distributed()  # the command line left the launcher's process group alone
    engine = engines[0]
    net = engine.net
    gallery = engine.test_loader["synthetic_reid"]["gallery"]
    engine.set_model_mode("eval")
    # every rank gets all features, in dataset order (numpy ids as tensors: the file loads weights-only)
    sharded = [torch.as_tensor(x) for x in engine.extract_features_sharded(gallery)]
    local = [torch.as_tensor(x) for x in engine.extract_features_from(gallery)]
    torch.save({"status": status, "printed": printed, "results": engine.last_results,
                "summary": engine.epoch_summary, "ddp": engine.ddp,
                "find_unused": engine.model.find_unused_parameters,
                "sampler": type(engine.train_loader.sampler).__name__, "batches": engine.num_batches,
                "states": [c.state.clone() for c in net.cells()],
                "running": [c.running_state.clone() for c in net.cells()],
                "buffers": {k: v.clone() for k, v in net.named_buffers() if "running_mean" in k},
                "backbone": [p.detach().clone() for p in net.backbone.parameters()][:4],
                "sharded": sharded, "local": local, "gallery_pids": [item[1] for item in gallery.dataset.data]},
               osp.join(out_dir, f"cli_rank{rank}.pt"))
    _reliability_checks(rank, out_dir, engine, save_dir)


def _reliability_checks(rank, out_dir, engine, save_dir):
    """Resume, a non-finite loss and a failed checkpoint write under 2 ranks (no further training)."""
    from ptl_torchreid.engine import NonFiniteLossError
    from ptl_torchreid.engine.hooks import NonFiniteLossGuard
    from ptl_torchreid.utils.checkpoint import CheckpointError

    out = {}
    # 'auto' resolves to rank 0's latest checkpoint on every rank (rank 1's own save_dir is empty)
    torch.manual_seed(100 + rank)  # the RNG states come from rank 0's checkpoint
    for p in engine.net.parameters():
        p.data.add_(float(rank))
    out["start"] = engine.resume("auto", save_dir=save_dir)
    out["weights"] = [p.detach().clone() for p in engine.net.parameters()][:4]
    out["iteration"] = engine.iteration
    engine._restore_rng_state(engine._pending_rng)
    out["rand"] = torch.rand(3)
    # a NaN loss on rank 1 only stops both ranks
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    guard = NonFiniteLossGuard()
    guard.trainer = engine
    try:
        guard.check(loss, {"loss": float(loss)})
    except NonFiniteLossError as e:
        out["nonfinite"] = str(e)

    class FailingManager:
        def save(self, state, **where):
            raise CheckpointError("disk full")

    try:
        out["written"] = engine._write_checkpoint(FailingManager(), lambda: {"x": 1}, iteration=1)
    except CheckpointError as e:
        out["write_error"] = str(e)
    torch.save(out, osp.join(out_dir, f"reliability_rank{rank}.pt"))


@pytest.fixture(scope="module")
def cli_run(spawned):
    return [torch.load(spawned / f"cli_rank{r}.pt") for r in range(WORLD)], spawned


def test_cli_trains_with_ddp_and_distributed_identity_sampler(cli_run):
    ranks, _ = cli_run
    for r in ranks:
        assert r["status"] == 0
        assert r["ddp"] and r["find_unused"]  # backbone freezing turns on find_unused_parameters
        assert r["sampler"] == "DistributedRandomIdentitySampler"
        assert r["batches"] == ranks[0]["batches"] > 0
        assert math.isfinite(r["summary"]["loss"])
    # the logged loss is the mean over all ranks' samples, the same on every rank
    assert ranks[0]["summary"]["loss"] == pytest.approx(ranks[1]["summary"]["loss"], rel=1e-12)
    for a, b in zip(ranks[0]["backbone"], ranks[1]["backbone"]):
        assert torch.equal(a, b)


def test_cli_cell_states_identical_across_ranks(cli_run):
    ranks, _ = cli_run
    assert len(ranks[0]["states"]) == 6
    for a, b in zip(ranks[0]["states"] + ranks[0]["running"], ranks[1]["states"] + ranks[1]["running"]):
        assert torch.equal(a, b)
    assert any(s.abs().sum() > 0 for s in ranks[0]["running"])


def test_cli_only_rank0_prints_logs_and_saves(cli_run):
    ranks, out = cli_run
    files = _files_under(str(out / "cli" / "rank0"))
    assert "model/model.pth.tar-2" in files and "model/model-best.pth.tar" in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert any(f.startswith("train-") and f.endswith(".log") for f in files)
    assert _files_under(str(out / "cli" / "rank1")) == []
    assert "2 processes (gloo)" in ranks[0]["printed"] and "** Results (synthetic_reid) **" in ranks[0]["printed"]
    assert ranks[1]["printed"] == ""


def test_cli_iteration_checkpoints_written_by_rank0_only(cli_run):
    ranks, out = cli_run
    files = _files_under(str(out / "cli" / "rank0"))
    assert any(f.startswith("model/model-iter") for f in files)
    assert _files_under(str(out / "cli" / "rank1")) == []


def test_resume_loads_rank0_checkpoint_on_every_rank(spawned):
    r0, r1 = (torch.load(spawned / f"reliability_rank{r}.pt") for r in range(WORLD))
    assert r0["start"] == r1["start"] == 2 and r0["iteration"] == r1["iteration"] > 0
    for a, b in zip(r0["weights"], r1["weights"]):
        assert torch.equal(a, b)  # the ranks' different weights were replaced by the same checkpoint's
    assert torch.equal(r0["rand"], r1["rand"])  # rank 0's RNG states, restored on every rank


def test_non_finite_loss_and_failed_write_stop_every_rank(spawned):
    r0, r1 = (torch.load(spawned / f"reliability_rank{r}.pt") for r in range(WORLD))
    assert "on another rank" in r0["nonfinite"] and "loss nan on rank 1" in r1["nonfinite"]
    assert r0["write_error"] == "disk full" and "rank 0 could not write" in r1["write_error"]
    assert "written" not in r0 and "written" not in r1


def test_sharded_feature_extraction_restores_dataset_order(cli_run):
    ranks, _ = cli_run
    for r in ranks:
        feats, pids, camids = r["sharded"]
        local_feats, local_pids, local_camids = r["local"]
        assert pids.tolist() == local_pids.tolist() == r["gallery_pids"]
        assert camids.tolist() == local_camids.tolist()
        torch.testing.assert_close(feats, local_feats, rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks[0]["sharded"][0], ranks[1]["sharded"][0])


def test_cli_sharded_evaluation_matches_single_process(cli_run, tmp_path):
    """Both ranks report the same results, equal to one process evaluating rank 0's checkpoint."""
    from ptl_torchreid.config import load_config
    from ptl_torchreid.engine import run

    ranks, out = cli_run
    assert ranks[0]["results"] == ranks[1]["results"]
    dist_res = ranks[0]["results"]["synthetic_reid"]
    # the ranks evaluated with the same (rank 0's) BatchNorm statistics as the checkpoint holds
    for k, v in ranks[0]["buffers"].items():
        assert torch.equal(v, ranks[1]["buffers"][k]), k
    checkpoint = str(out / "cli" / "rank0" / "model" / "model.pth.tar-2")
    cfg = load_config(opts=CLI_OPTS + ["data.root", str(out / "cli-data"), "data.save_dir", str(tmp_path),
                                       "test.evaluate", "True", "model.load_weights", checkpoint])
    single = run(cfg)["synthetic_reid"]
    assert single["mAP"] == pytest.approx(dist_res["mAP"], abs=1e-6)
    assert single["cmc"] == pytest.approx(dist_res["cmc"], abs=1e-6)


def test_engine_refuses_plain_sampler_and_fixbase_without_unused_parameters():
    from ptl_torchreid.config import engine_kwargs, load_config
    from ptl_torchreid.engine import PTLEngineMixin

    source = fake_source()
    plain = SimpleNamespace(train_loader=SimpleNamespace(sampler=torch.utils.data.RandomSampler(source)),
                            world_size=2, epoch=3)
    with pytest.raises(ValueError, match="distribute_train_loaders"):
        PTLEngineMixin._check_train_sampler(plain)
    sampler = DistributedRandomIdentitySampler(source, 8, 4, num_replicas=2, rank=1)
    PTLEngineMixin._check_train_sampler(SimpleNamespace(train_loader=SimpleNamespace(sampler=sampler),
                                                        world_size=2, epoch=3))
    # the epoch reaches the sampler through the epoch loader, which plans each epoch
    loader = torch.utils.data.DataLoader(list(range(len(source))), batch_size=8, sampler=sampler)
    plan = EpochLoader(loader, seed=0).plan(3)
    assert sampler.epoch == 3 and plan == sampler.plan(3)[1]
    fake = SimpleNamespace(ddp=True, model=SimpleNamespace(find_unused_parameters=False))
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        PTLEngineMixin._check_distributed_run(fake, 1, ["classifier"])
    PTLEngineMixin._check_distributed_run(fake, 0, ["classifier"])
    # the command line asks for it with fixbase epochs and leaves it to the engine otherwise
    assert engine_kwargs(load_config(opts=["train.fixbase_epoch", "2"]))["find_unused_parameters"] is True
    assert engine_kwargs(load_config())["find_unused_parameters"] is None


# -- the sampler --------------------------------------------------------------------------------------------------

def fake_source(num_pids=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 14, (num_pids,), generator=g).tolist()
    return [(f"img_{pid}_{i}.jpg", pid, i % 3, 0) for pid, n in enumerate(counts) for i in range(n)]


def rank_batches(source, world, epoch, batch_size=8, k=4, seed=5):
    out = []
    for r in range(world):
        s = DistributedRandomIdentitySampler(source, batch_size, k, num_replicas=world, rank=r, seed=seed)
        s.set_epoch(epoch)
        idx = list(s)
        assert len(idx) == len(s) and len(idx) % batch_size == 0
        out.append([idx[i:i + batch_size] for i in range(0, len(idx), batch_size)])
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_gives_pk_batches_on_disjoint_shards(world):
    source = fake_source()
    per_rank = rank_batches(source, world, epoch=0)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0  # equal batch counts
    pids_of_rank = []
    for batches in per_rank:
        pids = set()
        for batch in batches:
            counts = Counter(source[i][1] for i in batch)
            assert len(counts) == 2 and set(counts.values()) == {4}  # P=2 identities x K=4 images
            pids |= set(counts)
        pids_of_rank.append(pids)
    for a in range(world):
        for b in range(a + 1, world):
            assert not pids_of_rank[a] & pids_of_rank[b]


def test_sampler_epochs_are_reproducible_and_differ():
    source = fake_source()
    assert rank_batches(source, 2, epoch=3) == rank_batches(source, 2, epoch=3)
    assert rank_batches(source, 2, epoch=3) != rank_batches(source, 2, epoch=4)
    assert rank_batches(source, 2, epoch=3, seed=1) != rank_batches(source, 2, epoch=3, seed=2)
    # shards change from epoch to epoch, so every rank sees all identities over time
    seen = set()
    for epoch in range(6):
        seen |= {source[i][1] for batch in rank_batches(source, 2, epoch)[0] for i in batch}
    assert len(seen) > len({p for _, p, _, _ in source}) * 0.8


def test_sampler_within_epoch_uses_each_image_once_when_enough_images():
    source = [("x", pid, 0) for pid in range(12) for _ in range(8)]  # 3-tuples as in older torchreid lists
    for batches in rank_batches(source, 2, epoch=0):
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))


def test_sampler_errors_are_clear():
    source = fake_source(num_pids=3)
    with pytest.raises(ValueError, match="multiple of num_instances"):
        DistributedRandomIdentitySampler(source, 6, 4, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="identities"):
        DistributedRandomIdentitySampler(source, 8, 4, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        DistributedRandomIdentitySampler(source, 8, 4, num_replicas=2, rank=2)


def test_sampler_defaults_to_single_process():
    s = DistributedRandomIdentitySampler(fake_source(), 8, 4)
    assert (s.num_replicas, s.rank) == (1, 0)


def test_shard_sampler_covers_every_item_once():
    shards = [list(ShardSampler(11, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(ShardSampler(11, 3, r)) for r in range(3)] == [4, 4, 3]
    assert list(ShardSampler(5)) == list(range(5))  # single process: everything


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.train = items

    def __len__(self):
        return len(self.train)

    def __getitem__(self, i):
        return {"index": i, "pid": self.train[i][1]}


@pytest.mark.parametrize("name", ["RandomIdentitySampler", "RandomSampler", "SequentialSampler"])
def test_distributed_train_loaders_have_equal_batch_counts(name):
    source = fake_source(num_pids=17)
    dataset = ListDataset(source)
    base = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True)
    loaders = []
    for r in range(3):
        sampler = build_distributed_train_sampler(source, name, 8, num_instances=4, seed=3, num_replicas=3, rank=r)
        sampler.set_epoch(2)
        loaders.append(rebuild_loader(base, sampler))
    batches = [[b["index"].tolist() for b in loader] for loader in loaders]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) > 0
    assert all(len(batch) == 8 for per_rank in batches for batch in per_rank)
    assert loaders[0].drop_last and loaders[0].batch_size == 8
    if name != "RandomIdentitySampler":  # plain samplers: (nearly) disjoint index shards
        flat = [set(i for batch in per_rank for i in batch) for per_rank in batches]
        assert len(flat[0] & flat[1]) <= 2  # the padding repeats at most world_size - 1 items


def test_distributed_train_sampler_rejects_unsupported_names():
    with pytest.raises(ValueError, match="RandomIdentitySampler, RandomSampler"):
        build_distributed_train_sampler(fake_source(), "RandomDomainSampler", 8, num_replicas=2, rank=0)


# -- mixed precision ----------------------------------------------------------------------------------------------

def test_precision_names_and_scaler():
    assert amp.normalize_precision("bfloat16") == "bf16" and amp.normalize_precision(None) == "fp32"
    assert amp.normalize_precision(torch.float16) == "fp16" and amp.normalize_precision(torch.float32) == "fp32"
    assert amp.autocast_dtype("bf16") is torch.bfloat16 and amp.autocast_dtype("fp32") is None
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        amp.normalize_precision("int8")
    assert amp.make_grad_scaler("cpu", "fp16").is_enabled()
    assert not amp.make_grad_scaler("cpu", "bf16").is_enabled()
    assert not amp.make_grad_scaler("cpu", "fp32").is_enabled()
    assert amp.memory_format(True) is torch.channels_last
    with amp.autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with amp.autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16


def test_bf16_autocast_training_step_on_cpu_is_finite():
    model = small_ptl().train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = amp.make_grad_scaler("cpu", "bf16")
    torch.manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 3, 64, 32).contiguous(memory_format=torch.channels_last)
        with amp.autocast_context("cpu", "bf16"):
            logits = model(x)
            assert logits.dtype == torch.bfloat16  # the forward really ran in bf16
            loss = F.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert math.isfinite(loss.detach().item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(c.state.dtype == torch.float32 and torch.isfinite(c.state).all() for c in model.cells())


def test_engine_bf16_channels_last_training_is_finite(tmp_path):
    """The engine's AMP path with channels_last: model and batches in channels_last, bf16 forward, finite loss."""
    from ptl_torchreid.config import engine_run_kwargs, load_config
    from ptl_torchreid.engine import build_engine

    cfg = load_config(opts=CLI_OPTS + ["data.root", str(tmp_path / "data"), "data.save_dir", str(tmp_path / "log"),
                                       "train.max_epoch", "1", "ptl.freeze_backbone_epochs", "0",
                                       "train.amp", "True", "train.amp_dtype", "bf16", "train.channels_last", "True"])
    engine = build_engine(cfg)
    assert engine.channels_last and engine.memory_format is torch.channels_last and not engine.ddp
    conv = next(p for p in engine.net.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen = []
    engine.net.register_forward_pre_hook(
        lambda m, inp: seen.append((inp[0].is_contiguous(memory_format=torch.channels_last),
                                    torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)))
    results = engine.run(**engine_run_kwargs(cfg))
    assert math.isfinite(engine.epoch_summary["loss"]) and 0 <= results["synthetic_reid"]["mAP"] <= 1
    assert seen and all(cl for cl, _ in seen)
    assert (True, torch.bfloat16) in seen  # training forwards ran under bf16 autocast


# -- GPU benchmark script, CPU path ------------------------------------------------------------------------------

def test_benchmark_script_cpu_path(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_gpu", osp.join(REPO, "tools", "benchmark_gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    argv = ["--device", "cpu", "--iters", "2", "--batch-size", "4", "--height", "64", "--width", "32", "--warmup",
            "0", "--out", str(out)]
    try:
        results, text = bench.main(argv)
    except RuntimeError as err:
        if "non-finite loss" not in str(err):
            raise
        # bf16 autocast gives NaN for these untrained models on some CPUs (seen on an Intel Xeon with AMX, not on
        # an AMD EPYC); the benchmark refuses such a run, and its fp32 path must still work there.
        results, _ = bench.main(argv + ["--modes", "fp32"])
        assert [r["mode"] for r in results] == ["fp32", "fp32"] and all(r["images_per_s"] > 0 for r in results)
        pytest.xfail(f"bf16 autocast on this CPU: {err}")
    assert [(r["model"], r["mode"]) for r in results] == [
        (m, mode) for m in ("resnet50", "ptl_resnet50") for mode in ("fp32", "amp", "amp_cl")]
    assert all(r["images_per_s"] > 0 and r["peak_mib"] is None for r in results)
    written = out.read_text()
    assert "| ptl_resnet50 | AMP (bf16) | " in written and "CPU" in written
    assert "AMP (bf16) / fp32 ptl_resnet50:" in written
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "fp64"])


def test_registered_rank_synced_buffers_are_left_to_their_owner(monkeypatch, tmp_path):
    """wrap_ddp hands a registered owner's buffers to the owner: DDP ignores them and the owner broadcasts them
    once; a module type the package knows nothing of plugs in the same way the BConv-Cells do."""
    class Tally(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(1))

        def forward(self, x):
            return x

    def tally_names(net):
        return [f"{name}.seen" for name, m in net.named_modules() if isinstance(m, Tally)]

    broadcasts = []
    monkeypatch.setattr(pdist, "_RANK_SYNCED", list(pdist._RANK_SYNCED))
    pdist.register_rank_synced_buffers(tally_names, lambda model, src: broadcasts.append(src))
    pdist.register_rank_synced_buffers(tally_names, lambda model, src: None)  # another pair: registered
    pdist.register_rank_synced_buffers(*pdist._RANK_SYNCED[-1])  # the same pair again: not registered twice
    model = nn.Sequential(nn.Linear(2, 2), Tally(), nn.BatchNorm1d(2), make_stack("dataset"))
    assert pdist.rank_synced_buffer_names(model) == sorted(
        ["1.seen"] + ["3." + n for n in cell_sync.cell_buffer_names(model[3])])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = pdist.wrap_ddp(model)
        assert {"1.seen", "3.c1.running_state"} <= set(ddp.parameters_to_ignore)
        assert "2.running_mean" not in ddp.parameters_to_ignore  # other buffers stay with DDP
        assert broadcasts == [0]
        assert pdist.unwrap(ddp) is model and models.unwrap(ddp) is model
    finally:
        dist.destroy_process_group()
