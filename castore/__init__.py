"""castore: a content-addressed, deduplicating checkpoint store for long training runs."""

from .errors import *  # noqa: F401,F403
from .background import SaveHandle
from .checkpoint import Checkpoint, Counter, Every
from .gc import GcPlan
from .replay import RingBuffer
from .retention import Keep
from .store import SaveResult, Store, StoreStats
from .tracking import TrackedArray

__version__ = "0.4.0"
