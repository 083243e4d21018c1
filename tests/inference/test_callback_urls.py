"""Which callback URLs a job may name: https to public hosts only (inference.callback_client).

No worker or Triton here: a refused URL is refused before anything is held,
and a job accepted under the `db` fixture never commits, so never runs.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from accounts.errors import ApplicationError
from accounts.models import Scope
from accounts.services import apikey_create
from inference.callback_client import callback_post, callback_url_validate
from inference.models import CatalogModel, Job, ServerPool
from metering.selectors import organization_balance
from metering.services import price_book_publish
from tests.factories import OrganizationFactory
from tests.helpers import credits, ledger_rows

MODEL = "callback-url-model"

PUBLIC = [
    "https://hooks.example.com/gym",
    "https://hooks.example.com:8443/gym/jobs?source=gym&x=1",
    "https://8.8.8.8/hook",
    "https://[2606:4700:4700::1111]/hook",
    "https://xn--bcher-kva.example/hook",
]

REFUSED = {
    "http to a public host": "http://hooks.example.com/gym",
    "another scheme": "ftp://hooks.example.com/gym",
    "no scheme": "hooks.example.com/gym",
    "not a URL": "not a url",
    "no host": "https:///gym",
    "credentials": "https://user:secret@hooks.example.com/gym",
    "a user name that looks like the host": "https://hooks.example.com@evil.example/",
    "a fragment": "https://hooks.example.com/gym#part",
    "a bad port": "https://hooks.example.com:99999/gym",
    "spaces": "https://hooks.example.com/a b",
    "non-ASCII": "https://hooks.example.com/caf\u00e9",
    "too long": "https://hooks.example.com/" + "a" * 2048,
    "RFC 1918": "https://10.0.0.1/gym",
    "RFC 1918 too": "https://192.168.1.10/gym",
    "RFC 1918 as well": "https://172.16.0.1/gym",
    "cloud metadata (link-local)": "https://169.254.169.254/latest/meta-data",
    "shared address space": "https://100.64.0.1/gym",
    "unspecified": "https://0.0.0.0/gym",
    "multicast": "https://224.0.0.1/gym",
    "IPv6 link-local": "https://[fe80::1]/gym",
    "IPv6 unique local": "https://[fd00::1]/gym",
    # fec0::/10, deprecated by RFC 3879 but still routed inside some networks;
    # Python 3.11 counts it global and not reserved
    "IPv6 site-local": "https://[fec0::1]/gym",
    "IPv6 site-local, top of the range": "https://[feff:ffff::1]/gym",
    "IPv6 site-local embedding a private IPv4": "https://[fec0::ffff:a00:1]/gym",
    "IPv4-mapped private": "https://[::ffff:10.0.0.1]/gym",
    # IPv6 spellings of an IPv4 address that a NAT64 gateway (RFC 6052), a
    # SIIT translator (RFC 6145) or an old stack sends on to that address
    "NAT64 of a private address": "https://[64:ff9b::a00:1]/gym",
    "NAT64 of the cloud metadata address": "https://[64:ff9b::a9fe:a9fe]/gym",
    "IPv4-translated private": "https://[::ffff:0:a00:1]/gym",
    "IPv4-compatible private": "https://[::10.0.0.1]/gym",
    "6to4 of a private address": "https://[2002:a00:1::1]/gym",
    "Teredo": "https://[2001::a00:1]/gym",
    "hex IPv4": "https://0x0a000001/gym",
    "decimal IPv4": "https://167772161/gym",
    "short IPv4": "https://10.1/gym",
    "single-label host": "https://intranet/gym",
    "numeric top-level label": "https://hooks.example.123/gym",
    "a .localhost name": "https://api.localhost/gym",
}

LOOPBACK = [
    "http://127.0.0.1:8000/gym",
    "https://127.0.0.1/gym",
    "http://localhost:8000/gym",
    "https://[::1]/gym",
    "https://127.1/gym",
    "https://0x7f000001/gym",
]


@pytest.fixture
def loopback_off(settings):
    settings.DEBUG = False
    settings.INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK = False


@pytest.mark.parametrize("url", PUBLIC)
def test_https_urls_of_public_hosts_are_accepted(url, loopback_off):
    assert callback_url_validate(url) == url


@pytest.mark.parametrize("url", REFUSED.values(), ids=REFUSED.keys())
def test_anything_else_is_refused_with_a_reason(url, loopback_off):
    # when
    with pytest.raises(ApplicationError) as refused:
        callback_url_validate(url)

    # then
    assert (refused.value.code, refused.value.status) == ("invalid_callback_url", 400)
    assert refused.value.param == "callback_url"
    assert refused.value.message.startswith("callback_url")


@pytest.mark.parametrize("url", LOOPBACK)
def test_loopback_only_where_the_setting_or_debug_allows_it(url, settings):
    # given / when / then
    settings.DEBUG = False
    settings.INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK = False
    with pytest.raises(ApplicationError):
        callback_url_validate(url)
    settings.INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK = True
    assert callback_url_validate(url) == url
    settings.INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK = False
    settings.DEBUG = True
    assert callback_url_validate(url) == url


def test_delivery_checks_again_and_never_connects_to_a_refused_address(loopback_off):
    # when: a URL accepted once, under rules since tightened
    answer = callback_post(url="http://localhost:9/gym", body=b"{}", headers={}, timeout=1)

    # then
    assert answer.status_code is None
    assert answer.error.startswith("refused:")


def test_delivery_never_connects_to_a_name_that_resolves_to_a_nat64_private_address(
    monkeypatch, loopback_off
):
    import socket

    from inference import callback_client

    # given a public name whose AAAA record points at the metadata address
    # through the NAT64 prefix (the lookup replaced at the one module that
    # makes it: no DNS here)
    def nat64(host, port, *args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("64:ff9b::a9fe:a9fe", port, 0, 0))]

    monkeypatch.setattr(callback_client.socket, "getaddrinfo", nat64)

    # when a webhook is posted to it
    answer = callback_post(url="https://hooks.example.com/gym", body=b"{}", headers={}, timeout=1)

    # then no connection is made
    assert answer.status_code is None
    assert answer.error.startswith("refused:"), answer.error


def test_delivery_never_connects_to_a_name_that_resolves_to_a_site_local_address(
    monkeypatch, loopback_off
):
    import socket

    from inference import callback_client

    # given a public name whose AAAA record is a deprecated site-local address
    # (the lookup replaced at the one module that makes it: no DNS here)
    def site_local(host, port, *args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fec0::1", port, 0, 0))]

    monkeypatch.setattr(callback_client.socket, "getaddrinfo", site_local)

    # when a webhook is posted to it
    answer = callback_post(url="https://hooks.example.com/gym", body=b"{}", headers={}, timeout=1)

    # then no connection is made
    assert answer.status_code is None
    assert answer.error.startswith("refused:"), answer.error


def test_a_name_the_resolver_never_answers_costs_the_attempt_its_deadline(monkeypatch):
    import socket
    import threading

    from inference import callback_client

    # given a resolver that never answers. Nothing here can make a real one
    # hang (no network), so the lookup is replaced at the one module that
    # makes it; left alone, it would answer after 30 s with an error.
    release = threading.Event()

    def silent(*args, **kwargs):
        release.wait(30)
        raise socket.gaierror("the resolver gave up")

    monkeypatch.setattr(callback_client.socket, "getaddrinfo", silent)

    # when a webhook is posted to a host name with a short deadline
    try:
        answer = callback_post(
            url="https://hooks.example.com/gym", body=b"{}", headers={}, timeout=0.2
        )
    finally:
        release.set()

    # then the attempt failed for want of an address within its deadline
    assert answer.status_code is None
    assert answer.error == "hooks.example.com did not resolve in time (within 0.2 s)"


def test_names_that_never_resolve_do_not_hold_up_other_lookups(monkeypatch, settings):
    import socket
    import threading

    from inference import callback_client

    # given a resolver that never answers for one customer's host names but
    # answers at once for another's (replaced at the one module that resolves,
    # as above; the answer is loopback, where nothing listens on port 9)
    settings.INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK = True
    release = threading.Event()
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        if host.startswith("silent"):
            release.wait(30)
            raise socket.gaierror("the resolver gave up")
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(callback_client.socket, "getaddrinfo", resolver)

    # when eight deliveries to silent names are under way, then one to the other
    slow = [
        threading.Thread(
            target=callback_post,
            kwargs={
                "url": f"https://silent{i}.example.com/gym",
                "body": b"{}",
                "headers": {},
                "timeout": 1.0,
            },
        )
        for i in range(8)
    ]
    try:
        for thread in slow:
            thread.start()
        answer = callback_post(
            url="https://hooks.example.com:9/gym", body=b"{}", headers={}, timeout=1.0
        )
    finally:
        release.set()
        for thread in slow:
            thread.join()

    # then its name was resolved (its attempt failed on the connection instead)
    assert answer.status_code is None
    assert "did not resolve" not in answer.error
    assert "Connection" in answer.error or "refused" in answer.error


# --- through the API ----------------------------------------------------------------------


@pytest.fixture
def api(db, grant):
    price_book_publish(
        prices=[
            {
                "model_name": MODEL,
                "input_rate": Decimal("1"),
                "cached_input_rate": Decimal("1"),
                "output_rate": Decimal("1"),
            }
        ]
    )
    pool = ServerPool.objects.create(name="callback-urls", grpc_urls=["127.0.0.1:1"])
    CatalogModel.objects.create(name=MODEL, pool=pool)
    org = OrganizationFactory(requests_per_minute=10_000)
    grant(org, credits(10))
    _key, raw = apikey_create(organization=org, name="jobs", scopes=[Scope.INFERENCE])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return org, client


@pytest.mark.parametrize(
    "url",
    [
        REFUSED["http to a public host"],
        REFUSED["credentials"],
        REFUSED["cloud metadata (link-local)"],
        REFUSED["IPv4-mapped private"],
        REFUSED["NAT64 of a private address"],
        REFUSED["IPv6 site-local"],
        REFUSED["6to4 of a private address"],
        REFUSED["too long"],
        "http://127.0.0.1:8000/gym",  # loopback, with the setting off
    ],
)
def test_a_job_with_a_refused_callback_url_is_400_and_changes_nothing(api, url, loopback_off):
    # given
    org, client = api
    before = (ledger_rows(), organization_balance(organization=org))

    # when
    response = client.post(
        "/api/v1/jobs",
        {"model": MODEL, "prompt": "hello", "max_tokens": 4, "callback_url": url},
        format="json",
    )

    # then
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_callback_url", "callback_url")
    assert error["message"]
    assert not Job.objects.filter(organization=org).exists()
    assert (ledger_rows(), organization_balance(organization=org)) == before


def test_a_job_with_a_good_callback_url_keeps_it(api, loopback_off):
    # given
    org, client = api
    url = "https://hooks.example.com/gym?source=jobs"

    # when
    response = client.post(
        "/api/v1/jobs",
        {"model": MODEL, "prompt": "hello", "max_tokens": 4, "callback_url": url},
        format="json",
    )

    # then
    assert response.status_code == 202, response.content
    assert Job.objects.get(organization=org).callback_url == url
