"""The operator commands: org_create, apikey_create, credits_grant."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import ApiKey, AuditEvent, Membership, Organization, Role, Scope, User
from metering.models import (
    AccountKind,
    CreditLot,
    JournalTransaction,
    LedgerEntry,
    LotSource,
)
from metering.selectors import account_balance, organization_balance
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import credits

pytestmark = pytest.mark.django_db

KEY_SHAPE = re.compile(r"gym_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}")


def run(*args, **options) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO(), **options)
    return out.getvalue()


def ledger_rows() -> tuple[int, int, int]:
    return (
        JournalTransaction.objects.count(),
        LedgerEntry.objects.count(),
        CreditLot.objects.count(),
    )


# --- org_create ---------------------------------------------------------------------------


def test_org_create_makes_an_organization_with_a_new_owner():
    # when
    out = run("org_create", "acme", "--owner", "Boss@Example.TEST", "--name", "Acme Inc")

    # then
    org = Organization.objects.get(slug="acme")
    assert org.name == "Acme Inc"
    assert f"id {org.pk}" in out
    owner = User.objects.get(email="boss@example.test")
    assert not owner.has_usable_password()
    assert Membership.objects.get(organization=org).user == owner
    assert Membership.objects.get(organization=org).role == Role.OWNER
    [event] = AuditEvent.objects.filter(organization=org, action="organization.created")
    assert event.actor_user == owner


def test_org_create_reuses_an_existing_user_as_owner():
    # given
    user = UserFactory(email="existing@example.test")

    # when
    run("org_create", "beta", "--owner", "EXISTING@example.test")

    # then
    org = Organization.objects.get(slug="beta")
    assert org.name == "beta"
    assert Membership.objects.get(organization=org).user == user
    assert User.objects.filter(email="existing@example.test").count() == 1


def test_org_create_will_not_make_an_account_that_has_not_proven_its_address_the_owner():
    # given an account someone signed up with under the customer's address, unverified
    squatter = UserFactory(email="cfo@customer.test", email_verified=False)

    # when the operator makes the customer's organization with that address as its owner
    with pytest.raises(CommandError, match="has not verified the address"):
        run("org_create", "customer", "--owner", "CFO@customer.test")

    # then nothing is made, and the squatter owns nothing
    assert not Organization.objects.filter(slug="customer").exists()
    assert not Membership.objects.filter(user=squatter).exists()


def test_org_create_without_an_owner():
    # when
    run("org_create", "solo")

    # then
    org = Organization.objects.get(slug="solo")
    assert not Membership.objects.filter(organization=org).exists()


@pytest.mark.parametrize("slug", ["Not A Slug", "UPPER", "under_score!", ""])
def test_org_create_refuses_a_bad_slug_and_writes_nothing(slug):
    # given
    before = (Organization.objects.count(), AuditEvent.objects.count())

    # when
    with pytest.raises(CommandError, match="invalid_slug"):
        run("org_create", slug)

    # then
    assert (Organization.objects.count(), AuditEvent.objects.count()) == before


def test_org_create_refuses_a_taken_slug():
    # given
    run("org_create", "taken")

    # when
    with pytest.raises(CommandError, match="organization_exists"):
        run("org_create", "taken", "--owner", "second@example.test")

    # then
    assert Organization.objects.filter(slug="taken").count() == 1
    assert not Membership.objects.filter(organization__slug="taken").exists()


# --- apikey_create ---------------------------------------------------------------------------


def test_apikey_create_prints_only_the_key_and_it_authenticates(org):
    # when
    out = run("apikey_create", org.slug)

    # then
    raw = out.removesuffix("\n")
    assert out == raw + "\n" and "\n" not in raw
    assert KEY_SHAPE.fullmatch(raw), out
    key = ApiKey.objects.get(organization=org)
    assert key.name == "cli"
    assert key.scopes == [Scope.BILLING_READ, Scope.INFERENCE]
    response = key_client(raw).get("/api/v1/me")
    assert response.status_code == 200
    assert response.json()["organization"]["id"] == org.pk
    assert response.json()["api_key"]["id"] == key.pk


def test_apikey_create_with_a_name_and_scopes(org):
    # when
    raw = run("apikey_create", org.slug, "--name", "deploy", "--scopes", "admin", "marketplace")

    # then
    key = ApiKey.objects.get(organization=org)
    assert key.name == "deploy"
    assert key.scopes == [Scope.ADMIN, Scope.MARKETPLACE]
    assert key_client(raw.strip()).get("/api/v1/keys").status_code == 200
    [event] = AuditEvent.objects.filter(organization=org, action="api_key.created")
    assert event.target == key.prefix


def test_apikey_create_for_an_unknown_organization_writes_nothing(org):
    # given
    before = (ApiKey.objects.count(), AuditEvent.objects.count())

    # when
    with pytest.raises(CommandError, match="nope"):
        run("apikey_create", "nope")

    # then
    assert (ApiKey.objects.count(), AuditEvent.objects.count()) == before


def test_apikey_create_refuses_an_unknown_scope(org):
    # when
    with pytest.raises(CommandError):
        run("apikey_create", org.slug, "--scopes", "root")

    # then
    assert not ApiKey.objects.exists()


def test_apikey_create_refuses_a_blank_name(org):
    # when
    with pytest.raises(CommandError, match="invalid_name"):
        run("apikey_create", org.slug, "--name", "  ")

    # then
    assert not ApiKey.objects.exists()


# --- credits_grant ----------------------------------------------------------------------------


def test_credits_grant_adds_exactly_the_micro_credits_with_the_reason(org, grant):
    # given
    grant(org, credits(10))
    before = organization_balance(organization=org)

    # when
    out = run("credits_grant", org.slug, "12.345678", "--reason", "Goodwill for ticket 42")

    # then
    after = organization_balance(organization=org)
    assert after.available - before.available == 12_345_678
    assert after.held == before.held
    assert "available 22.345678" in out
    txn = JournalTransaction.objects.get(organization=org, memo="Goodwill for ticket 42")
    [lot] = txn.created_lots.all()
    assert lot.source == LotSource.ADJUSTMENT
    assert (lot.amount, lot.remaining) == (12_345_678, 12_345_678)
    assert lot.paid is False and lot.resellable is False
    entries = {e.account.kind: e.amount for e in txn.entries.select_related("account")}
    assert entries == {AccountKind.WALLET: 12_345_678, AccountKind.ADJUSTMENTS: -12_345_678}


def test_credits_grant_shows_in_the_ledger_api_with_its_reason(org, make_key):
    # given
    _key, raw = make_key(org, scopes=[Scope.BILLING_READ])

    # when
    run("credits_grant", org.slug, "5", "--reason", "Onboarding credit")

    # then
    rows = key_client(raw).get("/api/v1/credits/ledger").json()["results"]
    assert [(r["account"], r["amount"], r["memo"]) for r in rows] == [
        ("wallet", credits(5), "Onboarding credit")
    ]


def test_credits_grant_records_the_acting_staff_member(org):
    # given
    staff = UserFactory(email="finance@example.test", is_staff=True)

    # when
    run("credits_grant", org.slug, "1", "--reason", "refund", "--actor", "FINANCE@example.test")

    # then
    assert JournalTransaction.objects.get(organization=org).actor == staff


def test_credits_grant_with_the_same_key_grants_once(org):
    # when
    run("credits_grant", org.slug, "3", "--reason", "promo", "--key", "promo-2025")
    run("credits_grant", org.slug, "3", "--reason", "promo", "--key", "promo-2025")

    # then
    assert organization_balance(organization=org).available == credits(3)
    assert JournalTransaction.objects.filter(organization=org).count() == 1


def test_credits_grant_takes_credits_away_with_a_negative_amount(org, grant):
    # given
    grant(org, credits(10))

    # when
    run("credits_grant", org.slug, "-2.5", "--reason", "clawback")

    # then
    assert organization_balance(organization=org).available == credits("7.5")
    system = account_balance(
        account=JournalTransaction.objects.get(memo="clawback")
        .entries.get(account__organization__isnull=True)
        .account
    )
    assert system == credits("2.5")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "5", "--reason", "x"], "nope"),
        (["{org}", "lots", "--reason", "x"], "not a number"),
        (["{org}", "0.0000001", "--reason", "x"], "millionth"),
        (["{org}", "0", "--reason", "x"], "invalid_amount"),
        (["{org}", "5", "--reason", "   "], "reason_required"),
        (["{org}", "5"], "--reason"),
        (["{org}", "5", "--reason", "x", "--actor", "ghost@example.test"], "ghost"),
        (["{org}", "-1", "--reason", "more than there is"], "insufficient"),
        # Decimal() alone reads these as 3, 250, 1000 and 1000 credits
        (["{org}", "\u0663", "--reason", "x"], "not a number of credits: write ASCII digits"),
        (["{org}", "\uff12\uff15\uff10", "--reason", "x"], "write ASCII digits"),
        (["{org}", "1_000", "--reason", "x"], "write ASCII digits"),
        (["{org}", "1e3", "--reason", "x"], "write ASCII digits"),
        (["{org}", "1 000", "--reason", "x"], "write ASCII digits"),
    ],
    ids=[
        "unknown-org",
        "not-a-number",
        "too-fine",
        "zero",
        "blank-reason",
        "no-reason",
        "unknown-actor",
        "overdraw",
        "arabic-indic-digit",
        "fullwidth-digits",
        "underscore",
        "exponent",
        "space-inside",
    ],
)
def test_credits_grant_refuses_bad_input_and_writes_nothing(org, args, message):
    # given
    OrganizationFactory(slug="other")
    before = ledger_rows()
    balance = organization_balance(organization=org)

    # when
    with pytest.raises(CommandError, match=message) as refused:
        run("credits_grant", *[a.format(org=org.slug) for a in args])

    # then it exits with a failure status (what manage.py returns), and nothing is written
    assert refused.value.returncode == 1
    assert ledger_rows() == before
    assert organization_balance(organization=org) == balance
