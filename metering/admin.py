"""Finance's view of the ledger: everything readable, nothing editable in place.

The ledger is append-only, so these admins refuse add, change and delete;
corrections go through the services (adjustments, reversals).
"""

from django.contrib import admin

from metering.models import (
    CreditLot,
    Hold,
    JournalTransaction,
    LedgerAccount,
    LedgerEntry,
    ModelPrice,
    PriceBook,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class EntryInline(admin.TabularInline):
    model = LedgerEntry
    fields = ["account", "amount", "balance_after"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(LedgerAccount)
class LedgerAccountAdmin(ReadOnlyAdmin):
    list_display = ["id", "organization", "kind", "balance", "next_expiry_at"]
    list_filter = ["kind"]
    search_fields = ["organization__slug"]
    list_select_related = ["organization"]


@admin.register(JournalTransaction)
class JournalTransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "organization", "idempotency_key", "memo", "created_at"]
    list_filter = ["kind"]
    search_fields = ["idempotency_key", "organization__slug", "memo"]
    list_select_related = ["organization"]
    inlines = [EntryInline]


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "transaction", "account", "amount", "balance_after", "created_at"]
    list_select_related = ["transaction", "account", "account__organization"]
    search_fields = ["account__organization__slug", "transaction__idempotency_key"]


@admin.register(CreditLot)
class CreditLotAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "organization",
        "account",
        "source",
        "paid",
        "resellable",
        "priority",
        "amount",
        "remaining",
        "expires_at",
    ]
    list_filter = ["source", "paid", "resellable"]
    search_fields = ["organization__slug"]
    list_select_related = ["organization", "account", "account__organization"]


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = ["key", "organization", "status", "amount", "captured", "expires_at"]
    list_filter = ["status"]
    search_fields = ["key", "organization__slug"]
    list_select_related = ["organization"]


class ModelPriceInline(admin.TabularInline):
    model = ModelPrice
    extra = 0
    can_delete = False
    readonly_fields = [
        "model_name",
        "input_rate",
        "cached_input_rate",
        "output_rate",
        "minimum_charge",
    ]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(PriceBook)
class PriceBookAdmin(ReadOnlyAdmin):
    list_display = ["version", "effective_at", "notes"]
    inlines = [ModelPriceInline]
