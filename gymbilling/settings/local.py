"""Development and `make demo`: SQLite unless DATABASE_URL says otherwise."""

from .base import *  # noqa: F403
from .base import BASE_DIR, DATABASES, env

DEBUG = env.bool("DJANGO_DEBUG", default=True)

if not env.str("DATABASE_URL", default=""):
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "var" / "demo.sqlite3",  # `make demo` creates var/
        "ATOMIC_REQUESTS": False,
        # Writers queue instead of failing at once when the worker and the
        # web process write together: every transaction takes the write lock
        # when it begins (a reader upgrading to writer mid-transaction fails
        # at once, whatever the timeout), and WAL lets readers carry on.
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL;",
        },
    }

EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
