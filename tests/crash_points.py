"""`prebake` with a SIGKILL planted at one exact point of its own code, for crash tests.

    PREBAKE_TEST_CRASH_AT="module:Qualified.name:before|after[:N]" python -m tests.crash_points serve ...

runs the `prebake` command line with the named function (or method; sync or async) wrapped so
that its Nth call (default 1) SIGKILLs the process right before the call starts or right after
it returns. The process sends the signal to itself, so nothing runs after the point: no
handler, no `finally`, no flush, exactly as if another process had killed it at that instant;
what a test then finds on disk is what a crash there leaves. An outside kill can only aim at
the boundaries a client sees (bytes sent, replies received); this aims between two storage
steps, where the windows are microseconds wide.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

ENV = "PREBAKE_TEST_CRASH_AT"


def parse(spec: str) -> tuple[str, str, str, int]:
    """(module, qualified name, "before" or "after", N) of a crash point; ValueError if malformed."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[2] not in ("before", "after"):
        raise ValueError(f"{ENV}={spec!r}: expected module:Qualified.name:before|after[:N]")
    nth = int(parts[3]) if len(parts) == 4 else 1
    if nth < 1:
        raise ValueError(f"{ENV}={spec!r}: N must be at least 1")
    return parts[0], parts[1], parts[2], nth


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant(spec: str) -> None:
    """Wrap the function `spec` names (see the module docstring) where it is defined."""
    module_name, qualname, when, nth = parse(spec)
    owner: Any = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for attribute in path:
        owner = getattr(owner, attribute)
    original: Callable[..., Any] = inspect.getattr_static(owner, name)
    if isinstance(original, (staticmethod, classmethod)):
        raise ValueError(f"{ENV}={spec!r}: static and class methods are not supported")
    calls = 0
    lock = threading.Lock()

    def reached() -> bool:
        nonlocal calls
        with lock:
            calls += 1
            return calls == nth

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            hit = reached()
            if hit and when == "before":
                _die()
            result = await original(*args, **kwargs)
            if hit:
                _die()
            return result

        setattr(owner, name, wrapped_async)
        return

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        hit = reached()
        if hit and when == "before":
            _die()
        result = original(*args, **kwargs)
        if hit:
            _die()
        return result

    setattr(owner, name, wrapped)


def main() -> None:
    spec = os.environ.get(ENV, "")
    if spec:
        plant(spec)
    from prebake.client.cli import main as prebake_main

    raise SystemExit(prebake_main())


if __name__ == "__main__":
    main()
