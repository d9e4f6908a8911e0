"""Content-addressed blob storage: the `BlobStore` contract and its backends."""

from prebake.server.blobs.base import (
    MAX_UPLOAD_ID_LENGTH,
    BlobReader,
    BlobStore,
    BlobWriter,
    StoreStats,
    UploadStatus,
    validate_upload_id,
)
from prebake.server.blobs.local import LocalBlobStore, LocalBlobWriter

__all__ = [
    "MAX_UPLOAD_ID_LENGTH",
    "BlobReader",
    "BlobStore",
    "BlobWriter",
    "LocalBlobStore",
    "LocalBlobWriter",
    "StoreStats",
    "UploadStatus",
    "validate_upload_id",
]
