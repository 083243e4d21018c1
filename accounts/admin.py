from django import forms
from django.contrib import admin, messages
from django.contrib.admin import widgets
from django.contrib.auth.admin import GroupAdmin as BaseGroupAdmin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm
from django.contrib.auth.forms import UserChangeForm as BaseUserChangeForm
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.shortcuts import render
from django.utils import timezone

from accounts.dashboard import with_retry_after
from accounts.errors import ApplicationError
from accounts.forms import AdminEmailAuthenticationForm, storable_email_cleaned
from accounts.models import INVITATION_REVOKED_WITH_ITS_KEY, Invitation, Organization, User
from accounts.services import invitation_revoke, organization_entitlements_set, user_email_change
from accounts.services.organizations import ENTITLEMENT_FIELDS
from accounts.views import sign_in_count


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows that only services write (the ledger, what Stripe said, invitations): staff read
    them here and act through actions that call the services."""

    # Its page still builds the model's form (to list the fields it shows), and a URL
    # field's form field warns that Django 6 reads "example.com" as https, not http:
    # https now, the admin's own widget kept.
    formfield_overrides = {
        models.URLField: {"widget": widgets.AdminURLFieldWidget, "assume_scheme": "https"}
    }

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.display(description="sent by")
def sent_by(row) -> str:
    """A list column for rows that name who sent them (a job, a usage record): the API
    key's prefix, or the member signed in to the dashboard (its playground); "-" for
    neither (an operator's). Its admin selects `api_key` and `user` with the rows."""
    if row.user_id is not None:
        return f"dashboard ({row.user.email})"
    if row.api_key_id is not None:
        return row.api_key.prefix
    return "-"


class _LowerCaseEmail:
    """An address is stored lower-cased, as the manager and sign-up store it and as
    invitations compare it: one kept with capitals matches no invitation. And unique
    whatever its case: Ann@x and ann@x are one person. Checked as stored, as every
    service checks it (user_email_change, which a change goes through): one that NFKC
    stretches out of shape is the field's `invalid_email`, saying why."""

    def clean_email(self):
        email = storable_email_cleaned(self.cleaned_data["email"])
        if User.objects.filter(email__iexact=email).exclude(pk=self.instance.pk).exists():
            raise ValidationError("A user with that email address already exists.", code="unique")
        return email


class UserCreationForm(_LowerCaseEmail, AdminUserCreationForm):
    pass


class UserChangeForm(_LowerCaseEmail, BaseUserChangeForm):
    # Changing the address unverifies it (user_email_change) unless staff say here that
    # they checked the new one: "email verified", ticked already for the old address,
    # cannot say so.
    new_email_verified = forms.BooleanField(
        required=False,
        label="New address checked",
        help_text="Only with a new email address: tick if you have checked that the person "
        "reads mail at it, and it stays verified. Otherwise the new address is unverified "
        "and emailed a verification link; until it is followed, the account cannot sign in "
        "with its password, and managers cannot add it by the address.",
    )


# Staff sign in with their address in any case, as on the dashboard, and their attempts
# are limited as the dashboard's are (the same counts: one password store).
admin.site.login_form = AdminEmailAuthenticationForm
_admin_login = admin.site.login


def _admin_login_counted(request, extra_context=None):
    if request.method == "POST":
        try:
            sign_in_count(request)
        except ApplicationError as error:
            context = {
                **admin.site.each_context(request),
                "title": "Log in",
                "app_path": request.get_full_path(),
                "form": AdminEmailAuthenticationForm(request),  # unbound: no password check
                "username": request.POST.get("username", ""),
                "refusal": error,
            }
            response = render(request, "admin/login_refused.html", context, status=error.status)
            return with_retry_after(response, error)
    return _admin_login(request, extra_context)


admin.site.login = _admin_login_counted


def _permissions_of(user) -> set[str]:
    """The permissions the user holds, directly and through groups, whether active or not
    (ModelBackend counts none for an inactive account, which staff can reactivate)."""
    return {
        f"{app}.{codename}"
        for app, codename in Permission.objects.filter(Q(user=user) | Q(group__user=user))
        .values_list("content_type__app_label", "codename")
        .distinct()
    }


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    add_form = UserCreationForm
    form = UserChangeForm
    ordering = ["email"]
    list_display = ["email", "email_verified", "first_name", "last_name", "is_staff", "is_active"]
    list_filter = ["email_verified", "is_staff", "is_superuser", "is_active", "groups"]
    search_fields = ["email", "first_name", "last_name"]
    fieldsets = (
        (None, {"fields": ("email", "email_verified", "new_email_verified", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name")}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups")}),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "password1", "password2")}),)

    def save_model(self, request, obj, form, change):
        """A new address goes through user_email_change: unverified and emailed the link,
        unless staff ticked "New address checked" (UserChangeForm); the old address is
        told who changed it."""
        # Compared as stored (UserChangeForm.clean_email canonicalizes it): the form counts
        # "Ann@X" typed over "ann@x" as changed, but it is the same, proven, address.
        if not (change and "email" in form.changed_data and obj.email != form.initial["email"]):
            super().save_model(request, obj, form, change)
            return
        email = obj.email
        obj.email = form.initial["email"]  # the rest saved first, under the old address
        super().save_model(request, obj, form, change)
        user_email_change(
            user=obj,
            email=email,
            changed_by=request.user,
            verified=form.cleaned_data.get("new_email_verified", False),
        )

    # Who may do what in this admin: only superusers give it (a staff member with
    # change_user could otherwise make themselves a superuser).
    PRIVILEGE_FIELDS = ("is_superuser", "is_staff", "groups", "user_permissions")

    def get_readonly_fields(self, request, obj=None):
        readonly = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:
            readonly += [name for name in self.PRIVILEGE_FIELDS if name not in readonly]
        return readonly

    def has_change_permission(self, request, obj=None):
        """Not on an account that may do more than the staff member (a superuser, or one
        with a permission they lack), unless they are a superuser: setting its password or
        address would be signing in as it. They may still view it. Django's password page
        asks this too, and answers 403."""
        if not super().has_change_permission(request, obj):
            return False
        if obj is None or request.user.is_superuser or obj.pk == request.user.pk:
            return True
        return not obj.is_superuser and _permissions_of(obj) <= _permissions_of(request.user)

    def has_delete_permission(self, request, obj=None):
        # Staff deactivate a person (is_active) instead: a deleted user's audit trail
        # loses its actor, and the API keys they made must keep naming their creator
        # (ApiKey.created_by is PROTECT; a deactivated creator's admin keys are refused).
        return False


admin.site.unregister(Group)


@admin.register(Group)
class GroupAdmin(BaseGroupAdmin):
    """Groups are privileges: only superusers make, change or delete them. Staff with
    `auth.change_group` could otherwise add any permission (refunds, credit adjustments,
    changing users) to a group they belong to, and so to themselves, around UserAdmin's
    rule that only superusers give privileges. Others may view them."""

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "standing", "created_at"]
    search_fields = ["slug", "name"]

    def save_model(self, request, obj, form, change):
        """Entitlements (standing, tiers, priority, limits, seats) are written as billing
        writes them, through organization_entitlements_set: under the organization's row
        lock, and recorded in its audit log with the staff member's name. A plain save
        would write every column from the form, over what billing set meanwhile."""
        entitlements = {
            name: getattr(obj, name) for name in ENTITLEMENT_FIELDS if name in form.changed_data
        }
        if change:
            others = [name for name in form.changed_data if name not in ENTITLEMENT_FIELDS]
            if others:
                obj.save(update_fields=others)
        else:
            # Created with the defaults; what staff chose instead is set as a change.
            for name in entitlements:
                setattr(obj, name, Organization._meta.get_field(name).get_default())
            obj.save()
        if entitlements:
            organization_entitlements_set(
                organization=obj, reason=f"admin: set by {request.user}", **entitlements
            )


class InvitationStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [
            ("open", "Open"),
            ("expired", "Expired"),
            ("accepted", "Accepted"),
            ("revoked", "Revoked"),
        ]

    def queryset(self, request, queryset):
        # As Invitation.status reads each row.
        now = timezone.now()
        unused = queryset.filter(accepted_at__isnull=True, revoked_at__isnull=True).exclude(
            INVITATION_REVOKED_WITH_ITS_KEY
        )
        if self.value() == "open":
            return unused.filter(expires_at__gt=now)
        if self.value() == "expired":
            return unused.filter(expires_at__lte=now)
        if self.value() == "accepted":
            return queryset.filter(accepted_at__isnull=False)
        if self.value() == "revoked":
            return queryset.filter(accepted_at__isnull=True).filter(
                Q(revoked_at__isnull=False) | INVITATION_REVOKED_WITH_ITS_KEY
            )
        return queryset


@admin.register(Invitation)
class InvitationAdmin(ReadOnlyAdmin):
    """Invitations, read-only: staff see who invited whom to what, and revoke an open one
    (a leaked link, a sender who should not have sent it) through invitation_revoke, audited
    in the organization's log with their name. Made through the API and the dashboard
    only: the token is mailed when one is made, and never stored."""

    list_display = [
        "email",
        "organization",
        "role",
        "status",
        "invited_by",
        "invited_by_key",
        "expires_at",
        "created_at",
    ]
    list_filter = [
        InvitationStatusFilter,
        "role",
        ("organization", admin.RelatedOnlyFieldListFilter),
    ]
    list_select_related = ["organization", "invited_by", "invited_by_key"]
    search_fields = ["email", "organization__slug"]
    exclude = ["token_hash"]
    actions = ["revoke"]
    # Revoked, never deleted (ReadOnlyAdmin): the row is the record that the address was
    # invited, by whom.

    def has_revoke_permission(self, request) -> bool:
        """Revoking changes an invitation, though it stays read-only here."""
        return request.user.has_perm("accounts.change_invitation")

    @admin.display(description="status")
    def status(self, invitation) -> str:
        return invitation.status

    @admin.action(description="Revoke: the link admits nobody from now on", permissions=["revoke"])
    def revoke(self, request, queryset):
        said, all_revoked = [], True
        for invitation in queryset.select_related("organization").order_by("pk"):
            try:
                invitation_revoke(invitation=invitation, actor=request.user)
            except ApplicationError as error:
                all_revoked = False
                said.append(f"invitation to {invitation.email}: {error.message} ({error.code})")
            else:
                said.append(f"invitation to {invitation.email}: revoked")
        level = messages.SUCCESS if all_revoked else messages.WARNING
        self.message_user(request, "; ".join(said), level)
