"""PTL engine: training/evaluation in both engines, state handling, freezing, checkpoints, AMP."""
import math
import os.path as osp

import pytest
import torch
from tiny import TINY_RUN

import ptl_torchreid.engine.evaluator as evaluator_module
from ptl_torchreid.config import engine_run_kwargs, load_config
from ptl_torchreid.engine import (
    ENGINES,
    HookBase,
    NonFiniteLossError,
    PTLImageSoftmaxEngine,
    build_datamanager,
    build_engine,
    build_model,
    build_optimizer,
    clamp_ranks,
)
from ptl_torchreid.models import is_ptl

TINY = TINY_RUN + ["data.transforms", "['random_flip']", "train.lr", "0.001"]


def tiny_cfg(data_root, save_dir, *opts):
    return load_config(opts=TINY + ["data.root", data_root, "data.save_dir", str(save_dir)] + list(opts))


@pytest.fixture(scope="module")
def datamanager(data_root, tmp_path_factory):
    return build_datamanager(tiny_cfg(data_root, tmp_path_factory.mktemp("dm")))


def make_engine(cfg, datamanager):
    return build_engine(cfg, datamanager=datamanager)


def ptl_cells(engine):
    return list(engine.net.cells())


@pytest.mark.parametrize("loss", ["softmax", "triplet"])
@pytest.mark.parametrize("model_name", ["ptl_osnet_x0_25", "osnet_x0_25"])
def test_one_epoch_train_and_eval(data_root, datamanager, tmp_path, loss, model_name):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", model_name, "loss.name", loss,
                   "loss.triplet.weight_x", "1.0")
    engine = make_engine(cfg, datamanager)
    assert isinstance(engine, ENGINES[loss])
    assert engine.is_ptl == model_name.startswith("ptl_")
    results = engine.run(**engine_run_kwargs(cfg))

    res = results["synthetic_reid"]
    assert 0.0 <= res["mAP"] <= 1.0 and 1 in res["cmc"]
    summary = engine.epoch_summary
    loss_keys = ["loss"] if loss == "softmax" else ["loss_t", "loss_x"]
    for k in loss_keys + ["acc"]:
        assert math.isfinite(summary[k])
    assert ("state_norm" in summary) == engine.is_ptl
    if engine.is_ptl:
        assert summary["state_norm"] > 0  # the state accumulated during the epoch
        assert {"lr_backbone", "lr_ptl"} <= set(summary)
    # Checkpoints: per-epoch file and model-best, loadable weights-only, with a scheduler and the cell buffers.
    for name in ("model.pth.tar-1", "model-best.pth.tar"):
        state = torch.load(osp.join(str(tmp_path), "model", name), map_location="cpu", weights_only=True)
        assert state["epoch"] == 1 and state["scheduler"] is not None
        assert isinstance(state["rank1"], float)
        assert set(state["state_dict"]) == set(engine.net.state_dict())
        if engine.is_ptl:
            buffers = [n for n, _ in engine.net.named_buffers() if "running_state" in n]
            assert buffers and all(b in state["state_dict"] for b in buffers)
    # TensorBoard event file written to save_dir.
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def _record_resets_and_forwards(engine):
    events = []
    net = engine.net
    original = net.reset_state

    def spy():
        events.append("reset")
        return original()

    net.reset_state = spy
    net.register_forward_pre_hook(lambda m, inp: events.append("fwd-train" if m.training else "fwd-eval"))
    return events


def _split_epochs(events):
    """Training events grouped per epoch ('reset' and 'fwd-train' only; evaluation forwards dropped)."""
    return [e for e in events if e != "fwd-eval"]


def test_reset_at_every_epoch_start(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "train.max_epoch", "2")
    engine = make_engine(cfg, datamanager)
    events = _record_resets_and_forwards(engine)
    epoch_ends = []

    class EpochEnds(HookBase):
        def after_epoch(self):
            epoch_ends.append(len(events))

    engine.register_hooks([EpochEnds()])
    engine.run(**engine_run_kwargs(cfg))
    assert len(epoch_ends) == 2
    # Each epoch begins with exactly one reset, followed only by its training forwards.
    for start, end in zip([0] + epoch_ends[:-1], epoch_ends):
        epoch = _split_epochs(events[start:end])
        assert epoch[0] == "reset" and epoch.count("reset") == 1 and len(epoch) > 1


class CallRecorder(HookBase):
    """Records every hook call with the engine's position and what the hook can see there."""

    def __init__(self):
        self.calls = []

    def _record(self, point):
        t = self.trainer
        self.calls.append((point, t.epoch, t.iteration))

    def before_train(self):
        self._record("before_train")

    def after_train(self):
        self._record("after_train")

    def before_epoch(self):
        self._record("before_epoch")

    def after_epoch(self):
        self._record("after_epoch")
        assert self.trainer.epoch_summary["epoch_time"] > 0  # logged before the registered hooks run

    def before_step(self):
        self._record("before_step")

    def before_backward(self):
        self._record("before_backward")
        assert torch.isfinite(self.trainer.loss) and "loss" in self.trainer.step_summary

    def after_step(self):
        self._record("after_step")
        assert math.isfinite(self.trainer.step_summary["loss"])

    def before_test(self):
        self._record("before_test")

    def after_test(self):
        self._record("after_test")
        assert "synthetic_reid" in self.trainer.last_results


def test_registered_hook_sees_every_call_in_order(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "train.max_epoch", "2",
                   "test.eval_freq", "1")
    engine = make_engine(cfg, datamanager)
    recorder = CallRecorder()
    engine.register_hooks([None, recorder])
    assert recorder.trainer is engine
    engine.run(**engine_run_kwargs(cfg))
    steps = engine.iteration // 2
    assert steps > 0 and engine.iteration == 2 * steps
    expected = [("before_train", 0, 0)]
    for epoch in range(2):
        expected.append(("before_epoch", epoch, epoch * steps))
        for i in range(epoch * steps, (epoch + 1) * steps):
            expected += [("before_step", epoch, i), ("before_backward", epoch, i), ("after_step", epoch, i + 1)]
        if epoch == 0:  # evaluated every epoch but the last, which the final test covers
            expected += [("before_test", 0, steps), ("after_test", 0, steps)]
        expected.append(("after_epoch", epoch, (epoch + 1) * steps))
    expected += [("before_test", 1, 2 * steps), ("after_test", 1, 2 * steps), ("after_train", 1, 2 * steps)]
    assert recorder.calls == expected
    # evaluations outside run() reach the registered hooks too
    engine.test(ranks=[1])
    assert recorder.calls[-2:] == [("before_test", 1, 2 * steps), ("after_test", 1, 2 * steps)]


class _NaNTerm(HookBase):
    """Adds a non-finite term to the loss, as a faulty extra loss would."""

    def before_backward(self):
        self.trainer.loss = self.trainer.loss + float("nan")
        self.trainer.step_summary["loss_extra"] = float("nan")


def test_non_finite_guard_checks_the_loss_with_the_terms_hooks_added(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "train.max_epoch", "1")
    engine = make_engine(cfg, datamanager)
    before = {k: v.detach().clone() for k, v in engine.net.named_parameters()}
    engine.register_hooks([_NaNTerm()])
    with pytest.raises(NonFiniteLossError, match="loss_extra nan"):
        engine.run(**engine_run_kwargs(cfg))
    assert all(torch.equal(before[k], v) for k, v in engine.net.named_parameters())  # no step was taken


def test_reset_policy_never_and_iter(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "train.max_epoch", "2",
                   "ptl.reset_policy", "never")
    engine = make_engine(cfg, datamanager)
    events = _record_resets_and_forwards(engine)
    engine.run(**engine_run_kwargs(cfg))
    assert "reset" not in events

    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "train.max_epoch", "2",
                   "ptl.reset_policy", "iter", "ptl.reset_every_n_iters", "3")
    engine = make_engine(cfg, datamanager)
    events = _record_resets_and_forwards(engine)
    engine.run(**engine_run_kwargs(cfg))
    train_events = _split_epochs(events)
    steps = train_events.count("fwd-train")
    assert steps == engine.iteration >= 4
    # Step k (counted across epochs) is preceded by a reset iff k % 3 == 0.
    expected = []
    for k in range(steps):
        expected += (["reset"] if k % 3 == 0 else []) + ["fwd-train"]
    assert train_events == expected


def test_evaluation_freezes_state(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25")
    engine = make_engine(cfg, datamanager)
    engine.train()
    cells = ptl_cells(engine)
    before = [(None if c.state is None else c.state.clone(), c.running_state.clone()) for c in cells]
    modes = []
    engine.net.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    engine.test(ranks=[1])
    assert modes and not any(modes), "feature extraction must run the model in eval mode"
    for c, (state, running) in zip(cells, before):
        assert torch.equal(c.running_state, running)
        assert (c.state is None and state is None) or torch.equal(c.state, state)
    # Evaluating twice gives identical features: nothing carried over between evaluations.
    first = dict(engine.last_results)
    engine.test(ranks=[1])
    assert engine.last_results == first


def test_freeze_backbone_for_first_epoch(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "ptl.freeze_backbone_epochs", "1",
                   "ptl.lr_mult", "10")
    engine = make_engine(cfg, datamanager)
    groups = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
    assert groups == {"backbone": pytest.approx(0.001), "ptl": pytest.approx(0.01)}

    net = engine.net
    backbone0 = [p.detach().clone() for p in net.backbone_parameters()]
    ptl0 = [p.detach().clone() for p in net.ptl_parameters()]
    bn_stats0 = [b.clone() for n, b in net.backbone.named_buffers() if "running_mean" in n]
    engine.max_epoch = 2
    engine.epoch = 0
    engine.train()
    assert all(torch.equal(a, b) for a, b in zip(backbone0, net.backbone_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bn_stats0, [b for n, b in net.backbone.named_buffers()
                                                              if "running_mean" in n]))
    assert any(not torch.equal(a, b) for a, b in zip(ptl0, net.ptl_parameters()))
    engine.epoch = 1
    engine.train()
    assert any(not torch.equal(a, b) for a, b in zip(backbone0, net.backbone_parameters()))


def test_freeze_backbone_throughout(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "ptl.freeze_backbone_epochs", "-1")
    engine = make_engine(cfg, datamanager)
    backbone0 = [p.detach().clone() for p in engine.net.backbone_parameters()]
    for engine.epoch in range(2):
        engine.train()
    assert all(torch.equal(a, b) for a, b in zip(backbone0, engine.net.backbone_parameters()))


def test_checkpoint_resume_round_trip(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "loss.name", "triplet",
                   "loss.triplet.weight_x", "1.0", "train.lr_scheduler", "single_step", "train.stepsize", "[1]")
    engine = make_engine(cfg, datamanager)
    engine.run(**engine_run_kwargs(cfg))
    ckpt = osp.join(str(tmp_path), "model", "model.pth.tar-1")

    resumed_cfg = tiny_cfg(data_root, tmp_path / "resumed", "model.name", "ptl_osnet_x0_25", "loss.name",
                           "triplet", "loss.triplet.weight_x", "1.0", "train.lr_scheduler", "single_step",
                           "train.stepsize", "[1]", "train.max_epoch", "2", "model.resume", ckpt)
    resumed = make_engine(resumed_cfg, datamanager)
    assert resumed.start_epoch == 1
    sd, sd2 = engine.net.state_dict(), resumed.net.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert resumed.scheduler.state_dict() == engine.scheduler.state_dict()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in engine.optimizer.param_groups]
    opt1, opt2 = engine.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert opt1.keys() == opt2.keys()
    assert all(torch.equal(opt1[i]["exp_avg"], opt2[i]["exp_avg"]) for i in opt1)
    assert resumed.best_rank1 == engine.best_rank1
    assert resumed.iteration == engine.iteration > 0

    kwargs = engine_run_kwargs(resumed_cfg)
    kwargs["start_epoch"] = resumed.start_epoch
    resumed.run(**kwargs)
    assert osp.isfile(osp.join(str(tmp_path / "resumed"), "model", "model.pth.tar-2"))
    assert resumed.epoch == 1  # only the second epoch was trained


def test_model_best_tracks_best_rank1(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "osnet_x0_25")
    engine = make_engine(cfg, datamanager)
    engine.save_model(0, 0.5, str(tmp_path))
    engine.save_model(1, 0.25, str(tmp_path))
    best = torch.load(osp.join(str(tmp_path), "model", "model-best.pth.tar"), weights_only=True)
    assert best["epoch"] == 1 and best["rank1"] == 0.5
    engine.save_model(2, 0.75, str(tmp_path))
    best = torch.load(osp.join(str(tmp_path), "model", "model-best.pth.tar"), weights_only=True)
    assert best["epoch"] == 3 and best["best_rank1"] == 0.75


def test_scheduler_always_present(datamanager):
    model = build_model(load_config(opts=TINY + ["model.name", "osnet_x0_25"]), datamanager.num_train_pids)
    optimizer = build_optimizer(model, optim="adam", lr=0.001)
    engine = PTLImageSoftmaxEngine(datamanager, model, optimizer, scheduler=None, use_gpu=False,
                                   progress_bar=False)
    assert engine.scheduler is not None and engine._scheds["model"] is engine.scheduler
    assert engine.checkpoint_state(0, 0.0)["scheduler"] is not None


def test_ranks_clamped_to_gallery_size(data_root, datamanager, tmp_path, capsys):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "osnet_x0_25", "test.ranks", "[1, 5, 10, 1000]")
    engine = make_engine(cfg, datamanager)
    engine.test(ranks=[1, 5, 10, 1000])
    out = capsys.readouterr().out
    num_gallery = len(datamanager.test_dataset["synthetic_reid"]["gallery"])
    assert "Rank-1000 cannot be computed" in out and f"only {num_gallery} images" in out
    assert sorted(engine.last_results["synthetic_reid"]["cmc"]) == [r for r in (1, 5, 10) if r <= num_gallery]
    assert clamp_ranks([1, 5, 20], 10) == [1, 5]
    assert clamp_ranks([20], 10) == [1]


def test_evaluation_uses_vectorised_evaluate_rank(data_root, datamanager, tmp_path, monkeypatch):
    calls = []
    real = evaluator_module.evaluate_rank

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator_module, "evaluate_rank", spy)
    engine = make_engine(tiny_cfg(data_root, tmp_path, "model.name", "osnet_x0_25"), datamanager)
    engine.test(ranks=[1, 5])
    assert len(calls) == 1 and calls[0]["max_rank"] == 5


def test_bf16_autocast_on_cpu(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25", "train.amp", "True")
    engine = make_engine(cfg, datamanager)
    assert engine.amp and engine.amp_dtype == torch.bfloat16 and not engine.scaler.is_enabled()
    engine.train()
    assert math.isfinite(engine.epoch_summary["loss"])
    assert all(p.dtype == torch.float32 for p in engine.net.parameters())


def test_engine_is_device_agnostic(data_root, datamanager, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path, "model.name", "ptl_osnet_x0_25")
    engine = make_engine(cfg, datamanager)
    assert engine.device == torch.device("cpu") and not engine.use_gpu
    assert all(p.device.type == "cpu" for p in engine.net.parameters())
    assert is_ptl(engine.model)


def test_rerank_and_cosine_evaluation(data_root, datamanager, tmp_path):
    engine = make_engine(tiny_cfg(data_root, tmp_path, "model.name", "osnet_x0_25"), datamanager)
    engine.test(ranks=[1], dist_metric="cosine", normalize_feature=True, rerank=True)
    res = engine.last_results["synthetic_reid"]
    assert 0.0 <= res["mAP"] <= 1.0 and 0.0 <= res["cmc"][1] <= 1.0


def test_plain_weights_load_into_ptl_backbone(tmp_path):
    """model.load_weights with a plain torchreid checkpoint and a PTL model: the weights go into the backbone
    (the transfer setting: a plain model trained on one dataset, fine-tuned with PTL on another)."""
    plain = build_model(load_config(opts=TINY + ["model.name", "osnet_x0_25"]), num_classes=7)
    path = str(tmp_path / "plain.pth.tar")
    torch.save({"state_dict": plain.state_dict(), "epoch": 3}, path)
    ptl = build_model(load_config(opts=TINY + ["model.name", "ptl_osnet_x0_25", "model.load_weights", path,
                                               "model.load_weights_mode", "match"]), num_classes=5)
    plain_sd = plain.state_dict()
    backbone_sd = ptl.backbone.state_dict()
    # every backbone tensor but the classifier, which is new for the target's 5 identities
    assert backbone_sd and all(torch.equal(v, plain_sd[k]) for k, v in backbone_sd.items()
                               if not k.startswith("classifier."))
    assert ptl.classifier.out_features == 5
