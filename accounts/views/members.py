"""The dashboard's members page, and the page the invitation email links to."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.views import (
    redirect_to_login,
)
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.cache import never_cache

from accounts.api_base import MANAGERS
from accounts.dashboard import (
    SESSION_ORGANIZATION,
    Confirmation,
    PickPage,
    SingleQueryParams,
    owned_or_refused,
    refusal_page,
)
from accounts.errors import ApplicationError
from accounts.models import Membership, Role
from accounts.selectors import (
    invitation_to_accept,
    organization_invitations,
    organization_members,
    organization_open_invitations,
    user_by_email,
)
from accounts.services import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_add,
    membership_remove,
    membership_set_role,
)

# --- invitations ------------------------------------------------------------------------


# The page holds the invitation's token (in its form): no browser or proxy keeps it.
@method_decorator(never_cache, name="dispatch")
class InvitationAcceptPage(SingleQueryParams, View):
    """The invitation email's link: GET `token` shows what it invites to; POST accepts it.

    The token leaves the address at once: the link's GET keeps it in the session and
    answers with a redirect to the page without it, so that access logs, the history
    and the `next` of signing in or up never hold it. Signed out, the page leads to
    signing in or up and back here (the session keeps the token through both). Signed
    in, its POST accepts through invitation_accept, as the API does (the token is the
    permission; the address must be the one invited), and the dashboard switches to
    the organization. A refusal (unknown, expired, revoked, used, another address, no
    seat left) is this page with the refusal's status and code.
    """

    template_name = "registration/invitation.html"
    title = "Invitation"
    session_key = "invitation_token"

    def get(self, request: HttpRequest) -> HttpResponse:
        if "token" in request.GET:
            request.session[self.session_key] = request.GET["token"]
            return HttpResponseRedirect(reverse("invitation-page"))
        token = request.session.get(self.session_key, "")
        person = request.user if request.user.is_authenticated else None
        try:
            invitation = invitation_to_accept(token=token, user=person)
        except ApplicationError as error:
            return self.refused(request, error)
        context = {"invitation": invitation, "here": reverse("invitation-page")}
        return render(request, self.template_name, {"title": self.title, **context})

    def post(self, request: HttpRequest) -> HttpResponse:
        # The API's way (a token in the body) or the page's (the one the link left).
        token = request.POST.get("token") or request.session.get(self.session_key, "")
        if not request.user.is_authenticated:
            return redirect_to_login(reverse("invitation-page"))
        try:
            membership = invitation_accept(token=token, user=request.user)
        except ApplicationError as error:
            return self.refused(request, error)
        request.session.pop(self.session_key, None)
        organization = membership.organization
        request.session[SESSION_ORGANIZATION] = organization.slug
        messages.success(
            request, f"You joined {organization.name} as {Role(membership.role).label.lower()}."
        )
        return HttpResponseRedirect(reverse("dashboard"))

    def refused(self, request: HttpRequest, error: ApplicationError) -> HttpResponse:
        return refusal_page(request, self.template_name, {"title": self.title}, error)


# --- members and invitations -----------------------------------------------------------


class MemberForm(forms.Form):
    email = forms.EmailField(max_length=254)  # the column's
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class MembersPage(PickPage):
    """Members and open invitations; invite by email or add a person who has an account
    (POST here), change a role, remove someone, revoke an invitation.

    Owners and admins, as the members API lets manage members; the services hold the
    rest (only an owner makes or unmakes an owner, the last owner stays, the seats
    bound the members), and their refusals are drawn on the page.
    """

    template_name = "dashboard/members.html"
    title = "Members"
    nav = "members"
    allowed_roles = MANAGERS
    # The form a POST sent, drawn again with what was typed when a service refuses it.
    submitted: forms.Form | None = None
    # Older open invitations than these are listed by the invitations API (paginated).
    shown_invitations = 200
    pick = "remove"

    def get_context_data(self, *, picked: int | None = None, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("form", self.submitted if self.submitted is not None else MemberForm())
        context = super().get_context_data(**kwargs)
        organization = self.request.organization
        members = list(organization_members(organization=organization).order_by("pk"))
        shown = self.shown_invitations
        invitations = organization_open_invitations(organization=organization).order_by("-pk")
        invitations = list(invitations[: shown + 1])
        context.update(
            members=members,
            invitations=invitations[:shown],
            more_invitations=len(invitations) > shown,
            roles=Role.choices,
            confirm=next((self.confirmation(m) for m in members if m.pk == picked), None),
            now=timezone.now(),
        )
        return context

    def confirmation(self, membership: Membership) -> Confirmation:
        return Confirmation(
            question=f"Remove {membership.user.email} from {self.request.organization.name}?",
            consequence="They lose access to this organization at once; the API keys they "
            "created keep working, except for managing the organization.",
            action=reverse("dashboard-member-remove", args=[membership.pk]),
            button="Remove",
        )

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        """Invite `email`; or, with the form's `add` button, add the person who has an
        account under it at once, as the members API does (and the seats allow)."""
        form = self.submitted = MemberForm(request.POST)
        if not form.is_valid():
            return self.invalid(form)
        email, role = form.cleaned_data["email"], form.cleaned_data["role"]
        if "add" in request.POST:
            membership = membership_add(
                organization=request.organization,
                user=user_by_email(email=email),
                role=role,
                actor=request.user,
            )
            return self.done(f"Added {membership.user.email} as {self.role_name(role)}.")
        invitation_create(
            organization=request.organization, email=email, role=role, actor=request.user
        )
        return self.done(
            f"Invited {email.lower()} as {self.role_name(role)}; the invitation is valid for 7 days."
        )

    @staticmethod
    def role_name(role: str) -> str:
        return Role(role).label.lower()

    def membership(self, member_id: int) -> Membership:
        return owned_or_refused(
            organization_members(organization=self.request.organization), member_id, what="member"
        )


class MemberRolePage(MembersPage):
    """POST `role`: change a member's role."""

    http_method_names = ["post"]
    form_page = "dashboard-members"

    def post(self, request: HttpRequest, member_id: int) -> HttpResponse:
        form = RoleForm(request.POST)
        if not form.is_valid():
            return self.invalid(form, name="role_form")
        membership = membership_set_role(
            membership=self.membership(member_id),
            role=form.cleaned_data["role"],
            actor=request.user,
        )
        return self.done(
            f"{membership.user.email} is now {self.role_name(membership.role)}.",
            to=reverse("dashboard-members"),
        )


class MemberRemovePage(MembersPage):
    """POST: remove a member (confirmed on /dashboard/members?remove=<id>)."""

    never_rate_limited = True
    http_method_names = ["post"]
    form_page = "dashboard-members"

    def post(self, request: HttpRequest, member_id: int) -> HttpResponse:
        membership = self.membership(member_id)
        membership_remove(membership=membership, actor=request.user)
        return self.done(f"Removed {membership.user.email}.", to=reverse("dashboard-members"))


class InvitationRevokePage(MembersPage):
    """POST: revoke an open invitation (its row's button; inviting the address again
    undoes it, so nothing is asked first)."""

    never_rate_limited = True
    http_method_names = ["post"]
    form_page = "dashboard-members"

    def post(self, request: HttpRequest, invitation_id: int) -> HttpResponse:
        invitation = owned_or_refused(
            organization_invitations(organization=request.organization),
            invitation_id,
            what="invitation",
        )
        invitation = invitation_revoke(invitation=invitation, actor=request.user)
        return self.done(
            f"Revoked the invitation to {invitation.email}: its link no longer works.",
            to=reverse("dashboard-members"),
        )
