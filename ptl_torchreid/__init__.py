"""ptl_torchreid: Progressive Transfer Learning (PTL) and COP pruning for torchreid.

Importing the package registers the ``ptl_*`` models in torchreid's model factory
and the synthetic datasets in torchreid's dataset registry. Imported before torch, it also makes torch's
OpenMP threads wait passively unless the user chose otherwise (see ``ptl_torchreid/_openmp.py``).
"""
__version__ = "0.1.0"

from . import (
    _openmp,  # noqa: E402,F401  (first: OpenMP waiting must be set before torch is imported)
    models,  # noqa: E402  (registers the ptl_* models in torchreid)
)

models.register_models()
from . import data  # noqa: E402,F401  (registers the synthetic datasets in torchreid)
