"""Production: every secret from the environment, secure cookies, no defaults."""

from .base import *  # noqa: F403
from .base import env

DEBUG = False
SECRET_KEY = env.str("DJANGO_SECRET_KEY")
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# The links in emails (invitations, verification) must name the real site, and the
# emails must go somewhere: no development fallback here (127.0.0.1 links, emails
# printed into the logs with their tokens).
SITE_URL = env.str("SITE_URL")
vars().update(env.email_url("EMAIL_URL"))
