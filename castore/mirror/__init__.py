"""Mirroring a store to object storage: uploads, pulls and bucket GC (``docs/format.md``,
*Bucket layout*; ``docs/guide.md``, *Mirrors*).

* :mod:`~castore.mirror.transfer`: one step up (:func:`upload_step`) or down (:func:`pull_step`);
* :mod:`~castore.mirror.mirror`: :class:`Mirror`, the background uploader a ``Store(mirror=)`` composes;
* :mod:`~castore.mirror.bucket_gc`: plan, execute and :func:`collect` on a bucket, under its lock.
"""

from .bucket_gc import BucketGcPlan
from .mirror import Mirror, MirrorOptions
from .transfer import PullResult, UploadResult, pull_step, upload_step

__all__ = ["BucketGcPlan", "Mirror", "MirrorOptions", "PullResult", "UploadResult", "pull_step", "upload_step"]
