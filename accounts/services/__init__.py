"""Every write of identity and tenancy. Import services from here."""

from accounts.services.api_keys import apikey_authenticate, apikey_create, apikey_revoke
from accounts.services.audit import audit_record
from accounts.services.email_verification import (
    user_email_change,
    user_email_verification_send,
    user_email_verify,
)
from accounts.services.organizations import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_add,
    membership_remove,
    membership_set_role,
    organization_create,
    organization_entitlements_set,
    user_signup,
)
from accounts.services.webhook_secrets import (
    webhook_secret_reveal,
    webhook_secret_rotate,
    webhook_signing_secrets,
)

__all__ = [
    "apikey_authenticate",
    "apikey_create",
    "apikey_revoke",
    "audit_record",
    "invitation_accept",
    "invitation_create",
    "invitation_revoke",
    "membership_add",
    "membership_remove",
    "membership_set_role",
    "organization_create",
    "organization_entitlements_set",
    "user_email_change",
    "user_email_verification_send",
    "user_email_verify",
    "user_signup",
    "webhook_secret_reveal",
    "webhook_secret_rotate",
    "webhook_signing_secrets",
]
