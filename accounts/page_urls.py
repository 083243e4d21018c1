"""The dashboard's pages for API keys and members, under /dashboard/ (gymbilling/urls.py)."""

from django.urls import path

from accounts.views import keys, members

urlpatterns = [
    path("keys", keys.ApiKeysPage.as_view(), name="dashboard-keys"),
    path("keys/<int:key_id>/revoke", keys.ApiKeyRevokePage.as_view(), name="dashboard-key-revoke"),
    path("members", members.MembersPage.as_view(), name="dashboard-members"),
    path(
        "members/<int:member_id>/role",
        members.MemberRolePage.as_view(),
        name="dashboard-member-role",
    ),
    path(
        "members/<int:member_id>/remove",
        members.MemberRemovePage.as_view(),
        name="dashboard-member-remove",
    ),
    path(
        "invitations/<int:invitation_id>/revoke",
        members.InvitationRevokePage.as_view(),
        name="dashboard-invitation-revoke",
    ),
]
