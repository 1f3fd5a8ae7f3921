"""Configuration: torchreid's ``scripts/default_config.py`` layout, extended by :func:`add_ptl_config`.

Key names follow torchreid's own, so a torchreid YAML config (image-reid) merges unchanged; the additions are
listed in :mod:`.defaults`. A torchreid-style config of your own takes them with ``add_ptl_config(cfg)``.

Merging is strict (:mod:`.merge`): an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the key and the nearest valid key; :func:`validate_config` (:mod:`.validate`) then rejects impossible
values before any work starts. :mod:`.kwargs` maps a config to the builders' keyword arguments.
"""
# The ptl section's choice lists, under the names this module always exported; their owners define them.
from ptl_torchreid.models import EVAL_STATES as PTL_EVAL_STATES
from ptl_torchreid.models import RESET_POLICIES as PTL_RESET_POLICIES
from ptl_torchreid.models import STATE_MODES as PTL_STATE_MODES

from .defaults import add_ptl_config, get_default_config, torchreid_default_config
from .errors import ConfigError
from .kwargs import (
    engine_kwargs,
    engine_run_kwargs,
    evaluation_kwargs,
    imagedata_kwargs,
    is_ptl_model_name,
    lr_scheduler_kwargs,
    model_kwargs,
    optimizer_kwargs,
    resolve_use_gpu,
    resume_path,
    synthetic_kwargs,
)
from .merge import config_keys, expand_save_dir, load_config, merge_from_file, merge_from_list, nearest_keys
from .validate import is_synthetic_dataset, torchreid_choices, torchreid_image_datasets, validate_config

__all__ = [
    "ConfigError",
    "config_keys",
    "nearest_keys",
    "resolve_use_gpu",
    "is_ptl_model_name",
    "get_default_config",
    "add_ptl_config",
    "torchreid_default_config",
    "load_config",
    "merge_from_file",
    "merge_from_list",
    "validate_config",
    "expand_save_dir",
    "imagedata_kwargs",
    "optimizer_kwargs",
    "lr_scheduler_kwargs",
    "engine_run_kwargs",
    "engine_kwargs",
    "evaluation_kwargs",
    "resume_path",
    "model_kwargs",
    "synthetic_kwargs",
    "is_synthetic_dataset",
    "torchreid_image_datasets",
    "torchreid_choices",
    "PTL_STATE_MODES",
    "PTL_EVAL_STATES",
    "PTL_RESET_POLICIES",
]
