"""Sealing stored secrets with keys derived from SECRET_KEY: one derivation for the project.

Each purpose (idempotent responses, webhook secrets) gets its own key, so a
value sealed for one cannot be opened as the other. Sealing uses SECRET_KEY;
opening also tries SECRET_KEY_FALLBACKS, so SECRET_KEY can be rotated the way
Django rotates it, without losing what was sealed before.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache

from cryptography.fernet import Fernet, MultiFernet
from django.conf import settings


@cache
def _fernet(purpose: str, secret_key: str) -> Fernet:
    digest = hashlib.sha256(f"gymbilling.{purpose}:".encode() + secret_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def sealer(purpose: str) -> MultiFernet:
    """Seals with SECRET_KEY's key for `purpose`; opens with it or any fallback's."""
    keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return MultiFernet([_fernet(purpose, key) for key in keys])
