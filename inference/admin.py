"""The model catalog is edited here by staff; jobs and their callbacks are read-only records."""

from django.contrib import admin, messages

from accounts.admin import ReadOnlyAdmin, sent_by
from inference.models import (
    JOB_ERROR_CODES,
    CatalogModel,
    DedicatedCapacity,
    Job,
    JobCallback,
    ServerPool,
)
from inference.services.jobs import tokenizer_special_tokens


@admin.register(ServerPool)
class ServerPoolAdmin(admin.ModelAdmin):
    list_display = ["name", "grpc_urls", "metrics_urls"]


@admin.register(CatalogModel)
class CatalogModelAdmin(admin.ModelAdmin):
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

    def save_model(self, request, obj, form, change):
        """Saved as given, with a warning when prompt_special_tokens differs from what the
        tokenizer file adds: a typo there skews every hold and context check, yet the engine's
        preprocessing may rightly differ (add_special_tokens false, or transformers rebuilding
        the post-processor from tokenizer_config.json), so it is not refused. A tokenizer this
        process cannot read (it lives on the workers) is not checked."""
        super().save_model(request, obj, form, change)
        adds = tokenizer_special_tokens(obj.tokenizer_file) if obj.tokenizer_file else None
        if adds is not None and adds != obj.prompt_special_tokens:
            self.message_user(
                request,
                f"{obj.tokenizer_file} adds {adds} special token(s) to a prompt, and "
                f"prompt_special_tokens is {obj.prompt_special_tokens}: check what the engine's "
                "preprocessing adds (deploy/triton/fill_repository.sh prints it). Every hold "
                "and context check counts this value.",
                level=messages.WARNING,
            )


@admin.register(DedicatedCapacity)
class DedicatedCapacityAdmin(admin.ModelAdmin):
    list_display = ["organization", "model", "pool"]
    list_select_related = ["organization", "model", "pool"]


class _ErrorCodeFilter(admin.SimpleListFilter):
    """The codes a job can end with, listed from this constant rather than by a DISTINCT
    over the whole jobs table (Django's default for a field without choices)."""

    title = "error code"
    parameter_name = "error_code"

    def lookups(self, request, model_admin):
        return [(code, code) for code in JOB_ERROR_CODES]

    def queryset(self, request, queryset):
        return queryset.filter(error_code=self.value()) if self.value() else queryset


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = [
        "public_id",
        "organization",
        "model",
        "priority",
        "status",
        "input_tokens",
        "output_tokens",
        "credits_charged",
        sent_by,
        "queued_at",
    ]
    list_filter = ["status", "priority", _ErrorCodeFilter, "model", "input_tokens_source"]
    search_fields = ["public_id", "organization__slug", "user__email"]
    list_select_related = ["organization", "model", "api_key", "user"]


@admin.register(JobCallback)
class JobCallbackAdmin(ReadOnlyAdmin):
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
