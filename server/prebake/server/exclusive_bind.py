"""One server per port: bind without port sharing, and name the process that has the port.

gRPC sets SO_REUSEPORT on its listeners by default, so a second server on a port in use
starts without error and the kernel splits connections between the two. The server is
built with `NO_PORT_SHARING` among its options, which makes the bind fail instead, and
`bind_exclusively` turns that failure into a message naming the owner of the port, found
(on Linux, best effort) by matching the listening socket's inode in /proc/net/tcp{,6}
against the file descriptors in /proc/*/fd.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

# Channel arguments for grpc.aio.server(options=...): one server per port, or a group of
# serving processes of one server (`prebake.server.serving_processes`).
NO_PORT_SHARING = ("grpc.so_reuseport", 0)
PORT_SHARING = ("grpc.so_reuseport", 1)

_LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
_PROC = Path("/proc")


class CannotListen(OSError):
    """The server could not bind its address; the message says why and who has the port."""


@dataclass(frozen=True)
class PortOwner:
    """A process listening on a port, as far as /proc lets this process see it."""

    uid: int
    pid: int | None = None
    command: str = ""

    def describe(self) -> str:
        if self.pid is None:
            return f"a process of uid {self.uid} (its pid is not visible to this user)"
        return f"pid {self.pid}" + (f" ({self.command})" if self.command else "")


def bind_exclusively(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """`server.add_insecure_port(address)` (`add_secure_port` with TLS `credentials`),
    raising CannotListen with the owner if taken.

    Returns the bound port (the chosen one for port 0). The server must have been built
    with `NO_PORT_SHARING`, else a port in use is silently shared.
    """
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        _, _, port_text = address.rpartition(":")
        owners = listening_owners(int(port_text)) if port_text.isdigit() else []
        if not owners:
            raise CannotListen(f"cannot listen on {address}: {exc}") from exc
        who = "; ".join(owner.describe() for owner in owners)
        raise CannotListen(
            f"cannot listen on {address}: port {port_text} is in use by {who}; "
            "stop that server or choose another --listen address"
        ) from exc


def bind_shared(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """`bind_exclusively` for a server built with `PORT_SHARING`, whose serving processes
    will bind the same port: a port on which anything listens already is refused (with its
    owner) before binding, since a SO_REUSEPORT bind would otherwise join that listener."""
    _, _, port_text = address.rpartition(":")
    if port_text.isdigit() and int(port_text) != 0:
        owners = listening_owners(int(port_text))
        if owners:
            who = "; ".join(owner.describe() for owner in owners)
            raise CannotListen(
                f"cannot listen on {address}: port {port_text} is in use by {who}; "
                "stop that server or choose another --listen address"
            )
    return bind_exclusively(server, address, credentials)


def listening_owners(port: int, proc: Path = _PROC) -> list[PortOwner]:
    """The processes with a TCP socket listening on `port` (any address), best effort.

    Empty where /proc is missing (not Linux) or shows no such socket.
    """
    sockets: dict[int, int] = {}  # socket inode -> uid
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            sockets.update(_listening_sockets((proc / "net" / table).read_text(), port))
    if not sockets:
        return []
    found = _pids_holding(set(sockets), proc)
    owners = {
        PortOwner(uid, pid, _command(pid, proc))
        for inode, uid in sockets.items()
        for pid in found.get(inode, [])
    }
    owners |= {PortOwner(uid) for inode, uid in sockets.items() if inode not in found}
    return sorted(owners, key=lambda o: (o.pid is None, o.pid or 0, o.uid))


def _listening_sockets(table: str, port: int) -> dict[int, int]:
    """Inode -> uid of the LISTEN sockets on `port` in one /proc/net/tcp{,6} table."""
    result: dict[int, int] = {}
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN_STATE:
            continue
        _, _, local_port = fields[1].rpartition(":")
        inode = int(fields[9])
        if int(local_port, 16) == port and inode:
            result[inode] = int(fields[7])
    return result


def _pids_holding(inodes: set[int], proc: Path) -> dict[int, list[int]]:
    """Socket inode -> pids with a descriptor on it, among the processes this user may inspect."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    found: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            descriptors = list((entry / "fd").iterdir())
        except OSError:  # gone meanwhile, or another user's process
            continue
        for descriptor in descriptors:
            try:
                inode = wanted.get(os.readlink(descriptor))
            except OSError:  # closed meanwhile
                continue
            if inode is not None and int(entry.name) not in found.get(inode, []):
                found.setdefault(inode, []).append(int(entry.name))
    return found


def _command(pid: int, proc: Path, limit: int = 160) -> str:
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    text = " ".join(part.decode(errors="replace") for part in argv if part)
    return text if len(text) <= limit else text[: limit - 3] + "..."
