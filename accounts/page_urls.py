"""The dashboard's pages for API keys and members, under /dashboard/ (gymbilling/urls.py)."""

from django.urls import path

from accounts import views

urlpatterns = [
    path("keys", views.ApiKeysPage.as_view(), name="dashboard-keys"),
    path("keys/<int:key_id>/revoke", views.ApiKeyRevokePage.as_view(), name="dashboard-key-revoke"),
    path("members", views.MembersPage.as_view(), name="dashboard-members"),
    path(
        "members/<int:member_id>/role", views.MemberRolePage.as_view(), name="dashboard-member-role"
    ),
    path(
        "members/<int:member_id>/remove",
        views.MemberRemovePage.as_view(),
        name="dashboard-member-remove",
    ),
]
