"""What every page of the customer dashboard shares.

A page acts for one organization of the signed-in user: the one they chose
with the switcher (kept in their session), else their personal organization,
else their first. Roles limit pages as they limit the API (`allowed_roles`).

A form acts for the organization it was drawn for, not for the one the session
names when it is sent: every form of a page carries that organization's slug
(`acting_for`, put there by `{% form_tokens %}`), and a POST whose `acting_for`
is not the organization acting now is refused (409 `organization_changed`)
before anything is done. Without it, a form drawn for one organization and
sent after a switch in another tab (or after its member was removed, which
falls back to their personal organization) would buy, list, pay or invite for
the other one, with its card.

A refusal from a service (`ApplicationError`) is not a crash: the page is
drawn again with the message, and answered with the error's own status (402,
409, ...), its machine-readable code in the page (`data-error-code`), so a
person sees what to do and a script sees what happened. Nothing the service
refused took effect; services own their transactions.

This lives in `accounts`, the lowest app, so each app's pages (`views.py`)
build on it without breaking the import direction in DESIGN.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import NON_FIELD_ERRORS
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.generic import TemplateView

from accounts.api_base import ALL_ROLES, require_single_query_params
from accounts.errors import ApplicationError
from accounts.idempotency import (
    StoredResponse,
    idempotency_begin,
    idempotency_complete,
    idempotency_release,
)
from accounts.models import IdempotencyRecord, Membership
from accounts.ratelimits import dashboard_limit, rate_limit_consume
from accounts.selectors import user_membership_by_slug, user_memberships

SESSION_ORGANIZATION = "dashboard_organization"
# The form field naming the organization (its slug) a form was drawn for.
ACTING_FOR = "acting_for"
# The form field carrying the one-time token of a drawn form (`{% form_tokens %}`).
FORM_TOKEN = "form_token"
# What a form's token is kept under among the organization's Idempotency-Keys: apart
# from the keys API clients choose.
_FORM_KEY_PREFIX = "form:"

M = TypeVar("M", bound=Model)


def chosen_membership(request: HttpRequest, memberships: list[Membership]) -> Membership | None:
    slug = request.session.get(SESSION_ORGANIZATION)
    for membership in memberships:
        if membership.organization.slug == slug:
            return membership
    personal = [m for m in memberships if m.organization.personal]
    return (personal or memberships or [None])[0]


def safe_next(request: HttpRequest, default: str) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return default


@dataclass(frozen=True)
class Replay:
    """How a form sent again is answered: a redirect to `location`, with `message` shown
    (none: nothing to say, as when `location` is Stripe's page)."""

    location: str
    message: str = ""


def _form_body(request: HttpRequest) -> bytes:
    """The form's fields, as the request fingerprint: the same drawn form sent again is
    the same request; one whose values were changed is another (422). Without the CSRF
    token: it says nothing of what the form asks for."""
    fields = sorted(
        (name, value)
        for name, values in request.POST.lists()
        if name != "csrfmiddlewaretoken"
        for value in values
    )
    return urlencode(fields).encode()


class SingleQueryParams:
    """A page's GET refuses a query parameter given more than once (400), as the API's
    lists do (require_single_query_params): read as its last value, `?days=7&days=90`
    drew 90 days without a word, and a link that meant the first got another page.
    No page takes a list."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method in ("GET", "HEAD"):
            try:
                require_single_query_params(request.GET)
            except ApplicationError as error:
                return query_refused(request, error)
        return super().dispatch(request, *args, **kwargs)


def query_refused(request: HttpRequest, error: ApplicationError) -> HttpResponse:
    """The page for a query it cannot read: the refusal (its code in `data-error-code`)
    and a link to the page without the query; in the dashboard's frame when a member
    page refused it (request.organization is set)."""
    context = {
        "title": "This address cannot be read",
        "refusal": error,
        "without_query": request.path,
        **{
            name: getattr(request, name)
            for name in ("organization", "membership", "memberships")
            if hasattr(request, name)
        },
    }
    return render(request, "dashboard/query_refused.html", context, status=error.status)


class MemberPage(LoginRequiredMixin, SingleQueryParams, TemplateView):
    """A dashboard page: signed in, a member of the organization, in a role it allows.

    Subclasses set `template_name`, `title` and `nav` (the menu entry to mark),
    add to `get_context_data`, and handle POST in `post()`, calling a service and
    returning `self.done(message)` on success; a refusal is drawn by `dispatch`.
    """

    title = ""
    nav = ""
    allowed_roles: tuple[str, ...] = ALL_ROLES
    # What a manager does to stop harm (revoke a leaked key, remove a member) is not
    # counted: whatever fills a limit (a script clicking as the owner, a stolen session)
    # must not hold the revoke back with a 429. Only managers reach those pages.
    never_rate_limited = False
    # The page whose forms POST here, by URL name, for an address that takes POSTs only
    # (a revoke, a removal): the page to reload when a form sent here was drawn for
    # another organization (organization_changed). Empty: this address.
    form_page = ""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = self._dispatch(request, *args, **kwargs)
        # An organization's figures, keys and people: no browser or proxy keeps a copy,
        # so Back after signing out shows nothing.
        add_never_cache_headers(response)
        return response

    def _dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return self.handle_no_permission()  # to the login page, with ?next=
        memberships = list(user_memberships(user=request.user).order_by("organization__name"))
        membership = chosen_membership(request, memberships)
        if membership is None:
            return render(
                request, "dashboard/no_organization.html", {"title": "No organization"}, status=403
            )
        request.membership = membership
        request.organization = membership.organization
        request.memberships = memberships
        if request.method == "POST":
            # Before the role check (the role may be another organization's) and before
            # the rate limit: nothing is done, and the person only needs to reload.
            sent = request.POST.get(ACTING_FOR)
            if sent != membership.organization.slug:
                return self.organization_changed(sent)
        if membership.role not in self.allowed_roles:
            return render(
                request,
                "dashboard/forbidden.html",
                {
                    "title": self.title,
                    "organization": request.organization,
                    "memberships": memberships,
                    "membership": membership,
                    "roles": ", ".join(self.allowed_roles),
                },
                status=403,
            )
        try:
            if request.method != "POST":
                return super().dispatch(request, *args, **kwargs)
            token = request.POST.get(FORM_TOKEN)
            if not token:
                # Before the rate limit, as organization_changed: nothing is done.
                raise ApplicationError(
                    code="form_outdated",
                    message="This form was drawn by an earlier version of the page and "
                    "could be acted on twice. Nothing was done: reload the page and send "
                    "it again.",
                    status=409,
                    param=FORM_TOKEN,
                )
            if not self.never_rate_limited:
                # A change counts against its person's own dashboard limit, not the
                # organization's API requests (dashboard_limit says why).
                rate_limit_consume(kind="dashboard changes", limits=[dashboard_limit(request.user)])
            claim = self._form_claim(request, token)
            if isinstance(claim, HttpResponse):
                return claim
            try:
                response = super().dispatch(request, *args, **kwargs)
            except ApplicationError as error:
                if error.took_effect:
                    self._form_keep(claim, Replay(request.path, self.replayed_message))
                else:
                    idempotency_release(record=claim)  # nothing was done: may be sent again
                raise
            except BaseException:
                # A server error: as the API, the key is freed for a retry.
                idempotency_release(record=claim)
                raise
            self._form_complete(claim, response)
            return response
        except ApplicationError as error:
            if request.method != "POST":
                raise
            return self.refused(error)

    # --- a form is acted on once ---------------------------------------------------------

    # Set by a handler: how its form sent again is answered (done() sets it). None: a
    # redirect to where the first answer went, else this page saying it was done once.
    replay: Replay | None = None
    # Set by a handler whose answer did nothing (a question before the action): the
    # form may be sent again, and is acted on then.
    did_nothing = False
    replayed_message = "This form was already sent, and was acted on once."

    def _form_claim(self, request: HttpRequest, token: str) -> IdempotencyRecord | HttpResponse:
        """Claim the form's token for this request, or the first outcome's replay.

        A second send while the first runs (a double click: the browser drops the first
        answer and shows the second's) waits for the first to finish, so it can show
        where the first went, rather than a page saying "still running"."""
        deadline = time.monotonic() + settings.DASHBOARD_FORM_WAIT_SECONDS
        key = _FORM_KEY_PREFIX + token
        while True:
            try:
                outcome = idempotency_begin(
                    organization=request.organization,
                    caller=f"user:{request.user.pk}",
                    key=key,
                    method="POST",
                    path=request.get_full_path(),
                    body=_form_body(request),
                )
            except ApplicationError as error:
                if error.code == "idempotency_in_progress" and time.monotonic() < deadline:
                    self._await_first(request, key, deadline)
                    continue
                raise _form_refusal(error) from None
            if isinstance(outcome, StoredResponse):
                return self._replayed(outcome)
            return outcome

    @staticmethod
    def _await_first(request: HttpRequest, key: str, deadline: float) -> None:
        """Until the first send of the form has its outcome (or `deadline`): one read a
        tenth of a second, not one insert that fails."""
        running = IdempotencyRecord.objects.filter(
            organization=request.organization, key=key, status_code__isnull=True
        )
        while time.monotonic() < deadline and running.exists():
            time.sleep(0.1)

    def _replayed(self, stored: StoredResponse) -> HttpResponse:
        replay = Replay(**json.loads(stored.body))
        if replay.message:
            messages.info(self.request, replay.message)
        response = HttpResponseRedirect(replay.location)
        response.status_code = stored.status_code
        response["Idempotent-Replayed"] = "true"
        return response

    def _form_complete(self, record: IdempotencyRecord, response: HttpResponse) -> None:
        if response.status_code >= 400 or self.did_nothing:
            idempotency_release(record=record)  # a form drawn again, or a question: nothing done
            return
        replay = self.replay
        if replay is None:
            is_redirect = 300 <= response.status_code < 400 and response.has_header("Location")
            replay = (
                Replay(response["Location"])
                if is_redirect
                else Replay(self.request.path, self.replayed_message)
            )
        self._form_keep(record, replay)

    @staticmethod
    def _form_keep(record: IdempotencyRecord, replay: Replay) -> None:
        # Only the Replay is kept, never the first answer: it may hold a secret shown once.
        idempotency_complete(
            record=record,
            status_code=302,
            content_type="application/json",
            body=json.dumps(asdict(replay)).encode(),
        )

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(
            title=self.title,
            nav=self.nav,
            organization=self.request.organization,
            membership=self.request.membership,
            memberships=self.request.memberships,
        )
        return context

    def organization_changed(self, sent: str | None) -> HttpResponse:
        """A form drawn for another organization than the one acting now (or one that
        names none): 409 `organization_changed`, saying which is which, with the page to
        reload for the organization acting now and a way back to the form's."""
        request = self.request
        drawn_for = next(
            (m for m in request.memberships if sent and m.organization.slug == sent), None
        )
        context = {
            "title": "The organization changed",
            "organization": request.organization,
            "membership": request.membership,
            "memberships": request.memberships,
            "sent": sent,
            "drawn_for": drawn_for,
            "reload": reverse(self.form_page) if self.form_page else request.path,
        }
        return render(request, "dashboard/organization_changed.html", context, status=409)

    def refused(self, error: ApplicationError, **context: Any) -> HttpResponse:
        """The page again, with the refusal, answered with its status."""
        response = self.render_to_response(self.get_context_data(refusal=error, **context))
        response.status_code = error.status
        return with_retry_after(response, error)

    def invalid(self, form: forms.Form, *, name: str = "form", **context: Any) -> HttpResponse:
        """A form the page cannot take, drawn again (as `name` in the context) with its
        errors, answered 400 (`form_refusal`)."""
        return self.refused(form_refusal(form), **{name: form}, **context)

    def done(self, message: str, *, to: str | None = None) -> HttpResponseRedirect:
        """Post/redirect/get: a success is shown once, and a reload does not repeat it.
        The form sent again goes to the same place, with the message again (the browser
        may have dropped the first answer, and its message with it)."""
        messages.success(self.request, message)
        location = to or self.request.path
        self.replay = Replay(location, f"{self.replayed_message} {message}")
        return HttpResponseRedirect(location)


def _form_refusal(error: ApplicationError) -> ApplicationError:
    """The Idempotency-Key machinery's refusal, said of a form (its code kept)."""
    said = {
        "idempotency_key_reused": "This form was already sent with other values. Nothing "
        "more was done: reload the page to send a new one.",
        "idempotency_in_progress": "This form was already sent and is still being acted on. "
        "Open the page again in a moment to see what was done.",
    }
    return ApplicationError(
        code=error.code,
        message=said.get(error.code, error.message),
        status=error.status,
        param=FORM_TOKEN,
        extra=error.extra,
    )


def with_retry_after(response: HttpResponse, error: ApplicationError) -> HttpResponse:
    """A limit's refusal (429) says when to try again, as the API's do."""
    if "retry_after" in error.extra:
        response["Retry-After"] = str(error.extra["retry_after"])
    return response


def refusal_page(
    request: HttpRequest, template_name: str, context: dict[str, Any], error: ApplicationError
) -> HttpResponse:
    """A page outside MemberPage (signing in and up, the emailed links) drawn with a
    refusal as MemberPage draws one: the refusal's status, and its code in the page."""
    response = render(request, template_name, {**context, "refusal": error}, status=error.status)
    return with_retry_after(response, error)


def form_refusal(form: forms.Form) -> ApplicationError:
    """The refusal of a form a page cannot take: 400, its first error.

    The code names the field in error, `invalid_<field>`: where a service checks
    the same field its code is the same (`invalid_name`, `invalid_scopes`,
    `invalid_seats`), so a refusal reads alike whichever of the two caught it.
    An error of the form as a whole is `invalid_request`.
    """
    field, errors = next(iter(form.errors.items()))
    if field == NON_FIELD_ERRORS or field not in form.fields:
        return ApplicationError(code="invalid_request", message=" ".join(errors))
    label = form[field].label
    return ApplicationError(code=f"invalid_{field}", message=f"{label}: {errors[0]}", param=field)


def page_before(
    queryset: QuerySet[M], *, before: int | None, size: int
) -> tuple[list[M], int | None]:
    """A page of `queryset`, newest first by id, of the rows below id `before` (None: the
    newest), and the `before` of the next, older page (None: this is the last).

    Cut by id, not by offset: rows are only added, so a page never repeats or skips
    one while new rows arrive.
    """
    if before is not None:
        queryset = queryset.filter(pk__lt=before)
    rows = list(queryset.order_by("-pk")[: size + 1])
    return rows[:size], (rows[size - 1].pk if len(rows) > size else None)


def owned_or_refused(queryset: QuerySet[M], pk: int, *, what: str) -> M:
    """The row `pk` of a selector already limited to the page's organization.

    Another organization's row answers exactly as a missing one does (404
    `not_found`), as the API's do, so an id reveals nothing.
    """
    row = queryset.filter(pk=pk).first()
    if row is None:
        raise ApplicationError(
            code="not_found", message=f"No such {what} in this organization.", status=404
        )
    return row


@dataclass(frozen=True)
class Confirmation:
    """What a page asks before a POST that cannot be undone (dashboard/confirm.html):
    the link that asks is a GET, which changes nothing; only the POST does."""

    question: str
    consequence: str
    action: str  # the URL the confirming POST goes to
    button: str
    fields: tuple[tuple[str, str], ...] = ()  # (name, value) the confirming POST sends


class PickQuery(forms.Form):
    """`?<name>=<id>`: the row a page asks to confirm an action on (revoke, remove)."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields[name] = forms.IntegerField(required=False, min_value=1)


class PickPage(MemberPage):
    """A page that asks before an action on one of its rows: `?<pick>=<id>` draws it with
    that row's Confirmation; `get_context_data` takes the id as `picked` (None: none)."""

    pick = ""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        query = PickQuery(self.pick, request.GET)
        if not query.is_valid():
            return self.invalid(query, name="query")
        return self.render_to_response(self.get_context_data(picked=query.cleaned_data[self.pick]))


class OrganizationSwitchView(LoginRequiredMixin, TemplateView):
    """POST `organization` (a slug among the user's): later pages act for it.

    No MemberPage: its form names the organization it switches to, so it sends no
    `acting_for` (a switch is what makes the other tabs' forms stale)."""

    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> HttpResponse:
        slug = request.POST.get("organization", "")
        if user_membership_by_slug(user=request.user, slug=slug) is None:
            return render(
                request,
                "dashboard/no_organization.html",
                {"title": "No such organization", "slug": slug},
                status=404,
            )
        request.session[SESSION_ORGANIZATION] = slug
        return HttpResponseRedirect(safe_next(request, reverse("dashboard")))
