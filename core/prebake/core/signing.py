"""Signed artifacts: what is signed, key files, key ids, signing and verification.

The one owner of the signature format, used by the publisher and the compile worker
(sign), the server (check and record) and the deploying client (verify against its
trust set, from the manifest it fetched, so that a compromised server or bucket still
cannot make a deploy host place files no trusted key signed).

**What is signed** (format 1): the bytes `b"prebake artifact signature v1\\n"` followed
by the compact JSON object (sorted keys, UTF-8, no whitespace)
`{"artifact_id": ..., "key": ..., "manifest_digest": ..., "v": 1}`, where

* `artifact_id` is the artifact's id (its key digest, 32 hex digits),
* `key` is the key's canonical text (`ResolvedKey.canonical`, whose xxh3-128 is the id:
  the signature binds the configuration, not only an opaque id),
* `manifest_digest` is `prebake.core.digests.manifest_digest` of the file list (paths,
  blob digests and sizes, executable bits). A verifier recomputes it from the files it
  received and never reads the manifest digest the server states.

The prefix separates these signatures from anything else the key might sign. A new
format is a new version number and prefix, never a silent change.

**Keys** are Ed25519. A private key file is PEM, PKCS#8, unencrypted
(`-----BEGIN PRIVATE KEY-----`, what `openssl genpkey -algorithm ed25519` writes); a
public key file is PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`, `openssl pkey
-pubout`). `generate_key_files` writes both (the private one mode 0600). A key's id is
`ed25519:` and the first 32 hex digits of the SHA-256 of its raw 32-byte public key.

`cryptography` is imported only when a key is loaded or a signature checked, so the thin
client without the `signing` extra works as long as nothing asks for trust;
`SigningUnavailable` names the extra otherwise. Everything here is thread-safe (keys are
immutable).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prebake.core.digests import manifest_digest
from prebake.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from prebake.v1 import registry_pb2

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT_VERSION = 1
_PREFIX = b"prebake artifact signature v1\n"
KEY_ID_PREFIX = "ed25519:"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# A key id is the prefix and 32 hex digits; anything longer is refused before any lookup.
MAX_KEY_ID = len(KEY_ID_PREFIX) + 32
EXTRA = "signing"
# Key files are a few hundred bytes; a bigger file is not a key (and is not read whole).
_MAX_KEY_FILE = 16 * 1024


class SigningUnavailable(FailedPrecondition):
    """Signing or verification was asked for, but `cryptography` is not installed."""


class BadSignature(InvalidArgument):
    """A signature that is malformed or does not verify for what it claims to sign."""


class UntrustedArtifact(PermissionDenied):
    """An artifact the trust set does not accept (unsigned, unknown signer, bad signature).

    Raised by the client before anything is placed; `signer` is the key id the artifact
    names ("" when unsigned).
    """

    def __init__(self, details: str = "", signer: str = "") -> None:
        super().__init__(details)
        self.signer = signer


class KeyFileError(InvalidArgument):
    """A key file that cannot be read or is not an Ed25519 key in the documented format."""


def _crypto() -> Any:
    """The `cryptography` Ed25519 and serialization modules, or `SigningUnavailable`."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningUnavailable(
            f"signed artifacts need the 'cryptography' package: pip install 'prebake[{EXTRA}]'"
        ) from None
    return ed25519, serialization


@dataclass(frozen=True)
class Signature:
    """A signature over one artifact: who signed (`key_id`, `public_key`) and the 64 bytes."""

    key_id: str
    signature: bytes
    # The signer's raw 32-byte public key. A verifier with a trust set looks the signer up by
    # `key_id` and never trusts this; it lets a server without a signer set check consistency.
    public_key: bytes = b""

    def check_shape(self) -> None:
        """Raise BadSignature unless the fields have the sizes and forms of format 1."""
        if not self.key_id.startswith(KEY_ID_PREFIX) or len(self.key_id) != MAX_KEY_ID:
            shown = self.key_id[: MAX_KEY_ID + 8]
            raise BadSignature(f"signature key id {shown!r} is not 'ed25519:' and 32 hex digits")
        if any(c not in "0123456789abcdef" for c in self.key_id[len(KEY_ID_PREFIX) :]):
            raise BadSignature(f"signature key id {self.key_id!r} is not 'ed25519:' and 32 hex digits")
        if len(self.signature) != SIGNATURE_BYTES:
            raise BadSignature(
                f"signature is {len(self.signature)} bytes; an Ed25519 signature is {SIGNATURE_BYTES}"
            )
        if self.public_key:
            if len(self.public_key) != PUBLIC_KEY_BYTES:
                raise BadSignature(
                    f"signature public key is {len(self.public_key)} bytes; "
                    f"an Ed25519 public key is {PUBLIC_KEY_BYTES}"
                )
            if key_id(self.public_key) != self.key_id:
                raise BadSignature(f"signature key id {self.key_id} is not the id of its public key")


def key_id(public_key: bytes) -> str:
    """The id of a raw 32-byte Ed25519 public key: `ed25519:` + 32 hex digits of SHA-256."""
    return KEY_ID_PREFIX + hashlib.sha256(public_key).hexdigest()[:32]


def signed_bytes(artifact_id: str, key_canonical: str, manifest: str) -> bytes:
    """The exact bytes a format-1 signature signs (see the module docstring)."""
    document = {
        "artifact_id": artifact_id,
        "key": key_canonical,
        "manifest_digest": manifest,
        "v": FORMAT_VERSION,
    }
    return _PREFIX + json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{str(path)!r} is larger than {_MAX_KEY_FILE} bytes; it is not a key file")
    return data


def _raw_public(public: Ed25519PublicKey) -> bytes:
    _, serialization = _crypto()
    raw: bytes = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


class SigningKey:
    """An Ed25519 private key that signs artifacts. Load with `SigningKey.load`."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = _raw_public(private.public_key())
        self.key_id = key_id(self.public_key)

    @classmethod
    def load(cls, path: Path | str) -> SigningKey:
        """The key in a PEM PKCS#8 file; `KeyFileError` if it is not an unencrypted Ed25519 key."""
        ed25519, serialization = _crypto()
        path = Path(path)
        data = _read_key_file(path)
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(
                f"{str(path)!r} is not an unencrypted PEM (PKCS#8) private key: {exc}"
            ) from None
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"{str(path)!r} holds a {type(private).__name__}, not an Ed25519 key")
        return cls(private)

    def sign(self, artifact_id: str, key_canonical: str, manifest: str) -> Signature:
        """The signature of one artifact, `manifest` its manifest digest (see `signed_bytes`)."""
        payload = signed_bytes(artifact_id, key_canonical, manifest)
        return Signature(self.key_id, self._private.sign(payload), self.public_key)

    def __repr__(self) -> str:  # never the key material
        return f"SigningKey({self.key_id})"


def _public_from_raw(raw: bytes) -> Ed25519PublicKey:
    ed25519, _ = _crypto()
    try:
        key: Ed25519PublicKey = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise BadSignature(f"not an Ed25519 public key: {exc}") from None
    return key


def verify(public_key: bytes, signature: Signature, payload: bytes) -> bool:
    """Whether `signature` is `public_key`'s signature of `payload` (shapes checked first)."""
    signature.check_shape()
    public = _public_from_raw(public_key)  # raises SigningUnavailable before the import below
    from cryptography.exceptions import InvalidSignature

    try:
        public.verify(signature.signature, payload)
    except InvalidSignature:
        return False
    return True


def load_public_key(path: Path | str) -> bytes:
    """The raw public key in a PEM SubjectPublicKeyInfo file (or derived from a private key file).

    `KeyFileError` if the file holds no Ed25519 key in either PEM form.
    """
    ed25519, serialization = _crypto()
    path = Path(path)
    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        return SigningKey.load(path).public_key
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{str(path)!r} is not a PEM public key: {exc}") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{str(path)!r} holds a {type(public).__name__}, not an Ed25519 key")
    return _raw_public(public)


class TrustSet:
    """The public keys whose signatures are accepted; several keys allow rotation.

    `verify` accepts an artifact signed by any of them. Keys are looked up by the id the
    signature names and the signature is checked with the trusted key itself: the public
    key a signature carries is never used.
    """

    def __init__(self, public_keys: Iterable[bytes]) -> None:
        self.keys: dict[str, bytes] = {key_id(k): k for k in public_keys}
        for raw in self.keys.values():
            _public_from_raw(raw)  # refuse a malformed key now, not at the first artifact

    @classmethod
    def load(cls, paths: Sequence[Path | str]) -> TrustSet:
        """The trust set of the public key files `paths` (see `load_public_key`)."""
        return cls(load_public_key(p) for p in paths)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self.keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def verify(self, artifact_id: str, key_canonical: str, manifest: str, signature: Signature | None) -> str:
        """The trusted signer's key id, or `UntrustedArtifact` saying why the artifact is refused."""
        trusted = ", ".join(self.key_ids) or "none"
        if signature is None:
            raise UntrustedArtifact(
                f"artifact {artifact_id} is not signed; the trust set accepts only artifacts "
                f"signed by {trusted}"
            )
        signer = signature.key_id
        public = self.keys.get(signer)
        if public is None:
            raise UntrustedArtifact(
                f"artifact {artifact_id} is signed by {signer[:MAX_KEY_ID]}, which is not trusted "
                f"(trusted: {trusted})",
                signer=signer,
            )
        try:
            valid = verify(public, signature, signed_bytes(artifact_id, key_canonical, manifest))
        except BadSignature as exc:
            raise UntrustedArtifact(f"artifact {artifact_id}: {exc}", signer=signer) from None
        if not valid:
            raise UntrustedArtifact(
                f"artifact {artifact_id} names signer {signer}, but its signature does not match its "
                "key and files (tampered with, or signed for something else)",
                signer=signer,
            )
        return signer


def generate_key_files(out: Path | str) -> tuple[Path, Path, str]:
    """Write a new key pair: `out` (private, PEM PKCS#8, mode 0600) and `out.pub` (PEM).

    Returns (private path, public path, key id). Refuses (`KeyFileError`) to overwrite an
    existing file: a lost signing key cannot be recovered, so it is never replaced silently.
    """
    ed25519, serialization = _crypto()
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{str(path)!r} exists; remove it or choose another --out")
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path, key_id(_raw_public(private.public_key()))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (never following or replacing anything there) with `mode`, durably."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:
        raise KeyFileError(f"cannot create {str(path)!r}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # the umask may have narrowed or (for 0600) it is already exact


def files_digest(files: Iterable[registry_pb2.ArtifactFile]) -> str:
    """The manifest digest of a wire file list, in any order."""
    return manifest_digest((f.path, f.digest.hash, f.digest.size_bytes, f.executable) for f in files)


def signature_of(artifact: registry_pb2.Artifact) -> Signature | None:
    """The signature a wire artifact carries, or None when it has none."""
    if not artifact.HasField("signature"):
        return None
    sig = artifact.signature
    return Signature(key_id=sig.key_id, signature=sig.signature, public_key=sig.public_key)


def verify_artifact(trust: TrustSet, artifact: registry_pb2.Artifact) -> str:
    """The trusted signer of a fetched manifest, or `UntrustedArtifact`.

    Checks the signature over the artifact's id, its key's canonical text and the manifest
    digest recomputed here from its files (the server's `manifest_digest` is not read), so
    a manifest changed anywhere after signing (another file, digest or executable bit) is
    refused. The artifact must carry its files (`GetArtifact`, or a lookup hit).
    """
    digest = files_digest(artifact.files)
    return trust.verify(artifact.artifact_id, artifact.key.canonical, digest, signature_of(artifact))


def check_signed_key(artifact: registry_pb2.Artifact, model: str, model_revision: str = "") -> None:
    """`UntrustedArtifact` unless the artifact's key names `model` (and `model_revision`, if given).

    For a deployer that verified the artifact (`verify_artifact`), so its key's canonical text is
    the signed one: a server that answers a lookup with a genuinely signed artifact of another
    model is refused too. Compatibility policies never change the model or its revision.
    """
    try:
        signed = json.loads(artifact.key.canonical)
    except ValueError:
        signed = None
    if not isinstance(signed, dict):
        raise UntrustedArtifact(f"artifact {artifact.artifact_id} has no readable key to check")
    for field, wanted in (("model", model), ("model_revision", model_revision)):
        if wanted and field in signed and signed[field] != wanted:
            raise UntrustedArtifact(
                f"artifact {artifact.artifact_id} is signed for {field} {str(signed[field])[:256]!r}, "
                f"not the requested {wanted!r}",
                signer=artifact.signature.key_id,
            )
