"""botocore's exceptions -> prebake's domain errors, in one place.

Every boto3 call of the DynamoDB backend runs under `translate` (through
`Engine.run`), so nothing engine-specific escapes the storage seams:

* a failed condition (a conditional write, or a transaction one of whose conditions
  failed) -> `ConditionFailed`: the caller re-reads and decides again;
* throttling, a transaction conflict, a 5xx, a refused or timed-out connection ->
  `Unavailable` (retryable), naming the table or tables, never a secret;
* a missing table -> `FailedPrecondition` with the `prebake init-aws` hint; missing or
  refused credentials, no region -> `FailedPrecondition` saying what to configure;
* an item over DynamoDB's 400 KB -> `InvalidArgument`;
* anything else -> `Internal` with DynamoDB's message (a bug in this backend).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from prebake.core.errors import FailedPrecondition, Internal, InvalidArgument, PrebakeError, Unavailable
from prebake.server.storage.conditions import ConditionFailed

# Error codes (of a response, or of one cancellation reason of a transaction) that mean
# "busy now, fine later".
_BUSY_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ProvisionedThroughputExceeded",
        "ThrottlingException",
        "ThrottlingError",
        "Throttling",
        "RequestLimitExceeded",
        "LimitExceededException",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "TransactionInProgressException",
        "TransactionConflictException",
        "TransactionConflict",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "MissingAuthenticationTokenException",
        "IncompleteSignatureException",
    }
)


class TransactionConflict(Unavailable):
    """Another transaction was writing one of the items at the same moment; nothing changed.

    Retried by `Engine.transact` a few times before it reaches a caller.
    """


def init_hint(prefix: str) -> str:
    return f"run `prebake init-aws --registry dynamodb://{prefix}` to create the tables"


def _reasons(response: dict[str, Any]) -> list[str]:
    return [str(r.get("Code") or "None") for r in response.get("CancellationReasons") or []]


def _too_large(message: str) -> bool:
    return "size" in message.lower() and ("exceed" in message.lower() or "large" in message.lower())


def _translate_client_error(exc: ClientError, where: str, hint: str) -> PrebakeError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code == "ConditionalCheckFailedException":
        return ConditionFailed(f"{where}: the stored item changed meanwhile")
    if code == "TransactionCanceledException":
        reasons = _reasons(dict(exc.response))
        if "ConditionalCheckFailed" in reasons:
            return ConditionFailed(f"{where}: the stored items changed meanwhile")
        if "TransactionConflict" in reasons:
            return TransactionConflict(f"{where}: a concurrent transaction wrote the same items; retry")
        if any(r in _BUSY_CODES for r in reasons):
            return Unavailable(
                f"DynamoDB is busy ({', '.join(sorted(set(reasons) - {'None'}))}) on {where}; retry"
            )
        if "ValidationError" in reasons and _too_large(message):
            return InvalidArgument(f"{where}: an item would exceed DynamoDB's 400 KB item size limit")
        return Internal(f"DynamoDB cancelled a transaction on {where}: {message}")
    if code == "ValidationException" and _too_large(message):
        return InvalidArgument(f"{where}: an item would exceed DynamoDB's 400 KB item size limit")
    if code == "ResourceNotFoundException":
        return FailedPrecondition(f"{where}: a DynamoDB table or index does not exist; {hint}")
    if code in _CREDENTIAL_CODES:
        return FailedPrecondition(
            f"DynamoDB refused the server's AWS credentials for {where} ({code}); check the "
            "credentials boto3 finds (AWS_PROFILE, environment, instance role) and their IAM policy"
        )
    if code in _BUSY_CODES or status >= 500:
        return Unavailable(f"DynamoDB is unavailable for {where} ({code or status}); retry")
    return Internal(f"DynamoDB refused a request on {where} ({code}: {message})")


def translate(exc: ClientError | BotoCoreError, where: str, hint: str) -> PrebakeError:
    """The domain error for a botocore exception raised while working on `where`.

    `where` names the table(s), e.g. "table prebake-prod-jobs"; `hint` says how to
    create missing tables. Messages carry no credentials and no traceback.
    """
    if isinstance(exc, ClientError):
        return _translate_client_error(exc, where, hint)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return FailedPrecondition(
            f"no usable AWS credentials for DynamoDB ({where}): {exc}; set them the way boto3 "
            "looks for them (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an instance role)"
        )
    if isinstance(exc, NoRegionError):
        return FailedPrecondition(
            f"no AWS region for DynamoDB ({where}); set AWS_REGION or AWS_DEFAULT_REGION, or a profile region"
        )
    # Refused, reset or timed-out connections and every other transport failure.
    return Unavailable(f"DynamoDB is unreachable for {where} ({type(exc).__name__}: {exc}); retry")
