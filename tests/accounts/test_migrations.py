"""Data the accounts migrations must carry over, tried on the real schema."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from accounts.models import User

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = ("accounts", "0006_priority_known_email_any_case")
VERIFIED = ("accounts", "0007_user_email_verified")
CALLER = ("accounts", "0008_idempotency_record_caller")
PREVIOUSLY_VERIFIED = ("accounts", "0009_user_email_previously_verified")


@pytest.fixture
def migrate():
    """Migrates the test database to a node; after the test, back to the latest."""

    def _migrate(target: tuple[str, str]):
        executor = MigrationExecutor(connection)
        executor.migrate([target])
        return executor.loader.project_state([target]).apps

    yield _migrate
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_every_user_made_before_email_verification_is_verified(migrate):
    # given a user made before email verification existed
    old = migrate(BEFORE)
    old.get_model("accounts", "User").objects.create(email="early@example.test")

    # when the migration runs
    new = migrate(VERIFIED)

    # then they are verified: only an account signed up from now on starts unverified
    user = new.get_model("accounts", "User").objects.get(email="early@example.test")
    assert user.email_verified is True


def test_no_account_unverified_at_the_upgrade_escapes_being_reclaimed(migrate):
    # given, before the column existed: unverified accounts, one of which has signed in
    # (a squatter's, from before unverified accounts were refused sign-in, or an owner's
    # whose address staff changed: nothing tells which), and a verified one
    old = migrate(CALLER)
    users = old.get_model("accounts", "User").objects
    now = timezone.now()
    users.create(email="signed-in@example.test", email_verified=False, last_login=now)
    users.create(email="never@example.test", email_verified=False)
    users.create(email="proven@example.test", email_verified=True, last_login=now)

    # when the migration runs
    new = migrate(PREVIOUSLY_VERIFIED)

    # then none counts as having proven an address before: a reset still reclaims the
    # unverified ones from whoever may have squatted them
    previously = dict(
        new.get_model("accounts", "User").objects.values_list("email", "email_previously_verified")
    )
    assert previously == {
        "signed-in@example.test": False,
        "never@example.test": False,
        "proven@example.test": False,
    }


def test_a_user_inserted_without_the_verified_column_is_verified(db):
    # given a process not yet upgraded, which inserts users without email_verified
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO accounts_user (password, is_superuser, first_name, last_name, "
            "is_staff, is_active, date_joined, email) "
            "VALUES ('!', false, '', '', false, true, now(), 'old.code@example.test')"
        )

    # then the database gives it what the model's default would
    assert User.objects.get(email="old.code@example.test").email_verified is True
