"""Requests per minute, per key and per organization, counted in Redis (the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.test import Client

from accounts.models import ApiKey, Membership, Role, Scope
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_window")]


def limit_key(key: ApiKey, requests_per_minute: int) -> None:
    # No service sets a key's own ceiling yet: set the column as billing would.
    ApiKey.objects.filter(pk=key.pk).update(requests_per_minute=requests_per_minute)


def reset_seconds(response) -> int:
    value = response["x-ratelimit-reset-requests"]
    assert value.endswith("s"), value
    return int(value[:-1])


def assert_rate_limited(response) -> dict:
    assert response.status_code == 429, response.content
    error = response.json()["error"]
    assert set(error) >= {"type", "code", "message", "param"}
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limited"
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= 60
    assert error["retry_after"] == retry_after
    return error


def test_a_key_with_its_own_limit_gets_that_many_requests_then_429(org, make_key):
    # given
    key, raw = make_key(org, scopes=[Scope.INFERENCE])
    limit_key(key, 3)
    client = key_client(raw)

    # when
    ok = [client.get("/api/v1/me") for _ in range(3)]
    refused = client.get("/api/v1/me")

    # then
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert [r["x-ratelimit-limit-requests"] for r in ok] == ["3", "3", "3"]
    assert [r["x-ratelimit-remaining-requests"] for r in ok] == ["2", "1", "0"]
    assert all(1 <= reset_seconds(r) <= 60 for r in ok)
    error = assert_rate_limited(refused)
    assert "API key" in error["message"]
    assert error["limit"] == 3


def test_other_keys_of_the_same_organization_are_unaffected(org, make_key):
    # given: one key has used up its own limit
    limited, limited_raw = make_key(org, scopes=[Scope.INFERENCE], name="limited")
    limit_key(limited, 3)
    limited_client = key_client(limited_raw)
    for _ in range(3):
        assert limited_client.get("/api/v1/me").status_code == 200
    assert_rate_limited(limited_client.get("/api/v1/me"))
    _other, other_raw = make_key(org, scopes=[Scope.INFERENCE], name="other")

    # when
    response = key_client(other_raw).get("/api/v1/me")

    # then: the other key answers, and the organization counted only the 3 that passed
    assert response.status_code == 200
    assert response["x-ratelimit-limit-requests"] == str(org.requests_per_minute)
    assert response["x-ratelimit-remaining-requests"] == str(org.requests_per_minute - 4)


def test_a_key_of_another_organization_is_unaffected(org, make_key):
    # given
    limited, limited_raw = make_key(org, scopes=[Scope.INFERENCE])
    limit_key(limited, 3)
    limited_client = key_client(limited_raw)
    for _ in range(3):
        limited_client.get("/api/v1/me")
    assert_rate_limited(limited_client.get("/api/v1/me"))
    stranger_org = OrganizationFactory()
    _stranger, stranger_raw = make_key(stranger_org, scopes=[Scope.INFERENCE])

    # when
    response = key_client(stranger_raw).get("/api/v1/me")

    # then
    assert response.status_code == 200
    assert response["x-ratelimit-remaining-requests"] == str(stranger_org.requests_per_minute - 1)


def test_the_organizations_limit_applies_across_its_keys(make_key):
    # given: an organization allowed 3 requests a minute, two keys without their own limit
    org = OrganizationFactory(requests_per_minute=3)
    _a, raw_a = make_key(org, scopes=[Scope.INFERENCE], name="a")
    _b, raw_b = make_key(org, scopes=[Scope.INFERENCE], name="b")
    client_a, client_b = key_client(raw_a), key_client(raw_b)
    _s, raw_s = make_key(OrganizationFactory(requests_per_minute=3), scopes=[Scope.INFERENCE])

    # when
    first = [client_a.get("/api/v1/me"), client_a.get("/api/v1/me"), client_b.get("/api/v1/me")]
    refused_b = client_b.get("/api/v1/me")
    refused_a = client_a.get("/api/v1/me")
    stranger = key_client(raw_s).get("/api/v1/me")

    # then
    assert [r.status_code for r in first] == [200, 200, 200]
    assert [r["x-ratelimit-remaining-requests"] for r in first] == ["2", "1", "0"]
    for refused in (refused_b, refused_a):
        error = assert_rate_limited(refused)
        assert "organization" in error["message"]
    assert stranger.status_code == 200


def test_a_key_limit_above_the_organizations_does_not_lift_it(make_key):
    # given
    org = OrganizationFactory(requests_per_minute=2)
    key, raw = make_key(org, scopes=[Scope.INFERENCE])
    limit_key(key, 100)
    client = key_client(raw)

    # when
    statuses = [client.get("/api/v1/me").status_code for _ in range(3)]

    # then
    assert statuses == [200, 200, 429]


def test_signed_in_users_count_against_their_organizations_limit(member_of):
    # given
    org = OrganizationFactory(requests_per_minute=2)
    user = member_of(org, Role.OWNER)
    client = Client()
    client.force_login(user)

    # when
    responses = [client.get("/api/v1/me") for _ in range(3)]

    # then
    assert [r.status_code for r in responses[:2]] == [200, 200]
    assert responses[1]["x-ratelimit-remaining-requests"] == "0"
    assert_rate_limited(responses[2])


def test_a_refused_post_creates_nothing(org, make_key):
    # given
    key, raw = make_key(org, scopes=[Scope.ADMIN])
    limit_key(key, 1)
    client = key_client(raw)
    assert client.get("/api/v1/keys").status_code == 200
    before = ApiKey.objects.count()

    # when
    response = client.post(
        "/api/v1/keys",
        {"name": "n", "scopes": ["inference"]},
        format="json",
        HTTP_IDEMPOTENCY_KEY="rl-1",
    )

    # then
    assert_rate_limited(response)
    assert ApiKey.objects.count() == before
    assert not org.idempotency_records.exists()


def test_limits_still_count_after_redis_lost_its_scripts():
    # The limit scripts run by their SHA (EVALSHA): a Redis that restarted or
    # flushed its script cache must still count and refuse, not fail.
    from accounts.errors import ApplicationError
    from accounts.ratelimits import Limit, Slot, concurrency_release, rate_limit_consume
    from accounts.redis import get_redis

    limits = [Limit(scope="org:scripts-test", limit=2)]
    assert rate_limit_consume(kind="requests", limits=limits).remaining == 1
    get_redis().script_flush()

    assert rate_limit_consume(kind="requests", limits=limits).remaining == 0
    with pytest.raises(ApplicationError) as refused:
        rate_limit_consume(kind="requests", limits=limits)
    assert refused.value.code == "rate_limited"

    get_redis().script_flush()
    tokens = [Limit(scope="org:scripts-test", limit=100)]
    rate_limit_consume(
        kind="tokens",
        limits=tokens,
        cost=5,
        slot=Slot(scope="org:scripts-test", limit=1, job_id="a"),
    )
    with pytest.raises(ApplicationError) as busy:
        rate_limit_consume(
            kind="tokens",
            limits=tokens,
            cost=5,
            slot=Slot(scope="org:scripts-test", limit=1, job_id="b"),
        )
    assert busy.value.code == "too_many_concurrent_jobs"
    # the refused job's tokens were not counted: 95 of 100 still free
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == 95
    concurrency_release(scope="org:scripts-test", job_id="a")


def test_a_refund_given_once_for_a_job_is_not_given_twice():
    # A settlement tried again after its commit's answer was lost releases the
    # job's reservations again (inference.services.jobs.job_settle's `retried`):
    # the tokens it did not use must go back once, not twice.
    import time

    from accounts.ratelimits import Limit, rate_limit_consume, rate_limit_refund

    # given 40 tokens reserved in a window by two jobs
    limits = [Limit(scope="org:refund-once", limit=100)]
    now = time.time()
    rate_limit_consume(kind="tokens", limits=limits, cost=40, now=now)

    # when one job's unused 30 are given back twice, and the other's 5 once
    for _ in range(2):
        rate_limit_refund(kind="tokens", limits=limits, amount=30, counted_at=now, once_for="a")
    rate_limit_refund(kind="tokens", limits=limits, amount=5, counted_at=now, once_for="b")

    # then the window counts 40 - 30 - 5 tokens
    assert rate_limit_consume(kind="tokens", limits=limits, cost=0, now=now).remaining == 95


# --- a request counted with the work it asks for (an inference job) ------------------


def test_a_request_counted_with_a_jobs_tokens_is_all_or_nothing():
    from accounts.errors import ApplicationError
    from accounts.ratelimits import Limit, RequestCount, rate_limit_consume

    requests = [Limit(scope="key:together", limit=2), Limit(scope="org:together", limit=5)]
    tokens = [Limit(scope="org:together", limit=100)]

    # when both have room: one call counts the request and the tokens
    count = RequestCount(requests)
    used = rate_limit_consume(kind="tokens", limits=tokens, cost=60, request=count)
    assert used.remaining == 40 and used.limit == 100
    assert (count.usage.limit, count.usage.remaining) == (2, 1)
    assert 1 <= count.usage.reset_seconds <= 60

    # when the tokens have no room: the request is not counted either
    refused = RequestCount(requests)
    with pytest.raises(ApplicationError) as too_many_tokens:
        rate_limit_consume(kind="tokens", limits=tokens, cost=60, request=refused)
    assert too_many_tokens.value.extra["kind"] == "tokens"
    assert refused.usage is None
    probe = RequestCount(requests)
    rate_limit_consume(kind="tokens", limits=tokens, cost=0, request=probe)
    assert probe.usage.remaining == 0  # 2 counted: the first call and this probe

    # when the requests have no room: refused as requests, the tokens untouched
    with pytest.raises(ApplicationError) as too_many_requests:
        rate_limit_consume(kind="tokens", limits=tokens, cost=1, request=RequestCount(requests))
    assert too_many_requests.value.code == "rate_limited"
    assert too_many_requests.value.extra["kind"] == "requests"
    assert "API key" in too_many_requests.value.message
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == 40


@contextmanager
def _scripts_counted() -> Iterator[list[str]]:
    """The Lua scripts this process sends to Redis inside the block, one name per call.

    Counted where every command leaves the client (`Redis.execute_command`, which
    `Script.__call__` reaches through `evalsha`), then sent on to the real Redis as
    before: a count of this test's requests alone, which Redis's own server-wide
    `commandstats` is not (another process's script in the same moment would count).
    """
    import redis

    sent: list[str] = []
    original = redis.Redis.execute_command

    def counting(client, *args, **options):
        if str(args[0]).upper() in {"EVAL", "EVALSHA"}:
            sent.append(str(args[0]).upper())
        return original(client, *args, **options)

    redis.Redis.execute_command = counting
    try:
        yield sent
    finally:
        redis.Redis.execute_command = original


def _chat(client, body: dict):
    return client.post("/v1/chat/completions", body, format="json")


def test_chat_completions_over_the_request_limit_are_refused_before_any_reservation(org, make_key):
    # given: a model the organization may call, and a key with room for 2 requests
    from accounts.ratelimits import Limit, rate_limit_consume
    from tests.helpers import served_model

    served_model("gym-rl", access_tier="basic")
    key, raw = make_key(org, scopes=[Scope.INFERENCE])
    limit_key(key, 2)
    client = key_client(raw)
    body = {"model": "gym-rl", "messages": [{"role": "user", "content": "hi"}]}

    # when: a bad body, then a request the organization cannot pay for (no
    # credits), then one over the limit
    bad = _chat(client, {"model": "gym-rl", "messages": []})
    with _scripts_counted() as scripts:
        unpaid = _chat(client, body)
    tokens = [Limit(scope=f"org:{org.pk}", limit=0)]
    tokens_before = rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining
    refused = client.post(
        "/v1/chat/completions", body, format="json", HTTP_IDEMPOTENCY_KEY="rl-chat-1"
    )

    # then: each counted once, the refused one before anything was reserved
    assert bad.status_code == 400 and bad["x-ratelimit-remaining-requests"] == "1"
    assert unpaid.status_code == 402 and unpaid["x-ratelimit-remaining-requests"] == "0"
    # the request's count and the job's tokens and slot in one script, one round trip
    assert len(scripts) == 1
    error = assert_rate_limited(refused)
    assert "API key" in error["message"]
    # no tokens reserved for it, and its Idempotency-Key left free for the retry
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == tokens_before
    assert not org.idempotency_records.exists()


def test_a_concurrency_slot_is_leased_for_the_configured_time(settings):
    # given slots leased for 65 minutes (what a 30-minute run limit sets)
    import time

    from accounts.ratelimits import Limit, Slot, concurrency_slots_taken, rate_limit_consume
    from accounts.redis import get_redis

    settings.RATELIMIT_SLOT_LEASE_SECONDS = 3900
    scope = "org:lease-test"
    get_redis().delete(f"conc:{scope}")

    # when a job takes one
    taken = time.time()
    rate_limit_consume(
        kind="tokens",
        limits=[Limit(scope=scope, limit=100)],
        slot=Slot(scope=scope, limit=1, job_id="job_long"),
    )

    # then it counts until the lease's end, and the set outlives it
    lease_end = get_redis().zscore(f"conc:{scope}", "job_long")
    assert taken + 3900 <= lease_end <= time.time() + 3900
    assert get_redis().ttl(f"conc:{scope}") > 3900
    # and the sweep reads when it was taken from the same lease: not before it was
    assert dict(concurrency_slots_taken(before=taken - 1)).get(scope) is None
    assert dict(concurrency_slots_taken(before=time.time() + 1))[scope] == ["job_long"]
    get_redis().delete(f"conc:{scope}")


def test_a_key_refused_for_its_scope_is_counted_until_429(org, make_key):
    # given an inference key allowed three requests a minute
    key, raw = make_key(org, scopes=[Scope.INFERENCE])
    limit_key(key, 3)
    client = key_client(raw)

    # when it keeps asking for what its scope does not allow
    answers = [client.get("/api/v1/keys") for _ in range(4)]

    # then each refusal counts, as any 4xx does, and the fourth is over the limit
    assert [r.status_code for r in answers] == [403, 403, 403, 429]
    assert answers[0].json()["error"]["code"] == "permission_denied"
    assert [r["x-ratelimit-remaining-requests"] for r in answers[:3]] == ["2", "1", "0"]
    assert_rate_limited(answers[3])


def test_a_disarmed_admin_key_is_counted_until_429(org, make_key, member_of):
    # given an admin's key, disarmed when its creator stopped being an admin
    creator = member_of(org, Role.ADMIN)
    key, raw = make_key(org, scopes=[Scope.ADMIN], actor=creator)
    limit_key(key, 2)
    Membership.objects.filter(organization=org, user=creator).update(role=Role.MEMBER)
    client = key_client(raw)

    # when it keeps listing keys
    answers = [client.get("/api/v1/keys") for _ in range(3)]

    # then its refusals count against its limit too
    assert [r.status_code for r in answers] == [403, 403, 429]
    assert_rate_limited(answers[2])


# --- keys made with keys share the first key's limit -------------------------------------


def _made_with(parent: ApiKey, name: str, requests_per_minute: int | None = None):
    """An inference key made with the key `parent`, as POST /api/v1/keys with it does."""
    from accounts.services import apikey_create

    return apikey_create(
        organization=parent.organization,
        name=name,
        scopes=[Scope.INFERENCE],
        requests_per_minute=requests_per_minute,
        actor_key=parent,
    )


def test_keys_made_with_a_key_share_its_requests_per_minute(org, make_key):
    # given: K1 allowed 2 requests a minute, and two keys it made, each allowed 2 too
    k1, raw1 = make_key(org, scopes=[Scope.INFERENCE], name="k1", requests_per_minute=2)
    children = [_made_with(k1, f"child {i}", 2)[1] for i in range(2)]
    first, second = key_client(children[0]), key_client(children[1])

    # when: one request from each child, then a third from either, and one from K1
    served = [first.get("/api/v1/me"), second.get("/api/v1/me")]
    refused = [first.get("/api/v1/me"), key_client(raw1).get("/api/v1/me")]

    # then: the third request across them is over K1's 2, whichever key sends it
    assert [r.status_code for r in served] == [200, 200]
    # the tightest of the child's limits is reported: K1's, which the second used up
    assert [r["x-ratelimit-remaining-requests"] for r in served] == ["1", "0"]
    errors = [assert_rate_limited(response) for response in refused]
    assert [error["limit"] for error in errors] == [2, 2]
    # the child is told it is the line's limit, K1 its own
    assert f"API key's line ({k1.prefix} and the keys made from it)" in errors[0]["message"]
    assert "for this API key." in errors[1]["message"]


def test_a_grandchild_counts_against_the_first_key_of_its_line(org, make_key):
    # given: K1 (2 a minute) made K2, which made K3; both at 2
    (_k1, raw1), _k2, (_k3, raw3) = _line(org, make_key, 2, 2, 2)

    # when
    answers = [key_client(raw3).get("/api/v1/me"), key_client(raw1).get("/api/v1/me")]
    third = key_client(raw3).get("/api/v1/me")

    # then
    assert [r.status_code for r in answers] == [200, 200]
    assert_rate_limited(third)


def _line(org, make_key, *limits: int | None):
    """K1 (made by the operator) and the keys made each with the one before, with `limits`
    as their requests_per_minute: [(row, raw), ...]."""
    line = [make_key(org, scopes=[Scope.INFERENCE], name="k1", requests_per_minute=limits[0])]
    for i, limit in enumerate(limits[1:], start=2):
        line.append(_made_with(line[-1][0], f"k{i}", limit))
    return line


def _counted(key: ApiKey) -> int:
    """The requests counted in `key`'s own bucket this minute, as Redis holds them."""
    import time

    from accounts.ratelimits import _window_key
    from accounts.redis import get_redis

    return int(get_redis().get(_window_key("requests", f"key:{key.pk}", time.time())) or 0)


def test_a_middle_keys_limit_binds_every_key_made_below_it(org, make_key):
    # given: K1 with no limit of its own made K2 (2 a minute), which made K3 (2 a minute);
    # K3 made two keys, each allowed 2
    (_k1, raw1), _k2, (k3, _raw3) = _line(org, make_key, None, 2, 2)
    grandchildren = [key_client(_made_with(k3, f"k4-{i}", 2)[1]) for i in range(2)]

    # when: one request from each of K3's keys, then a third from either
    served = [client.get("/api/v1/me") for client in grandchildren]
    refused = grandchildren[0].get("/api/v1/me")

    # then: the third is over K2's 2 (and K3's), which every key below K2 shares; K1,
    # unlimited, is not held by it
    assert [r.status_code for r in served] == [200, 200]
    assert [r["x-ratelimit-remaining-requests"] for r in served] == ["1", "0"]
    error = assert_rate_limited(refused)
    assert error["limit"] == 2
    assert "API key's line" in error["message"]
    assert key_client(raw1).get("/api/v1/me").status_code == 200


def test_a_request_refused_by_a_middle_key_counts_in_no_bucket_of_its_line(org, make_key):
    # given: K1 allowed 4 a minute made K2 (2 a minute), which made K3a and K3b (2 each)
    (_k1, raw1), (k2, _raw2), (k3a, raw3a) = _line(org, make_key, 4, 2, 2)
    _k3b, raw3b = _made_with(k2, "k3b", 2)
    served = [key_client(raw3a).get("/api/v1/me"), key_client(raw3b).get("/api/v1/me")]

    # when: K3a asks again, with room in its own bucket and in K1's, but none in K2's
    refused = key_client(raw3a).get("/api/v1/me")

    # then: refused by K2's limit, named, with its Retry-After
    assert [r.status_code for r in served] == [200, 200]
    error = assert_rate_limited(refused)
    assert error["limit"] == 2
    assert f"API key's line ({k2.prefix} and the keys made from it)" in error["message"]
    # and counted in no bucket: K3a's holds its one request, K1 still has 2 of its 4 left
    assert _counted(k3a) == 1
    k1_client = key_client(raw1)
    assert [k1_client.get("/api/v1/me").status_code for _ in range(3)] == [200, 200, 429]


def test_a_key_made_before_its_ancestors_limits_were_stored_still_counts_against_them(
    org, make_key
):
    # given: K1 (no limit) made K2 (2 a minute), which made K3 and K3b (2 each): K2's,
    # K3's and K3b's rows as migration 0013 leaves keys made before it (no ancestor_limits)
    _k1, (k2, _raw2), (k3, raw3) = _line(org, make_key, None, 2, 2)
    _k3b, raw3b = _made_with(k2, "k3b", 2)
    ApiKey.objects.filter(organization=org).update(ancestor_limits=None)
    k3.refresh_from_db()

    # when: K3 and K3b are used once each, and a key K3 makes then is used
    first = [key_client(raw3).get("/api/v1/me"), key_client(raw3b).get("/api/v1/me")]
    k4, raw4 = _made_with(k3, "k4", 2)
    second = key_client(raw4).get("/api/v1/me")

    # then: K2's 2 bind all three, and K4 stored the line its parent's walk found
    assert [r.status_code for r in first] == [200, 200]
    error = assert_rate_limited(second)
    assert f"API key's line ({k2.prefix} and the keys made from it)" in error["message"]
    k4.refresh_from_db()
    assert [a["id"] for a in k4.ancestor_limits] == [k2.pk, k3.pk]


def test_a_key_made_by_a_person_counts_in_its_own_bucket_only(org, make_key, member_of):
    # given: an owner's key at 2 a minute, used up, and a key the owner made signed in
    owner = member_of(org, Role.OWNER)
    _own, own_raw = make_key(org, scopes=[Scope.ADMIN], actor=owner, requests_per_minute=2)
    for _ in range(2):
        assert key_client(own_raw).get("/api/v1/me").status_code == 200
    client = Client()
    client.force_login(owner)
    made = client.post(
        "/api/v1/keys",
        {"name": "signed in", "scopes": ["inference"], "requests_per_minute": 2},
        content_type="application/json",
    ).json()

    # when
    answers = [key_client(made["key"]).get("/api/v1/me") for _ in range(3)]

    # then: its own 2, untouched by the other key's
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert made["parent"] is None


def test_chat_completions_of_a_child_key_count_against_its_root_in_one_script(org, make_key):
    # given: a model, K1 allowed 2 requests a minute with one used, and a key K1 made
    from tests.helpers import served_model

    served_model("gym-rl-line", access_tier="basic")
    (_k1, raw1), (_child, child_raw) = _line(org, make_key, 2, 2)
    assert key_client(raw1).get("/api/v1/me").status_code == 200
    child = key_client(child_raw)
    body = {"model": "gym-rl-line", "messages": [{"role": "user", "content": "hi"}]}

    # when: the child asks twice (the organization has no credits: 402 once counted)
    with _scripts_counted() as scripts:
        unpaid = _chat(child, body)
    refused = _chat(child, body)

    # then: the first counted in K1's bucket too, in the one script; the second is over it
    assert unpaid.status_code == 402, unpaid.content
    assert unpaid["x-ratelimit-remaining-requests"] == "0"
    assert len(scripts) == 1
    error = assert_rate_limited(refused)
    assert error["limit"] == 2


def test_chat_completions_of_a_grandchild_count_against_the_middle_key_in_one_script(org, make_key):
    # given: a model, K1 (no limit) made K2 (1 a minute, used by another key it made),
    # which made K3
    from tests.helpers import served_model

    served_model("gym-rl-middle", access_tier="basic")
    _k1, (k2, _raw2), (_k3, raw3) = _line(org, make_key, None, 1, 1)
    _sibling, sibling_raw = _made_with(k2, "sibling", 1)
    assert key_client(sibling_raw).get("/api/v1/me").status_code == 200
    body = {"model": "gym-rl-middle", "messages": [{"role": "user", "content": "hi"}]}

    # when: K3 asks for a completion
    with _scripts_counted() as scripts:
        refused = _chat(key_client(raw3), body)

    # then: refused by K2's limit, in the one script that would have reserved the job
    error = assert_rate_limited(refused)
    assert error["limit"] == 1
    assert k2.prefix in error["message"]
    assert len(scripts) == 1
