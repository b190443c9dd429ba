"""castore: a content-addressed, deduplicating checkpoint store for long training runs."""

from .checkpoint import Checkpoint, load
from .errors import (
    BucketBusyError,
    CastoreError,
    ChunkCorruptError,
    ChunkMissingError,
    CommitTimeoutError,
    ComponentCollisionError,
    CorruptDataError,
    FormatError,
    IntegrityError,
    MigrationError,
    MirrorError,
    RemoteBucketNotFoundError,
    RemoteError,
    RemoteNotFoundError,
    RemotePermissionError,
    RemoteUnavailableError,
    SaveError,
    SelectionError,
    StepConflictError,
    StepExistsError,
    StepNotFoundError,
    StoreBusyError,
    StoreLockedError,
    StoreNotFoundError,
    StorePermissionError,
    TrackingError,
    UnsafeFilesystemError,
    UnsupportedLocationError,
    UnsupportedValueError,
    UsageError,
)
from .loop import Counter, Every
from .maintenance.gc import GcPlan, StepAccount, StoreStats
from .maintenance.retention import Keep
from .maintenance.verify import Problem, VerifyReport
from .mirror import MirrorOptions
from .replay import RingBuffer
from .save.background import SaveHandle
from .save.saver import SaveResult
from .store import Store
from .tracking import TrackedArray

__version__ = "0.6.0"

__all__ = [
    "CastoreError",
    "Checkpoint",
    "ChunkCorruptError",
    "ChunkMissingError",
    "CommitTimeoutError",
    "ComponentCollisionError",
    "CorruptDataError",
    "Counter",
    "Every",
    "FormatError",
    "GcPlan",
    "IntegrityError",
    "Keep",
    "MigrationError",
    "Problem",
    "BucketBusyError",
    "MirrorError",
    "MirrorOptions",
    "RemoteBucketNotFoundError",
    "RemoteError",
    "RemoteNotFoundError",
    "RemotePermissionError",
    "RemoteUnavailableError",
    "RingBuffer",
    "SaveError",
    "SaveHandle",
    "SaveResult",
    "SelectionError",
    "StepAccount",
    "StepConflictError",
    "StepExistsError",
    "StepNotFoundError",
    "Store",
    "StoreBusyError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StorePermissionError",
    "StoreStats",
    "TrackedArray",
    "TrackingError",
    "UnsafeFilesystemError",
    "UnsupportedLocationError",
    "UnsupportedValueError",
    "UsageError",
    "VerifyReport",
    "load",
]
