"""The server's signature policy: which signatures a publish needs, which signers are revoked.

Built once from the configuration (`require_signatures`, `signer_keys`, `revoked_signers`)
and shared by the publish paths (operator publish, worker completion) and the read paths
(lookup, GetArtifact). The format and the cryptography are `prebake.core.signing`'s; this
module only decides. Immutable, so thread-safe.

What the server's check buys: a record of who produced each artifact, refusal of
tampered or mis-signed uploads, and (with a signer set) of publishers without a known
key. It does not replace the client's verification: a deploy host that passes `--trust`
verifies every manifest itself, so a compromised server still cannot make it place
anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prebake.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from prebake.core.signing import BadSignature, Signature, key_id, load_public_key, signed_bytes, verify
from prebake.server.config import ServerConfig
from prebake.server.records import Artifact, NormalizedKey

_KEY_ID_RE = re.compile(r"ed25519:[0-9a-f]{32}")


def split_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated setting."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_key_ids(text: str, setting: str) -> frozenset[str]:
    """The key ids of a comma-separated setting; ValueError naming `setting` if one is malformed."""
    ids = split_list(text)
    for item in ids:
        if not _KEY_ID_RE.fullmatch(item):
            raise ValueError(
                f"{setting}: {item[:80]!r} is not a key id ('ed25519:' and 32 hex digits, "
                "as `prebake key generate` prints)"
            )
    return frozenset(ids)


@dataclass(frozen=True)
class SignaturePolicy:
    """What the server accepts and serves; the default accepts anything and revokes nothing."""

    require: bool = False
    # Key id -> raw public key. Empty: any key whose signature verifies with the public key
    # the request carries.
    signers: Mapping[str, bytes] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()

    @classmethod
    def from_settings(
        cls, require: bool, signer_key_files: Sequence[str], revoked_signers: str
    ) -> SignaturePolicy:
        """The policy of the settings; ValueError for an unreadable key file or a malformed id
        (and `SigningUnavailable`'s message when `cryptography` is missing and keys are named)."""
        revoked = parse_key_ids(revoked_signers, "revoked_signers")
        signers: dict[str, bytes] = {}
        for path in signer_key_files:
            try:
                public = load_public_key(path)
            except (InvalidArgument, FailedPrecondition) as exc:
                raise ValueError(f"signer_keys: {exc}") from None
            signers[key_id(public)] = public
        return cls(require=require, signers=signers, revoked=revoked)

    def check(self, key: NormalizedKey, manifest: str, signature: Signature | None) -> None:
        """Raise unless a publish of `key` with manifest digest `manifest` and `signature` may go on.

        `PermissionDenied`: unsigned while signatures are required; a revoked signer; a signer
        outside the configured signer set. `BadSignature` (INVALID_ARGUMENT): malformed, no
        public key to check it with, or it does not verify for this key and file list.
        """
        if signature is None:
            if self.require:
                raise PermissionDenied(
                    "this server accepts only signed artifacts (require_signatures); sign with "
                    "`--signing-key FILE` (prebake publish, prebake worker). Nothing was published"
                )
            return
        signature.check_shape()
        signer = signature.key_id
        if signer in self.revoked:
            raise PermissionDenied(f"signer {signer} is revoked on this server; nothing was published")
        if self.signers:
            public = self.signers.get(signer)
            if public is None:
                raise PermissionDenied(
                    f"signer {signer} is not one of this server's signer keys (signer_keys); "
                    "nothing was published"
                )
        elif signature.public_key:
            public = signature.public_key
        else:
            raise BadSignature(
                f"the signature by {signer} carries no public key, and this server has no signer keys "
                "to check it with; nothing was published"
            )
        if not verify(public, signature, signed_bytes(key.digest, key.canonical, manifest)):
            raise BadSignature(
                f"the signature by {signer} does not verify for artifact {key.digest} with these files "
                f"(manifest {manifest}); nothing was published"
            )

    def revoked_signer(self, artifact: Artifact) -> str | None:
        """The revoked key id `artifact` is signed by, or None if it may be served."""
        signature = artifact.signature
        if signature is not None and signature.key_id in self.revoked:
            return signature.key_id
        return None

    def refuse_revoked(self, artifact: Artifact) -> None:
        """`FailedPrecondition` naming the key when `artifact` is signed by a revoked signer."""
        signer = self.revoked_signer(artifact)
        if signer is not None:
            raise FailedPrecondition(revoked_message(artifact.artifact_id, signer))


def revoked_message(artifact_id: str, signer: str) -> str:
    return (
        f"artifact {artifact_id} is signed by revoked key {signer} and is not served; a lookup "
        "enqueues its rebuild, or publish it again signed by a current key (replace)"
    )


def signature_policy(config: ServerConfig) -> SignaturePolicy:
    """The policy of a server configuration; ValueError for unusable settings."""
    return SignaturePolicy.from_settings(
        config.require_signatures, split_list(config.signer_keys), config.revoked_signers
    )
