"""The WSGI handler gunicorn serves: Django's, with a request that survives any charset.

Django takes a request's `charset` parameter as its encoding whenever `codecs`
knows the name, binary codecs included (base64, hex, zlib, rot13); with a query
string, building the request then decodes it with that codec and raises
LookupError before any middleware runs: a plain-text 500. Here such a charset is
not taken (the request keeps the default encoding), so the request is built and
`ApiErrorMiddleware` answers it with a 415 in the one error shape. ASGI requests
decode their query string without the charset, so ASGI needs only the middleware.
"""

from __future__ import annotations

import codecs

import django
from django.core.handlers.wsgi import WSGIHandler, WSGIRequest
from django.utils.http import parse_header_parameters


def is_text_charset(charset: str) -> bool:
    """Whether `charset` names a codec that decodes bytes to text (not base64, zlib...)."""
    try:
        return codecs.lookup(charset)._is_text_encoding
    except (LookupError, ValueError):  # unknown, or a name codecs cannot normalize
        return False


class GymWSGIRequest(WSGIRequest):
    def _set_content_type_params(self, meta):
        # As Django's, but a charset that is not a text encoding is not taken as the
        # encoding (see the module docstring); the middleware refuses the request.
        self.content_type, self.content_params = parse_header_parameters(
            meta.get("CONTENT_TYPE", "")
        )
        charset = self.content_params.get("charset")
        if charset is not None and is_text_charset(charset):
            self.encoding = charset


class GymWSGIHandler(WSGIHandler):
    request_class = GymWSGIRequest


def get_wsgi_application() -> GymWSGIHandler:
    """As `django.core.wsgi.get_wsgi_application`, with the request above."""
    django.setup(set_prefix=False)
    return GymWSGIHandler()
