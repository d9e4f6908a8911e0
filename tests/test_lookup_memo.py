"""The lookup memos' own rules, without a server: what they keep, and when they rebuild."""

from __future__ import annotations

from dataclasses import replace

from prebake.server import convert
from prebake.server.lookup_memo import JobMessages
from prebake.server.records import Job, JobState
from prebake.v1 import jobs_pb2
from tests.contract.samples import START, make_job


def filled(memo: JobMessages, job: Job) -> jobs_pb2.Job:
    into = jobs_pb2.Job()
    memo.fill(into, job)
    return into


def test_a_job_message_is_rebuilt_for_every_stored_change() -> None:
    memo = JobMessages()
    job = make_job(revision=1)
    assert filled(memo, job) == convert.job(job)
    assert filled(memo, job) == convert.job(job)  # from the memo
    # Every stored change bumps the revision (and the time of the change).
    leased = replace(job, state=JobState.LEASED, worker="w-1", revision=2, updated_at=START + 1)
    assert filled(memo, leased) == convert.job(leased)
    progressed = replace(leased, progress=0.5, message="compiling", revision=3, updated_at=START + 2)
    assert filled(memo, progressed).progress == 0.5
    # Even a change that kept the revision but not its time (nothing stored does) is rebuilt.
    assert filled(memo, replace(progressed, message="other", updated_at=START + 3)).message == "other"


def test_a_job_not_read_from_the_queue_is_never_kept() -> None:
    memo = JobMessages()
    job = make_job()  # revision 0
    assert filled(memo, job) == convert.job(job)
    changed = replace(job, message="something else")
    assert filled(memo, changed).message == "something else"
