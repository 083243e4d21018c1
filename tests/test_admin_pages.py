"""Every admin list opens for staff, with rows in it: a column that names a missing field or
follows a relation wrongly is a 500 there, and nothing else reads every list."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse

from tests.factories import OrganizationFactory
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
