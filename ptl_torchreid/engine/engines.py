"""The PTL engines: torchreid's image engines on :class:`PTLEngineMixin`'s loop; only the loss terms differ."""
from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.engine.trainer import PTLEngineMixin

__all__ = ["PTLImageSoftmaxEngine", "PTLImageTripletEngine"]


class PTLImageSoftmaxEngine(PTLEngineMixin, torchreid.engine.ImageSoftmaxEngine):
    """Softmax (cross-entropy, optional label smoothing) engine for PTL and plain torchreid models.

    ``PTLImageSoftmaxEngine(datamanager, model, optimizer, scheduler=None, use_gpu=True, label_smooth=True,
    **ptl_kwargs)``; see :class:`PTLEngineMixin` for ``ptl_kwargs``. Arguments after ``optimizer`` are keywords.
    """

    def compute_losses(self, outputs, pids):
        loss = self.compute_loss(self.criterion, outputs, pids)
        return loss, {"loss": loss.item(), "acc": torchreid.metrics.accuracy(outputs, pids)[0].item()}


class PTLImageTripletEngine(PTLEngineMixin, torchreid.engine.ImageTripletEngine):
    """Hard-mining triplet + softmax engine (``weight_t * L_triplet + weight_x * L_softmax``).

    ``PTLImageTripletEngine(datamanager, model, optimizer, margin=0.3, weight_t=1, weight_x=1, scheduler=None,
    use_gpu=True, label_smooth=True, **ptl_kwargs)``; the model must be built with ``loss='triplet'``.
    """

    def compute_losses(self, outputs, pids):
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise TypeError(
                "the triplet engine needs the model to return (logits, features) in training; build it with "
                "loss='triplet'"
            )
        logits, features = outputs
        loss = 0
        summary = {}
        if self.weight_t > 0:
            loss_t = self.compute_loss(self.criterion_t, features, pids)
            loss = loss + self.weight_t * loss_t
            summary["loss_t"] = loss_t.item()
        if self.weight_x > 0:
            loss_x = self.compute_loss(self.criterion_x, logits, pids)
            loss = loss + self.weight_x * loss_x
            summary["loss_x"] = loss_x.item()
            summary["acc"] = torchreid.metrics.accuracy(logits, pids)[0].item()
        return loss, summary
