"""The partner REST API for identity: me, keys, members, invitations, audit, webhook secret."""

from __future__ import annotations

from datetime import timedelta

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response

from accounts.api_base import (
    MANAGERS,
    OrgApiView,
    PagedListMixin,
    StrictSerializer,
    acting_key,
    acting_user,
)
from accounts.authentication import KeyPrincipal
from accounts.errors import ApplicationError
from accounts.models import Membership, Organization, Role, Scope
from accounts.selectors import (
    invitation_by_token,
    organization_api_keys,
    organization_audit_events,
    organization_invitations,
    organization_members,
    organization_open_invitations,
    user_by_email,
)
from accounts.services import (
    apikey_create,
    apikey_revoke,
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_add,
    membership_remove,
    membership_set_role,
    webhook_secret_reveal,
    webhook_secret_rotate,
)
from accounts.services.api_keys import MAX_REQUESTS_PER_MINUTE


class OrganizationOutput(serializers.Serializer):
    id = serializers.IntegerField()
    slug = serializers.CharField()
    name = serializers.CharField()
    personal = serializers.BooleanField()
    standing = serializers.CharField()
    seats = serializers.IntegerField()
    model_tiers = serializers.ListField(child=serializers.CharField())
    max_priority = serializers.CharField()
    requests_per_minute = serializers.IntegerField()
    tokens_per_minute = serializers.IntegerField()
    concurrent_jobs = serializers.IntegerField()


class UserOutput(serializers.Serializer):
    """A person, wherever the API names one (who is calling, who sent a job)."""

    class Meta:
        ref_name = "User"

    id = serializers.IntegerField()
    email = serializers.EmailField()


# --- me ----------------------------------------------------------------------------


class MeApi(OrgApiView):
    class Output(serializers.Serializer):
        class Meta:
            ref_name = "MeOutput"

        organization = OrganizationOutput()
        user = UserOutput(allow_null=True)
        role = serializers.CharField(allow_null=True)
        api_key = inline_serializer(
            "MeKey",
            {
                "id": serializers.IntegerField(),
                "prefix": serializers.CharField(),
                "scopes": serializers.ListField(child=serializers.CharField()),
            },
            allow_null=True,
        )

    @extend_schema(responses=Output, summary="Who is calling, for which organization")
    def get(self, request):
        key = acting_key(request)
        membership = getattr(request, "membership", None)
        data = {
            "organization": request.organization,
            "user": None if key else {"id": request.user.pk, "email": request.user.email},
            "role": membership.role if membership else None,
            "api_key": {"id": key.pk, "prefix": key.prefix, "scopes": key.scopes} if key else None,
        }
        return Response(self.Output(data).data)


# --- API keys --------------------------------------------------------------------


class ApiKeyOutput(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    requests_per_minute = serializers.IntegerField(allow_null=True)
    parent = serializers.IntegerField(
        source="parent_id",
        allow_null=True,
        help_text="The id of the API key that made this one: revoking that key revokes "
        "this one, and this key's requests also count against the requests_per_minute of "
        "that key and of every key above it that has one. Null for a key a person or an "
        "operator made, and for every key made before keys recorded it.",
    )
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)


class ApiKeyListCreateApi(PagedListMixin, OrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    class Input(StrictSerializer):
        class Meta:
            ref_name = "KeyListCreateInput"

        name = serializers.CharField(max_length=100)
        scopes = serializers.ListField(
            child=serializers.ChoiceField(choices=Scope.values),
            min_length=1,
            max_length=10,
            help_text="Made with an API key: only scopes that key has.",
        )
        expires_at = serializers.DateTimeField(
            required=False,
            allow_null=True,
            help_text="Made with an API key that expires: required, and no later than it.",
        )
        requests_per_minute = serializers.IntegerField(
            required=False,
            allow_null=True,
            min_value=1,
            max_value=MAX_REQUESTS_PER_MINUTE,
            help_text="A ceiling for this key under the organization's limit; null for none. "
            "Made with an API key that has one: required, and no higher.",
        )

    class CreatedOutput(ApiKeyOutput):
        class Meta:
            ref_name = "KeyListCreateCreatedOutput"

        key = serializers.CharField(help_text="The full key. Shown once: store it now.")

    @extend_schema(responses=ApiKeyOutput(many=True), summary="List the organization's API keys")
    def get(self, request):
        return self.page(request, organization_api_keys, ApiKeyOutput)

    @extend_schema(request=Input, responses={201: CreatedOutput}, summary="Create an API key")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        key, raw = apikey_create(
            organization=request.organization,
            actor=acting_user(request),
            actor_key=acting_key(request),
            **data.validated_data,
        )
        body = dict(ApiKeyOutput(key).data, key=raw)
        return Response(body, status=status.HTTP_201_CREATED)


class ApiKeyRevokeApi(OrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    # Answers 200 with the revoked key (drf-spectacular assumes 204 for DELETE).
    @extend_schema(responses={200: ApiKeyOutput}, summary="Revoke an API key at once")
    def delete(self, request, key_id: int):
        key = get_object_or_404(organization_api_keys(organization=request.organization), pk=key_id)
        key = apikey_revoke(
            key=key,
            actor=acting_user(request),
            actor_key=acting_key(request),
        )
        return Response(ApiKeyOutput(key).data)


# --- members and invitations -------------------------------------------------------


class PathOrgApiView(OrgApiView):
    """Views under /orgs/{org_id}/: the organization in the path must be the caller's.

    Another organization's id answers 404, exactly like one that does not
    exist, so ids reveal nothing.
    """

    def resolve_organization(self, request) -> Organization:
        org_id = self.kwargs["org_id"]
        if isinstance(request.user, KeyPrincipal):
            if request.user.organization.pk != org_id:
                raise ApplicationError(
                    code="not_found", message="No such organization.", status=404
                )
            return request.user.organization
        membership = (
            Membership.objects.filter(user=request.user, organization_id=org_id)
            .select_related("organization")
            .first()
        )
        if membership is None:
            raise ApplicationError(code="not_found", message="No such organization.", status=404)
        request.membership = membership
        return membership.organization


class MemberOutput(serializers.Serializer):
    id = serializers.IntegerField(help_text="the membership's id, which the member paths take")
    # Usage by key ("user:<id>") and jobs (member_id) name a member by their user's id,
    # which outlives the membership: without it here, nothing told whose they were.
    user_id = serializers.IntegerField(
        help_text="the person's id, as usage by key (user:<id>) and jobs (member_id) name them"
    )
    email = serializers.EmailField(source="user.email")
    role = serializers.CharField()
    created_at = serializers.DateTimeField()


class MemberListAddApi(PagedListMixin, PathOrgApiView):
    required_scope = Scope.ADMIN

    class Input(StrictSerializer):
        class Meta:
            ref_name = "MemberListAddInput"

        email = serializers.EmailField(max_length=254)  # the column's
        role = serializers.ChoiceField(choices=Role.values, default=Role.MEMBER)

    @extend_schema(responses=MemberOutput(many=True), summary="List members")
    def get(self, request, org_id: int):
        return self.page(request, organization_members, MemberOutput)

    @extend_schema(request=Input, responses={201: MemberOutput}, summary="Add an existing user")
    def post(self, request, org_id: int):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        membership = membership_add(
            organization=request.organization,
            user=user_by_email(email=data.validated_data["email"]),
            role=data.validated_data["role"],
            actor=acting_user(request),
            actor_key=acting_key(request),
        )
        return Response(MemberOutput(membership).data, status=status.HTTP_201_CREATED)

    def check_access(self, request, organization):
        if request.method == "POST" and not isinstance(request.user, KeyPrincipal):
            self.allowed_roles = MANAGERS
        super().check_access(request, organization)


class MemberDetailApi(PathOrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    class Input(StrictSerializer):
        class Meta:
            ref_name = "MemberDetailInput"

        role = serializers.ChoiceField(choices=Role.values)

    def _membership(self, request, member_id: int) -> Membership:
        return get_object_or_404(
            organization_members(organization=request.organization), pk=member_id
        )

    @extend_schema(request=Input, responses=MemberOutput, summary="Change a member's role")
    def patch(self, request, org_id: int, member_id: int):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        membership = membership_set_role(
            membership=self._membership(request, member_id),
            role=data.validated_data["role"],
            actor=acting_user(request),
            actor_key=acting_key(request),
        )
        return Response(MemberOutput(membership).data)

    @extend_schema(responses={204: None}, summary="Remove a member")
    def delete(self, request, org_id: int, member_id: int):
        membership_remove(
            membership=self._membership(request, member_id),
            actor=acting_user(request),
            actor_key=acting_key(request),
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationOutput(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.EmailField()
    role = serializers.CharField()
    expires_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()
    revoked_at = serializers.DateTimeField(
        allow_null=True, help_text="When it was withdrawn; null while it is open."
    )


class InvitationListCreateApi(PagedListMixin, PathOrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    class Input(StrictSerializer):
        class Meta:
            ref_name = "InvitationListCreateInput"

        email = serializers.EmailField(max_length=254)  # the column's
        role = serializers.ChoiceField(choices=Role.values, default=Role.MEMBER)

    @extend_schema(responses=InvitationOutput(many=True), summary="List open invitations")
    def get(self, request, org_id: int):
        return self.page(request, organization_open_invitations, InvitationOutput)

    @extend_schema(request=Input, responses={201: InvitationOutput}, summary="Invite by email")
    def post(self, request, org_id: int):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        invitation, _token = invitation_create(
            organization=request.organization,
            actor=acting_user(request),
            actor_key=acting_key(request),
            **data.validated_data,
        )
        return Response(InvitationOutput(invitation).data, status=status.HTTP_201_CREATED)


class InvitationRevokeApi(PathOrgApiView):
    """Withdraw an open invitation: its link admits nobody from now on, and the address may
    be invited again. Whoever may invite to its role may revoke it (an invitation to be
    owner: only an owner). One already accepted (409 `invitation_used`), revoked (409
    `invitation_revoked`) or expired (409 `invitation_expired`) is left as it is; another
    organization's invitation is 404, as one that does not exist."""

    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    # Answers 200 with the revoked invitation, as revoking a key does.
    @extend_schema(
        responses={200: InvitationOutput},
        summary="Revoke an open invitation: its link admits nobody from now on",
    )
    def delete(self, request, org_id: int, invitation_id: int):
        invitation = get_object_or_404(
            organization_invitations(organization=request.organization), pk=invitation_id
        )
        invitation = invitation_revoke(
            invitation=invitation, actor=acting_user(request), actor_key=acting_key(request)
        )
        return Response(InvitationOutput(invitation).data)


class InvitationAcceptApi(OrgApiView):
    """Accept an invitation as the signed-in user (API keys cannot: they are not people)."""

    class Input(StrictSerializer):
        class Meta:
            ref_name = "InvitationAcceptInput"

        token = serializers.CharField(max_length=200)

    def resolve_organization(self, request):
        if isinstance(request.user, KeyPrincipal):
            raise ApplicationError(
                code="permission_denied",
                message="Sign in as the invited person to accept an invitation.",
                status=403,
            )
        if Membership.objects.filter(user=request.user).exists():
            return super().resolve_organization(request)
        # Someone with no organization yet: the invitation's organization
        # scopes the rate limit and the Idempotency-Key. Its token is read once
        # the body is valid: a lone surrogate could not even be hashed.
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        invitation = invitation_by_token(token=data.validated_data["token"])
        if invitation is None:
            raise ApplicationError(
                code="invitation_invalid",
                message="This invitation is unknown, revoked or expired; ask for a new one.",
                status=404,
                param="token",
            )
        return invitation.organization

    def check_access(self, request, organization):
        # The invitation token is the permission; invitation_accept checks it.
        return

    @extend_schema(request=Input, responses={201: MemberOutput}, summary="Accept an invitation")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        membership = invitation_accept(token=data.validated_data["token"], user=request.user)
        return Response(MemberOutput(membership).data, status=status.HTTP_201_CREATED)


# --- audit -------------------------------------------------------------------------


class AuditEventOutput(serializers.Serializer):
    id = serializers.IntegerField()
    action = serializers.CharField()
    target = serializers.CharField()
    actor = serializers.SerializerMethodField()
    data = serializers.JSONField()
    created_at = serializers.DateTimeField()

    def get_actor(self, event) -> str | None:
        if event.actor_user_id:
            return event.actor_user.email
        if event.actor_key_id:
            return event.actor_key.prefix
        return None


class AuditEventListApi(PagedListMixin, OrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    @extend_schema(responses=AuditEventOutput(many=True), summary="Security audit log")
    def get(self, request):
        return self.page(request, organization_audit_events, AuditEventOutput)


# --- webhook signing secret ------------------------------------------------------------


class WebhookSecretOutput(serializers.Serializer):
    secret = serializers.CharField(
        help_text="whsec_...: verify the Gym-Signature header of our webhooks with it"
    )
    created_at = serializers.DateTimeField()
    rotated_at = serializers.DateTimeField(allow_null=True)
    previous_expires_at = serializers.DateTimeField(
        allow_null=True,
        help_text="until then webhooks are signed with the previous secret as well",
    )


def _secret_response(revealed) -> Response:
    response = Response(WebhookSecretOutput(revealed).data)
    response["Cache-Control"] = "no-store"
    return response


class WebhookSecretApi(OrgApiView):
    """The secret that signs the webhooks we send (job callbacks), created on first read."""

    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    @extend_schema(responses=WebhookSecretOutput, summary="The webhook signing secret")
    def get(self, request):
        return _secret_response(
            webhook_secret_reveal(
                organization=request.organization,
                actor=acting_user(request),
                actor_key=acting_key(request),
            )
        )


class WebhookSecretRotateApi(OrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = MANAGERS

    class Input(StrictSerializer):
        class Meta:
            ref_name = "WebhookSecretRotateInput"

        previous_valid_for_seconds = serializers.IntegerField(
            min_value=0,
            max_value=86_400,
            default=0,
            help_text="keep signing with the old secret too for this long (default: stop at once)",
        )

    @extend_schema(
        request=Input, responses=WebhookSecretOutput, summary="Rotate the webhook signing secret"
    )
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        return _secret_response(
            webhook_secret_rotate(
                organization=request.organization,
                previous_valid_for=timedelta(
                    seconds=data.validated_data["previous_valid_for_seconds"]
                ),
                actor=acting_user(request),
                actor_key=acting_key(request),
            )
        )
