"""Production: every secret from the environment, secure cookies, no defaults."""

from .base import *  # noqa: F403
from .base import env

DEBUG = False
SECRET_KEY = env.str("DJANGO_SECRET_KEY")
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
CSRF_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=True)
# A request is HTTPS when the TLS terminator says so. It must set X-Forwarded-Proto on
# every request, overwriting what a client sent: one passed through lets a client on
# plain HTTP claim HTTPS (and skip the redirect below); one never set loops the redirect.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Plain HTTP is answered with a redirect to HTTPS, and browsers told to use only HTTPS
# for a year (HSTS: once a browser has it, the site cannot go back to HTTP for them
# until it expires; 0 sends none).
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=365 * 24 * 60 * 60)
# Load balancers probe the app servers directly, over plain HTTP and without
# X-Forwarded-Proto: a redirect there would count as a failed check. Neither answer
# carries anything of anyone's (paths without the leading slash, as Django matches).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^ping$"]
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# The links in emails (invitations, verification) must name the real site, and the
# emails must go somewhere: no development fallback here (127.0.0.1 links, emails
# printed into the logs with their tokens).
SITE_URL = env.str("SITE_URL")
vars().update(env.email_url("EMAIL_URL"))
