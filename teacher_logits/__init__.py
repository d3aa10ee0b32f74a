"""Offline teacher-logit generation for knowledge distillation: the library.

``from teacher_logits import LogitStore`` reads a gathered store with numpy, h5py
and hdf5plugin only; importing this package never imports torch, transformers
or Snakemake. The workflow's rule scripts (``workflow_scripts/``) call into
``prepare``, ``generation``, ``gather`` and ``report_figures``.
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["LogitStore", "UserError"]

from .errors import UserError


def __getattr__(name: str):
    # The reader brings h5py; plan-time users (the Snakefile) import only light modules.
    if name == "LogitStore":
        from .store.reader import LogitStore

        return LogitStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
