"""Datasets for ptl_torchreid.

Importing this package registers the synthetic datasets ``synthetic_reid`` (the default demo dataset) and the
transfer pair ``synthetic_source`` / ``synthetic_target`` in torchreid, so that
``torchreid.data.ImageDataManager(root=..., sources='synthetic_reid')`` generates and loads them.
"""
from .check import (
    PATTERNS,
    DatasetError,
    DatasetReport,
    DatasetRootError,
    check_dataset_root,
    format_report,
    parse_image_name,
)
from .reader import (
    ImageReadError,
    install_strict_reader,
    read_image,
    reset_skipped_images,
    skipped_images,
    uninstall_strict_reader,
)
from .synthetic import (
    DEFAULT_DATASETS,
    FORMAT_VERSION,
    STYLES,
    SyntheticParams,
    SyntheticReID,
    make_contact_sheet,
    make_params,
    prepare_synthetic_dataset,
    read_split,
    register_synthetic_dataset,
    registered_synthetic_datasets,
)
from .synthetic.dataset import _register_defaults

_register_defaults()
del _register_defaults

__all__ = [
    "PATTERNS",
    "DatasetError",
    "DatasetReport",
    "DatasetRootError",
    "ImageReadError",
    "check_dataset_root",
    "format_report",
    "install_strict_reader",
    "read_image",
    "reset_skipped_images",
    "skipped_images",
    "uninstall_strict_reader",
    "DEFAULT_DATASETS",
    "FORMAT_VERSION",
    "STYLES",
    "SyntheticParams",
    "SyntheticReID",
    "make_contact_sheet",
    "make_params",
    "parse_image_name",
    "prepare_synthetic_dataset",
    "read_split",
    "register_synthetic_dataset",
    "registered_synthetic_datasets",
]
