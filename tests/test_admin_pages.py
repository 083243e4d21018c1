"""Every admin list opens for staff, with rows in it: a column that names a missing field or
follows a relation wrongly is a 500 there, and nothing else reads every list."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse

from gymbilling.models import Plan
from tests.factories import OrganizationFactory
from tests.gymbilling.test_admin import PLAN_FORM
from tests.helpers import credits

pytestmark = pytest.mark.django_db

LISTS = sorted((model._meta.app_label, model._meta.model_name) for model in admin.site._registry)


@pytest.mark.parametrize(("app", "model"), LISTS, ids=[f"{a}.{m}" for a, m in LISTS])
def test_staff_open_every_admin_list(admin_client, grant, app, model):
    # given a ledger with rows in it
    grant(OrganizationFactory(), credits(5))

    # when staff open the list, and search it where it can be searched
    listed = admin_client.get(reverse(f"admin:{app}_{model}_changelist"))
    searched = admin_client.get(reverse(f"admin:{app}_{model}_changelist"), {"q": "x"})

    # then both are pages, not errors
    assert listed.status_code == 200, listed.content[:500]
    assert searched.status_code == 200, searched.content[:500]


# A NUL in text sent to PostgreSQL is a DataError where the list counts its rows, outside
# the admin's own handling of a malformed filter: a 500 before.
NUL_QUERIES = [
    ("admin:inference_job_changelist", {"q": "a\x00b"}),
    ("admin:inference_job_changelist", {"error_code": "\x00"}),
    ("admin:inference_job_changelist", {"status__exact": "\x00"}),
    ("admin:metering_usagerecord_changelist", {"model_name": "gym\x00"}),
    ("admin:accounts_user_changelist", {"q": "\x00"}),
    ("admin:gymbilling_billingcustomer_changelist", {"q": "cus_\x00"}),
    ("admin:gymbilling_stripeevent_changelist", {"type": "\x00"}),
    ("admin:gymbilling_stripeevent_changelist", {"\x00": "1"}),
]


@pytest.mark.parametrize(("url", "query"), NUL_QUERIES, ids=[str(q) for _u, q in NUL_QUERIES])
def test_a_nul_in_an_admin_search_or_filter_is_a_400(admin_client, grant, url, query):
    # given a ledger with rows in it
    grant(OrganizationFactory(), credits(5))

    # when staff search or filter it with text holding a NUL
    response = admin_client.get(reverse(url), query)

    # then the request is refused as malformed, with its code, not a server error
    assert response.status_code == 400
    assert b'data-error-code="invalid_request"' in response.content


@pytest.mark.parametrize(("app", "model"), LISTS, ids=[f"{a}.{m}" for a, m in LISTS])
def test_a_nul_in_any_admin_lists_search_is_a_400(admin_client, app, model):
    response = admin_client.get(reverse(f"admin:{app}_{model}_changelist"), {"q": "\x00"})

    assert response.status_code == 400


def test_a_nul_in_an_admin_form_is_a_400_and_saves_nothing(admin_client):
    # given an organization
    org = OrganizationFactory(name="Acme")

    # when staff save its page with a NUL in its name
    response = admin_client.post(
        reverse("admin:accounts_organization_change", args=[org.pk]),
        {"slug": org.slug, "name": "Ac\x00me"},
    )

    # then it is refused, and the organization keeps its name
    assert response.status_code == 400
    org.refresh_from_db()
    assert org.name == "Acme"


def test_a_nul_escaped_in_an_admin_json_field_is_a_400_and_saves_nothing(admin_client):
    # when staff add a plan whose model tiers (a JSON field) hold the escape of a NUL,
    # which the field decodes into one
    response = admin_client.post(
        "/admin/gymbilling/plan/add/", {**PLAN_FORM, "model_tiers": '["ba\\u0000sic"]'}
    )

    # then it is refused, and nothing was saved
    assert response.status_code == 400
    assert not Plan.objects.filter(code=PLAN_FORM["code"]).exists()


def test_a_nul_in_an_admin_path_is_a_400(admin_client):
    response = admin_client.get("/admin/gymbilling/stripeevent/%00/change/")

    assert response.status_code == 400


def test_a_nul_outside_the_admin_is_left_to_each_page(client):
    assert client.get("/ping", {"x": "\x00"}).status_code == 200
