"""castore: a content-addressed, deduplicating checkpoint store for long training runs."""

from .errors import *  # noqa: F401,F403
from .checkpoint import Checkpoint, Counter, Every
from .store import SaveResult, Store, StoreStats

__version__ = "0.1.0"
