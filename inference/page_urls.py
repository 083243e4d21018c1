from django.urls import path

from inference.views import PlaygroundPage

# Mounted at /dashboard/: the customer dashboard's inference pages.
urlpatterns = [
    path("playground", PlaygroundPage.as_view(), name="playground"),
]
