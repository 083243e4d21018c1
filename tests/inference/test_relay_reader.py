"""A streamed job's reader marker (inference.relay): its API process renews it while it reads
the job's events, and the job's worker cancels the job once it lapses.

In this process: the worker's cancel watcher is the real thread, Redis the
real one. The end to end case (a web process that dies mid-stream) is in
tests/reliability/test_inference_cancel.py.
"""

from __future__ import annotations

import threading
import time
import uuid

from accounts.redis import get_redis
from inference.relay import relay_cancel_watch, relay_events, relay_publish


def _job_id() -> str:
    return f"job_reader_{uuid.uuid4().hex[:12]}"


def test_a_stream_read_as_its_reader_keeps_its_marker_and_a_wait_leaves_none(settings):
    # given two jobs' events, each ended
    settings.INFERENCE_STREAM_READER_TTL_SECONDS = 5.0
    streamed, waited = _job_id(), _job_id()
    for job_id in (streamed, waited):
        relay_publish(job_id, {"type": "delta", "text": "Squat"})
        relay_publish(job_id, {"type": "done"})

    # when one is read as a stream's reader, the other as a wait for the whole answer
    assert [e["type"] for e in relay_events(streamed, timeout_s=5, reader=True)] == [
        "delta",
        "done",
    ]
    assert [e["type"] for e in relay_events(waited, timeout_s=5)] == ["delta", "done"]

    # then only the stream's reader left its marker, for the marker's life
    assert 0 < get_redis().pttl(f"jobreader:{streamed}") <= 5000
    assert not get_redis().exists(f"jobreader:{waited}")


def test_a_streamed_job_nobody_reads_is_cancelled_once_its_marker_is_due(settings):
    # given a streamed job and a job not streamed, both running, neither read
    settings.INFERENCE_STREAM_READER_TTL_SECONDS = 0.3
    with (
        relay_cancel_watch(_job_id(), reader=True) as streamed,
        relay_cancel_watch(_job_id()) as waited,
    ):
        # then the stream is not cancelled before its reader had the marker's
        # life to show itself, and is once that has passed
        assert not streamed.wait(0.15)
        assert streamed.wait(5)

        # and the job not streamed runs on: its client waits for the whole answer
        assert not waited.wait(0.6)


def test_a_streamed_job_whose_reader_reads_on_runs_past_many_marker_lives(settings):
    # given a streamed job whose reader reads its events for 2.5 s, five
    # of the marker's lives (half-second ones: this machine may stall a
    # thread for a while, which is not what is tested)
    settings.INFERENCE_STREAM_READER_TTL_SECONDS = 0.5
    job_id = _job_id()
    read: list[dict] = []
    reader = threading.Thread(
        target=lambda: read.extend(relay_events(job_id, timeout_s=10, heartbeat=True, reader=True)),
        daemon=True,
    )
    with relay_cancel_watch(job_id, reader=True) as cancel:
        reader.start()
        time.sleep(0.1)
        relay_publish(job_id, {"type": "delta", "text": "Squat"})

        # when it has read for that long
        cancelled = cancel.wait(2.5)
        relay_publish(job_id, {"type": "done"})
        reader.join(5)

    # then it was never cancelled, and read everything
    assert not cancelled
    assert [e["type"] for e in read if e.get("type") != "heartbeat"] == ["delta", "done"]
