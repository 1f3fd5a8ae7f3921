"""Strict merging: YAML files and ``KEY VALUE`` overrides into a config, with errors that name the key.

An unknown key raises :class:`ConfigError` naming the nearest valid keys, a value that does not convert
faithfully to its default's type names the type wanted, and a key given twice in one YAML mapping names both
lines. :func:`load_config` chains defaults, file, torchreid-style flags and overrides, then validates.

Values are decoded as yacs decodes them (command-line text as Python literals) and then set key by key, rather
than through yacs's ``merge_from_other_cfg``: that merge literal-evaluates every string again (a ``data.root``
given as ``'1'`` would become an int and fail), accepts only the default's exact type or list <-> tuple (not
``true`` for a boolean, ``10`` for a float key, one value for a list key, nor ``True`` for ``use_gpu``, whose
default is ``'auto'``), and reports an unknown key without the nearest one. These conversions are what configs
written for this package rely on.
"""
import ast
import difflib
import os.path as osp

import yaml
from yacs.config import CfgNode as CN

from .defaults import get_default_config
from .errors import ConfigError
from .validate import validate_config

__all__ = ["config_keys", "nearest_keys", "merge_from_file", "merge_from_list", "load_config", "expand_save_dir"]

# Keys that accept more than their default's type.
_EXTRA_TYPES = {"use_gpu": (bool, str), "train.cpu_threads": (int, str)}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def config_keys(node=None, prefix=""):
    """All leaf keys of a config (default: the default config), dotted."""
    if node is None:
        node = get_default_config()
    keys = []
    for k, v in node.items():
        full = prefix + k
        if isinstance(v, CN):
            keys.extend(config_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def nearest_keys(key, cfg, n=3):
    """Valid keys of ``cfg`` closest to ``key`` (whole dotted name first, then the last component)."""
    keys = config_keys(cfg)
    found = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    if not found:
        leaf = key.split(".")[-1]
        by_leaf = {}
        for k in keys:
            by_leaf.setdefault(k.split(".")[-1], []).append(k)
        for name in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.6):
            found.extend(by_leaf[name])
    return found[:n]


def _unknown_key_error(key, cfg, source):
    near = nearest_keys(key, cfg)
    hint = f" Did you mean {' or '.join(repr(k) for k in near)}?" if near else ""
    return ConfigError(f"unknown config key '{key}'{source}.{hint}")


def _type_name(t):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        t, t.__name__
    )


def _coerce_scalar(value, default, key, source):
    """Coerce ``value`` to the type of ``default``; raise ConfigError if that is not a faithful conversion."""
    want = type(default)
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    if want is bool and isinstance(value, str):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if want is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        f"config key '{key}'{source} must be {_type_name(want)} (like the default {default!r}), got {value!r}"
    )


def _coerce(value, default, key, source):
    leaf = key.split(".")[-1]
    extra = _EXTRA_TYPES.get(key) or _EXTRA_TYPES.get(leaf)
    if extra is not None:
        if isinstance(value, str) and bool in extra and value.lower() in _TRUE + _FALSE and value != "auto":
            return value.lower() in _TRUE
        if isinstance(value, extra):
            return value
        raise ConfigError(
            f"config key '{key}'{source} must be one of the types {', '.join(t.__name__ for t in extra)}, got {value!r}"
        )
    if isinstance(default, (list, tuple)):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]  # a single value for a list key, e.g. `data.sources market1501`
        if default:
            value = [_coerce_scalar(v, default[0], key, source) for v in value]
        return value
    if isinstance(value, (list, tuple)):
        raise ConfigError(
            f"config key '{key}'{source} takes a single value (like the default {default!r}), got the list {value!r}"
        )
    return _coerce_scalar(value, default, key, source)


def _set_key(cfg, key, value, source=""):
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], CN):
            raise _unknown_key_error(key, cfg, source)
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise _unknown_key_error(key, cfg, source)
    if isinstance(node[leaf], CN):
        raise ConfigError(
            f"config key '{key}'{source} is a section; set one of its keys instead: "
            f"{', '.join(key + '.' + k for k in node[leaf])}"
        )
    node[leaf] = _coerce(value, node[leaf], key, source)


def _flatten(d, prefix=""):
    for k, v in d.items():
        full = prefix + str(k)
        if isinstance(v, dict):
            yield from _flatten(v, full + ".")
        else:
            yield full, v


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(
                    f"key '{_dotted(self, node, key)}' is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one of them"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _dotted(loader, node, key):
    # the dotted name of `key` inside `node`, from the mappings that enclose it (for the error message)
    path = [str(key)]
    parents = getattr(loader, "_parents", {})
    while id(node) in parents:
        node, name = parents[id(node)]
        path.append(str(name))
    return ".".join(reversed(path))


def _compose_with_parents(self):
    node = yaml.SafeLoader.compose_document(self)
    parents = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if isinstance(v, yaml.MappingNode):
                    parents[id(v)] = (n, getattr(k, "value", k))
                    stack.append(v)
    self._parents = parents
    return node


_UniqueKeyLoader.compose_document = _compose_with_parents


def merge_from_file(cfg, path):
    """Merge a YAML file into ``cfg`` (strict: unknown keys and wrong types are errors)."""
    if osp.isdir(path):
        raise ConfigError(f"config file {path} is a directory, not a YAML file; give the path of the file")
    if not osp.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
        except _DuplicateKeyError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        raise ConfigError(
            f"config file {path} is empty (no settings in it); give a config with at least one key, or leave "
            "out --config-file to use the defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    source = f" (in {path})"
    for key, value in _flatten(data):
        _set_key(cfg, key, value, source)
    return cfg


def _decode(text):
    """Decode a command-line value the way yacs does (Python literals; anything else is a string)."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # not a (buildable) literal, e.g. a dict with a list as key: keep the text; type checks follow
        return text


def merge_from_list(cfg, opts):
    """Merge ``['KEY', 'VALUE', ...]`` overrides (strict, with the nearest valid key on a typo)."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            f"overrides must be KEY VALUE pairs, got an odd number of items: {' '.join(map(str, opts))}"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        if not isinstance(key, str) or key.startswith("-"):
            raise ConfigError(
                f"expected a config KEY, got {key!r}; options (--config-file, -s, ...) must come before the "
                "KEY VALUE overrides"
            )
        _set_key(cfg, key, _decode(value), " (command-line override)")
    return cfg


def load_config(config_file=None, opts=None, sources=None, targets=None, transforms=None, root=None, validate=True):
    """Defaults <- YAML file <- torchreid-style flags <- ``KEY VALUE`` overrides, then validated."""
    cfg = get_default_config()
    if config_file:
        merge_from_file(cfg, config_file)
    # The flags of torchreid's scripts/main.py, applied like its reset_config().
    if root:
        cfg.data.root = root
    if sources:
        cfg.data.sources = list(sources)
    if targets:
        cfg.data.targets = list(targets)
    if transforms:
        cfg.data.transforms = list(transforms)
    merge_from_list(cfg, opts)
    expand_save_dir(cfg)
    if validate:
        validate_config(cfg)
    return cfg


def expand_save_dir(cfg):
    """Fill the placeholders ``{model}``, ``{sources}``, ``{targets}``, ``{loss}`` in ``data.save_dir``.

    This lets a PTL config and its baseline twin differ only in ``model.name`` yet log to different folders.
    """
    values = {
        "model": cfg.model.name,
        "sources": "+".join(cfg.data.sources),
        "targets": "+".join(cfg.data.targets),
        "loss": cfg.loss.name,
    }
    try:
        cfg.data.save_dir = cfg.data.save_dir.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(
            f"data.save_dir = '{cfg.data.save_dir}' has an invalid placeholder ({e}); available: "
            f"{', '.join('{' + k + '}' for k in values)}"
        ) from None
    return cfg
