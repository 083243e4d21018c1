"""The dashboard's pages for people: signing in and up, proving an email address, a
forgotten password; API keys (`keys`), members and invitations (`members`).

Signing in is Django's view, limited (SignInView); signing out is Django's own
(`gymbilling/urls.py`); both are drawn with `templates/registration/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate, login, password_validation
from django.contrib.auth.mixins import LoginRequiredMixin
from django.contrib.auth.views import (
    LoginView,
    PasswordResetConfirmView,
    PasswordResetView,
)
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters

from accounts.dashboard import (
    SingleQueryParams,
    refusal_page,
    safe_next,
    with_retry_after,
)
from accounts.errors import ApplicationError
from accounts.forms import (
    EmailAuthenticationForm,
    PasswordResetRequestForm,
    storable_email_cleaned,
)
from accounts.models import User
from accounts.ratelimits import Limit, rate_limit_consume
from accounts.services import (
    user_email_verification_send,
    user_email_verify,
    user_signup,
)
from accounts.services.email_verification import (
    email_verification_account,
    user_password_reset_done,
)
from accounts.views.members import InvitationAcceptPage

# --- limits on people's own attempts ----------------------------------------------------


@dataclass(frozen=True)
class Attempts:
    """A kind of attempt, at most the setting `limit_setting`'s value in each fixed window
    of `window` seconds, per scope (a network address, an account)."""

    kind: str
    limit_setting: str
    window: int

    def count(self, *, scope: str) -> None:
        """Count one attempt by `scope`; over the limit, `rate_limited` (429), not counted."""
        limit = Limit(scope=scope, limit=getattr(settings, self.limit_setting))
        rate_limit_consume(kind=self.kind, limits=[limit], window=self.window)


SIGN_UPS = Attempts("sign-ups", "RATELIMIT_SIGNUP_PER_IP", window=600)
# Each sends an email from us to an address anyone may type; counted as sign-ups are.
PASSWORD_RESETS = Attempts("password resets", "RATELIMIT_SIGNUP_PER_IP", window=600)
# Each sends an email from us to an address anyone may have typed at sign-up.
VERIFICATION_EMAILS = Attempts(
    "verification emails", "RATELIMIT_VERIFICATION_EMAILS_PER_USER", window=3600
)


def client_address(request: HttpRequest) -> str:
    """The network address a request came from, as its connection says (REMOTE_ADDR).

    Never X-Forwarded-For as sent: a client writes what it likes there, and would pick
    its own limit. Behind a proxy or load balancer REMOTE_ADDR is the proxy's, and every
    client shares one limit: the deployment puts the client's address in REMOTE_ADDR,
    from the header its proxy sets and for connections from that proxy only (README,
    "The customer dashboard").
    """
    return request.META.get("REMOTE_ADDR") or "unknown"


def _email_scope(email: str) -> str:
    """An address tried at sign-in as a limit's scope: in the form sign-up stores it, so
    that its cases count as one, and hashed, so that Redis holds no addresses."""
    # NFKC first, as the sign-in form's username field reads it: "\uff41da@" (a fullwidth
    # letter) signs in as "ada@", so it must count as "ada@" too.
    canonical = User.objects.canonical_email(unicodedata.normalize("NFKC", email))
    return f"email:{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


def sign_in_count(request: HttpRequest, *, email: str | None = None) -> None:
    """Count a sign-in attempt (the dashboard's, the admin's, a verification link's) per
    network address and per address tried (`email`; else the form's `username`), or
    refuse it (429, `rate_limited`) before its password is checked: a guess over the
    limit learns nothing, right or wrong."""
    if email is None:
        email = request.POST.get("username", "")
    rate_limit_consume(
        kind="sign-ins",
        limits=[
            Limit(scope=f"ip:{client_address(request)}", limit=settings.RATELIMIT_SIGNIN_PER_IP),
            Limit(
                scope=_email_scope(email),
                limit=settings.RATELIMIT_SIGNIN_PER_EMAIL,
            ),
        ],
    )


class SignInView(SingleQueryParams, LoginView):
    """Django's sign-in, matching the address in any case (EmailAuthenticationForm), and
    counted per network address and per address tried.

    Over either limit, the attempt is refused (429, Retry-After) before the password is
    checked: a guess over the limit learns nothing, right or wrong.
    """

    authentication_form = EmailAuthenticationForm
    extra_context = {"title": "Sign in"}

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        username = request.POST.get("username", "")
        try:
            sign_in_count(request)
        except ApplicationError as error:
            # A form not bound to the POST: drawing a bound one's errors would check the
            # password after all.
            form = self.get_form_class()(request, initial={"username": username})
            response = self.render_to_response(
                self.get_context_data(form=form, refusal=error), status=error.status
            )
            return with_retry_after(response, error)
        return super().post(request, *args, **kwargs)


class SignupForm(forms.Form):
    email = forms.EmailField(max_length=254)
    password = forms.CharField(widget=forms.PasswordInput, max_length=128, strip=False)

    def clean_email(self) -> str:
        # As user_signup stores it: an address that NFKC stretches past the column, or
        # out of shape, is refused here, drawn as the field's error (invalid_email).
        return storable_email_cleaned(self.cleaned_data["email"])

    def clean_password(self) -> str:
        password = self.cleaned_data["password"]
        # The user to be, so that the validators that compare the password with the
        # account (UserAttributeSimilarityValidator: the address) have one to compare.
        person = User(email=User.objects.canonical_email(self.cleaned_data.get("email")))
        password_validation.validate_password(password, user=person)
        return password


@method_decorator(sensitive_post_parameters("password"), name="dispatch")
class SignupView(SingleQueryParams, View):
    """A new account and its personal organization, unverified until the emailed link.

    The answer says nothing of whether the address already had an account: a valid form
    is answered with the same redirect to "check your email" (SignupDoneView) either way,
    signing nobody in, and either way one email goes to the address (user_signup: the
    new account's verification link, or a note to the existing account's owner). Only
    the mailbox learns which; the link then signs the new account in, with its password.
    """

    template_name = "registration/signup.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        if request.user.is_authenticated:
            return HttpResponseRedirect(self.next(request))
        return self.draw(request, SignupForm())

    def post(self, request: HttpRequest) -> HttpResponse:
        if request.user.is_authenticated:
            # As the GET: no second account, and no switching the session to it.
            return HttpResponseRedirect(self.next(request))
        try:
            # Before the form is read: a taken address counts as a new one does.
            SIGN_UPS.count(scope=f"ip:{client_address(request)}")
        except ApplicationError as error:
            form = SignupForm(initial={"email": request.POST.get("email", "")})
            return with_retry_after(self.draw(request, form, error.status, refusal=error), error)
        form = SignupForm(request.POST)
        if not form.is_valid():
            return self.draw(request, form, status=400)
        try:
            # A User, or None when the address had one: answered alike.
            user_signup(email=form.cleaned_data["email"], password=form.cleaned_data["password"])
        except ApplicationError as error:
            form.add_error("email", ValidationError(error.message, code=error.code))
            return self.draw(request, form, status=error.status)
        done = reverse("signup-done")
        back = safe_next(request, "")
        return HttpResponseRedirect(f"{done}?{urlencode({'next': back})}" if back else done)

    @staticmethod
    def next(request: HttpRequest) -> str:
        """Where the visitor was going (`next`, as the sign-in page takes it: an invitation's
        page), on this site only; else the dashboard."""
        return safe_next(request, reverse("dashboard"))

    def draw(self, request: HttpRequest, form: forms.Form, status=200, **context) -> HttpResponse:
        context.update(form=form, title="Sign up", next=safe_next(request, ""))
        return render(request, self.template_name, context, status=status)


class SignupDoneView(SingleQueryParams, View):
    """`/signup/done`: "check your email", where every valid sign-up lands (SignupView)."""

    def get(self, request: HttpRequest) -> HttpResponse:
        context = {"title": "Check your email", "next": safe_next(request, "")}
        return render(request, "registration/signup_done.html", context)


# --- proving an email address ------------------------------------------------------------


@method_decorator(never_cache, name="dispatch")
@method_decorator(sensitive_post_parameters("password"), name="dispatch")
class EmailVerifyView(SingleQueryParams, View):
    """The link emailed at sign-up (and when staff change an address): GET `token` asks,
    POST verifies.

    Only for the account the link names: signed in as it, the POST verifies; signed
    out, the POST carries the account's password, and verifies and signs in (the only
    way an unverified account signs in, accounts.forms). A verified address lets
    managers add the account by it, so it takes the mailbox and the password. The GET
    changes nothing, so a mail scanner that opens every link verifies nothing.
    """

    template_name = "registration/verify_email.html"
    title = {"title": "Verify your email address"}

    def get(self, request: HttpRequest) -> HttpResponse:
        token = request.GET.get("token", "")
        try:
            user = email_verification_account(token=token, user=self.signed_in(request))
        except ApplicationError as error:
            return refusal_page(request, self.template_name, self.title, error)
        return render(request, self.template_name, self.asking(request, token, user))

    def post(self, request: HttpRequest) -> HttpResponse:
        token = request.POST.get("token", "")
        signed_in = self.signed_in(request)
        try:
            if signed_in is None:
                user = self.sign_in(request, token)
            else:
                user = user_email_verify(token=token, user=signed_in)
        except ApplicationError as error:
            return self.refused(request, token, error)
        messages.success(
            request,
            f"{user.email} is verified: your organizations' owners can now add you by it.",
        )
        # A newcomer who signed up from an invitation's page (which keeps its token in the
        # session, kept through signing in) goes back to it, to accept.
        if request.session.get(InvitationAcceptPage.session_key):
            return HttpResponseRedirect(reverse("invitation-page"))
        return HttpResponseRedirect(reverse("dashboard"))

    @staticmethod
    def signed_in(request: HttpRequest) -> User | None:
        return request.user if request.user.is_authenticated else None

    def asking(self, request: HttpRequest, token: str, user: User) -> dict[str, Any]:
        return {
            **self.title,
            "token": token,
            "asked": user.email,
            "verified": user.email_verified,
            "password_asked": self.signed_in(request) is None,
        }

    def refused(self, request: HttpRequest, token: str, error: ApplicationError) -> HttpResponse:
        """The page again with the refusal; with the password form while the link still
        names an account (a wrong password, a limit)."""
        context = dict(self.title)
        with contextlib.suppress(ApplicationError):  # the link itself is what was refused
            context = self.asking(
                request,
                token,
                email_verification_account(token=token, user=self.signed_in(request)),
            )
        return refusal_page(request, self.template_name, context, error)

    @staticmethod
    def sign_in(request: HttpRequest, token: str) -> User:
        """Signed out: the link's account, with its password, is verified and signed in;
        counted as a sign-in (SignInView), and a wrong password refused as there."""
        account = email_verification_account(token=token, user=None)
        sign_in_count(request, email=account.email)
        user = authenticate(
            request, username=account.email, password=request.POST.get("password", "")
        )
        if user is None or user.pk != account.pk:
            raise ApplicationError(
                code="invalid_login",
                message=f"That is not the password of the account {account.email}. Forgotten "
                "it? Set a new one with the sign-in page's link: that verifies the address too.",
                param="password",
            )
        user = user_email_verify(token=token, user=user)
        login(request, user)
        return user


class EmailVerificationSendView(LoginRequiredMixin, View):
    """POST: email the signed-in user a new link (the overview's banner offers it)."""

    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> HttpResponse:
        user = request.user
        if user.email_verified:
            messages.info(request, f"{user.email} is already verified.")
            return HttpResponseRedirect(safe_next(request, reverse("dashboard")))
        try:
            VERIFICATION_EMAILS.count(scope=f"user:{user.pk}")
        except ApplicationError as error:
            return refusal_page(
                request, EmailVerifyView.template_name, EmailVerifyView.title, error
            )
        user_email_verification_send(user=user)
        messages.success(request, f"We sent a new link to {user.email}.")
        return HttpResponseRedirect(safe_next(request, reverse("dashboard")))


# --- a forgotten password ----------------------------------------------------------------


@method_decorator(sensitive_post_parameters("email"), name="dispatch")
class PasswordResetRequestView(PasswordResetView):
    """`/password-reset/`: the address gets a link to set a new password, if it has an
    account; the answer is the same either way (it reveals no accounts). Counted per
    network address, as sign-ups are."""

    form_class = PasswordResetRequestForm
    template_name = "registration/password_reset_form.html"
    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"
    extra_context = {"title": "Forgotten password"}

    def get_extra_email_context(self) -> dict[str, str]:
        return {"site_url": settings.SITE_URL.rstrip("/")}

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            PASSWORD_RESETS.count(scope=f"ip:{client_address(request)}")
        except ApplicationError as error:
            context = {"title": "Forgotten password", "form": self.form_class()}
            return refusal_page(request, self.template_name, context, error)
        self.extra_email_context = self.get_extra_email_context()
        return super().post(request, *args, **kwargs)


class PasswordResetSetView(PasswordResetConfirmView):
    """The emailed link: set a new password. It proves the mailbox: the address is
    verified, and an account someone else had signed up with it is its owner's
    (user_password_reset_done)."""

    template_name = "registration/password_reset_confirm.html"
    extra_context = {"title": "Set a new password"}

    def form_valid(self, form):
        # One transaction: the new password stands only with the address verified and a
        # squatter's keys revoked, never one without the other. Those first: saving the
        # password locks the account's row, which must come after the organizations'
        # locks that revoking the keys takes (user_password_reset_done).
        with transaction.atomic():
            user_password_reset_done(user=form.user)
            return super().form_valid(form)
