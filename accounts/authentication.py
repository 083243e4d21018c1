"""Who is calling: an API key (partner apps) or a signed-in user (the dashboard)."""

from __future__ import annotations

from dataclasses import dataclass

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication

from accounts.errors import ApplicationError
from accounts.models import ApiKey, Organization
from accounts.services import apikey_authenticate


@dataclass
class KeyPrincipal:
    """`request.user` for API-key requests: the organization, acting through a key."""

    key: ApiKey

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    pk = None

    @property
    def organization(self) -> Organization:
        return self.key.organization

    def __str__(self) -> str:
        return self.key.prefix


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer gym_...`."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != self.keyword.lower() or not raw.strip():
            raise ApplicationError(
                code="authentication_failed",
                message="Use the header Authorization: Bearer <your API key>.",
                status=401,
            )
        key = apikey_authenticate(raw=raw.strip())
        return KeyPrincipal(key=key), key

    def authenticate_header(self, request):
        return self.keyword


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "gym_<id>_<secret>"}
