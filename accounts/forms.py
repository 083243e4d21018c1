"""Signing in with an email address, matched in the form every address is stored in.

Sign-up, the admin and the manager store an address lower-cased
(User.objects.canonical_email); Django's sign-in forms look the typed username up as
typed, so "Ada@Example.test", the very address someone signed up with, matched nobody.
"""

from __future__ import annotations

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm

from accounts.models import User


class _CanonicalUsername:
    def clean_username(self) -> str:
        return User.objects.canonical_email(self.cleaned_data.get("username"))


class EmailAuthenticationForm(_CanonicalUsername, AuthenticationForm):
    """The dashboard's sign-in (accounts.views.SignInView)."""


class AdminEmailAuthenticationForm(_CanonicalUsername, AdminAuthenticationForm):
    """The admin's sign-in: staff only, as Django's."""
