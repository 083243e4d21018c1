"""The dashboard's API keys page: list, create (the secret shown once), revoke."""

from __future__ import annotations

from typing import Any

from django import forms
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_variables

from accounts.api_base import MANAGERS
from accounts.dashboard import (
    Confirmation,
    PickPage,
    Replay,
    owned_or_refused,
)
from accounts.models import ApiKey, Scope
from accounts.selectors import (
    organization_api_keys,
)
from accounts.services import (
    apikey_create,
    apikey_revoke,
)

# --- API keys --------------------------------------------------------------------------


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100)
    scopes = forms.MultipleChoiceField(choices=Scope.choices, widget=forms.CheckboxSelectMultiple)
    expires_at = forms.DateTimeField(
        required=False,
        label="Expires (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Leave empty for a key that does not expire.",
    )


class ApiKeysPage(PickPage):
    """The organization's API keys; create one, revoke one.

    Owners and admins only, as the keys API. A new key's secret is answered in the
    response to the POST that made it, and nowhere else: not in the session, not in
    a message (both are stored), so there is no later page that could show it again.
    """

    template_name = "dashboard/keys.html"
    title = "API keys"
    nav = "keys"
    allowed_roles = MANAGERS
    # The form a POST sent, drawn again with what was typed when a service refuses it.
    submitted: forms.Form | None = None
    # Older keys than these are listed by the keys API (paginated).
    shown = 200
    pick = "revoke"

    def get_context_data(self, *, picked: int | None = None, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("form", self.submitted if self.submitted is not None else ApiKeyForm())
        context = super().get_context_data(**kwargs)
        keys = list(organization_api_keys(organization=self.request.organization)[: self.shown + 1])
        context.update(
            keys=keys[: self.shown],
            more_keys=len(keys) > self.shown,
            confirm=next(
                (self.confirmation(k) for k in keys if k.pk == picked and not k.revoked_at), None
            ),
            now=timezone.now(),
        )
        return context

    @staticmethod
    def confirmation(key: ApiKey) -> Confirmation:
        return Confirmation(
            question=f"Revoke “{key.name}” ({key.prefix})?",
            consequence="Requests with this key, and with every key made with it, fail from "
            "the next one on. This cannot be undone.",
            action=reverse("dashboard-key-revoke", args=[key.pk]),
            button="Revoke the key",
        )

    # The new key in full: an error report of this frame shows it masked.
    @method_decorator(sensitive_variables("secret"))
    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        form = self.submitted = ApiKeyForm(request.POST)
        if not form.is_valid():
            return self.invalid(form)
        key, secret = apikey_create(
            organization=request.organization, actor=request.user, **form.cleaned_data
        )
        # Sent again, the form answers with the keys list saying the key was made, and
        # never with its secret: the secret is in this answer only.
        self.replay = Replay(
            reverse("dashboard-keys"),
            f"The key “{key.name}” ({key.prefix}) was created when this form was first sent, "
            "and its secret was shown then, once: it cannot be shown again. If it was not "
            "copied, revoke the key and create another.",
        )
        response = self.render_to_response(
            self.get_context_data(created=key, secret=secret, form=ApiKeyForm()), status=201
        )
        response["Cache-Control"] = "no-store"
        return response


class ApiKeyRevokePage(ApiKeysPage):
    """POST: revoke the key at once (confirmed on /dashboard/keys?revoke=<id>)."""

    never_rate_limited = True
    http_method_names = ["post"]
    form_page = "dashboard-keys"

    def post(self, request: HttpRequest, key_id: int) -> HttpResponse:
        key = owned_or_refused(
            organization_api_keys(organization=request.organization), key_id, what="API key"
        )
        key = apikey_revoke(key=key, actor=request.user)
        return self.done(
            f"Revoked {key.name} ({key.prefix}): it no longer works.", to=reverse("dashboard-keys")
        )
