"""Bring checkpoints written by other tools into a castore store.

* :func:`import_elements`: the complete steps of an ``elements.Checkpoint`` directory
  (DreamerV3's ``logdir/ckpt``), one store step per folder;
* :func:`import_replay`: an embodied replay directory of ``.npz`` chunks (DreamerV3's
  ``logdir/replay``) as one :class:`castore.RingBuffer` state.

The command line runs them as ``castore import-elements`` and ``castore import-replay``.
"""

from .elements_checkpoint import ElementsImport, ImportedStep, SkippedFolder, import_elements
from .embodied_replay import ReplayImport, import_replay

__all__ = ["ElementsImport", "ImportedStep", "ReplayImport", "SkippedFolder", "import_elements", "import_replay"]
