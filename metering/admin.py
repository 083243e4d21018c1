"""Finance's view of the ledger: everything readable, nothing editable in place.

The ledger is append-only, so these admins refuse add, change and delete;
corrections go through the services (adjustments, reversals).
"""

from django.contrib import admin
from django.db.models import Case, F, Model, OuterRef, Subquery, Sum, When
from django.db.models.functions import Coalesce

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


class AccountBalanceAdmin(ReadOnlyAdmin):
    """Accounts with their true balance, for credits (LedgerAccount) and money (MoneyAccount).

    A system account (no organization) keeps no cached balance, by design: every
    settlement touches it, so a cache would be one hot row serializing them all. Its
    `balance` column stays 0 and its balance is the sum of its entries, which the list
    adds in the same query (the SUM runs for system rows only); an organization's
    account shows its cache.
    """

    entry_model: type[Model]  # the account's entries: an `account` and an `amount`
    exclude = ["balance"]  # 0 for a system account: shown as true_balance instead
    readonly_fields = ["true_balance"]

    def get_queryset(self, request):
        summed = (
            self.entry_model.objects.filter(account=OuterRef("pk"))
            .order_by()
            .values("account")
            .annotate(total=Sum("amount"))
            .values("total")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                _true_balance=Case(
                    When(organization__isnull=True, then=Coalesce(Subquery(summed), 0)),
                    default=F("balance"),
                )
            )
        )

    @admin.display(description="balance (system: sum of entries)", ordering="_true_balance")
    def true_balance(self, account) -> int:
        return account._true_balance


class EntryInline(admin.TabularInline):
    model = LedgerEntry
    fields = ["account", "amount", "balance_after"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(LedgerAccount)
class LedgerAccountAdmin(AccountBalanceAdmin):
    entry_model = LedgerEntry
    list_display = ["id", "organization", "kind", "true_balance", "next_expiry_at"]
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
