"""The one exception of the storage primitives: a conditional write's condition failed."""

from __future__ import annotations

from prebake.core.errors import Busy


class ConditionFailed(Busy):
    """A conditional write found the stored state other than expected; nothing changed.

    The job lifecycle catches it, re-reads and decides again. Should one escape to a
    caller (too many concurrent changes of one object), it is ABORTED: retryable.
    """
