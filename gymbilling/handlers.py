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
import functools

import django
from django.core.handlers.wsgi import WSGIHandler, WSGIRequest
from django.utils.http import parse_header_parameters

# Printable ASCII, and the escapes an escape-decoding codec would rewrite. A query string
# is ASCII by the URL's rules, and Django decodes it with the request's charset: a charset
# must read this unchanged to be taken. Some codecs Python calls text do not: `undefined`
# raises on anything, `idna` and `punycode` refuse it, `utf-16` misreads it, and
# `unicode_escape` / `raw_unicode_escape` rewrite backslashes (in the body too). The
# backslash only in escapes that codec knows (`\\` among them): one before another
# character (`\]`) is an invalid escape, which `unicode_escape` decodes with a
# DeprecationWarning on every first request that names it.
_ASCII_PROBE = bytes(b for b in range(0x20, 0x7F) if b != 0x5C) + rb"\\\n\x41\u0041"


# Asked twice per request that names a charset (building the request, then the
# middleware), with a handful of names in practice; bounded, as the names are the
# sender's.
@functools.lru_cache(maxsize=64)
def is_text_charset(charset: str) -> bool:
    """Whether `charset` names a codec that reads ASCII as ASCII (not base64, zlib, idna...)."""
    try:
        codec = codecs.lookup(charset)
        ascii_text = _ASCII_PROBE.decode("ascii")
        # Both ways: `idna` reads the probe but not every ASCII query (its labels),
        # and fails to write it back.
        return (
            codec._is_text_encoding
            and _ASCII_PROBE.decode(codec.name) == ascii_text
            and ascii_text.encode(codec.name) == _ASCII_PROBE
        )
    except (LookupError, ValueError):  # unknown, a name codecs cannot normalize, or refusing
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
