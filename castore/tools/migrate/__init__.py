"""Bring checkpoints written by other tools into a castore store.

* :func:`import_elements`: the complete steps of an ``elements.Checkpoint`` directory
  (DreamerV3's ``logdir/ckpt``), one store step per folder.
"""

from .elements_checkpoint import ElementsImport, ImportedStep, SkippedFolder, import_elements

__all__ = ["ElementsImport", "ImportedStep", "SkippedFolder", "import_elements"]
