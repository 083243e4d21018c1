from django.urls import path

from inference import apis

# Mounted at /v1/, where OpenAI's SDKs expect them.
urlpatterns = [
    path("models", apis.ModelsApi.as_view(), name="openai-models"),
    # A model's name may hold a "/" (as "org/model" names do).
    path("models/<path:model_id>", apis.ModelDetailApi.as_view(), name="openai-model"),
    path("chat/completions", apis.ChatCompletionsApi.as_view(), name="openai-chat"),
    path("completions", apis.CompletionsApi.as_view(), name="openai-completions"),
]
