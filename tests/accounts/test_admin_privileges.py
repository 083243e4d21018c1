"""Who may give privileges in the Django admin: only superusers. Staff who may change
users change what a person is, never what they may do, and never sign in as someone who
may do more than they may (by setting that account's password)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client

from accounts.models import User
from tests.accounts.test_admin import user_form
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"  # UserFactory's
NEW_PASSWORD = "a brand new passphrase 42"


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def people_staff() -> User:
    """A staff member who may view and change users, and nothing else."""
    user = UserFactory(is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="accounts", codename__in=["view_user", "change_user"]
        )
    )
    return user


@pytest.fixture
def powerful_group() -> Group:
    group = Group.objects.create(name="finance")
    group.permissions.add(*Permission.objects.filter(content_type__app_label="gymbilling"))
    return group


def password_set(client: Client, user: User):
    return client.post(
        f"/admin/accounts/user/{user.pk}/password/",
        {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD, "usable_password": "true"},
    )


def privileges(user: User) -> tuple:
    user.refresh_from_db()
    return user.is_superuser, user.is_staff, sorted(user.groups.values_list("name", flat=True))


def test_staff_who_may_change_users_cannot_make_themselves_or_anyone_a_superuser(
    people_staff, powerful_group
):
    # given a staff member who may change users, and a customer's account
    client = signed_in(people_staff)
    customer = UserFactory()

    # when they post their own change form, and the customer's, with the superuser and
    # staff boxes ticked and a powerful group chosen (fields their page does not offer)
    crafted = {"is_superuser": "on", "is_staff": "on", "groups": [powerful_group.pk]}
    own = client.post(
        f"/admin/accounts/user/{people_staff.pk}/change/", user_form(people_staff, **crafted)
    )
    theirs = client.post(
        f"/admin/accounts/user/{customer.pk}/change/", user_form(customer, **crafted)
    )

    # then the forms save what they may change, and neither gained any privilege
    assert (own.status_code, theirs.status_code) == (302, 302)
    assert privileges(people_staff) == (False, True, [])
    assert privileges(customer) == (False, False, [])


def test_staff_who_may_change_users_cannot_set_a_password_of_someone_who_may_do_more(
    people_staff, powerful_group
):
    # given a superuser, and a staff member with permissions the people staff lack
    superuser = UserFactory(is_staff=True, is_superuser=True)
    finance = UserFactory(is_staff=True)
    finance.groups.add(powerful_group)
    client = signed_in(people_staff)

    # when the people staff set either's password, or change the superuser's address
    refused = [password_set(client, superuser), password_set(client, finance)]
    changed = client.post(
        f"/admin/accounts/user/{superuser.pk}/change/",
        user_form(superuser, email="mine@example.test", is_staff=True, is_superuser=True),
    )

    # then each is refused (403), and both still sign in with their own password only
    assert [r.status_code for r in refused] == [403, 403]
    assert changed.status_code == 403
    for person in (superuser, finance):
        person.refresh_from_db()
        assert person.check_password(PASSWORD) and not person.check_password(NEW_PASSWORD)
    assert superuser.email != "mine@example.test"
    # and they still see the superuser's page, read-only
    assert client.get(f"/admin/accounts/user/{superuser.pk}/change/").status_code == 200


def test_staff_who_may_change_users_still_set_a_customers_password(people_staff):
    # given a customer's account
    customer = UserFactory()

    # when staff who may change users set its password
    response = password_set(signed_in(people_staff), customer)

    # then it is set
    assert response.status_code == 302
    customer.refresh_from_db()
    assert customer.check_password(NEW_PASSWORD)


def test_a_superuser_gives_privileges_and_sets_a_superusers_password(
    admin_user, people_staff, powerful_group
):
    # given a superuser signed in, and another superuser
    client = signed_in(admin_user)
    other = UserFactory(is_staff=True, is_superuser=True)

    # when they make the people staff a superuser in the finance group, and set the
    # other superuser's password
    saved = client.post(
        f"/admin/accounts/user/{people_staff.pk}/change/",
        user_form(people_staff, is_staff=True, is_superuser=True, groups=[powerful_group.pk]),
    )
    password = password_set(client, other)

    # then both are done
    assert (saved.status_code, password.status_code) == (302, 302)
    assert privileges(people_staff) == (True, True, ["finance"])
    other.refresh_from_db()
    assert other.check_password(NEW_PASSWORD)


def test_staff_who_may_change_groups_cannot_give_their_group_more_permissions(powerful_group):
    # given: a staff member in a small group, who may view and change groups
    small = Group.objects.create(name="support")
    small.permissions.add(*Permission.objects.filter(codename__in=["view_group", "change_group"]))
    staff = UserFactory(is_staff=True)
    staff.groups.add(small)
    refunds = Permission.objects.get(codename="refund_payment")
    client = signed_in(staff)

    # when: they save their group's page with the refund permission added, and add a group
    change = client.post(
        f"/admin/auth/group/{small.pk}/change/",
        {
            "name": "support",
            "permissions": [*small.permissions.values_list("pk", flat=True), refunds.pk],
        },
    )
    add = client.post("/admin/auth/group/add/", {"name": "mine", "permissions": [refunds.pk]})

    # then: refused; the group holds what it held, no group was made, and they may still
    # view the groups
    assert (change.status_code, add.status_code) == (403, 403)
    assert not small.permissions.filter(pk=refunds.pk).exists()
    assert not Group.objects.filter(name="mine").exists()
    assert client.get(f"/admin/auth/group/{small.pk}/change/").status_code == 200
    assert not staff.has_perm("gymbilling.refund_payment")


def test_a_superuser_still_changes_groups():
    group = Group.objects.create(name="support")
    refunds = Permission.objects.get(codename="refund_payment")
    superuser = signed_in(UserFactory(is_staff=True, is_superuser=True))

    response = superuser.post(
        f"/admin/auth/group/{group.pk}/change/", {"name": "support", "permissions": [refunds.pk]}
    )

    assert response.status_code == 302
    assert group.permissions.filter(pk=refunds.pk).exists()
