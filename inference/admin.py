"""The model catalog is edited here by staff; jobs and their callbacks are read-only records."""

from django import forms
from django.contrib import admin

from inference.models import CatalogModel, DedicatedCapacity, Job, JobCallback, ServerPool
from inference.services.jobs import tokenizer_special_tokens


@admin.register(ServerPool)
class ServerPoolAdmin(admin.ModelAdmin):
    list_display = ["name", "grpc_urls", "metrics_urls"]


class CatalogModelForm(forms.ModelForm):
    # The model and fields are the admin's (ModelAdmin.get_form).

    def clean(self):
        """A prompt_special_tokens the tokenizer cannot add is a typo that would skew every
        hold and context check: 0 (the preprocessing adds none) or what its post-processor
        adds. A tokenizer this process cannot read (it lives on the workers) is not checked."""
        data = super().clean()
        path, special = data.get("tokenizer_file"), data.get("prompt_special_tokens")
        if path and special:
            adds = tokenizer_special_tokens(path)
            if adds is not None and special != adds:
                self.add_error(
                    "prompt_special_tokens",
                    f"{path} adds {adds} special token(s) to a prompt: set {adds}, or 0 if the "
                    "engine's preprocessing runs with add_special_tokens false.",
                )
        return data


@admin.register(CatalogModel)
class CatalogModelAdmin(admin.ModelAdmin):
    form = CatalogModelForm
    list_display = [
        "name",
        "status",
        "access_tier",
        "precision",
        "kv_cache_dtype",
        "tensor_parallel",
        "gpu_type",
        "gpu_hour_cost",
        "pool",
    ]
    list_filter = ["status", "precision", "access_tier"]
    list_select_related = ["pool"]
    search_fields = ["name"]


@admin.register(DedicatedCapacity)
class DedicatedCapacityAdmin(admin.ModelAdmin):
    list_display = ["organization", "model", "pool"]
    list_select_related = ["organization", "model", "pool"]


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "public_id",
        "organization",
        "model",
        "priority",
        "status",
        "input_tokens",
        "output_tokens",
        "credits_charged",
        "queued_at",
    ]
    list_filter = ["status", "priority", "input_tokens_source"]
    search_fields = ["public_id", "organization__slug"]
    list_select_related = ["organization", "model"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(JobCallback)
class JobCallbackAdmin(admin.ModelAdmin):
    list_display = [
        "event_id",
        "organization",
        "event_type",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "delivered_at",
    ]
    list_filter = ["status", "event_type"]
    search_fields = ["event_id", "job__public_id", "organization__slug"]
    list_select_related = ["organization"]
    # The body is the event as sent; the URL may carry the customer's own tokens.
    exclude = ["body"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
