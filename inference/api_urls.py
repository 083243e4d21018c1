from django.urls import path

from inference import apis

# Mounted at /api/v1/: the gym's own inference endpoints beside the OpenAI ones.
urlpatterns = [
    path("jobs", apis.JobListCreateApi.as_view(), name="jobs"),
    path("jobs/<str:job_id>", apis.JobDetailApi.as_view(), name="job-detail"),
    path("jobs/<str:job_id>/cancel", apis.JobCancelApi.as_view(), name="job-cancel"),
    path("credits/quote", apis.QuoteApi.as_view(), name="credits-quote"),
]
