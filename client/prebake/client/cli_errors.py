"""How a failed `prebake` command reports itself: stderr for people, one JSON object for scripts.

Every failure, from the parser to the server, ends in `report`: `error: <message>` on
stderr and, with `--json`, exactly one object on stdout:

    {"error": {"code": "INVALID_ARGUMENT", "message": "...", "field": "tensor_parallel_degree",
               "exit_code": 10}}

`code` is the gRPC status name for an error of the server or the client library
(`PrebakeError.code`), else one of the CLI's own: USAGE (the command line), ERROR (a
command's own failure), CANCELLED (Ctrl-C). `field` is the request field the error is
about, as the contract spells it (from the server's google.rpc.BadRequest detail, or
the flag the parser refused), else null. `exit_code` is the process's exit status.

Messages name CLI flags, not contract fields: the server words its messages for any
caller, naming fields in backquotes ("set `replace` to replace it"); `to_flags` turns
each field of `FIELD_FLAGS` into its flag ("set --replace to replace it"), and an error
about a key field is prefixed with the flag ("--tp: ml.inf2.xlarge has 2 NeuronCores; ...").
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass

from prebake.client import exitcodes
from prebake.client.errors import PrebakeError

# Contract field (request or key field) -> the flag that sets it; the one translation table.
FIELD_FLAGS: dict[str, str] = {
    "kind": "--kind",
    "model": "--model",
    "model_revision": "--revision",
    "instance_type": "--instance-type",
    "sequence_length": "--sequence-length",
    "batch_size": "--batch-size",
    "tensor_parallel_degree": "--tp",
    "precision": "--precision",
    "toolchain": "--toolchain",
    "options": "--option",
    "model_source": "--model-source",
    "replace": "--replace",
    "force": "--force",
    "overwrite": "--overwrite",
    "allow": "--allow",
    "server": "--server",
    # Recommend (`instance_types[i]` is looked up without its index).
    "instance_types": "--instance-type",
    "objective": "--objective",
    "max_ttft_ms": "--max-ttft-ms",
    "max_itl_ms": "--max-itl-ms",
    "concurrency": "--concurrency",
    "limit": "--limit",
}
# A flag that sets two fields (--instance-type: a key's, and Recommend's list) names the first.
FLAG_FIELDS: dict[str, str] = {flag: field for field, flag in reversed(FIELD_FLAGS.items())}

_QUOTED_FIELD = re.compile(r"`([a-z_]+)`")
_INDEX = re.compile(r"\[\d+\]$")


def to_flags(message: str) -> str:
    """`message` with every backquoted field it names as its CLI flag; other quotes dropped."""
    return _QUOTED_FIELD.sub(lambda m: FIELD_FLAGS.get(m.group(1), m.group(1)), message)


@dataclass(frozen=True)
class Failure:
    """What a failed command reports (see the module docstring)."""

    code: str
    message: str
    exit_code: int
    field: str | None = None

    @classmethod
    def of(cls, exc: PrebakeError, hint: str = "") -> Failure:
        """The failure that `exc` stands for; `hint` (a line for people) is appended."""
        message = to_flags(str(exc))
        flag = FIELD_FLAGS.get(_INDEX.sub("", exc.field or ""))
        if flag and not message.startswith(flag):
            message = f"{flag}: {message}"  # the server names the field; people typed the flag
        if hint:
            message = f"{message}\n  {hint}"
        return cls(exc.code, message, exitcodes.for_error(exc), exc.field)

    def json(self) -> str:
        return json.dumps(
            {
                "error": {
                    "code": self.code,
                    "message": self.message,
                    "field": self.field,
                    "exit_code": self.exit_code,
                }
            },
            indent=2,
        )


def report(failure: Failure, as_json: bool) -> int:
    """Print `failure` (stderr; and stdout as JSON with `as_json`); returns its exit code."""
    print(f"error: {failure.message}", file=sys.stderr)
    if as_json:
        with contextlib.suppress(BrokenPipeError):  # nobody reads stdout any more: stderr said it
            print(failure.json(), flush=True)
    return failure.exit_code
