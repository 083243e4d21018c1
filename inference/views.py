"""The dashboard's inference pages: the playground.

The playground runs no inference of its own. Its script (static/inference/
playground.js) sends the request a partner's app would send, to the same
OpenAI-compatible endpoint (`/v1/chat/completions`), as the signed-in member:
their session cookie, the CSRF token, and `X-Organization` for the
organization this page acts for (accounts.api_base.OrgApiView). So the holds,
limits, refusals and billing are the API's own, and what the page shows of a
request (its answer, usage, charge, errors) is what the API answered.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse

from accounts.dashboard import MemberPage
from inference.selectors import catalog_models_for
from metering.selectors import organization_balance


def _unusable(*, models: list, available: int) -> str | None:
    """Why nothing can be sent from the page as it loads (a code, as the API's), or None.

    Only what the page knows as it is drawn: credits spent meanwhile (another
    tab, a key) make the API refuse the request, and the page shows that
    refusal instead.
    """
    if not models:
        return "no_models"
    if available <= 0:
        return "insufficient_credits"
    return None


class PlaygroundPage(MemberPage):
    """Any member may use it, as any key of the organization may call inference."""

    template_name = "dashboard/playground.html"
    title = "Playground"
    nav = "playground"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        organization = self.request.organization
        # The selector GET /v1/models lists: the page offers what the API would serve.
        models = list(catalog_models_for(organization=organization).order_by("name"))
        available = organization_balance(organization=organization).available
        context.update(
            models=models,
            available=available,
            unusable=_unusable(models=models, available=available),
            api_base=self.request.build_absolute_uri(reverse("openai-models")).removesuffix(
                "/models"
            ),
        )
        return context
