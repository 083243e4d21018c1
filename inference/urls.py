from django.urls import path

from inference import apis

# Mounted at /v1/, where OpenAI's SDKs expect them.
urlpatterns = [
    path("models", apis.ModelsApi.as_view(), name="openai-models"),
    path("chat/completions", apis.ChatCompletionsApi.as_view(), name="openai-chat"),
    path("completions", apis.CompletionsApi.as_view(), name="openai-completions"),
]
