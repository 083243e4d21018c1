from django.urls import path

from accounts import apis

urlpatterns = [
    path("me", apis.MeApi.as_view(), name="me"),
    path("keys", apis.ApiKeyListCreateApi.as_view(), name="keys"),
    path("keys/<int:key_id>", apis.ApiKeyRevokeApi.as_view(), name="key-revoke"),
    path("orgs/<int:org_id>/members", apis.MemberListAddApi.as_view(), name="members"),
    path(
        "orgs/<int:org_id>/members/<int:member_id>",
        apis.MemberDetailApi.as_view(),
        name="member-detail",
    ),
    path(
        "orgs/<int:org_id>/invitations",
        apis.InvitationListCreateApi.as_view(),
        name="invitations",
    ),
    path(
        "orgs/<int:org_id>/invitations/<int:invitation_id>",
        apis.InvitationRevokeApi.as_view(),
        name="invitation-revoke",
    ),
    path("invitations/accept", apis.InvitationAcceptApi.as_view(), name="invitation-accept"),
    path("audit", apis.AuditEventListApi.as_view(), name="audit"),
    path("webhooks/secret", apis.WebhookSecretApi.as_view(), name="webhook-secret"),
    path(
        "webhooks/secret/rotate",
        apis.WebhookSecretRotateApi.as_view(),
        name="webhook-secret-rotate",
    ),
]
