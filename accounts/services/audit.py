"""The audit log: who did what, to what, in which organization."""

from __future__ import annotations

from typing import Any

from accounts.models import ApiKey, AuditEvent, Organization


def audit_record(
    *,
    organization: Organization | None,
    action: str,
    target: str = "",
    actor_user=None,
    actor_key: ApiKey | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Record a security-relevant action. Call inside the transaction that did it."""
    return AuditEvent.objects.create(
        organization=organization,
        action=action,
        target=target[:200],
        actor_user=actor_user if getattr(actor_user, "pk", None) else None,
        actor_key=actor_key,
        data=data or {},
    )
