"""People and organizations in the Django admin, as staff use it."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core import mail
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from django.forms.models import model_to_dict
from django.test import Client
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import (
    ApiKey,
    AuditEvent,
    Invitation,
    Membership,
    Organization,
    Role,
    Scope,
    Standing,
    User,
)
from accounts.services import (
    apikey_create,
    invitation_accept,
    invitation_create,
    membership_set_role,
)
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(admin_user) -> Client:
    """A superuser signed in to the admin (this folder's `admin_client` is an API key's)."""
    client = Client()
    client.force_login(admin_user)
    return client


def posted(fields: dict) -> dict:
    """`fields` as a browser posts an admin form: a ticked box "on", an unticked box and
    an empty field left out."""
    return {
        name: "on" if value is True else value
        for name, value in fields.items()
        if value is not None and value is not False and value != ""
    }


def user_form(user: User, **changes) -> dict:
    """The admin's change form for `user` as the page fills it, with `changes`."""
    return posted(
        {
            "email": user.email,
            "email_verified": user.email_verified,
            "first_name": user.first_name,
            "last_name": user.last_name,
            "is_active": user.is_active,
            "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
            "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
            **changes,
        }
    )


def _key_of(user, organization, scopes=(Scope.ADMIN, Scope.INFERENCE)) -> str:
    _key, raw = apikey_create(
        organization=organization, name="ops", scopes=list(scopes), actor=user
    )
    return raw


# --- leaving: deactivate, never delete ------------------------------------------------------


def test_staff_cannot_delete_a_user_and_the_database_keeps_their_keys_creator(staff):
    # given an admin who made an API key
    org = OrganizationFactory(seats=5)
    admin = UserFactory()
    Membership.objects.create(organization=org, user=admin, role=Role.ADMIN)
    _key_of(admin, org)

    # when staff open the user's delete page, and when code deletes the user
    page = staff.post(f"/admin/accounts/user/{admin.pk}/delete/", {"post": "yes"})
    with pytest.raises(ProtectedError):
        admin.delete()

    # then both are refused: the key still names its creator, so it can never
    # become a creator-less (operator's) key
    assert page.status_code == 403
    assert ApiKey.objects.get(organization=org).created_by_id == admin.pk


def test_a_deactivated_admins_admin_key_is_refused_and_its_other_scopes_work(staff):
    # given an admin's key with the admin and inference scopes
    org = OrganizationFactory(seats=5)
    admin = UserFactory()
    Membership.objects.create(organization=org, user=admin, role=Role.ADMIN)
    api = key_client(_key_of(admin, org))
    assert api.get("/api/v1/keys").status_code == 200

    # when staff deactivate the admin in the admin
    saved = staff.post(
        f"/admin/accounts/user/{admin.pk}/change/", user_form(admin, is_active=False)
    )
    assert saved.status_code == 302, saved.content
    assert not User.objects.get(pk=admin.pk).is_active

    # then the key is refused on admin endpoints, as a departed admin's is,
    # and makes no key; its inference scope still reads the models
    refused = api.post("/api/v1/keys", {"name": "again", "scopes": ["admin"]}, format="json")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert api.get("/api/v1/keys").status_code == 403
    assert not ApiKey.objects.filter(name="again").exists()
    assert api.get("/v1/models").status_code == 200


def test_a_deactivated_owners_key_can_no_longer_make_an_owner(staff):
    # given an owner's admin key, and a member
    org = OrganizationFactory(seats=5)
    owner, member = UserFactory(), UserFactory()
    Membership.objects.create(organization=org, user=owner, role=Role.OWNER)
    joined = Membership.objects.create(organization=org, user=member, role=Role.MEMBER)
    _key_of(owner, org)
    key = ApiKey.objects.get(organization=org)

    # when the owner is deactivated, then the key asks the service itself (the
    # view's own check of the creator aside) to make the member owner
    staff.post(f"/admin/accounts/user/{owner.pk}/change/", user_form(owner, is_active=False))
    with pytest.raises(ApplicationError) as refused:
        membership_set_role(membership=joined, role=Role.OWNER, actor_key=key)

    # then it is refused and the member is still a member
    assert refused.value.code == "permission_denied"
    assert Membership.objects.get(pk=joined.pk).role == Role.MEMBER


# --- organizations: entitlements go through their service -----------------------------------


def organization_form(org: Organization, **changes) -> dict:
    """The admin's form for `org` as the page fills it, with `changes`."""
    return posted({**model_to_dict(org), "model_tiers": json.dumps(org.model_tiers), **changes})


def test_staff_changing_an_entitlement_write_it_through_the_service_and_the_audit_log(
    staff, admin_user
):
    # given an organization on the default limits
    org = OrganizationFactory(requests_per_minute=60, model_tiers=["basic"])

    # when staff raise its request limit and rename it in the admin
    saved = staff.post(
        f"/admin/accounts/organization/{org.pk}/change/",
        organization_form(org, requests_per_minute=600, name="Renamed"),
    )

    # then both are saved, and the entitlement change is audited as billing's
    # are, naming the staff member; the name is no entitlement
    assert saved.status_code == 302, saved.content
    org.refresh_from_db()
    assert (org.requests_per_minute, org.name, org.model_tiers) == (600, "Renamed", ["basic"])
    [event] = AuditEvent.objects.filter(
        organization=org, action="organization.entitlements_changed"
    )
    assert event.data == {
        "before": {"requests_per_minute": 60},
        "after": {"requests_per_minute": 600},
    }
    assert admin_user.email in event.target


def test_staff_adding_an_organization_with_entitlements_have_them_audited(staff):
    # when staff add an organization that is suspended from the start
    saved = staff.post(
        "/admin/accounts/organization/add/",
        organization_form(
            Organization(slug="from-admin", name="From admin"), standing=Standing.SUSPENDED
        ),
    )

    # then it exists suspended, and the audit log says who set that
    assert saved.status_code == 302, saved.content
    org = Organization.objects.get(slug="from-admin")
    assert org.standing == Standing.SUSPENDED
    [event] = AuditEvent.objects.filter(
        organization=org, action="organization.entitlements_changed"
    )
    assert event.data["after"] == {"standing": "suspended"}


@pytest.mark.parametrize("tiers", ['"pro"', "3", '["basic", null]'])
def test_staff_cannot_give_an_organization_tiers_that_are_not_a_list_of_names(staff, tiers):
    # given an organization
    org = OrganizationFactory(model_tiers=["basic"])

    # when staff save tiers that are not a list of names
    response = staff.post(
        f"/admin/accounts/organization/{org.pk}/change/", organization_form(org, model_tiers=tiers)
    )

    # then the form names the field, and the tiers are as they were
    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == ["model_tiers"]
    org.refresh_from_db()
    assert org.model_tiers == ["basic"]


@pytest.mark.parametrize("priority", ["urgent", "Priority", ""])
def test_staff_cannot_give_an_organization_a_priority_jobs_do_not_have(staff, priority):
    # given an organization allowed standard jobs
    org = OrganizationFactory(max_priority="standard")

    # when staff save a priority no job has
    response = staff.post(
        f"/admin/accounts/organization/{org.pk}/change/",
        organization_form(org, max_priority=priority),
    )

    # then the form names the field, the entitlement is as it was, and nothing is audited
    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == ["max_priority"]
    org.refresh_from_db()
    assert org.max_priority == "standard"
    assert not AuditEvent.objects.filter(
        organization=org, action="organization.entitlements_changed"
    )


def test_the_database_refuses_a_priority_jobs_do_not_have():
    # given an organization
    org = OrganizationFactory()

    # when anything that skips the forms (a script, a shell) writes an unknown priority
    # then the database refuses it, and the entitlement is as it was
    with pytest.raises(IntegrityError), transaction.atomic():
        Organization.objects.filter(pk=org.pk).update(max_priority="urgent")
    org.refresh_from_db()
    assert org.max_priority == "standard"


# --- email addresses: lower-cased, one person per address whatever its case -----------------

PASSWORD = "a long and unusual passphrase 7"


def test_staff_adding_a_user_with_capitals_store_the_address_as_invitations_compare_it(staff):
    # given an open invitation to the lower-cased address
    org = OrganizationFactory(seats=5)
    _invitation, token = invitation_create(organization=org, email="ann.lee@example.test")

    # when staff add the person with capitals in their address
    saved = staff.post(
        "/admin/accounts/user/add/",
        {"email": "Ann.Lee@Example.TEST", "password1": PASSWORD, "password2": PASSWORD},
    )

    # then the address is stored lower-cased, and the invitation is theirs to accept
    assert saved.status_code == 302, saved.content
    user = User.objects.get(email="ann.lee@example.test")
    invitation_accept(token=token, user=user)
    assert Membership.objects.filter(organization=org, user=user).exists()


def test_staff_cannot_add_a_second_user_whose_address_differs_only_in_case(staff):
    # given a user
    UserFactory(email="bob@example.test")

    # when staff add the same address with capitals
    response = staff.post(
        "/admin/accounts/user/add/",
        {"email": "BOB@Example.test", "password1": PASSWORD, "password2": PASSWORD},
    )

    # then the form names the address, and there is still one such user
    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == ["email"]
    assert User.objects.filter(email__iexact="bob@example.test").count() == 1


def test_staff_changing_an_address_store_it_lower_cased_and_never_anothers(staff):
    # given two users
    carol, dave = UserFactory(email="carol@example.test"), UserFactory(email="dave@example.test")
    change = f"/admin/accounts/user/{carol.pk}/change/"

    # when staff give the first a new address with capitals, then the second's
    renamed = staff.post(change, user_form(carol, email="Carol.New@Example.TEST"))
    taken = staff.post(change, user_form(carol, email="DAVE@example.test"))

    # then the first is stored lower-cased and the second refused
    assert renamed.status_code == 302, renamed.content
    assert taken.status_code == 200
    assert list(taken.context["adminform"].form.errors) == ["email"]
    assert User.objects.get(pk=carol.pk).email == "carol.new@example.test"
    assert User.objects.get(pk=dave.pk).email == "dave@example.test"


# Valid as typed, 17 characters; NFKC stretches each U+FDFA to 18, spaces among them.
STRETCHED = "a@" + "\ufdfa" * 10 + ".test"


def _refused_as_stored(response) -> bool:
    """The admin form refused the address alone, as every service refuses it
    (User.objects.storable_email: invalid_email), saying what NFKC does to it."""
    errors = response.context["adminform"].form.errors.as_data()
    if list(errors) != ["email"]:
        return False
    [error] = errors["email"]
    return error.code == "invalid_email" and "Unicode NFKC" in error.message


def test_staff_cannot_add_a_user_whose_address_is_invalid_as_stored(staff):
    # when staff add a person with an address that is valid only as typed
    response = staff.post(
        "/admin/accounts/user/add/",
        {"email": STRETCHED, "password1": PASSWORD, "password2": PASSWORD},
    )

    # then the form names the address, saying why it is refused, and no user is made
    assert response.status_code == 200
    assert _refused_as_stored(response)
    assert not User.objects.exclude(is_superuser=True).exists()


def test_staff_changing_an_address_to_one_invalid_as_stored_get_the_field_refused(staff):
    # given a verified user
    gus = UserFactory(email="gus@example.test")

    # when staff give them an address that is valid only as typed
    response = staff.post(f"/admin/accounts/user/{gus.pk}/change/", user_form(gus, email=STRETCHED))

    # then the form names the address, saying why it is refused, and the user keeps
    # theirs, verified
    assert response.status_code == 200
    assert _refused_as_stored(response)
    gus.refresh_from_db()
    assert (gus.email, gus.email_verified) == ("gus@example.test", True)


def test_the_database_keeps_one_user_per_address_whatever_its_case():
    # given a user
    UserFactory(email="erin@example.test")

    # when anything that skips the lower-casing (a script, a shell) stores the address
    # with capitals
    # then the database refuses it: there is still one such user
    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.create(email="Erin@Example.test")
    assert User.objects.filter(email__iexact="erin@example.test").count() == 1


# --- changing an address: unverified until proven -------------------------------------------


def test_staff_changing_a_verified_address_unverify_it_and_email_the_new_one_a_link(
    staff, commit_then_mail
):
    # given a verified user with a session of their own
    fay = UserFactory(email="fay@example.test", password="fay's own passphrase 1")
    assert fay.email_verified
    change = f"/admin/accounts/user/{fay.pk}/change/"

    # when staff give them a new address, leaving "email verified" ticked as it was
    with commit_then_mail():
        saved = staff.post(change, user_form(fay, email="Fay.New@Example.test", first_name="Fay"))

    # then the new address is unverified (the rest of the form saved), and only it is
    # emailed a link, which names it
    assert saved.status_code == 302, saved.content
    fay.refresh_from_db()
    assert (fay.email, fay.email_verified, fay.first_name) == ("fay.new@example.test", False, "Fay")
    [message] = [each for each in mail.outbox if each.to == ["fay.new@example.test"]]
    assert "/verify-email?token=" in message.body
    # and the old address is told, without a link that acts
    [notice] = [each for each in mail.outbox if each.to == ["fay@example.test"]]
    assert "token" not in notice.body
    assert len(mail.outbox) == 2
    # and the password alone no longer signs in; the link, with the password, does
    refused = Client().post(
        "/login/", {"username": "fay.new@example.test", "password": "fay's own passphrase 1"}
    )
    assert refused.status_code == 200 and b"invalid_login" in refused.content
    token = parse_qs(urlsplit(re.search(r"https?://\S+", message.body)[0]).query)["token"][0]
    person = Client()
    verified = person.post("/verify-email", {"token": token, "password": "fay's own passphrase 1"})
    assert verified.status_code == 302
    assert User.objects.get(pk=fay.pk).email_verified


def test_staff_who_checked_the_new_address_keep_it_verified_and_email_it_nothing(
    staff, commit_then_mail
):
    # given a verified user
    gus = UserFactory(email="gus@example.test")

    # when staff give them a new address and tick "New address checked"
    page = staff.get(f"/admin/accounts/user/{gus.pk}/change/")
    assert page.status_code == 200 and b'name="new_email_verified"' in page.content
    with commit_then_mail():
        saved = staff.post(
            f"/admin/accounts/user/{gus.pk}/change/",
            user_form(gus, email="gus.new@example.test", new_email_verified=True),
        )

    # then it is verified, and no link is sent; only the old address hears of it
    assert saved.status_code == 302, saved.content
    gus.refresh_from_db()
    assert (gus.email, gus.email_verified) == ("gus.new@example.test", True)
    assert [message.to for message in mail.outbox] == [["gus@example.test"]]
    assert "token" not in mail.outbox[0].body


def test_staff_changing_an_address_tell_the_old_one_who_changed_it_and_when(
    staff, admin_user, commit_then_mail, settings
):
    # given a user whose address staff change (a request in their name, say)
    settings.SITE_URL = "https://gym.example.test"
    kit = UserFactory(email="kit@example.test")
    admin_user.first_name, admin_user.last_name = "Sam", "Staff"
    admin_user.save(update_fields=["first_name", "last_name"])

    # when
    with commit_then_mail():
        saved = staff.post(
            f"/admin/accounts/user/{kit.pk}/change/", user_form(kit, email="kit@elsewhere.test")
        )

    # then the old address gets a notice: who, when, and where; no link that acts, and
    # not the new address
    assert saved.status_code == 302, saved.content
    [notice] = [each for each in mail.outbox if each.to == ["kit@example.test"]]
    assert "changed" in notice.subject
    assert "by Sam Staff, of GymBilling's staff" in notice.body
    when = re.search(r"on (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", notice.body)
    assert when, notice.body
    sent_at = datetime.strptime(when[1], "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    assert abs(sent_at - timezone.now()) < timedelta(minutes=2)
    assert re.findall(r"https?://[^\s)]+", notice.body) == ["https://gym.example.test/"]
    assert "kit@elsewhere.test" not in notice.body


def test_staff_saving_a_user_without_changing_the_address_leave_its_verification_alone(
    staff, commit_then_mail
):
    # given a verified user and an unverified one
    hal = UserFactory(email="hal@example.test")
    ivy = UserFactory(email="ivy@example.test", email_verified=False)

    # when staff change their names only
    with commit_then_mail():
        for user in (hal, ivy):
            saved = staff.post(
                f"/admin/accounts/user/{user.pk}/change/", user_form(user, last_name="Smith")
            )
            assert saved.status_code == 302, saved.content

    # then each keeps what it had, and nothing is emailed
    assert dict(
        User.objects.filter(pk__in=[hal.pk, ivy.pk]).values_list("email", "email_verified")
    ) == {"hal@example.test": True, "ivy@example.test": False}
    assert mail.outbox == []


def test_staff_retyping_the_same_address_in_another_case_leave_its_verification_alone(
    staff, commit_then_mail
):
    # given a verified user
    joy = UserFactory(email="joy@example.test", password="joy's own passphrase 1")

    # when staff save the user with the address typed in capitals: the same address,
    # as it is stored and compared (User.objects.canonical_email)
    with commit_then_mail():
        saved = staff.post(
            f"/admin/accounts/user/{joy.pk}/change/",
            user_form(joy, email="Joy@Example.TEST", last_name="Smith"),
        )

    # then it stays verified, nothing is emailed, and its password still signs in
    assert saved.status_code == 302, saved.content
    joy.refresh_from_db()
    assert (joy.email, joy.email_verified, joy.last_name) == ("joy@example.test", True, "Smith")
    assert mail.outbox == []
    signed_in = Client().post(
        "/login/", {"username": "joy@example.test", "password": "joy's own passphrase 1"}
    )
    assert signed_in.status_code == 302


# --- invitations: read here, revoked through their service ---------------------------------


def test_staff_list_invitations_by_status_and_revoke_the_open_ones(staff, admin_user):
    # given an open invitation, an accepted one and another organization's open one
    org = OrganizationFactory(seats=5)
    owner = UserFactory()
    Membership.objects.create(organization=org, user=owner, role=Role.OWNER)
    leaked, _ = invitation_create(organization=org, email="leaked@example.test", actor=owner)
    used, token = invitation_create(organization=org, email="used@example.test", actor=owner)
    invitation_accept(token=token, user=UserFactory(email="used@example.test"))
    elsewhere, _ = invitation_create(organization=OrganizationFactory(), email="else@example.test")

    # when staff list the open ones, and revoke the leaked one and the used one
    listed = staff.get("/admin/accounts/invitation/", {"status": "open"})
    revoked = staff.post(
        "/admin/accounts/invitation/",
        {"action": "revoke", "_selected_action": [leaked.pk, used.pk]},
        follow=True,
    )

    # then the list showed the open ones only; the leaked one is revoked, audited with the
    # staff member's name, and the used one is said to be accepted and left as it was
    assert listed.status_code == 200
    shown = listed.content.decode()
    assert "leaked@example.test" in shown and "else@example.test" in shown
    assert "used@example.test" not in shown
    assert revoked.status_code == 200
    said = revoked.content.decode()
    assert "nvitation to leaked@example.test: revoked" in said
    assert "invitation to used@example.test: The invitation" in said and "(invitation_used)" in said
    for row in (leaked, used, elsewhere):
        row.refresh_from_db()
    assert leaked.revoked_at is not None
    assert used.revoked_at is None and elsewhere.revoked_at is None
    [event] = AuditEvent.objects.filter(organization=org, action="invitation.revoked")
    assert (event.target, event.actor_user) == ("leaked@example.test", admin_user)
    assert staff.get(f"/admin/accounts/invitation/{leaked.pk}/delete/").status_code == 403


def test_staff_see_an_invitation_revoked_with_its_key_as_revoked_though_it_expired_since(staff):
    # given two expired invitations sent with keys: one key revoked while its invitation
    # was open (before revoking a key closed them: the row itself says nothing), the other
    # only after its invitation had expired
    org = OrganizationFactory(seats=5)
    expired_at = timezone.now() - timedelta(days=1)
    for name, revoked_at in (
        ("leaked", expired_at - timedelta(days=1)),
        ("late", expired_at + timedelta(hours=1)),
    ):
        key, _raw = apikey_create(organization=org, name=name, scopes=[Scope.ADMIN])
        invitation_create(organization=org, email=f"{name}@example.test", actor_key=key)
        ApiKey.objects.filter(pk=key.pk).update(revoked_at=revoked_at)
    Invitation.objects.filter(organization=org).update(expires_at=expired_at)

    # when staff list the revoked and the expired ones, and all of them
    revoked = staff.get("/admin/accounts/invitation/", {"status": "revoked"}).content.decode()
    expired = staff.get("/admin/accounts/invitation/", {"status": "expired"}).content.decode()
    every = staff.get("/admin/accounts/invitation/").content.decode()

    # then the first is revoked, the second expired, in the filters and the status column
    assert "leaked@example.test" in revoked and "late@example.test" not in revoked
    assert "late@example.test" in expired and "leaked@example.test" not in expired
    statuses = dict(re.findall(r'>([a-z]+@example\.test)<.*?field-status">([a-z]+)<', every, re.S))
    assert statuses == {"leaked@example.test": "revoked", "late@example.test": "expired"}
