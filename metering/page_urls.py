"""The dashboard's pages for credits, under /dashboard/ (gymbilling/urls.py)."""

from django.urls import path

from metering import views

urlpatterns = [
    path("usage", views.UsagePage.as_view(), name="dashboard-usage"),
    path("activity", views.ActivityPage.as_view(), name="dashboard-activity"),
]
