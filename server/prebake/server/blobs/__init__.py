"""Blob storage in two layers: a narrow object store per backend, one content-addressed store above.

`objects.ObjectStore` (put, ranged get, head, delete, list, move, multipart uploads) is what a
backend implements: `local_objects.LocalObjectStore`, and `s3_objects.S3ObjectStore` (imported from
its module only: it needs the `aws` extra, boto3). `cas.ContentAddressedStore` is the
one `blob_store.BlobStore` over any of them: upload sessions, resume, hashing, verification,
quotas.
"""

from prebake.server.blobs.blob_store import (
    MAX_UPLOAD_ID_LENGTH,
    BlobReader,
    BlobStore,
    BlobWriter,
    Collected,
    PendingDigest,
    QuarantinedBlob,
    ScrubOutcome,
    ScrubResult,
    StoredBlob,
    StoreStats,
    StoreUsage,
    UploadDigest,
    UploadStatus,
    validate_upload_id,
)
from prebake.server.blobs.cas import BlobUpload, ContentAddressedStore
from prebake.server.blobs.local_objects import LocalObjectStore
from prebake.server.blobs.objects import ObjectStore

__all__ = [
    "MAX_UPLOAD_ID_LENGTH",
    "BlobReader",
    "BlobStore",
    "BlobUpload",
    "BlobWriter",
    "Collected",
    "ContentAddressedStore",
    "LocalObjectStore",
    "ObjectStore",
    "PendingDigest",
    "QuarantinedBlob",
    "ScrubOutcome",
    "ScrubResult",
    "StoreStats",
    "StoreUsage",
    "StoredBlob",
    "UploadDigest",
    "UploadStatus",
    "validate_upload_id",
]
