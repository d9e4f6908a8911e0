"""Signed download URLs for blobs on local disk: what S3 presigned GETs are to an S3 store.

A URL names one blob's object key, an expiry time and an HMAC-SHA256 of both under a secret
only the server's processes read (`blob-urls.secret` in the data directory, created once,
mode 0600), so a URL cannot be made up or stretched: whoever holds one got it from an
authorised lookup, and it reads that one blob until it expires. The server's blob HTTP
endpoint (`prebake.server.blob_http`) checks it; the client verifies what it downloads as it
does for S3 and falls back to a gRPC read for whatever a URL does not deliver.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
import urllib.parse
from pathlib import Path

SECRET_FILE = "blob-urls.secret"
SECRET_BYTES = 32
PATH_PREFIX = "/"


def load_or_create_secret(data_dir: Path) -> bytes:
    """The data directory's URL secret, created (atomically, mode 0600) if absent."""
    path = data_dir / SECRET_FILE
    with contextlib.suppress(FileNotFoundError):
        return bytes.fromhex(path.read_text().strip())
    data_dir.mkdir(parents=True, exist_ok=True)
    temp = data_dir / f".{SECRET_FILE}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(SECRET_BYTES).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # the first process to get here wins; the others read its secret
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)
    return bytes.fromhex(path.read_text().strip())


class BlobUrlSigner:
    """Makes and checks the URLs of one endpoint. Thread safe (immutable)."""

    def __init__(self, secret: bytes, base_url: str) -> None:
        self._secret = secret
        self.base_url = base_url.rstrip("/")

    def _mac(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def presign_get(self, key: str, expires_seconds: int) -> str:
        """See `prebake.server.blobs.objects.Presigns`."""
        expires = int(time.time()) + expires_seconds
        query = urllib.parse.urlencode({"expires": expires, "signature": self._mac(key, expires)})
        return f"{self.base_url}{PATH_PREFIX}{urllib.parse.quote(key)}?{query}"

    def check(self, path: str, query: str, now: float | None = None) -> str | None:
        """The object key a request's path and query are signed for, or None (forged,
        tampered with, expired or malformed)."""
        if not path.startswith(PATH_PREFIX):
            return None
        key = urllib.parse.unquote(path[len(PATH_PREFIX) :])
        fields = urllib.parse.parse_qs(query, max_num_fields=4)
        try:
            (expires_text,) = fields["expires"]
            (signature,) = fields["signature"]
            expires = int(expires_text)
        except (KeyError, ValueError):
            return None
        if not hmac.compare_digest(self._mac(key, expires), signature):
            return None
        if (time.time() if now is None else now) > expires:
            return None
        return key
