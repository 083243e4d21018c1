"""Finance and staff: plans and packs are edited here; what Stripe told us is
read-only; failed webhook events can be replayed."""

import uuid
from datetime import UTC, datetime

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Exists, OuterRef, Q
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from accounts.errors import ApplicationError
from gymbilling import stripe_client
from gymbilling.market.selectors import (
    payment_market_order,
    payouts_with_losses,
    shortfall_refund_owed,
)
from gymbilling.market.services import order_shortfall_refund_request
from gymbilling.models import (
    BillingCustomer,
    CheckoutSession,
    CreditPack,
    FormerStripeCustomer,
    Invoice,
    MeterError,
    OverageReport,
    PaymentReversal,
    Plan,
    RolloverCarry,
    StripeEvent,
    StripePrice,
    Subscription,
)
from gymbilling.pages import DigitsIntegerField
from gymbilling.selectors import REVERSAL_SUMS, market_fee_income, reversals_by_customer
from gymbilling.services import (
    billing_customer_connect_account_set,
    resale_unfreeze,
    stripe_event_process,
)
from gymbilling.services.refunds import payment_refund
from metering.admin import (
    AccountBalanceAdmin,
    ReadOnlyAdmin,
    ReportTable,
    UsageRecordAdmin,
    credits_cell,
    number_cell,
    report_table,
)
from metering.models import UsageRecord
from metering.selectors import rows_summed


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = [
        "code",
        "name",
        "active",
        "monthly_price",
        "currency",
        "monthly_credits",
        "seat_based",
        "overage_allowed",
    ]
    list_filter = ["active", "seat_based", "overage_allowed"]
    readonly_fields = ["stripe_product_id", "created_at", "updated_at"]


@admin.register(CreditPack)
class CreditPackAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "active", "credits", "price", "currency", "validity_days"]
    readonly_fields = ["stripe_product_id", "created_at", "updated_at"]


@admin.register(StripePrice)
class StripePriceAdmin(ReadOnlyAdmin):
    list_display = ["lookup_key", "stripe_price_id", "kind", "unit_amount", "currency", "current"]
    list_filter = ["kind", "current"]


class ResaleUnfreezeForm(forms.Form):
    note = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Why reselling may start again (the refund or dispute resolved, how): kept "
        "in the organization's audit log.",
    )


@admin.register(BillingCustomer)
class BillingCustomerAdmin(admin.ModelAdmin):
    list_display = [
        "organization",
        "stripe_customer_id",
        "email",
        "resale_frozen_at",
        "resale_frozen_reason",
    ]
    search_fields = ["stripe_customer_id", "organization__slug", "email"]
    # The freeze is set by refunds and disputes and lifted by the action below only: a field
    # of the form would write what the page showed back over a freeze set since it was drawn.
    readonly_fields = [
        "organization",
        "stripe_customer_id",
        "created_at",
        "resale_frozen_at",
        "resale_frozen_reason",
    ]
    actions = ["unfreeze_resale"]

    def has_add_permission(self, request):
        # Made by billing_customer_ensure, with the customer Stripe made: the organization
        # cannot even be chosen here (read-only).
        return False

    def has_delete_permission(self, request, obj=None):
        # Every later invoice.paid finds its organization through this row: without it
        # the customer is still charged and granted nothing. The delete view and the
        # "delete selected" action both go with this permission.
        return False

    def save_model(self, request, obj, form, change):
        """Only the fields staff changed are written (a plain save writes every column, over
        what billing set since the page was drawn); the Connect account, where the seller's
        payouts go, through billing_customer_connect_account_set, in the audit log."""
        others = [name for name in form.changed_data if name != "stripe_connect_account_id"]
        if others:
            obj.save(update_fields=others)
        if "stripe_connect_account_id" in form.changed_data:
            billing_customer_connect_account_set(
                customer_id=obj.pk, account_id=obj.stripe_connect_account_id, actor=request.user
            )

    # Without `permissions` Django offers an action to anyone who may view the list.
    @admin.action(
        description="Allow reselling again (after a refund or dispute is resolved)",
        permissions=["change"],
    )
    def unfreeze_resale(self, request, queryset):
        """A page showing each selected freeze, its causes and since when, and asking for a
        note (Django's intermediate action page, as "delete selected"); then resale_unfreeze
        of the freeze the page showed (its `resale_frozen_at`, sent back with the note): a
        refund or dispute that froze the customer again since is not lifted unseen."""
        if "_unfreeze" in request.POST:
            form = ResaleUnfreezeForm(request.POST)
            if form.is_valid():
                results = {}
                for pk in queryset.order_by("pk").values_list("pk", flat=True):
                    results[pk] = self._unfreeze_one(request, pk, form.cleaned_data["note"])
                results_message(
                    self, request, results, row="customer", done="reselling allowed again"
                )
                return None  # back to the list
        else:
            form = ResaleUnfreezeForm()
        frozen = (
            queryset.filter(resale_frozen_at__isnull=False)
            .select_related("organization")
            .order_by("pk")
        )
        if not frozen:
            self.message_user(request, "No frozen customer selected.", messages.WARNING)
            return None
        return action_page(
            self,
            request,
            "admin/gymbilling/resale_unfreeze.html",
            title="Allow reselling again",
            action="Allow reselling again",
            action_name="unfreeze_resale",
            customers=frozen,
            form=form,
        )

    @staticmethod
    def _unfreeze_one(request, pk: int, note: str) -> str:
        try:
            frozen_at = datetime.fromisoformat(request.POST.get(f"frozen_at_{pk}", ""))
        except ValueError:
            return "not lifted: it was not frozen when the page was drawn"
        try:
            resale_unfreeze(customer_id=pk, frozen_at=frozen_at, note=note, actor=request.user)
        except ApplicationError as exc:
            return f"not lifted: {exc.message} ({exc.code})"
        return "reselling allowed again"


@admin.register(Subscription)
class SubscriptionAdmin(ReadOnlyAdmin):
    list_display = [
        "stripe_subscription_id",
        "organization",
        "plan",
        "seats",
        "status",
        "current_period_end",
        "grace_until",
    ]
    list_filter = ["status", "plan"]
    search_fields = ["stripe_subscription_id", "organization__slug"]


class MinorUnitsField(DigitsIntegerField):
    """An amount of money in its currency's minor unit, typed as ASCII digits only.

    Django's IntegerField drops a zero fraction ("12.00" is 12): finance typing
    $12.00 would refund 12 cents. Any input that is not plain digits is refused.
    """

    default_error_messages = {
        "invalid": "Enter the amount in the payment's minor units, digits only, with no "
        "point, sign or exponent: in cents: 1200 is $12.00.",
    }


class RefundForm(forms.Form):
    amount = MinorUnitsField(
        required=False,
        min_value=1,
        help_text="In the payment's minor units (cents for usd: 1200 is $12.00). Blank: all "
        "that is left to refund. Of an invoice, what the payment paid besides the credits "
        "(overage, tax) is refunded first: refunding just that takes no credits back.",
    )
    note = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Why, for the ledger's readers and the customer's audit log.",
    )
    # Drawn with the form and kept when it comes back with an error: sending it again
    # (a double click, a retry after Stripe did not answer) is the same refund at Stripe.
    key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    SHORTFALL, SALE = "shortfall", "sale"

    def __init__(self, *args, shortfall_order=None, **kwargs):
        """`shortfall_order`: the marketplace order the payment paid for, when it still owes
        the buyer what it did not deliver. A plain refund of such a payment is read as one
        of the delivered sale (its credits and the sellers' shares taken back), so finance
        must say which they refund; nothing is chosen for them."""
        super().__init__(*args, **kwargs)
        if shortfall_order is None:
            return
        order = shortfall_order
        self.fields["part"] = forms.ChoiceField(
            label="What is refunded",
            widget=forms.RadioSelect,
            choices=[
                (
                    self.SHORTFALL,
                    f"The undelivered shortfall of market order {order.pk} "
                    f"({order.shortfall_amount} {order.currency}): what the buyer paid for and "
                    "did not get. The credits delivered stay the buyer's; the sellers keep "
                    "their proceeds.",
                ),
                (
                    self.SALE,
                    "The delivered sale: the credits delivered are taken back in proportion, "
                    "the sellers' shares and the fee too, and the buyer's reselling is frozen.",
                ),
            ],
            help_text="The shortfall is refunded whole, as the order's own shortfall refund "
            "(leave the amount blank or give exactly the shortfall). The delivered sale: at "
            "most what it has left, never the shortfall owed; blank is all it has left.",
        )
        self.order_fields(["part"])


class RefundAdminMixin:
    """A "Refund" page for rows that record a customer's payment (`stripe_payment_intent_id`):
    finance refund at Stripe, and the refund's clawback is applied at once
    (gymbilling.services.refunds). Staff need the permission gymbilling.refund_payment."""

    change_form_template = "admin/gymbilling/refundable_change_form.html"

    def get_urls(self):
        opts = self.model._meta
        refund = path(
            "<int:object_id>/refund/",
            self.admin_site.admin_view(self.refund_view),
            name=f"{opts.app_label}_{opts.model_name}_refund",
        )
        return [refund, *super().get_urls()]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        opts = self.model._meta
        extra_context = {
            **(extra_context or {}),
            "refund_url_name": f"admin:{opts.app_label}_{opts.model_name}_refund",
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def refund_view(self, request, object_id: int):
        if not request.user.has_perm("gymbilling.refund_payment"):
            raise PermissionDenied
        row = self.model.objects.select_related("organization").filter(pk=object_id).first()
        if row is None or not row.stripe_payment_intent_id:
            raise Http404("No payment to refund.")
        opts = self.model._meta
        back = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[row.pk])
        order = payment_market_order(payment_intent_id=row.stripe_payment_intent_id)
        # Offered while the order owes its shortfall; and to a form that chose it, drawn
        # while it was owed: refunded since (the sweep, another of finance), it is refused
        # as such (shortfall_refund_not_owed), never refunded as the sale instead.
        shortfall_order = (
            order
            if order is not None
            and order.shortfall_amount
            and (shortfall_refund_owed(order) or "part" in request.POST)
            else None
        )
        form = RefundForm(
            request.POST or None,
            initial={"key": uuid.uuid4().hex},
            shortfall_order=shortfall_order,
        )
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            if data.get("part") == RefundForm.SHORTFALL:
                return self._refund_shortfall(request, form, shortfall_order, back=back) or (
                    self._refund_page(request, row, form, back=back)
                )
            try:
                refund = payment_refund(
                    organization=row.organization,
                    payment_intent_id=row.stripe_payment_intent_id,
                    amount=data["amount"],
                    note=data["note"],
                    key=data["key"],
                    actor=request.user,
                )
            except ApplicationError as exc:
                form.add_error(None, f"{exc.message} ({exc.code})")
            except stripe_client.StripeRequestRefused as exc:
                form.add_error(None, f"Stripe refused the refund: {exc} ({exc.code})")
            except stripe_client.StripeUnavailable:
                form.add_error(
                    None,
                    "Stripe did not answer: the refund may or may not have been made. Send "
                    "this form again; it is the same refund at Stripe, never a second one.",
                )
            else:
                self._refund_done(request, refund)
                return HttpResponseRedirect(back)
        return self._refund_page(request, row, form, back=back)

    def _refund_done(self, request, refund: dict) -> None:
        """Say what the form's send did: refunded now, or found the refund an earlier send
        of the same form made (a double click, the back button, a retry after Stripe did not
        answer), which it must not report as made now: finance reading "Refunded" twice
        would think the customer was refunded twice, or refund again to undo one."""
        applied = refund["gym_applied"]
        what = f"{refund.get('amount')} {refund.get('currency', '')}"
        credits = (
            "the credits it bought are taken back."
            if applied
            else "taking back the credits it bought failed here (logged): Stripe's webhook for "
            "the refund will apply it. Do not refund again."
        )
        if refund.get("gym_already_made"):
            made_at = datetime.fromtimestamp(int(refund.get("created") or 0), tz=UTC)
            self.message_user(
                request,
                f"Already refunded: this form's refund {refund.get('id')} of {what} was made "
                f"at {made_at:%Y-%m-%d %H:%M:%S} UTC; nothing more was refunded now, and "
                + credits,
                messages.INFO if applied else messages.WARNING,
            )
            return
        self.message_user(
            request,
            f"Refunded {what} ({refund.get('id')}); " + credits,
            messages.SUCCESS if applied else messages.WARNING,
        )

    def _refund_shortfall(self, request, form, order, *, back: str):
        """The order's own shortfall refund, sent now; a redirect once Stripe took it, else
        None with why on the form."""
        try:
            order = order_shortfall_refund_request(
                order_id=order.pk,
                amount=form.cleaned_data["amount"],
                note=form.cleaned_data["note"],
                actor=request.user,
            )
        except ApplicationError as exc:
            form.add_error(None, f"{exc.message} ({exc.code})")
            return None
        self.message_user(
            request,
            f"Refunded the undelivered shortfall of market order {order.pk}: "
            f"{order.shortfall_amount} {order.currency} ({order.shortfall_refund_id}); the "
            "credits delivered stay the buyer's.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(back)

    def _refund_page(self, request, row, form, *, back: str):
        opts = self.model._meta
        context = {
            **self.admin_site.each_context(request),
            "title": f"Refund {row}",
            "opts": opts,
            "original": row,
            "form": form,
            "back": back,
            "back_label": str(row),
            "action": "Refund",
        }
        return TemplateResponse(request, "admin/gymbilling/refund.html", context)


@admin.register(CheckoutSession)
class CheckoutSessionAdmin(RefundAdminMixin, ReadOnlyAdmin):
    """Checkouts: subscriptions started, packs bought (refundable here)."""

    list_display = [
        "stripe_session_id",
        "organization",
        "kind",
        "pack",
        "status",
        "amount_total",
        "currency",
        "created_at",
    ]
    list_filter = ["kind", "status"]
    search_fields = ["stripe_session_id", "stripe_payment_intent_id", "organization__slug"]
    list_select_related = ["organization", "pack"]


@admin.register(Invoice)
class InvoiceAdmin(RefundAdminMixin, ReadOnlyAdmin):
    list_display = [
        "stripe_invoice_id",
        "organization",
        "billing_reason",
        "status",
        "amount_paid",
        "currency",
        "credits_granted",
        "created_at",
    ]
    list_filter = ["status", "billing_reason"]
    search_fields = ["stripe_invoice_id", "organization__slug"]


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    list_display = [
        "stripe_event_id",
        "type",
        "object_id",
        "status",
        "attempts",
        "received_at",
        "processed_at",
    ]
    list_filter = ["status", "type"]
    search_fields = ["stripe_event_id", "object_id"]
    actions = ["replay"]

    def has_replay_permission(self, request) -> bool:
        """Replaying grants credits and changes subscriptions, so it needs the change
        permission, though the event itself stays read-only here (what Stripe sent)."""
        return request.user.has_perm("gymbilling.change_stripeevent")

    @admin.action(
        description="Replay: process again now (reads the current objects from Stripe)",
        permissions=["replay"],
    )
    def replay(self, request, queryset):
        results = {}
        for event in queryset.order_by("stripe_created_at"):
            try:
                status = stripe_event_process(event_pk=event.pk, force=True)
            except Exception as exc:  # shown to staff; the event keeps its error
                status = f"error: {exc}"
            results[event.stripe_event_id] = status or "busy"
        level = (
            messages.SUCCESS
            if all(s == "processed" or s == "ignored" for s in results.values())
            else messages.WARNING
        )
        self.message_user(request, ", ".join(f"{k}: {v}" for k, v in results.items()), level)


class OverageCheckedForm(forms.Form):
    note = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What you found among the meter's events at Stripe (the event, its "
        "identifier and value, or that none is there) and how: kept in the organization's "
        "audit log.",
    )


@admin.register(OverageReport)
class OverageReportAdmin(ReadOnlyAdmin):
    """Overage batches sent to the Stripe meter; a failed one (its customer deleted at
    Stripe) was never invoiced: its error says what finance should do. "Stripe meter
    error": dropped (Stripe reported it failed: sent again under a new identifier, or
    failed) or maybe dropped (sent while Stripe dropped events it did not name, or named
    an attempt of it that may not be the one counted, or dropped it again after
    BILLING_OVERAGE_MAX_RESENDS re-sends, or refused it at once again after as many,
    "refusals" counting those, or an attempt of it got no answer and it could not be sent
    again within the 24 hours Stripe refuses its identifier twice: check it at Stripe; it
    is never re-sent by itself; "error" says which).
    Finance, once they have looked, say which:
    "Counted at Stripe" (the flag cleared) or "Not counted" (sent again)."""

    list_display = [
        "identifier",
        "organization",
        "credits",
        "used_at",
        "sent_at",
        "failed_at",
        "meter_error",
        "stripe_error_code",
        "refusals",
        "error",
        "created_at",
    ]
    list_filter = [("failed_at", admin.EmptyFieldListFilter), "meter_error"]
    search_fields = ["identifier", "organization__slug"]
    actions = ["counted_at_stripe", "not_counted_send_again"]

    def has_check_permission(self, request) -> bool:
        """Saying whether Stripe billed a batch: the change permission, though batches stay
        read-only here (their services change them)."""
        return request.user.has_perm("gymbilling.change_overagereport")

    @admin.action(description="Counted at Stripe — clear the flag", permissions=["check"])
    def counted_at_stripe(self, request, queryset):
        from gymbilling.services.overage import overage_report_counted

        return self._checked_at_stripe(
            request,
            queryset,
            act=overage_report_counted,
            done="counted at Stripe, flag cleared",
            action="Counted at Stripe — clear the flag",
            action_name="counted_at_stripe",
        )

    @admin.action(description="Not counted — send again", permissions=["check"])
    def not_counted_send_again(self, request, queryset):
        from gymbilling.services.overage import overage_report_resend

        return self._checked_at_stripe(
            request,
            queryset,
            act=overage_report_resend,
            done="re-queued under a new identifier",
            action="Not counted — send again",
            action_name="not_counted_send_again",
        )

    def _checked_at_stripe(self, request, queryset, *, act, done: str, action: str, action_name):
        """A page showing the batches flagged maybe dropped among those selected and asking
        for a note (Django's intermediate action page, as "delete selected"); then `act`
        on each selected batch, refused for one not flagged."""
        form = OverageCheckedForm(request.POST if "_checked" in request.POST else None)
        if form.is_valid():
            results = {}
            for report in queryset.order_by("pk"):
                try:
                    act(report_id=report.pk, note=form.cleaned_data["note"], actor=request.user)
                except ApplicationError as exc:
                    results[report.identifier] = f"{exc.message} ({exc.code})"
                else:
                    results[report.identifier] = done
            results_message(self, request, results, row="batch", done=done)
            return None  # back to the list
        flagged = queryset.filter(meter_error=MeterError.IN_DOUBT).select_related("organization")
        if not flagged:
            self.message_user(
                request,
                "No batch flagged maybe dropped selected: only those can be checked at Stripe "
                "here.",
                messages.WARNING,
            )
            return None
        return action_page(
            self,
            request,
            "admin/gymbilling/overage_checked.html",
            title=f"{action}: overage batches Stripe may have dropped",
            action=action,
            action_name=action_name,
            batches=flagged,
            resend=action_name == "not_counted_send_again",
            form=form,
        )


@admin.register(FormerStripeCustomer)
class FormerStripeCustomerAdmin(ReadOnlyAdmin):
    """Stripe customers deleted at Stripe and replaced by a new one for the organization."""

    list_display = ["stripe_customer_id", "organization", "replaced_by", "replaced_at"]
    search_fields = ["stripe_customer_id", "replaced_by", "organization__slug"]


@admin.register(PaymentReversal)
class PaymentReversalAdmin(ReadOnlyAdmin):
    list_display = [
        "key",
        "kind",
        "organization",
        "amount",
        "currency",
        "credits_clawed_back",
        "credits_lost",
        "credits_reinstated",
        "created_at",
        "reinstated_at",
    ]
    list_filter = ["kind", ("reinstated_at", admin.EmptyFieldListFilter)]


@admin.register(RolloverCarry)
class RolloverCarryAdmin(ReadOnlyAdmin):
    """Why credits expired as they came back (a released order, a won dispute): the cap a
    period's rollover left unused, and what was away when it counted."""

    list_display = ["key", "organization", "headroom", "memo", "created_at"]
    search_fields = ["key", "organization__slug"]
    list_select_related = ["organization"]


# --- the credit marketplace (read-only: every change goes through its services) --------

from gymbilling.models import (  # noqa: E402
    MarketFill,
    MarketListing,
    MarketOrder,
    MarketPayout,
    MarketReversal,
    MoneyAccount,
    MoneyEntry,
    MoneyTransaction,
    PayoutStatus,
)


@admin.register(MarketListing)
class MarketListingAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "seller",
        "price_per_1k",
        "currency",
        "quantity",
        "sold",
        "status",
        "created_at",
    ]
    list_filter = ["status", "currency"]
    search_fields = ["seller__slug"]


def action_page(
    model_admin, request, template: str, *, title: str, action: str, action_name: str, **context
) -> TemplateResponse:
    """An action's own page before it acts (Django's intermediate page, as "delete
    selected"): its form posts the action `action_name` again, with the rows selected."""
    return TemplateResponse(
        request,
        template,
        {
            **model_admin.admin_site.each_context(request),
            "title": title,
            "opts": model_admin.model._meta,
            "action": action,
            "action_name": action_name,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            **context,
        },
    )


def results_message(model_admin, request, results: dict, *, row: str, done: str) -> None:
    """An action's outcome for each row it acted on, in one message: a success only when
    every row came out `done`, else a warning, so that one left undone is not missed."""
    level = messages.SUCCESS if all(r == done for r in results.values()) else messages.WARNING
    model_admin.message_user(
        request, ", ".join(f"{row} {k}: {v}" for k, v in sorted(results.items())), level
    )


class ShortfallRefundFilter(admin.SimpleListFilter):
    """Orders paid for and not all delivered, by where their refund of the difference is."""

    title = "shortfall refund"
    parameter_name = "shortfall_refund"

    def lookups(self, request, model_admin):
        return [
            ("refused", "Refused by Stripe (finance)"),
            ("waiting", "Waiting to be sent"),
            ("refunded", "Refunded"),
            ("resolved", "Refunded by hand (finance)"),
            ("twice", "Refunded twice: by Stripe and by hand (finance)"),
        ]

    def queryset(self, request, queryset):
        from gymbilling.market.services import SHORTFALL_REFUND_REFUSED, SHORTFALL_REFUNDED_TWICE

        owed = queryset.filter(shortfall_amount__gt=0)
        if self.value() == "refused":
            return queryset.filter(SHORTFALL_REFUND_REFUSED)
        if self.value() == "waiting":
            return owed.filter(
                shortfall_refunded_at__isnull=True, shortfall_refund_refused_at__isnull=True
            )
        if self.value() == "refunded":
            return owed.filter(shortfall_refunded_at__isnull=False)
        if self.value() == "resolved":
            return owed.filter(shortfall_refund_resolved_at__isnull=False)
        if self.value() == "twice":
            return queryset.filter(SHORTFALL_REFUNDED_TWICE)
        return queryset


class ShortfallResolveForm(forms.Form):
    note = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="How the buyer was refunded (the Stripe refund's id, the bank transfer's "
        "reference): kept on the order and in the buyer's audit log. Refund it at Stripe "
        "from the order's checkout's Refund page, choosing the undelivered shortfall, or "
        "with Retry: a plain refund of the payment is taken as a refund of the delivered "
        "sale.",
    )


@admin.register(MarketOrder)
class MarketOrderAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "buyer",
        "quantity",
        "amount_total",
        "currency",
        "status",
        "shortfall_amount",
        "shortfall_refunded_at",
        "shortfall_refund_error",
        "shortfall_refund_resolved_at",
        "created_at",
    ]
    list_filter = ["status", "currency", ShortfallRefundFilter]
    search_fields = ["buyer__slug", "stripe_payment_intent_id"]
    # Who resolved the shortfall refund by hand, when and why, read as one line.
    exclude = [
        "shortfall_refund_resolved_at",
        "shortfall_refund_resolved_by",
        "shortfall_refund_resolved_note",
    ]
    readonly_fields = ["shortfall_refund_resolution"]
    actions = ["retry_shortfall_refund", "resolve_shortfall_refund"]

    def has_retry_permission(self, request) -> bool:
        """Sending money back to a buyer: the change permission, though the order stays
        read-only here (its services change it)."""
        return request.user.has_perm("gymbilling.change_marketorder")

    def has_resolve_permission(self, request) -> bool:
        """Saying a buyer was refunded by hand, so that nothing here refunds them again: a
        refund of finance's (gymbilling.refund_payment, as the Refund page) on the order
        (the change permission, as the retry)."""
        return request.user.has_perms(
            ["gymbilling.refund_payment", "gymbilling.change_marketorder"]
        )

    @admin.display(description="shortfall refund resolved")
    def shortfall_refund_resolution(self, order) -> str:
        from gymbilling.market.services import shortfall_refund_resolution

        return shortfall_refund_resolution(order) or "-"

    @admin.action(
        description="Retry the shortfall refund Stripe refused (once its cause is fixed)",
        permissions=["retry"],
    )
    def retry_shortfall_refund(self, request, queryset):
        from gymbilling.market.services import (
            SHORTFALL_REFUND_REFUSED,
            order_shortfall_refund_retry,
            shortfall_refund_resolution,
        )

        results = {}
        # Refunded by hand: sending it again would refund the buyer twice.
        for order in (
            queryset.filter(shortfall_refund_resolved_at__isnull=False)
            .select_related("shortfall_refund_resolved_by")
            .order_by("pk")
        ):
            results[order.pk] = f"not sent, {shortfall_refund_resolution(order)}"
        refused = queryset.filter(SHORTFALL_REFUND_REFUSED)
        for order_id in refused.order_by("pk").values_list("pk", flat=True):
            order_shortfall_refund_retry(order_id=order_id)
            order = MarketOrder.objects.get(pk=order_id)
            results[order_id] = (
                "refunded"
                if order.shortfall_refunded_at
                else "not sent: another retry has been sending it to Stripe since "
                f"{order.shortfall_refund_sending_at.isoformat(timespec='seconds')}; "
                "look again once it is done"
                # This retry's own claim is cleared when it is done: one left is another's.
                if order.shortfall_refund_sending_at
                else order.shortfall_refund_error
                if order.shortfall_refund_refused_at
                else "waiting for Stripe"
            )
        if not results:
            self.message_user(request, "No refused shortfall refund selected.", messages.WARNING)
            return
        results_message(self, request, results, row="order", done="refunded")

    @admin.action(description="Mark resolved (refunded by hand)", permissions=["resolve"])
    def resolve_shortfall_refund(self, request, queryset):
        """A page asking for the note first (Django's intermediate action page, as "delete
        selected"), then order_shortfall_refund_resolve for each order."""
        from gymbilling.market.services import (
            SHORTFALL_REFUND_REFUSED,
            order_shortfall_refund_resolve,
        )

        refused = queryset.filter(SHORTFALL_REFUND_REFUSED).select_related("buyer").order_by("pk")
        form = ShortfallResolveForm(request.POST if "_resolve" in request.POST else None)
        if form.is_valid():
            results = {}
            for order_id in queryset.order_by("pk").values_list("pk", flat=True):
                try:
                    order_shortfall_refund_resolve(
                        order_id=order_id, note=form.cleaned_data["note"], actor=request.user
                    )
                except ApplicationError as exc:
                    results[order_id] = f"{exc.message} ({exc.code})"
                else:
                    results[order_id] = "resolved"
            results_message(self, request, results, row="order", done="resolved")
            return None  # back to the list
        if not refused:
            self.message_user(request, "No refused shortfall refund selected.", messages.WARNING)
            return None
        return action_page(
            self,
            request,
            "admin/gymbilling/shortfall_resolve.html",
            title="Mark refused shortfall refunds resolved (refunded by hand)",
            action="Mark resolved (refunded by hand)",
            action_name="resolve_shortfall_refund",
            orders=refused,
            form=form,
        )


@admin.register(MarketFill)
class MarketFillAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "order",
        "listing",
        "seller",
        "quantity",
        "gross",
        "fee",
        "refunded",
        "status",
        "proceeds",
    ]
    list_filter = ["status", "proceeds"]


class PayoutHoldingFilter(admin.SimpleListFilter):
    """Refused payouts that hold their seller's payouts (in that currency, to that
    destination; one that may have paid a customer deleted since, `may_have_paid`,
    wherever they would go) until finance retries them; and the payouts a freeze of their
    seller's reselling keeps from being paid: closed unsent (seller_frozen, their proceeds
    back to available), or pending where an earlier send may have reached Stripe (sent by
    the first run once it is lifted)."""

    title = "holding the seller's payouts"
    parameter_name = "holding"

    def lookups(self, request, model_admin):
        return [
            ("yes", "Yes: refused, waiting for finance"),
            ("retried", "Retried by finance"),
            ("customer", "Yes: customer deleted at Stripe, waiting for its replacement"),
            (
                "frozen",
                "Frozen seller: not sent (closed, back to available; or pending, maybe sent "
                "before), paid once the freeze is lifted",
            ),
            (
                "frozen_held",
                "Frozen seller, pending and maybe sent before: refunds and disputes of its "
                "sales are the platform's losses (column lost)",
            ),
        ]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(status=PayoutStatus.FAILED, retry_allowed_at__isnull=True)
        if self.value() == "retried":
            return queryset.filter(status=PayoutStatus.FAILED, retry_allowed_at__isnull=False)
        if self.value() == "customer":
            # Still waiting: the organization still has that (deleted) customer and no
            # Connect account. Once it has another, the next payout run pays there.
            return queryset.filter(
                Exists(
                    BillingCustomer.objects.filter(
                        organization=OuterRef("seller"),
                        stripe_customer_id=OuterRef("destination"),
                        stripe_connect_account_id="",
                    )
                ),
                status=PayoutStatus.CUSTOMER_DELETED,
            )
        if self.value() == "frozen_held":
            # Pending with a send counted (_payout_sent_before): not undone for the freeze,
            # since Stripe may have paid it (market.services._payout_frozen). Its fills are
            # paid out, so what refunds and disputes of its sales take while the freeze lasts
            # is not taken from the seller's proceeds, and it pays them in full once sent.
            return queryset.filter(
                Exists(
                    BillingCustomer.objects.filter(
                        organization=OuterRef("seller"), resale_frozen_at__isnull=False
                    )
                ),
                status=PayoutStatus.PENDING,
                send_attempts__gt=0,
            )
        if self.value() == "frozen":
            # The freeze as it is now, not the payout's note (which says what the last
            # send found): lifted, the next payout run sends the pending ones and pays
            # the closed ones' proceeds in a new payout. A closed one that a later payout
            # of the seller's (in its currency) came after waits for nothing: that one
            # paid, or holds, what it had.
            return queryset.filter(
                Exists(
                    BillingCustomer.objects.filter(
                        organization=OuterRef("seller"), resale_frozen_at__isnull=False
                    )
                ),
                Q(status=PayoutStatus.PENDING)
                | Q(status=PayoutStatus.SELLER_FROZEN)
                & ~Exists(
                    MarketPayout.objects.filter(
                        seller=OuterRef("seller"),
                        currency=OuterRef("currency"),
                        pk__gt=OuterRef("pk"),
                    )
                ),
            )
        return queryset


class PayoutMarkPaidForm(forms.Form):
    evidence = forms.CharField(
        label="Stripe balance transaction",
        max_length=255,
        help_text="The id (cbtxn_...) of the credit this payout made, in the deleted "
        "customer's balance transactions in Stripe's dashboard (metadata market_payout = "
        "the payout's id).",
    )
    note = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What you found at Stripe and how (the seller used the credit, who "
        "checked): kept in the seller's audit log.",
    )

    def clean_evidence(self) -> str:
        import re

        from gymbilling.market.services import BALANCE_TRANSACTION_ID

        evidence = self.cleaned_data["evidence"].strip()
        if not re.fullmatch(BALANCE_TRANSACTION_ID, evidence):
            raise forms.ValidationError(
                "A customer balance transaction's id starts with cbtxn_ (letters and "
                "digits follow)."
            )
        return evidence


class PayoutRetryForm(forms.Form):
    note = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What you found at Stripe (no credit of this payout in the deleted "
        "customer's balance transactions, or a credit the seller never used; who checked): "
        "kept in the seller's audit log.",
    )


@admin.register(MarketPayout)
class MarketPayoutAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "seller",
        "amount",
        "currency",
        "method",
        "destination",
        "deleted_destination",
        "status",
        "stripe_object_id",
        "last_error",
        "may_have_paid",
        "send_attempts",
        "retry_allowed_at",
        "lost",
        "created_at",
    ]
    list_filter = ["status", "method", PayoutHoldingFilter]

    def get_queryset(self, request):
        return payouts_with_losses(super().get_queryset(request))

    @admin.display(
        description="lost (refunds and disputes of its sales, the platform's)",
        ordering="lost",
    )
    def lost(self, payout) -> int:
        return payout.lost

    search_fields = ["seller__slug", "destination", "stripe_object_id"]
    actions = ["retry_payouts", "mark_paid_at_stripe"]

    def has_retry_permission(self, request) -> bool:
        """Paying a seller (or saying they were paid): the change permission, though payouts
        stay read-only here."""
        return request.user.has_perm("gymbilling.change_marketpayout")

    @admin.action(
        description="Mark paid at Stripe (an earlier send did credit the deleted customer)",
        permissions=["retry"],
    )
    def mark_paid_at_stripe(self, request, queryset):
        """A page showing the payout and asking for the balance transaction and a note
        (Django's intermediate action page, as "delete selected"); then payout_mark_paid.
        One payout at a time: each has a balance transaction of its own."""
        from gymbilling.market.services import (
            PAYOUT_MARKABLE,
            payout_mark_paid,
            payout_not_markable,
        )

        if len(queryset) != 1:
            self.message_user(
                request,
                "Select one payout: each is marked paid with its own balance transaction.",
                messages.WARNING,
            )
            return None
        markable = queryset.filter(PAYOUT_MARKABLE).select_related("seller")
        if not markable:
            refused = payout_not_markable(queryset.get())
            self.message_user(request, f"{refused.message} ({refused.code})", messages.ERROR)
            return None
        form = PayoutMarkPaidForm(request.POST if "_mark_paid" in request.POST else None)
        if form.is_valid():
            payout = markable.get()
            try:
                payout_mark_paid(
                    payout_id=payout.pk,
                    note=form.cleaned_data["note"],
                    evidence=form.cleaned_data["evidence"],
                    actor=request.user,
                )
            except ApplicationError as exc:
                self.message_user(request, f"{exc.message} ({exc.code})", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"Payout {payout.pk} recorded as paid at Stripe "
                    f"({form.cleaned_data['evidence']}); the seller's payouts are no longer "
                    "held.",
                    messages.SUCCESS,
                )
            return None  # back to the list
        return action_page(
            self,
            request,
            "admin/gymbilling/payout_mark_paid.html",
            title="Mark a refused payout paid at Stripe",
            action="Mark paid at Stripe",
            action_name="mark_paid_at_stripe",
            payouts=markable,
            form=form,
        )

    @admin.action(
        description="Retry: the cause is fixed, pay the seller's available proceeds now",
        permissions=["retry"],
    )
    def retry_payouts(self, request, queryset):
        """Retried at once; but a selection with a payout an earlier send may have paid
        (which a retry pays again) first shows a page asking for a note, as "Mark paid at
        Stripe" does, kept in the seller's audit log."""
        from gymbilling.market.services import PAYOUT_MARKABLE, payouts_retry

        note = ""
        may_have_paid = queryset.filter(PAYOUT_MARKABLE).select_related("seller")
        if may_have_paid:
            form = PayoutRetryForm(request.POST if "_retry" in request.POST else None)
            if not form.is_valid():
                return action_page(
                    self,
                    request,
                    "admin/gymbilling/payout_retry.html",
                    title="Retry refused payouts that may have paid the seller",
                    action="Retry",
                    action_name="retry_payouts",
                    payouts=may_have_paid,
                    selected=list(queryset.values_list("pk", flat=True)),
                    form=form,
                )
            note = form.cleaned_data["note"]
        results = payouts_retry(
            payout_ids=list(queryset.values_list("pk", flat=True)), note=note, actor=request.user
        )
        if not results:
            self.message_user(
                request, "No refused payout waiting for finance selected.", messages.WARNING
            )
            return
        results_message(self, request, results, row="payout", done=PayoutStatus.SENT)


@admin.register(MarketReversal)
class MarketReversalAdmin(ReadOnlyAdmin):
    list_display = [
        "key",
        "order",
        "amount",
        "unapplied",
        "fee_reversed",
        "seller_reversed",
        "loss",
        "credits_lost",
        "credits_reinstated",
        "reinstated_at",
    ]


@admin.register(MoneyAccount)
class MoneyAccountAdmin(AccountBalanceAdmin):
    entry_model = MoneyEntry
    list_display = ["id", "kind", "organization", "currency", "true_balance"]
    list_filter = ["kind", "currency"]
    list_select_related = ["organization"]  # one query for the page, not one per seller


@admin.register(MoneyTransaction)
class MoneyTransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "idempotency_key", "currency", "organization", "created_at"]
    list_filter = ["kind", "currency"]
    search_fields = ["idempotency_key"]


_REVERSAL_COLUMNS = [
    ("customer", lambda row: row["customer"]),
    ("currency", lambda row: row["currency"]),
    ("refunded (minor units)", number_cell("refunded")),
    ("disputed (minor units)", number_cell("disputed")),
    ("of which disputes won", number_cell("disputes_won")),
    ("credits taken back unspent", credits_cell("credits_clawed_back")),
    ("credits already used", credits_cell("credits_used")),
    ("marketplace refunded or disputed (minor units)", number_cell("market_reversed")),
    ("of which platform fees", number_cell("market_fees_reversed")),
    ("of which losses (sellers already paid)", number_cell("market_losses")),
    (
        "marketplace refunded or disputed beyond what was sold (minor units)",
        number_cell("market_unapplied"),
    ),
]


def reversals_table(*, start, end) -> ReportTable:
    """The revenue report's refunds and disputes per customer, with totals per currency."""
    rows = reversals_by_customer(start=start, end=end)
    totals = rows_summed(rows, keys=("currency",), sums=REVERSAL_SUMS, label={"customer": "total"})
    return report_table(
        key="reversals",
        title="Refunds and disputes per customer",
        columns=_REVERSAL_COLUMNS,
        rows=rows,
        totals=totals,
        empty="No refund or dispute in these days.",
    )


_MARKET_FEE_COLUMNS = [
    ("currency", lambda row: row["currency"]),
    ("fills delivered", number_cell("fills")),
    ("marketplace volume (minor units)", number_cell("volume")),
    ("fees earned (minor units)", number_cell("fees_earned")),
    ("fees returned by refunds and disputes (minor units)", number_cell("fees_returned")),
    (
        "fees reinstated by disputes won and refunds failed (minor units)",
        number_cell("fees_reinstated"),
    ),
    ("fee income (minor units)", number_cell("fee_income")),
]


def market_fees_table(*, start, end) -> ReportTable:
    """The revenue report's marketplace fee income, one row per currency (each row is that
    currency's total: nothing to add up across them)."""
    return report_table(
        key="marketplace_fees",
        title="Marketplace fee income",
        columns=_MARKET_FEE_COLUMNS,
        rows=market_fee_income(start=start, end=end),
        totals=[],
        empty="No marketplace sale, refund or dispute in these days.",
    )


# The usage records' admin, whose revenue report gains the refunds and disputes and the
# marketplace's fees that only billing knows (metering knows nothing of payments; DESIGN:
# gymbilling keeps the finance reports). Registered again here, after metering's admin
# registered it.
admin.site.unregister(UsageRecord)


@admin.register(UsageRecord)
class BilledUsageRecordAdmin(UsageRecordAdmin):
    def report_tables(self, *, start, end, group_by):
        return [
            *super().report_tables(start=start, end=end, group_by=group_by),
            reversals_table(start=start, end=end),
            market_fees_table(start=start, end=end),
        ]
