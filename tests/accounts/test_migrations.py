"""Data the accounts migrations must carry over, tried on the real schema."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from accounts.models import User

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = ("accounts", "0006_priority_known_email_any_case")
VERIFIED = ("accounts", "0007_user_email_verified")


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
