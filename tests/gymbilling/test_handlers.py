"""The WSGI application gunicorn serves: a request with any charset gets an answer, never a 500.

Django's test client builds its request itself (not through `gymbilling.wsgi`), so
these call the application gunicorn loads, in this process and under gunicorn.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from wsgiref.util import setup_testing_defaults

import pytest

from gymbilling.wsgi import application

BINARY_CHARSETS = ["base64", "hex", "zlib", "rot13", "no-such-charset"]
# Codecs Python calls text that do not read ASCII as ASCII: each raised or misread the
# query string while Django built the request (a plain-text 500), or rewrote backslashes.
ASCII_MISREADING_CHARSETS = [
    "undefined",
    "idna",
    "punycode",
    "utf-16",
    "unicode_escape",
    "raw_unicode_escape",
]


def call(path: str, query: str, content_type: str) -> tuple[str, dict[str, str], bytes]:
    environ = {
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "CONTENT_TYPE": content_type,
        "HTTP_HOST": "testserver",
    }
    setup_testing_defaults(environ)
    started = {}

    def start_response(status, headers, exc_info=None):
        started.update(status=status, headers=dict(headers))

    response = application(environ, start_response)
    try:
        body = b"".join(response)
    finally:
        response.close()
    return started["status"], started["headers"], body


@pytest.mark.parametrize("charset", BINARY_CHARSETS + ASCII_MISREADING_CHARSETS)
def test_an_api_request_whose_charset_is_not_text_is_a_json_415(charset):
    # when (a percent-escape in the query: idna read it as too many fields, a 500)
    status, headers, body = call(
        "/api/v1/keys", "x=1&a=%41b", f"application/json; charset={charset}"
    )

    # then
    assert status.startswith("415 ")
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert (error["code"], error["type"]) == ("unsupported_media_type", "invalid_request_error")


def test_a_page_request_whose_charset_is_not_text_is_a_415_page():
    # when
    status, _, body = call("/ping", "x=1", "application/json; charset=base64")

    # then
    assert status.startswith("415 ")
    assert b'data-error-code="unsupported_media_type"' in body


def test_a_text_charset_is_served_as_before():
    # when
    status, _, body = call("/ping", "x=1", "application/json; charset=latin-1")

    # then
    assert status.startswith("200 ") and body == b"pong"


def test_under_gunicorn_a_binary_charset_is_a_json_415(app_server):
    # given
    request = urllib.request.Request(
        f"{app_server}/api/v1/keys?x=1",
        headers={"Content-Type": "application/json; charset=zlib"},
    )

    # when
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)

    # then
    assert refused.value.code == 415
    assert json.loads(refused.value.read())["error"]["code"] == "unsupported_media_type"
