"""Who asked a running job to stop (inference.relay.CancelOrigin): its cancel key says it, and
the worker's watcher reads it in the one MGET it already makes.

A job the gateway stopped waiting for before its first token is charged
nothing; one its client cancelled is billed as before (inference.tasks, and
tests/inference/test_job_run.py for the billing). In this process: the
watcher is the real thread, Redis the real one.
"""

from __future__ import annotations

import uuid

from accounts.redis import get_redis
from inference.relay import CancelOrigin, relay_cancel, relay_cancel_requested, relay_cancel_watch


def _job_id() -> str:
    return f"job_origin_{uuid.uuid4().hex[:12]}"


def test_a_running_jobs_cancel_carries_who_asked_for_it():
    # given three running jobs
    client, gateway, earlier = _job_id(), _job_id(), _job_id()
    with (
        relay_cancel_watch(client) as by_client,
        relay_cancel_watch(gateway) as by_gateway,
        relay_cancel_watch(earlier) as by_earlier,
    ):
        # when one is cancelled by its client, one by the gateway's timeout,
        # and one by a web process of a release before origins (its value b"1")
        relay_cancel(client)
        relay_cancel(gateway, origin=CancelOrigin.GATEWAY_TIMEOUT)
        get_redis().set(f"jobcancel:{earlier}", b"1", ex=60)

        # then each worker's cancel says who asked; the earlier release's, as it
        # always meant, a client's
        assert by_client.wait(5) and by_gateway.wait(5) and by_earlier.wait(5)
    assert (by_client.origin, by_gateway.origin, by_earlier.origin) == (
        CancelOrigin.CLIENT,
        CancelOrigin.GATEWAY_TIMEOUT,
        CancelOrigin.CLIENT,
    )


def test_the_gateways_timeout_never_overrides_a_clients_cancel():
    # given a job its client cancelled, and one the gateway stopped waiting for
    cancelled, timed_out = _job_id(), _job_id()
    relay_cancel(cancelled)
    relay_cancel(timed_out, origin=CancelOrigin.GATEWAY_TIMEOUT)

    # when the gateway then times out on the first, and the client cancels the second
    relay_cancel(cancelled, origin=CancelOrigin.GATEWAY_TIMEOUT)
    relay_cancel(timed_out)

    # then both are the client's cancels: it asked to stop, and is billed as it asked
    assert relay_cancel_requested(cancelled) == CancelOrigin.CLIENT
    assert relay_cancel_requested(timed_out) == CancelOrigin.CLIENT
    assert relay_cancel_requested(_job_id()) is None
