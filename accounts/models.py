"""Identity and tenancy: users, organizations, roles, API keys, entitlements, audit.

Credits belong to organizations. Billing decides what an organization may do
and writes it here as entitlements (DESIGN.md); the API and inference read
entitlements, never plans.
"""

from __future__ import annotations

import unicodedata

from django.conf import settings
from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Lower
from django.utils import timezone

from accounts.errors import ApplicationError


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    @classmethod
    def canonical_email(cls, email: str | None) -> str:
        """An address in the one form it is stored and compared in: NFKC-normalized and
        lower-cased, so that Ann@X and ann@x are one person (sign-up, sign-in, the admin,
        invitations).

        NFKC as Django's sign-in form normalizes what is typed (UsernameField): without
        it, sign-up stored "ada@\uff45xample.test" (a fullwidth e) beside
        "ada@example.test" as a second account, which no sign-in could then reach.
        """
        return unicodedata.normalize("NFKC", cls.normalize_email(email or "")).lower()

    @classmethod
    def storable_email(cls, email: str | None) -> str:
        """`email` in its canonical form, checked again as the column takes it: a valid
        address of at most 254 characters; else 400 `invalid_email` naming `email`.

        Forms and serializers check the address as typed, but NFKC may stretch it: each
        U+FDFA is 18 characters, spaces among them, each U+FB03 the three letters "ffi".
        Stored unchecked, such an address was a 500 (the column's limit) or one that no
        mail reaches. Every service that stores a typed address takes it from here.
        """
        canonical = cls.canonical_email(email)
        try:
            User._meta.get_field("email").clean(canonical, None)
        except ValidationError:
            raise ApplicationError(
                code="invalid_email",
                message="Enter a valid email address of at most 254 characters, in plain "
                "letters: in the form it is stored in (Unicode NFKC, lower case) this one is "
                "not valid, or is longer.",
                param="email",
                # Checked before anything is written: a corrected retry may reuse the
                # Idempotency-Key (accounts.api_base._REFUSED_BEFORE_WORK).
                refuses_input=True,
            ) from None
        return canonical

    def _create_user(self, email: str, password: str | None, **extra) -> User:
        if not email:
            raise ValueError("An email address is required.")
        user = self.model(email=self.canonical_email(email), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **extra) -> User:
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create_user(email, password, **extra)

    def create_superuser(self, email: str, password: str | None = None, **extra) -> User:
        extra["is_staff"] = True
        extra["is_superuser"] = True
        return self._create_user(email, password, **extra)


class User(AbstractUser):
    """A person. Signs in with an email address; there is no username."""

    username = None
    email = models.EmailField("email address", unique=True)
    # Whether the person proved they read mail at `email`. Only self-service sign-up
    # (user_signup) makes an unverified account, and staff changing an address unverify
    # it (user_email_change), until its owner follows the emailed link or accepts an
    # invitation sent to the address; anyone may sign up under any address,
    # so nothing may trust an unverified one (user_by_email does not find it). Every other
    # way a user is made (the admin, createsuperuser, the manager, operator commands) is
    # an operator's, and verified.
    email_verified = models.BooleanField(
        "email verified",
        default=True,
        # Also the database's default: a process not yet upgraded inserts users without
        # the column during a rolling deploy, and gets what this code would give them.
        db_default=True,
        help_text="False for an account made by signing up, until its owner confirms the "
        "link emailed to the address or accepts an invitation sent to it.",
    )
    # Whether an address of this account was proven before staff changed it (to one not
    # yet proven: user_email_change). A password reset reclaims an account whose address
    # nobody ever proved from whoever signed up with it, revoking the keys they made
    # (user_password_reset_done); an account that had proven an earlier address was its
    # owner's, and a reset after staff moved it to a new address must leave its keys be.
    # Written only by user_email_change; while `email_verified`, it says nothing.
    email_previously_verified = models.BooleanField(
        "email previously verified",
        default=False,
        # A process not yet upgraded that inserts a user has not changed its address.
        db_default=False,
        help_text="True once staff changed the address of an account whose address had been "
        "verified: a password reset then does not treat it as reclaimed from a squatter.",
    )

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    objects = UserManager()

    class Meta(AbstractUser.Meta):
        constraints = [
            # Every writer lower-cases the address (the manager, sign-up, the
            # admin's forms); this index holds it for any that does not: Ann@x
            # and ann@x are one person, and one account.
            models.UniqueConstraint(Lower("email"), name="user_email_unique_any_case"),
        ]

    def __str__(self) -> str:
        return self.email


def model_tiers_problem(value) -> str | None:
    """Why `value` is not a list of access tier names, or None when it is one.

    The column is JSON, so a form takes "pro" or 3 as readily as ["pro"]; inference
    reads the entitlement as a list, and a string would grant its letters as tiers.
    """
    if isinstance(value, list) and all(isinstance(tier, str) and tier for tier in value):
        return None
    return 'A JSON list of access tier names, e.g. ["basic", "pro"].'


class Standing(models.TextChoices):
    ACTIVE = "active", "Active"
    PAST_DUE = "past_due", "Past due (grace period)"
    SUSPENDED = "suspended", "Suspended"


class Priority(models.TextChoices):
    """A job's priority. Here, not in inference, because an organization's
    entitlement names one (max_priority), and accounts imports no other app."""

    BATCH = "batch", "Batch"
    STANDARD = "standard", "Standard"
    PRIORITY = "priority", "Priority"


class Organization(models.Model):
    """The tenant. Wallets, keys, subscriptions and jobs all belong to one.

    The entitlement fields are written by billing whenever the subscription
    changes; until a plan exists the defaults below apply.
    """

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    personal = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    # --- entitlements (written by billing) ---
    standing = models.CharField(max_length=16, choices=Standing.choices, default=Standing.ACTIVE)
    seats = models.PositiveIntegerField(default=1)
    model_tiers = models.JSONField(default=list, blank=True)  # access tiers allowed, e.g. ["basic"]
    max_priority = models.CharField(
        max_length=16, choices=Priority.choices, default=Priority.STANDARD
    )
    requests_per_minute = models.PositiveIntegerField(default=60)
    tokens_per_minute = models.PositiveIntegerField(default=100_000)
    concurrent_jobs = models.PositiveIntegerField(default=4)
    store_prompts = models.BooleanField(default=False)  # opt-in: prompts are not kept otherwise

    class Meta:
        ordering = ["pk"]
        constraints = [
            # Inference ranks the entitlement; an unknown value used to rank as
            # "standard" silently (written by a script, a shell, a bad import).
            models.CheckConstraint(
                condition=Q(max_priority__in=Priority.values),
                name="organization_max_priority_known",
            ),
        ]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        if self.model_tiers is None:  # the admin's empty field: no tiers beyond the default
            self.model_tiers = []
        if problem := model_tiers_problem(self.model_tiers):
            raise ValidationError({"model_tiers": problem})

    @property
    def in_good_standing(self) -> bool:
        return self.standing != Standing.SUSPENDED


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    BILLING = "billing", "Billing"
    MEMBER = "member", "Member"


def roles_grantable_by(role: str | None) -> frozenset[str]:
    """The roles someone holding `role` in an organization may give there (invite to, add,
    set): an owner any, an admin any but owner, anyone else (or no one: None) none. What
    the membership services require of a person acting (_require_manager and
    _require_owner_for in accounts.services.organizations), as a set: what an invitation
    they sent may still grant when it is accepted, or when they are demoted."""
    if role == Role.OWNER:
        return frozenset(Role.values)
    if role == Role.ADMIN:
        return frozenset(Role.values) - {Role.OWNER}
    return frozenset()


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "organization"], name="membership_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}@{self.organization_id}:{self.role}"


# An invitation sent with an API key that was revoked while the invitation was still open:
# withdrawn with the key (a revoked key vouches for nothing it did), whatever its own
# `revoked_at` says. apikey_revoke closes such invitations as it revokes the key, and the
# migration accounts 0011 those of keys revoked before it did; neither touches one that has
# expired by then, so an invitation of a key revoked before that change, which expired
# before 0011 ran, kept an empty `revoked_at` and read as merely expired. One whose key was
# revoked after it expired did expire: it is not this.
INVITATION_REVOKED_WITH_ITS_KEY = Q(invited_by_key__revoked_at__lt=F("expires_at"))


class Invitation(models.Model):
    """An email invitation to join an organization; the token is stored hashed."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="invitations"
    )
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    # The API key that sent it, when one did (invited_by is then empty): an admin key acts
    # for its creator, so the invitation stands only while the creator may still grant its
    # role (accounts.selectors.invitation_to_accept), and goes when they are removed or
    # demoted. RESTRICT: a key is never deleted on its own, only with its organization,
    # whose invitations go with it.
    invited_by_key = models.ForeignKey(
        "ApiKey", on_delete=models.RESTRICT, null=True, blank=True, related_name="+"
    )
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "email"],
                condition=Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="invitation_one_open_per_email",
            ),
        ]

    def __str__(self) -> str:
        return f"invitation {self.email} -> {self.organization_id}"

    @property
    def status(self) -> str:
        """accepted, revoked (by hand, with its sender, or with its key: see
        INVITATION_REVOKED_WITH_ITS_KEY), expired or open. Reads `invited_by_key`: select it
        with the invitation where many are listed."""
        if self.accepted_at:
            return "accepted"
        key = self.invited_by_key if self.invited_by_key_id else None
        if self.revoked_at or (key and key.revoked_at and key.revoked_at < self.expires_at):
            return "revoked"
        return "expired" if self.expires_at <= timezone.now() else "open"


class Scope(models.TextChoices):
    INFERENCE = "inference", "Inference"
    BILLING_READ = "billing:read", "Billing (read)"
    MARKETPLACE = "marketplace", "Marketplace"
    ADMIN = "admin", "Organization admin (keys, members)"


class ApiKey(models.Model):
    """A partner app's credential: `gym_<public id>_<secret><checksum>`.

    Only a hash of the whole key and its displayable prefix are stored; the
    key is shown once, when created.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    public_id = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    # Optional per-key ceiling under the organization's limit.
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    # An admin-scoped key acts with its creator's role (accounts.api_base), and a key with
    # no creator is an operator's, whose scope alone decides: deleting the creator must
    # not turn their keys into operator keys. People leave by deactivation instead.
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # The key that made this one (POST /api/v1/keys with a key); null when a person or an
    # operator made it, and on every key made before migration 0012, which recorded none.
    # apikey_revoke revokes a key's descendants with it, so a leaked key's children die
    # with it. RESTRICT, not SET_NULL: a parent deleted would free its children from the
    # revocation and the limit they owe it; nothing deletes keys (they are revoked), and
    # unlike PROTECT, deleting their organization still deletes the whole line at once.
    parent = models.ForeignKey(
        "self", on_delete=models.RESTRICT, null=True, blank=True, related_name="children"
    )
    # The first key of this key's line: its parent's limit_root, or its parent; null when
    # it has no parent. Never changes once set. The rate limit reads ancestor_limits
    # (below), which holds this key's bucket when it has a limit; the release before it
    # counted in this key's bucket alone, and still does while a deploy replaces it.
    limit_root = models.ForeignKey(
        "self", on_delete=models.RESTRICT, null=True, blank=True, related_name="+"
    )
    # Every ancestor of this key (its parent, that key's parent, up to limit_root) that has
    # a requests_per_minute of its own, root first: [{"id", "public_id",
    # "requests_per_minute"}]. A request with this key counts in each one's per-key bucket
    # too (accounts.api_base), so a key in the middle of a line, limited to 10 a minute,
    # binds every key made below it, not only the first key's limit. Written by
    # apikey_create from its parent's, so the request path reads it with the key in one
    # query (api_keys._key_load), with no walk up the line. A snapshot: it holds because a
    # key's requests_per_minute never changes once made (no service changes it; one that
    # does must rewrite this list on every descendant in its transaction). [] for a key
    # with no limited ancestor; null on keys made before migration 0013 (and by the
    # release before, during its deploy): read by walking `parent` instead.
    ancestor_limits = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-pk"]

    def __str__(self) -> str:
        return f"{self.prefix} ({self.name})"

    @property
    def prefix(self) -> str:
        return f"gym_{self.public_id}"


class AuditEvent(models.Model):
    """A security-relevant action, readable by the organization's owners and admins."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="audit_events", null=True
    )
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    actor_key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    action = models.CharField(max_length=64)
    target = models.CharField(max_length=200, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-pk"]
        indexes = [models.Index(fields=["organization", "-id"])]

    def __str__(self) -> str:
        return f"{self.action} {self.target}"


class IdempotencyRecord(models.Model):
    """The first response to a POST with an Idempotency-Key, replayed for 24 hours."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="idempotency_records"
    )
    key = models.CharField(max_length=255)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=500)
    request_hash = models.CharField(max_length=64)
    # Who sent the first request ("key:<id>" or "user:<id>"); only they get its
    # replay. Empty on records written before the column existed, and on those
    # a process not yet upgraded writes (db_default: its inserts leave the
    # column out); accounts.idempotency._same_request says how those match.
    # They expire with their 24 hours.
    caller = models.CharField(max_length=64, blank=True, db_default="")
    # Null while the first request is still running: a retry then gets 409.
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    content_type = models.CharField(max_length=200, blank=True)
    body = models.BinaryField(null=True, blank=True)
    # The response's own headers a replay sends again (accounts.idempotency:
    # the credits charged, the job's id, a model's Sunset), not the rate
    # limits of the request that was answered.
    headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "key"], name="idempotency_key_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.organization_id}:{self.key}"


class WebhookSecret(models.Model):
    """An organization's `whsec_...` secret, which signs the webhooks we send it.

    Unlike an API key it must be read back to sign, so it is stored encrypted
    (Fernet; accounts.services.webhook_secrets), never in the clear. After a
    rotation the previous secret may keep signing, beside the new one, until
    `previous_expires_at`, so receivers can switch without dropping events.
    """

    organization = models.OneToOneField(
        Organization, on_delete=models.CASCADE, related_name="webhook_secret"
    )
    secret_sealed = models.BinaryField()
    previous_sealed = models.BinaryField(null=True, blank=True)
    previous_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"webhook secret of {self.organization_id}"
