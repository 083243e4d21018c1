"""Signing in with an email address, matched in the form every address is stored in.

Sign-up, the admin and the manager store an address lower-cased
(User.objects.canonical_email); Django's sign-in forms look the typed username up as
typed, so "Ada@Example.test", the very address someone signed up with, matched nobody.
An account whose address is unverified does not sign in with its password alone
(_EmailSignIn).
"""

from __future__ import annotations

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm, PasswordResetForm
from django.core.exceptions import ValidationError
from django.template.loader import render_to_string

from accounts.errors import ApplicationError
from accounts.models import User
from accounts.services.mail import email_send_on_commit


def storable_email_cleaned(email: str | None) -> str:
    """A form's typed address as it is stored (User.objects.storable_email), or the
    field's error: one that NFKC stretches past the column, or out of shape, is refused
    with `invalid_email`'s message, which says why an address valid as typed is not."""
    try:
        return User.objects.storable_email(email)
    except ApplicationError as error:
        raise ValidationError(error.message, code=error.code) from None


class _EmailSignIn:
    """The address matched in the form it is stored in; an unverified address refused.

    An account whose address is unverified (made by signing up, or whose address staff
    changed) signs in only through the link emailed to the address, with its password
    (accounts.views.EmailVerifyView): signing in with the password alone would let
    whoever signed up under someone else's address use the account, and would tell them
    that the address had no account before (the sign-up page answers alike either way).
    The refusal is the wrong password's, word for word, after the same password check.
    """

    def clean_username(self) -> str:
        return User.objects.canonical_email(self.cleaned_data.get("username"))

    def confirm_login_allowed(self, user) -> None:
        super().confirm_login_allowed(user)
        if not user.email_verified:
            raise self.get_invalid_login_error()


class EmailAuthenticationForm(_EmailSignIn, AuthenticationForm):
    """The dashboard's sign-in (accounts.views.SignInView)."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "invalid_login": "Wrong %(username)s or password. If you have just signed up, or "
        "your address was changed, follow the link we emailed you first: it verifies the "
        "address and signs you in.",
    }


class AdminEmailAuthenticationForm(_EmailSignIn, AdminAuthenticationForm):
    """The admin's sign-in: staff only, as Django's."""


class PasswordResetRequestForm(PasswordResetForm):
    """Django's "forgot my password" form, for this project's accounts.

    - The address is matched as every address is stored (canonical_email).
    - An account with no usable password is included: operators make owners without
      one (`org_create --owner`), and a reset is how such an owner sets theirs.
    - The email goes through accounts.services.mail: after commit, and a mail server
      that is down is logged, not turned into an error page.
    - The link names SITE_URL, not the Host header the request came with.
    """

    def get_users(self, email: str):
        return User.objects.filter(email=User.objects.canonical_email(email), is_active=True)

    def send_mail(
        self,
        subject_template_name,
        email_template_name,
        context,
        from_email,
        to_email,
        html_email_template_name=None,
    ) -> None:
        subject = "".join(render_to_string(subject_template_name, context).splitlines())
        body = render_to_string(email_template_name, context)
        email_send_on_commit(to=to_email, subject=subject, body=body)
