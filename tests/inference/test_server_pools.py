"""Server pools as staff edit them (the admin) and as operators check them (triton_status).

Against the session's real tritonserver; the pools are catalog rows.
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from inference.models import DedicatedCapacity, ServerPool
from inference.triton import GenerationRequest, scrape_metrics
from inference.triton import ServerPool as TritonPool
from tests.helpers import served_model, wait_until

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("grpc_urls", "metrics_urls", "field"),
    [
        ([], [], "grpc_urls"),
        ("triton-0:8001", [], "grpc_urls"),
        (["grpc://triton-0:8001"], [], "grpc_urls"),
        (["triton-0"], [], "grpc_urls"),
        (["::1:8001"], [], "grpc_urls"),
        (["[::1]:99999"], [], "grpc_urls"),
        (["triton-0:0"], [], "grpc_urls"),
        (["triton-0:\u0668\u0660\u0660\u0661"], [], "grpc_urls"),  # 8001 in Arabic-Indic digits
        (["triton-0:8001\n"], [], "grpc_urls"),
        (["triton-0:8001", "triton-1:8001"], ["http://triton-0:8002/metrics"], "metrics_urls"),
        (["triton-0:8001"], ["triton-0:8002/metrics"], "metrics_urls"),
        (["triton-0:8001"], "http://triton-0:8002/metrics", "metrics_urls"),
    ],
)
def test_a_pool_with_addresses_no_client_could_use_is_refused(grpc_urls, metrics_urls, field):
    # when / then
    with pytest.raises(ValidationError) as refused:
        ServerPool(name="p", grpc_urls=grpc_urls, metrics_urls=metrics_urls).full_clean()
    assert list(refused.value.message_dict) == [field]


def test_a_pool_with_a_metrics_url_per_server_or_none_is_accepted():
    # when / then: no error
    ServerPool(name="a", grpc_urls=["triton_0:8001", "10.0.0.7:8001"]).full_clean()
    ServerPool(
        name="b",
        grpc_urls=["triton-0:8001", "[::1]:8001"],
        metrics_urls=["http://triton-0:8002/metrics", "https://[::1]:8002/metrics"],
    ).full_clean()


def test_staff_adding_a_pool_with_mismatched_metrics_urls_see_why_and_nothing_is_saved(
    admin_client,
):
    # when a pool of two servers with one metrics url is added in the admin
    response = admin_client.post(
        "/admin/inference/serverpool/add/",
        {
            "name": "two-servers",
            "grpc_urls": '["triton-0:8001", "triton-1:8001"]',
            "metrics_urls": '["http://triton-0:8002/metrics"]',
        },
    )

    # then the form comes back with the reason, and no pool exists
    assert response.status_code == 200
    assert "One metrics url per gRPC address (2)" in response.content.decode()
    assert not ServerPool.objects.filter(name="two-servers").exists()


def test_staff_leaving_the_metrics_urls_empty_save_a_pool_without_them(admin_client):
    # when a pool is added in the admin with the metrics field left empty
    response = admin_client.post(
        "/admin/inference/serverpool/add/",
        {"name": "no-metrics", "grpc_urls": '["triton-0:8001"]', "metrics_urls": ""},
    )

    # then it is saved, with none
    assert response.status_code == 302
    assert ServerPool.objects.get(name="no-metrics").metrics_urls == []


def _status(*args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("triton_status", *args, stdout=out, stderr=err)
    except SystemExit as exit_:
        return int(exit_.code), out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def test_triton_status_shows_each_server_serving_with_its_load(triton_server):
    # given a catalog model on the session's server, with its metrics url,
    # which has served at least one request
    served_model(
        "gym-status",
        grpc_urls=[triton_server.grpc_url],
        metrics_urls=[triton_server.metrics_url],
    )
    pool = TritonPool([triton_server.grpc_url])
    try:
        pool.generate(GenerationRequest("Status", 2, seed=1))
    finally:
        pool.close()
    # (Triton counts a decoupled request once it has released it, just after.)
    wait_until(
        lambda: scrape_metrics(triton_server.metrics_url)["nv_inference_request_success"] >= 1,
        timeout=30,
        what="the request to be counted",
    )

    # when
    code, out, _err = _status("--json")

    # then: serving, with its load (a count: what earlier tests left running
    # may still be there) and its request counts
    assert code == 0
    report = json.loads(out)
    [pool] = report["pools"]
    [server] = pool["servers"]
    assert pool["pool"] == "pool-gym-status" and pool["serving"] == 1
    assert server["url"] == triton_server.grpc_url
    assert server["ready"] is True and server["models"] == {"ensemble": ""}
    assert isinstance(server["load"], int) and server["load"] >= 0
    assert server["requests_ok"] >= 1 and isinstance(server["requests_failed"], int)
    assert report["unavailable"] == []


def test_triton_status_fails_when_a_pool_has_no_server_serving(triton_server, dead_grpc_url):
    # given one pool that serves and one whose only server is down
    served_model("gym-up", grpc_urls=[triton_server.grpc_url])
    served_model("gym-down", grpc_urls=[dead_grpc_url])

    # when
    code, out, err = _status("--timeout", "1")

    # then: exit status 1, the down server named with why, the other serving
    assert code == 1
    assert f"{triton_server.grpc_url}  serving" in out
    assert f"{dead_grpc_url}  NOT SERVING" in out
    assert "UNAVAILABLE" in out
    assert "pool-gym-down" in err and "pool-gym-up" not in err


def test_triton_status_reports_every_server_of_a_pool_whose_metrics_urls_are_short(
    triton_server, dead_grpc_url
):
    # given a pool written around the admin's checks: two servers, one metrics url
    served_model(
        "gym-short",
        grpc_urls=[triton_server.grpc_url, dead_grpc_url],
        metrics_urls=[triton_server.metrics_url],
    )

    # when
    code, out, _err = _status("--json", "--timeout", "1")

    # then both servers are reported, the second without a load; the pool serves
    assert code == 0
    [pool] = json.loads(out)["pools"]
    first, second = pool["servers"]
    assert (first["url"], first["ready"]) == (triton_server.grpc_url, True)
    assert isinstance(first["load"], int)
    assert (second["url"], second["ready"], second["load"]) == (dead_grpc_url, False, None)


def test_triton_status_asks_a_dedicated_pool_for_its_models_and_does_not_fail_for_it(
    triton_server, dead_grpc_url, org
):
    # given a model served by the session's server, and an organization's
    # dedicated pool for it whose only server is down
    model = served_model(
        "gym-shared-up", grpc_urls=[triton_server.grpc_url], triton_model="gym_engine"
    )
    pool = ServerPool.objects.create(name="dedicated-down", grpc_urls=[dead_grpc_url])
    DedicatedCapacity.objects.create(organization=org, model=model, pool=pool)

    # when
    code, out, _err = _status("--json", "--timeout", "1")

    # then: the dedicated pool was asked for the model's engine model and
    # reported down, but the exit status is 0: its jobs go to the shared pool
    pools = {entry["pool"]: entry for entry in json.loads(out)["pools"]}
    assert pools["dedicated-down"]["models"] == ["gym_engine"]
    assert pools["dedicated-down"]["serving"] == 0
    assert pools["pool-gym-shared-up"]["serving"] == 1
    assert code == 0


def test_triton_status_of_a_pool_that_does_not_exist_is_an_error():
    # when / then
    with pytest.raises(CommandError, match="No server pool named 'nope'"):
        call_command("triton_status", "--pool", "nope")
