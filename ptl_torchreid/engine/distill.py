"""Distillation from the unpruned parent during the post-prune fine-tuning, as a training hook.

``engine.register_hooks([Distillation(parent, feature_weight, logit_weight)])`` (or ``run(cfg, hooks=[...])``)
adds, to the loss of any of the package's training engines, on every training batch:

* feature term: ``feature_weight * mean ||f_s / |f_s| - f_p / |f_p| ||^2`` between the pruned model's embedding
  (the input of its classifier) and the parent's eval-mode embedding of the same images;
* logit term: ``logit_weight * T^2 * KL(softmax(z_p / T) || softmax(z_s / T))`` between the classifiers' logits
  (only when the parent's classifier has as many identities as the pruned model's, i.e. it was trained on them).

The parent runs in eval mode under ``torch.no_grad`` with its parameters frozen, so it gets no gradient and its
BatchNorm statistics stay as they are. The terms appear in the training log as ``loss_kd_f`` / ``loss_kd_l``.
"""
import copy

import torch
import torch.nn.functional as F

from ptl_torchreid.engine.hooks import HookBase
from ptl_torchreid.models import unwrap

__all__ = ["Distillation"]


class Distillation(HookBase):
    """Distil ``parent`` into the model an engine trains.

    Args:
        parent: the unpruned model (copied; the copy is frozen and kept in eval mode).
        feature_weight: weight of the embedding term (0: off).
        logit_weight: weight of the logit term (0: off).
        temperature: softmax temperature of the logit term.
    """

    def __init__(self, parent, feature_weight=1.0, logit_weight=0.0, temperature=4.0):
        self.check(feature_weight, logit_weight, temperature)
        self.parent = copy.deepcopy(parent).eval()
        for p in self.parent.parameters():
            p.requires_grad_(False)
        self.feature_weight = float(feature_weight)
        self.logit_weight = float(logit_weight)
        self.temperature = float(temperature)
        self._student = {}
        self._teacher = None
        self.handles = []

    @staticmethod
    def check(feature_weight, logit_weight, temperature):
        """Raise ValueError naming a bad option."""
        for name, v in (("feature_weight", feature_weight), ("logit_weight", logit_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"distillation {name}={v!r} is not valid; use a number >= 0")
        if feature_weight == 0 and logit_weight == 0:
            raise ValueError("distillation with feature_weight=0 and logit_weight=0 would add nothing")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"distillation temperature={temperature!r} is not valid; use a number > 0")

    def _classifier(self, net):
        classifier = getattr(net, "classifier", None)
        if not isinstance(classifier, torch.nn.Linear):
            raise ValueError("distillation needs models with a Linear 'classifier' (torchreid's layout); got "
                             f"{type(classifier).__name__}")
        return classifier

    def before_train(self):
        """Capture the parent's outputs and the student's embedding on every training forward."""
        self.after_train()  # a run stopped by an error left its forward hooks in place
        net = unwrap(self.trainer.model)
        self.parent.to(next(net.parameters()).device)
        classifier = self._classifier(net)
        self.use_logits = self.logit_weight > 0 and \
            self._classifier(self.parent).out_features == classifier.out_features

        def on_input(module, args):
            if module.training:
                with torch.no_grad():
                    feats = self.parent(args[0])
                    logits = self.parent.classifier(feats) if self.use_logits else None
                self._teacher = (feats.float(), logits)

        def on_features(module, args):
            if module.training:
                self._student["features"] = args[0]

        self.handles = [net.register_forward_pre_hook(on_input), classifier.register_forward_pre_hook(on_features)]

    def before_step(self):
        if not self.handles:  # an epoch trained with engine.train() outside run(): no before_train
            self.before_train()

    def before_backward(self):
        """Add the distillation terms to the step's loss (the non-finite-loss guard checks the sum after)."""
        t = self.trainer
        extra, terms = self.loss(t.outputs)
        t.loss = t.loss + extra
        t.step_summary.update(terms)

    def after_train(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def loss(self, outputs):
        """(distillation loss, {term: float}) for the current training batch."""
        feats_p, logits_p = self._teacher
        total, terms = 0.0, {}
        if self.feature_weight > 0:
            feats_s = self._student["features"].float()
            term = (F.normalize(feats_s, dim=1) - F.normalize(feats_p, dim=1)).pow(2).sum(1).mean()
            total = total + self.feature_weight * term
            terms["loss_kd_f"] = term.item()
        if self.use_logits:
            logits_s = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
            t = self.temperature
            term = F.kl_div(F.log_softmax(logits_s.float() / t, 1), F.softmax(logits_p.float() / t, 1),
                            reduction="batchmean") * t * t
            total = total + self.logit_weight * term
            terms["loss_kd_l"] = term.item()
        return total, terms
