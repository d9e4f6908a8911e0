"""Which workers are live and what they serve: toolchain resolution and "no worker" answers.

Workers are heard of when they long-poll `LeaseJob` or heartbeat; each record lives for
`ttl` seconds past the last time it was heard of, in the worker directory
(`prebake.server.storage.WorkerDirectory`) shared by every replica. A key without a
toolchain resolves to the newest toolchain a live worker serves for its kind and
compile target (when no default is configured), and a job no live worker can take is
reported at once instead of waiting in silence.

Used from the event loop only. Reads of the directory are cached for `CACHE_SECONDS`
(a hit must not pay a directory read); writes are throttled per worker.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from prebake.server.records import JobPurpose, NormalizedKey, WorkerCapability, WorkerRecord
from prebake.server.storage import WorkerDirectory

CACHE_SECONDS = 1.0


def version_order(toolchain: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing the numbers in a toolchain name numerically ("2.21" > "2.9")."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|[^\d]+", toolchain)
    )


class WorkerLiveness:
    """The live workers as this replica last read them, and what follows from them."""

    def __init__(
        self,
        directory: WorkerDirectory,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._ttl = ttl
        self._clock = clock
        self._written: dict[str, tuple[tuple[WorkerCapability, ...], float]] = {}
        self._cache: tuple[float, list[WorkerRecord]] | None = None

    async def heard_from(self, worker_id: str, capabilities: Sequence[WorkerCapability]) -> None:
        """Record that `worker_id` is alive and serves `capabilities`.

        Writes only when the capabilities changed or a third of the ttl has passed, so
        a polling worker costs one directory write per ttl/3.
        """
        now = self._clock()
        caps = tuple(capabilities)
        last = self._written.get(worker_id)
        if last is not None and last[0] == caps and now - last[1] < self._ttl / 3:
            return
        if len(self._written) > 10_000:
            # Worker ids come from callers: bound what one replica remembers of them.
            self._written.clear()
        await self._directory.put_worker(WorkerRecord(worker_id, caps, now, now + self._ttl))
        self._written[worker_id] = (caps, now)
        self._cache = None

    async def still_alive(self, worker_id: str) -> None:
        """Keep a worker that is busy compiling (heartbeating, not polling) live."""
        now = self._clock()
        last = self._written.get(worker_id)
        if last is not None and now - last[1] < self._ttl / 3:
            return
        caps = last[0] if last is not None else None
        if caps is None:
            # Heard of by another replica, or before a restart: keep what it said then.
            known = await self._directory.workers(now, include_expired=True)
            caps = next((w.capabilities for w in known if w.worker_id == worker_id), None)
        if caps is not None:
            await self.heard_from(worker_id, caps)

    async def live(self) -> list[WorkerRecord]:
        now = self._clock()
        if self._cache is None or now - self._cache[0] >= CACHE_SECONDS:
            self._cache = (now, await self._directory.workers(now))
        return [w for w in self._cache[1] if w.live(now)]

    @staticmethod
    def newest_toolchain(
        live: Sequence[WorkerRecord], kind: str, compile_target: str
    ) -> tuple[str, str] | None:
        """(newest toolchain a live worker serves for kind and target, that worker's id)."""
        offers = [
            (cap.toolchain, worker.worker_id)
            for worker in live
            for cap in worker.capabilities
            if cap.kind == kind and (not cap.compile_targets or compile_target in cap.compile_targets)
        ]
        if not offers:
            return None
        return max(offers, key=lambda offer: (version_order(offer[0]), offer[1]))

    @staticmethod
    def unserved_reason(
        live: Sequence[WorkerRecord], key: NormalizedKey, purpose: JobPurpose = JobPurpose.COMPILE
    ) -> str:
        """ "" when a live worker can run a job of `purpose` for `key`; else what is missing, for people."""
        if any(
            cap.serves(key.kind, key.toolchain, key.compile_target, purpose)
            for w in live
            for cap in w.capabilities
        ):
            return ""
        target = f" for {key.compile_target}" if key.compile_target else ""
        verb = "serves" if purpose is JobPurpose.COMPILE else "evaluates"
        wanted = f"no live worker {verb} {key.kind} {key.toolchain}{target}"
        same_kind = sorted(
            {
                f"{cap.toolchain}"
                + (f" for {', '.join(cap.compile_targets)}" if cap.compile_targets else "")
                + ("" if purpose in cap.purposes else f" ({', '.join(p.value for p in cap.purposes)} only)")
                for w in live
                for cap in w.capabilities
                if cap.kind == key.kind
            }
        )
        if same_kind:
            return f"{wanted}; live {key.kind} workers serve {'; '.join(same_kind)}"
        if live:
            kinds = sorted({cap.kind for w in live for cap in w.capabilities})
            return f"{wanted}; live workers serve only {', '.join(kinds)}"
        return f"{wanted}; no worker is live"
