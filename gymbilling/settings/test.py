"""The test suite: real PostgreSQL and Redis (see Makefile and tests/conftest.py)."""

from .base import *  # noqa: F403
from .base import env

DEBUG = False
SECRET_KEY = "test-secret-key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# Tests use their own Redis database so a developer's demo worker is untouched.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/15")
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=CELERY_BROKER_URL)
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/14")
# Every test client signs in and up from 127.0.0.1, many within a minute (the browser
# tests through one app server): the limits on people are out of reach here, and
# their own tests set them low (tests/dashboard/test_rate_limits.py).
RATELIMIT_SIGNIN_PER_IP = env.int("RATELIMIT_SIGNIN_PER_IP", default=100_000)
RATELIMIT_SIGNIN_PER_EMAIL = env.int("RATELIMIT_SIGNIN_PER_EMAIL", default=100_000)
RATELIMIT_SIGNUP_PER_IP = env.int("RATELIMIT_SIGNUP_PER_IP", default=100_000)
RATELIMIT_VERIFICATION_EMAILS_PER_USER = env.int(
    "RATELIMIT_VERIFICATION_EMAILS_PER_USER", default=100_000
)
RATELIMIT_DASHBOARD_PER_USER = env.int("RATELIMIT_DASHBOARD_PER_USER", default=100_000)
# Job callbacks go to receivers the tests run on 127.0.0.1, which answer at once.
INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK = True
# The marketplace tests trade a few credits for a few cents, under Stripe's
# minimum charge, which the stand-in does not enforce; the minimum's own test
# sets the production default (tests/gymbilling/market/test_market_apis.py).
MARKET_MIN_ORDER_AMOUNTS = dict.fromkeys(STRIPE_MINIMUM_CHARGES, 1)  # noqa: F405
INFERENCE_CALLBACK_TIMEOUT_SECONDS = env.float("INFERENCE_CALLBACK_TIMEOUT_SECONDS", default=2.0)
