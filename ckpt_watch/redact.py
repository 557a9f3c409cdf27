"""Secrets out of URLs before they are logged, shown or stored.

`redact_url(url)` replaces the userinfo password (`http://user:pw@host` → `http://user:***@host`;
a bare `token@host`, which is how access tokens ride in URLs, becomes `***@host`) and the values
of token-like query and fragment parameters (`?token=`, `api_key=`, `sig=`, `X-Amz-Signature=`,
…). Everything else is kept byte for byte, so a redacted URL still says where it points.
`redact_text(text)` does the same to every `scheme://…` URL inside a message (an exception's
text, a status line, a param value). `RedactFilter` applies it to every log record a handler
emits, a safety net under the call sites that redact what they log.

Authority and userinfo follow RFC 3986 (as `urllib.parse.urlsplit`): the authority ends at the
first `/`, `?` or `#`, the userinfo at its last `@`; a password holding those characters must
be percent-encoded to be a valid URL at all.
"""

from __future__ import annotations

import logging
import re

REDACTED = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
_URL_IN_TEXT = re.compile(_SCHEME + r"[^\s'\"<>`]+")
_TRAILING = ".,;:!?)]}"  # sentence punctuation after a URL in a message
# parameter names that carry credentials (compared lower-cased, '-' as '_')
_SECRET_PARAM = re.compile(
    r"(?:^|_)(?:token|secret|password|passwd|pwd|pass|api_?key|apikey|key|auth|authorization|sig|"
    r"signature|credential|credentials|session|sessionid|sid|code|jwt|bearer)$"
    r"|token|secret|passw|apikey|api_key"
)


def _secret_name(name: str) -> bool:
    return bool(_SECRET_PARAM.search(name.lower().replace("-", "_")))


def _redact_params(part: str) -> str:
    """`a=1&token=x` → `a=1&token=***` (a `;` separator is kept as well)."""
    out = []
    for item in re.split(r"([&;])", part):
        name, eq, value = item.partition("=")
        out.append(f"{name}={REDACTED}" if eq and value and _secret_name(name) else item)
    return "".join(out)


def _redact_userinfo(authority: str) -> str:
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        return authority
    user, colon, password = userinfo.partition(":")
    if colon:
        return f"{user}:{REDACTED if password else ''}@{hostport}"
    return f"{REDACTED}@{hostport}" if user else authority


def redact_url(url: str) -> str:
    """The URL with its userinfo password and token-like parameter values replaced by `***`."""
    m = re.match(_SCHEME, url)
    if not m:
        return url
    scheme, rest = url[: m.end()], url[m.end() :]
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, tail = rest[:end], rest[end:]
    tail, hash_, fragment = tail.partition("#")
    path, qmark, query = tail.partition("?")
    redacted = scheme + _redact_userinfo(authority) + path
    if qmark:
        redacted += "?" + _redact_params(query)
    if hash_:
        redacted += "#" + _redact_params(fragment)
    return redacted


def redact_text(text: str) -> str:
    """`text` with every URL in it passed through `redact_url`."""

    def one(m: re.Match[str]) -> str:
        url = m.group(0)
        stripped = url.rstrip(_TRAILING)
        return redact_url(stripped) + url[len(stripped) :]

    return _URL_IN_TEXT.sub(one, text) if "://" in text else text


class RedactFilter(logging.Filter):
    """Handler filter: the record's message (arguments applied) and its formatted traceback
    with every URL redacted. Install it on the handler: a logger's filter misses its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_text is None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True
