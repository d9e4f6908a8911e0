"""The one table of who may call what: rpc full name -> the roles allowed to call it.

`RPC_ROLES` names every rpc of every `prebake.v1` service (a test checks it against the
service descriptors, so a new rpc cannot ship without an entry). `admin` may call every
rpc besides the roles listed. An rpc of a prebake service missing from the table is
refused to everyone but admin (fail closed).

Open to everyone, token or not (`OPEN_SERVICES`): the standard health service, because
load balancers and orchestrators probe it without credentials and it reveals only
SERVING / NOT_SERVING; and server reflection, because it describes only the public
contract (the same `.proto` files anyone can read in the repository), never data.

Some rules depend on the request, not just the rpc; they live in `request_rules`
(`PublishArtifact` with `replace` needs admin; whether a reader's miss may enqueue).
"""

from __future__ import annotations

from prebake.server.principal import Role

R, W, P = Role.READER, Role.WORKER, Role.PUBLISHER
_ADMIN_ONLY: frozenset[Role] = frozenset()
_ANY = frozenset({R, W, P})


def _service(name: str, rpcs: dict[str, frozenset[Role]]) -> dict[str, frozenset[Role]]:
    return {f"prebake.v1.{name}.{rpc}": roles for rpc, roles in rpcs.items()}


RPC_ROLES: dict[str, frozenset[Role]] = {
    **_service(
        "Registry",
        {
            # Deployers look keys up (a miss may enqueue: see request_rules) and read manifests.
            # Publishers too: `prebake publish` resolves the key it signs with a report-only lookup,
            # and asks whether the key has an artifact before it uploads anything.
            "Lookup": frozenset({R, P}),
            # Workers too: an evaluation job fetches the artifact it evaluates.
            "GetArtifact": frozenset({R, W, P}),
            # Artifacts compiled elsewhere; workers publish through CompleteJob instead.
            "PublishArtifact": frozenset({P}),
            # Evaluations are read like manifests; storing one vouches for measurements, as
            # publishing vouches for files.
            "ListEvaluations": frozenset({R, P}),
            "ImportEvaluation": frozenset({P}),
            # A read of evaluations and keys, like ListEvaluations.
            "Recommend": frozenset({R, P}),
        },
    ),
    **_service(
        "Blobs",
        {
            "FindMissingBlobs": frozenset({W, P}),
            # Downloads (by workers: the artifact an evaluation job evaluates).
            "Read": frozenset({R, W}),
            # Uploads of compile outputs (workers) and of imported artifacts (publishers).
            "Write": frozenset({W, P}),
            "QueryWriteStatus": frozenset({W, P}),
        },
    ),
    **_service(
        "Jobs",
        {
            "GetJob": frozenset({R}),
            "ListJobs": frozenset({R}),
            "WatchJob": frozenset({R}),
            # A job is shared by everyone who joined it: cancelling is an operator's call.
            "CancelJob": _ADMIN_ONLY,
            # Asks for worker time as a lookup's miss does (readers only where
            # reader_may_enqueue: see request_rules); the worker's result vouches for itself.
            "EnqueueEvaluation": frozenset({R, P}),
        },
    ),
    **_service(
        "Admin",
        {
            # Read-only views (`prebake ls`, `prebake stats`).
            "ListArtifacts": frozenset({R}),
            "GetStats": frozenset({R}),
            "DeleteArtifact": _ADMIN_ONLY,
            "PinArtifact": _ADMIN_ONLY,
            # Removes (even a dry run lists the whole store): an operator's call.
            "CollectGarbage": _ADMIN_ONLY,
            # Quarantines, marks artifacts unavailable and enqueues rebuilds; reads every blob.
            "VerifyBlobs": _ADMIN_ONLY,
        },
    ),
    **_service(
        "Workers",
        {
            "ListWorkers": frozenset({R}),
            "LeaseJob": frozenset({W}),
            "Heartbeat": frozenset({W}),
            "CompleteJob": frozenset({W}),
            "CompleteEvaluationJob": frozenset({W}),
            "FailJob": frozenset({W}),
            "ReleaseJob": frozenset({W}),
        },
    ),
    # Public reference data; any authenticated caller.
    **_service(
        "Catalog",
        {
            "ListModels": _ANY,
            "ListInstanceTypes": _ANY,
            # Presets carry the registry's artifacts and evaluations: read like ListEvaluations.
            "ListPresets": frozenset({R, P}),
            "GetPreset": frozenset({R, P}),
        },
    ),
}

# Services whose rpcs need no credentials (see the module docstring).
# (Both reflection protocols: `prebake.server.reflection.SERVICE_NAMES`; a test compares.)
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
# The package whose rpcs the table governs.
GOVERNED_PACKAGE = "prebake.v1"


def split_method(method: str) -> tuple[str, str]:
    """("prebake.v1.Registry", "Lookup") from gRPC's "/prebake.v1.Registry/Lookup"."""
    service, _, rpc = method.lstrip("/").partition("/")
    return service, rpc


def is_open(method: str) -> bool:
    """Whether `method` ("/pkg.Service/Rpc") is served without credentials."""
    return split_method(method)[0] in OPEN_SERVICES


def allowed(method: str, roles: frozenset[Role]) -> bool:
    """Whether a caller holding `roles` may call `method` ("/pkg.Service/Rpc")."""
    if Role.ADMIN in roles:
        return True
    service, rpc = split_method(method)
    return bool(RPC_ROLES.get(f"{service}.{rpc}", _ADMIN_ONLY) & roles)


def roles_for(method: str) -> frozenset[Role]:
    """The roles that may call `method`, admin included (for messages)."""
    service, rpc = split_method(method)
    return RPC_ROLES.get(f"{service}.{rpc}", _ADMIN_ONLY) | {Role.ADMIN}
