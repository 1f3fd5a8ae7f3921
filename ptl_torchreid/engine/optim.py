"""Optimizer construction with a separate learning rate for the PTL parameters."""
from ptl_torchreid._torchreid import torchreid
from ptl_torchreid.models import is_ptl, unwrap

__all__ = ["build_optimizer"]


def build_optimizer(model, lr_mult=1.0, **kwargs):
    """``torchreid.optim.build_optimizer`` with a learning-rate multiplier for PTL parameters.

    ``kwargs`` are torchreid's (``optim``, ``lr``, ``weight_decay``, ``momentum``, ``staged_lr``, ...). A plain
    torchreid model gets exactly torchreid's optimizer. A PTL model gets two named parameter groups:

    - ``backbone``: ``model.backbone_parameters()`` at ``lr`` (``lr * base_lr_mult`` when ``staged_lr``: the
      backbone is the pretrained "base" part);
    - ``ptl``: ``model.ptl_parameters()`` (cells, fusion, head, classifier) at ``lr * lr_mult``.

    For PTL models the split is defined by the model, so ``new_layers`` is not used.
    """
    net = unwrap(model)
    if not is_ptl(net):
        return torchreid.optim.build_optimizer(model, **kwargs)

    staged_lr = kwargs.pop("staged_lr", False)
    kwargs.pop("new_layers", None)
    base_lr_mult = kwargs.pop("base_lr_mult", 0.1)
    lr = kwargs.get("lr", 0.0003)

    backbone = list(net.backbone_parameters())
    ptl = list(net.ptl_parameters())
    ids_b, ids_p = {id(p) for p in backbone}, {id(p) for p in ptl}
    if ids_b & ids_p or (ids_b | ids_p) != {id(p) for p in net.parameters()}:
        raise ValueError(
            f"{type(net).__name__}: backbone_parameters() and ptl_parameters() must be disjoint and cover all "
            "parameters "
            f"(shared: {len(ids_b & ids_p)}, missing: {len({id(p) for p in net.parameters()} - ids_b - ids_p)})"
        )

    # Let torchreid pick the optimizer class and its hyper-parameters, then install our groups: every key
    # a group does not set falls back to those defaults, as with torchreid's own staged_lr.
    optimizer = torchreid.optim.build_optimizer(net, staged_lr=False, **kwargs)
    optimizer.param_groups.clear()
    optimizer.add_param_group({"params": backbone, "lr": lr * (base_lr_mult if staged_lr else 1.0), "name": "backbone"})
    optimizer.add_param_group({"params": ptl, "lr": lr * lr_mult, "name": "ptl"})
    return optimizer
