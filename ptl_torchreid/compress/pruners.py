"""Layer pruners: how channel pruning treats each layer type, one class per type, looked up by the module's type.

A pruner holds all that ``compress`` knows about its layer type:

* detection (:meth:`LayerPruner.leaf`): whether the channel graph prunes the module, keeps its channels
  (:class:`KeepChannels`) or traces through its own operations (None);
* slicing (:meth:`~LayerPruner.prune`): the module's tensors and channel attributes cut to the kept channels;
* the channel configuration a pruned file stores and reloads (:meth:`~LayerPruner.channel_config`,
  :meth:`~LayerPruner.apply_channel_config`);
* costs: multiply-adds and parameters as functions of the channel counts (:meth:`~LayerPruner.cost`,
  :meth:`~LayerPruner.positions`), which drive COP's FLOP/parameter terms and its targets, and the weight the
  criteria read (:meth:`~LayerPruner.kernel`).

Convolutions (dense and depthwise), linears, batch/instance norms and PReLU are built in; the BConv-Cell's pruner
registers from ``bconv_pruner``. ``register_layer_pruner(MyLayer, MyLayerPruner())`` adds a type. A module gets the
pruner of the nearest class in its type's MRO that has one, so subclasses share their parent's pruner.
"""
import numpy as np
import torch.nn as nn

__all__ = ["LayerPruner", "KeepChannels", "UnsupportedLayerError", "register_layer_pruner", "layer_pruner",
           "leaf_pruner", "select_channels", "resize_tensor", "ConvPruner", "DepthwiseConvPruner", "LinearPruner",
           "NormPruner", "PReLUPruner"]


class UnsupportedLayerError(ValueError):
    """The model contains a layer whose weights the pruner does not know how to slice."""


def _replace(module, name, tensor):
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(module, name, tensor)


def select_channels(module, name, dim, index):
    """Keep the entries ``index`` (a LongTensor) along ``dim`` of ``module``'s parameter or buffer ``name`` (a
    missing or None tensor is left alone); a parameter stays a parameter."""
    t = getattr(module, name, None)
    if t is None:
        return
    _replace(module, name, t.detach().index_select(dim, index.to(t.device)).clone())


def resize_tensor(module, name, shape):
    """Give ``module``'s parameter or buffer ``name`` the ``shape`` (zeros; the weights are loaded afterwards)."""
    t = getattr(module, name, None)
    if t is not None and tuple(t.shape) != tuple(shape):
        _replace(module, name, t.new_zeros(shape))


class LayerPruner:
    """How channel pruning treats one layer type. Subclass it for a layer of your own and register an instance
    with :func:`register_layer_pruner`.

    Attributes:
        kind: the layer's kind in the channel graph (``LayerRecord.kind``) and in notes, e.g. ``'conv'``.
        produces: True for a dense layer whose output channels are new ones computed from all its inputs (a
            conv, a linear, a BConv-Cell); its output channels are prunable filters and it consumes its input
            channels through a kernel. False for a channel-wise layer (BatchNorm, depthwise conv, PReLU): output
            channel c comes from input channel c, so both are pruned together.
    """

    kind = "layer"
    produces = True

    # -- detection -------------------------------------------------------------------------------------------
    def leaf(self, module):
        """The pruner the channel graph uses for this instance: ``self``, another pruner (a conv's depthwise
        form), a :class:`KeepChannels`, or None to trace through the module's own operations."""
        return self

    def for_input(self, module, x):
        """The pruner for a call of ``module`` on ``x`` (the first tensor argument): ``self``, or a
        :class:`KeepChannels` when the call cannot be pruned through."""
        return self

    # -- slicing ---------------------------------------------------------------------------------------------
    def prune(self, module, keep_in, keep_out):
        """Cut ``module`` in place to the input channels ``keep_in`` and output channels ``keep_out`` (sorted
        LongTensors of kept positions; the same channels for a channel-wise layer)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement prune()")

    # -- channel configuration -------------------------------------------------------------------------------
    def channel_config(self, module):
        """The module's channel counts as ``{attribute: int}`` (saved with a pruned model), or None when it has
        none to save."""
        return None

    def apply_channel_config(self, module, config):
        """Give ``module`` the channel counts ``config`` (from :meth:`channel_config`), with tensors of the new
        shapes (their values are loaded afterwards)."""
        raise ValueError(f"{type(module).__name__} has no channel configuration in {type(self).__name__}")

    # -- costs -----------------------------------------------------------------------------------------------
    def kernel(self, module):
        """The weight a dense layer reads its input channels through, as (out, in, positions), detached."""
        w = module.weight.detach()
        return w.reshape(w.shape[0], w.shape[1], -1)

    def positions(self, output, batch):
        """Output positions per sample of one call producing ``output``; FLOPs count 2 per multiply-add per
        position, as ``torch.utils.flop_counter`` does."""
        return output.numel() // (output.shape[0] * output.shape[1])

    def cost(self, module):
        """A function ``(in_channels, out_channels) -> (multiply-adds per output position, parameters)`` for
        this module at other channel counts (its kernel size and bias fixed)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement cost()")


class KeepChannels(LayerPruner):
    """A layer the channel graph does not prune through: its input and output channels are kept, and a note says
    why. ``reason`` and ``note`` are templates with ``{name}`` (the module's name) and ``{type}`` (its class);
    ``detail``, when given, is a note added before ``note`` for every call."""

    kind = "barrier"
    produces = False

    def __init__(self, reason, note, detail=None):
        self.reason, self.note, self.detail = reason, note, detail


class _Unsupported(LayerPruner):
    """A layer with its own channel-indexed weights that the pruner cannot slice: tracing through it raises
    :class:`UnsupportedLayerError` unless it is excluded."""

    kind = "unsupported"
    produces = False


UNSUPPORTED = _Unsupported()


_REGISTRY = {}


def register_layer_pruner(layer_type, pruner):
    """Prune modules of ``layer_type`` (and its subclasses without a pruner of their own) with ``pruner``, a
    :class:`LayerPruner` instance; replaces any pruner ``layer_type`` had. Returns ``pruner``."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be a torch.nn.Module subclass, got {layer_type!r}")
    if not isinstance(pruner, LayerPruner):
        raise TypeError(f"pruner must be a LayerPruner instance, got {type(pruner).__name__}")
    _REGISTRY[layer_type] = pruner
    return pruner


def layer_pruner(module):
    """The pruner registered for ``module``'s type (the nearest class of its MRO that has one), or None."""
    for cls in type(module).__mro__:
        pruner = _REGISTRY.get(cls)
        if pruner is not None:
            return pruner
    return None


def leaf_pruner(module):
    """How the channel graph treats ``module``: its pruner (or a :class:`KeepChannels`), the unsupported marker
    for an unknown module with its own parameters or buffers, or None (traced through)."""
    pruner = layer_pruner(module)
    if pruner is not None:
        return pruner.leaf(module)
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return UNSUPPORTED
    return None


def _bias(module):
    """1 when ``module`` has a bias (one parameter per output channel), else 0."""
    return int(getattr(module, "bias", None) is not None)


def _slice_dense(module, keep_in, keep_out):
    """A weight (out, in, ...) and bias (out,) cut to the kept output rows and input columns."""
    select_channels(module, "weight", 0, keep_out)
    select_channels(module, "weight", 1, keep_in)
    select_channels(module, "bias", 0, keep_out)


def _kernel_positions(weight):
    return int(np.prod(weight.shape[2:])) if weight is not None and weight.dim() > 2 else 1


# -- built-in pruners ---------------------------------------------------------------------------------------------
_GROUPED = KeepChannels("{name} is a grouped (not depthwise) convolution",
                        "{name}: grouped convolutions are not pruned; its input and output channels are kept")
_ACROSS_CHANNELS = KeepChannels("{name} normalises or mixes across channels",
                                "{name}: {type} normalises across channels; its input and output channels are kept")


class ConvPruner(LayerPruner):
    """Convolutions with ``groups == 1``; a depthwise one is pruned by :class:`DepthwiseConvPruner`, other
    grouped ones keep their channels."""

    kind = "conv"

    def leaf(self, module):
        if module.groups == 1:
            return self
        if module.groups == module.in_channels == module.out_channels:
            return DEPTHWISE
        return _GROUPED

    def prune(self, module, keep_in, keep_out):
        _slice_dense(module, keep_in, keep_out)
        module.in_channels, module.out_channels = len(keep_in), len(keep_out)

    def channel_config(self, module):
        return dict(in_channels=int(module.in_channels), out_channels=int(module.out_channels),
                    groups=int(module.groups))

    def apply_channel_config(self, module, config):
        module.in_channels, module.out_channels = config["in_channels"], config["out_channels"]
        module.groups = config["groups"]
        resize_tensor(module, "weight",
                      (module.out_channels, module.in_channels // module.groups) + tuple(module.kernel_size))
        resize_tensor(module, "bias", (module.out_channels,))

    def cost(self, module):
        kk, bias = _kernel_positions(module.weight), _bias(module)
        return lambda cin, cout: (cout * cin * kk, cout * cin * kk + bias * cout)


class DepthwiseConvPruner(ConvPruner):
    """Depthwise convolutions (``groups == in_channels == out_channels``): channel-wise."""

    kind = "depthwise"
    produces = False

    def leaf(self, module):
        return self

    def prune(self, module, keep_in, keep_out):
        select_channels(module, "weight", 0, keep_out)
        select_channels(module, "bias", 0, keep_out)
        module.in_channels = module.out_channels = module.groups = len(keep_out)

    def cost(self, module):
        kk, bias = _kernel_positions(module.weight), _bias(module)
        return lambda cin, cout: (cout * kk, cout * kk + bias * cout)


DEPTHWISE = DepthwiseConvPruner()


class LinearPruner(LayerPruner):
    """``nn.Linear`` on (batch, features) inputs; on other inputs its channels are kept."""

    kind = "linear"

    def for_input(self, module, x):
        if x.dim() == 2:
            return self
        return KeepChannels(_ACROSS_CHANNELS.reason, _ACROSS_CHANNELS.note,
                            detail=f"{{name}}: a Linear on a {x.dim()}-d input is not pruned")

    def prune(self, module, keep_in, keep_out):
        _slice_dense(module, keep_in, keep_out)
        module.in_features, module.out_features = len(keep_in), len(keep_out)

    def channel_config(self, module):
        return dict(in_features=int(module.in_features), out_features=int(module.out_features))

    def apply_channel_config(self, module, config):
        module.in_features, module.out_features = config["in_features"], config["out_features"]
        resize_tensor(module, "weight", (module.out_features, module.in_features))
        resize_tensor(module, "bias", (module.out_features,))

    def positions(self, output, batch):
        return output.numel() // (output.shape[-1] * batch)

    def cost(self, module):
        bias = _bias(module)
        return lambda cin, cout: (cout * cin, cout * cin + bias * cout)


class NormPruner(LayerPruner):
    """Batch and instance norms: channel-wise affine and running statistics."""

    kind = "norm"
    produces = False
    _TENSORS = ("weight", "bias", "running_mean", "running_var")

    def prune(self, module, keep_in, keep_out):
        for name in self._TENSORS:
            select_channels(module, name, 0, keep_out)
        module.num_features = len(keep_out)

    def channel_config(self, module):
        return dict(num_features=int(module.num_features))

    def apply_channel_config(self, module, config):
        module.num_features = config["num_features"]
        for name in self._TENSORS:
            resize_tensor(module, name, (module.num_features,))

    def positions(self, output, batch):
        return 0  # no multiply-adds

    def cost(self, module):
        affine = getattr(module, "weight", None) is not None
        return lambda cin, cout: (0, 2 * cout if affine else 0)


class PReLUPruner(LayerPruner):
    """``nn.PReLU`` with one slope per channel; a single shared slope is traced through."""

    kind = "prelu"
    produces = False

    def leaf(self, module):
        return self if module.num_parameters > 1 else None

    def prune(self, module, keep_in, keep_out):
        select_channels(module, "weight", 0, keep_out)
        module.num_parameters = len(keep_out)

    def channel_config(self, module):
        return dict(num_parameters=int(module.num_parameters)) if module.num_parameters > 1 else None

    def apply_channel_config(self, module, config):
        module.num_parameters = config["num_parameters"]
        resize_tensor(module, "weight", (module.num_parameters,))

    def positions(self, output, batch):
        return 0  # no multiply-adds

    def cost(self, module):
        return lambda cin, cout: (0, cout)


register_layer_pruner(nn.modules.conv._ConvNd, ConvPruner())
register_layer_pruner(nn.modules.conv._ConvTransposeNd, UNSUPPORTED)
register_layer_pruner(nn.Linear, LinearPruner())
register_layer_pruner(nn.modules.batchnorm._BatchNorm, NormPruner())
register_layer_pruner(nn.modules.instancenorm._InstanceNorm, NormPruner())
register_layer_pruner(nn.PReLU, PReLUPruner())
for _type in (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d):
    register_layer_pruner(_type, _ACROSS_CHANNELS)
