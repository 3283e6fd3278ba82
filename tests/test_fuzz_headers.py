"""Fuzzing header handling (kproxy/headers.py ``request_headers`` and ``response_headers``,
and the heads kproxy/http1.py writes and reads).

Requests come in as gunicorn hands them over: a WSGI environ with ``HTTP_*`` keys (repeated
fields joined with ``,``, names with ``_`` dropped, ``CONTENT_TYPE``/``CONTENT_LENGTH``
without the prefix). Responses come in as ``kproxy.http1`` reads them from the upstream's
header block on a real socket (field lines in the order received).

Properties (RFC 9110 §7.6.1, CONTRACT.md "HTTP behaviour", README.rst "Forwarding"):

- no hop-by-hop header (``headers.HOP_BY_HOP``) and no header named by any ``Connection``
  token comes out, in either direction; ``Expect`` is not forwarded either (the server
  answered ``100 Continue`` itself);
- every other header comes out with its value unchanged: repeated request fields as the
  one joined value the environ holds, repeated response fields (``Set-Cookie``) one per line
  in their order;
- ``Host`` is the one given (pass_host node/rewrite) or else the client's; nothing is
  added (no ``User-Agent`` or ``Accept-Encoding`` of kproxy's own);
- the request head kproxy writes carries exactly those fields, and a value with a line
  break or NUL in it is refused rather than written;
- whatever bytes an upstream sends as a head, reading it gives a response or
  ``InvalidResponse``/``ClosedEarly`` (a 502), never another exception.

Run: ``python -m pytest tests/test_fuzz_headers.py``.
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy import http1
from kproxy.headers import HOP_BY_HOP, request_headers, response_headers

# more examples for a longer run: KPROXY_FUZZ_SCALE=10 python -m pytest tests/test_fuzz_*.py
SCALE = float(os.environ.get("KPROXY_FUZZ_SCALE", "1"))

NOT_FORWARDED = HOP_BY_HOP | {"expect"}
END_TO_END = ["Host", "User-Agent", "Accept-Encoding", "Accept", "Content-Type", "Content-Length",
              "Cookie", "Set-Cookie", "Authorization", "X-Forwarded-For", "X-Request-Id", "Via",
              "Cache-Control", "X-Custom", "X-A-B-C", "Trailers", "Keep-Alive2", "Te-X", "Content-Encoding"]
NAMES = sorted(HOP_BY_HOP) + ["Expect"] + END_TO_END
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def case_variants(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.swapcase()]) | st.lists(
        st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c.lower() for c, f in zip(name, flips)))


names = st.one_of(st.sampled_from(NAMES).flatmap(case_variants),
                  st.text(TOKEN_CHARS, min_size=1, max_size=12))
# field values as a server hands them over: visible ASCII, inner spaces and tabs, latin-1 obs-text
field_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f")
                       | st.just("\t"), max_size=30).map(str.strip)


@st.composite
def connection_values(draw) -> str:
    """A Connection value: tokens naming headers (hop-by-hop, end-to-end, unknown), in any
    case, with odd spacing and empty list elements."""
    tokens = draw(st.lists(names | st.sampled_from(["close", "keep-alive", "Upgrade", ""]), max_size=5))
    spaces = st.sampled_from(["", " ", "  ", "\t"])
    return ",".join(draw(spaces) + t + draw(spaces) for t in tokens).strip()


@st.composite
def header_lists(draw) -> list[tuple[str, str]]:
    headers = []
    for _ in range(draw(st.integers(0, 14))):
        name = draw(names)
        value = draw(connection_values()) if name.lower() == "connection" else draw(field_values)
        headers.append((name, value))
        if draw(st.integers(0, 5)) == 0:  # repeated fields: same name, maybe another case
            headers.append((draw(case_variants(name)), draw(field_values)))
    if draw(st.booleans()):
        headers.append((draw(case_variants("Connection")), draw(connection_values())))
    return headers


def connection_tokens(values: list[str]) -> set[str]:
    return {token.strip().lower() for value in values for token in value.split(",")} - {""}


# -- requests --

def gunicorn_environ(headers: list[tuple[str, str]]) -> dict[str, str]:
    """What gunicorn (kproxy.worker's base) puts in the environ for these request headers."""
    environ: dict[str, str] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}
    repeated: dict[str, list[str]] = {}
    for name, value in headers:
        name = name.upper()
        if "_" in name:  # header_map = "drop"
            continue
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
            continue
        if name == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
            continue
        key = "HTTP_" + name.replace("-", "_")
        if key in environ:
            repeated.setdefault(key, [environ[key]]).append(value)
        else:
            environ[key] = value
    for key, values in repeated.items():
        environ[key] = ",".join(values)
    return environ


def expected_request_headers(environ: dict[str, str]) -> dict[str, str]:
    """The model: lower-cased name -> value that must be sent upstream. Host and the
    framing are never copied (the gateway writes them itself), and no Connection token can
    make them hop-by-hop."""
    fields = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
              if key.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        fields["content-type"] = environ["CONTENT_TYPE"]
    named = connection_tokens([fields.get("connection", "")]) - {"content-length", "transfer-encoding", "host"}
    dropped = NOT_FORWARDED | {"host", "content-length"} | named
    return {name: value for name, value in fields.items() if name not in dropped}


@settings(max_examples=int(250 * SCALE), deadline=None)
@given(header_lists())
def test_request_headers_drop_hop_by_hop_and_connection_tokens_and_keep_the_rest(headers):
    environ = gunicorn_environ(headers)
    out = request_headers(environ)
    lowered = {name.lower(): value for name, value in out.items()}
    assert len(lowered) == len(out), f"a header twice in different case: {sorted(out)}"
    assert lowered == expected_request_headers(environ)
    # the property itself, independent of the model above
    named = connection_tokens([environ.get("HTTP_CONNECTION", "")])
    assert not set(lowered) & (HOP_BY_HOP | named | {"host", "content-length"})
    # and the head on the wire carries exactly these fields
    head = http1.request_head("GET", "/", out, "node:80", None).decode("latin-1")
    request_line, *lines = head.split("\r\n")[:-2]
    assert request_line == "GET / HTTP/1.1"
    assert [tuple(line.split(": ", 1)) for line in lines] == list({"Host": "node:80", **out}.items())


@settings(max_examples=int(100 * SCALE), deadline=None)
@given(st.tuples(st.text(st.characters(max_codepoint=0xFF), max_size=10), st.sampled_from(["\r", "\n", "\0", "\r\n"]),
                 st.text(st.characters(max_codepoint=0xFF), max_size=10)).map("".join))
def test_a_header_value_that_would_break_the_head_is_refused(value):
    with pytest.raises(http1.InvalidRequest):
        http1.request_head("GET", "/", {"X-Value": value}, "node:80", None)


# -- responses --

def read_head(data: bytes) -> http1.Response:
    """What kproxy reads from an upstream that sent these bytes and closed."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.close()
        return http1.read_response(ours, "GET")


def upstream_response(headers: list[tuple[str, str]]) -> http1.Response:
    """The response kproxy reads from an upstream that sent these header lines."""
    block = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers) + b"\r\n"
    return read_head(b"HTTP/1.1 200 OK\r\n" + block)


@settings(max_examples=int(250 * SCALE), deadline=None)
@given(header_lists())
def test_response_headers_drop_hop_by_hop_and_connection_tokens_and_keep_the_rest(headers):
    if any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        headers = [(n, v) for n, v in headers if n.lower() not in ("content-length", "transfer-encoding")]
    response = upstream_response(headers)
    out = response_headers(response)
    # the model: every field line in the order received, minus hop-by-hop ones and those
    # a Connection line names
    received = [(name.lower(), value) for name, value in response.headers]
    assert received == [(name.lower(), value.strip()) for name, value in headers]
    dropped = HOP_BY_HOP | connection_tokens([v for n, v in headers if n.lower() == "connection"])
    assert [(name.lower(), value) for name, value in out] == \
        [(name, value) for name, value in received if name not in dropped]
    # Set-Cookie lines stay apart, in their order
    assert [v for n, v in out if n.lower() == "set-cookie"] == \
        ([v.strip() for n, v in headers if n.lower() == "set-cookie"] if "set-cookie" not in dropped else [])


@settings(max_examples=int(300 * SCALE), deadline=None)
@given(st.binary(max_size=300) | st.lists(st.sampled_from([
    b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Switching",
    b"HTTP/2 200", b"HTTP/1.1 99 Low", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 5, 6",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b" folded", b"\tfolded", b"X-A: b",
    b"Bad Name: x", b"NoColon", b"X: a\rb", b"X: \x00", b"", b"\n"]), max_size=8).map(b"\r\n".join))
def test_any_response_head_is_read_or_refused_cleanly(data):
    try:
        response = read_head(data + b"\r\n\r\nhello")
    except (http1.InvalidResponse, http1.ClosedEarly):
        return
    assert 100 <= response.status <= 999 and not 100 <= response.status < 200
    for name, value in response.headers:
        assert "\r" not in value and "\n" not in value and "\0" not in value and name.strip() == name
