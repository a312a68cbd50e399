"""A durable memo of deterministic chat completions, as an ``httpx`` transport.

An evaluation runs the same stream under several policies. Their strategy-free calls
(calibration, the strong model's answers, the strategy it writes for the same query and
answer) are byte-identical requests; at temperature 0 a local model answers them the same
way, so asking twice only costs time — about 20 s a call for a 1.5B model on two CPU
cores. :class:`ResponseCache` answers a repeated request from a JSON-lines file and
forwards the rest, so a long run also resumes where it stopped after a crash.

Only ``POST`` requests whose JSON body has ``"temperature": 0`` are memoised (sampling
at a higher temperature is not meant to repeat), and only ``200`` replies are stored.
Each miss appends one line and fsyncs it before the reply is returned; a torn last line
(a crash mid-write) is dropped with a :class:`TornCacheWarning`, damage anywhere else is
a :class:`CorruptCacheError`. Each record keeps the seconds the original call took, so a
report can state model time even when a later run was served from the file
(:func:`read_cache`).

The file and the server are both untrusted: lines are read with the bounded
:func:`~intercascade_core.core.untrusted_json.loads` and their fields type-checked, and a
forwarded reply is streamed through to the client as it arrives (so the client's deadline
holds), stored only once it is complete, at most ``MAX_RESPONSE_BYTES`` long.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..core import untrusted_json
from ..errors import CorruptCacheError, InvalidArgumentError, MalformedJSONError
from .chat import MAX_RESPONSE_BYTES

__all__ = ["CacheRecord", "ResponseCache", "TornCacheWarning", "read_cache"]


class TornCacheWarning(UserWarning):
    """The cache file's last line was incomplete (a crash mid-append) and was dropped."""


@dataclass(frozen=True, slots=True)
class CacheRecord:
    """One stored call: the request key, endpoint, model, original seconds and reply."""

    key: str
    url: str
    model: str
    elapsed_s: float
    body: str


def request_key(url: str, payload: Any) -> str:
    """sha256 of the URL and the canonical JSON of the request body."""
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{url}\n{canon}".encode()).hexdigest()


def read_cache(path: str | os.PathLike[str]) -> list[CacheRecord]:
    """All complete records of a cache file, in the order they were written (empty if the
    file does not exist)."""
    return _scan(Path(path))[0]


def _scan(p: Path) -> tuple[list[CacheRecord], int, int]:
    """The records, the length of the complete lines and the file size (one read)."""
    if not p.exists():
        return [], 0, 0
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    out: list[CacheRecord] = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(_record(line))
        except MalformedJSONError as e:
            raise CorruptCacheError(f"{p}: line {n} is not a cache record ({e})") from None
    if torn:
        warnings.warn(f"{p}: dropped an incomplete last line ({len(torn)} bytes)", TornCacheWarning,
                      stacklevel=3)
    return out, len(raw) - len(torn), len(raw)


# a stored body is a JSON string inside the line: escaping about doubles it at worst for
# text (control characters take six bytes; a line past the bound is not written)
_MAX_LINE_BYTES = 2 * MAX_RESPONSE_BYTES + 4096


def _record(line: bytes) -> CacheRecord:
    d = untrusted_json.loads(line, max_bytes=_MAX_LINE_BYTES, max_depth=2)
    if not isinstance(d, dict):
        raise MalformedJSONError("syntax", "not a JSON object")
    elapsed = d.get("elapsed_s")
    if not (isinstance(elapsed, int | float) and not isinstance(elapsed, bool)
            and math.isfinite(elapsed) and elapsed >= 0):
        raise MalformedJSONError("number", "field 'elapsed_s' is not a number of seconds >= 0")
    return CacheRecord(_string(d, "key"), _string(d, "url"), _string(d, "model"),
                       float(elapsed), _string(d, "body"))


def _string(d: dict[str, Any], name: str) -> str:
    value = d.get(name)
    if not isinstance(value, str):
        raise MalformedJSONError("syntax", f"field {name!r} is not a string")
    return value


class ResponseCache(httpx.BaseTransport):
    """Serve repeated temperature-0 chat requests from ``path``; forward the rest to
    ``inner`` (default: a plain ``httpx.HTTPTransport``). ``hits`` and ``misses`` count
    memoisable requests. Only 200 replies that are chat completions (a JSON object with
    ``choices``) are stored. Thread-safe, with one writer per file: two threads missing
    on the same request both ask the model (at temperature 0 they get the same reply,
    stored twice; reading keeps one)."""

    def __init__(self, path: str | os.PathLike[str], inner: httpx.BaseTransport | None = None) -> None:
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise InvalidArgumentError("path", f"expected a file path, got {path!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise InvalidArgumentError("path", f"{self.path} is a directory, expected a file")
        self._inner = inner if inner is not None else httpx.HTTPTransport()
        self._lock = threading.Lock()
        records, complete, size = _scan(self.path)
        self._bodies = {r.key: r.body for r in records}
        if complete < size:  # cut the torn line, else the next append would extend it
            with open(self.path, "r+b") as f:
                f.truncate(complete)
                os.fsync(f.fileno())
        self.hits = 0
        self.misses = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        payload = _memoisable(request)
        if payload is None:
            return self._inner.handle_request(request)
        url = str(request.url)
        key = request_key(url, payload)
        with self._lock:
            body = self._bodies.get(key)
            if body is not None:
                self.hits += 1
                return _json_response(200, body.encode(), request)
            self.misses += 1
        t0 = time.perf_counter()
        resp = self._inner.handle_request(request)
        model = str(payload.get("model", ""))

        def complete(content: bytes) -> None:
            text = _completion_text(content) if resp.status_code == 200 else None
            if text is not None:  # anything else is left for ChatModel to classify
                elapsed = time.perf_counter() - t0
                self._append(CacheRecord(key, url, model, elapsed, text))

        return httpx.Response(resp.status_code, headers=_plain_headers(resp.headers),
                              stream=_Tee(resp, complete), request=request)

    def _append(self, rec: CacheRecord) -> None:
        line = json.dumps({"key": rec.key, "url": rec.url, "model": rec.model,
                           "elapsed_s": round(rec.elapsed_s, 4), "body": rec.body},
                          ensure_ascii=False) + "\n"
        data = line.encode("utf-8")
        if len(data) > _MAX_LINE_BYTES:
            return  # it could not be read back; the reply is passed on, only not memoised
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    # a partial line would be glued to the next append and damage the file
                    f.truncate(start)
                    raise
            self._bodies[rec.key] = rec.body

    def close(self) -> None:
        self._inner.close()


class _Tee(httpx.SyncByteStream):
    """Passes a forwarded reply's decoded chunks on as they arrive; once it has been read
    to the end, hands the whole body (up to ``MAX_RESPONSE_BYTES``) to *complete*. A reply
    closed early (the client's deadline) or too long is passed on, never stored."""

    def __init__(self, resp: httpx.Response, complete: Callable[[bytes], None]) -> None:
        self._resp = resp
        self._complete = complete

    def __iter__(self) -> Iterator[bytes]:
        buf = bytearray()
        for chunk in self._resp.iter_bytes():
            if len(buf) <= MAX_RESPONSE_BYTES:
                buf += chunk
            yield chunk
        if len(buf) <= MAX_RESPONSE_BYTES:
            self._complete(bytes(buf))

    def close(self) -> None:
        self._resp.close()


def _memoisable(request: httpx.Request) -> dict[str, Any] | None:
    if request.method != "POST":
        return None
    try:
        payload = json.loads(request.read())
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("temperature") != 0:
        return None
    return payload


def _completion_text(content: bytes) -> str | None:
    """The reply as text when it is a chat completion worth replaying, else None."""
    try:
        text = content.decode("utf-8")
        doc = untrusted_json.loads(text, max_bytes=MAX_RESPONSE_BYTES)
    except ValueError:  # UnicodeDecodeError and MalformedJSONError are ValueErrors
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("choices"), list) and doc["choices"]
    return text if ok else None


def _plain_headers(headers: httpx.Headers | None) -> dict[str, str]:
    # the body is (or will be) decoded: drop transfer headers that describe the wire form
    keep = {k: v for k, v in (headers or {}).items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")}
    keep.setdefault("content-type", "application/json")
    return keep


def _json_response(status: int, content: bytes, request: httpx.Request) -> httpx.Response:
    return httpx.Response(status, headers=_plain_headers(None), content=content, request=request)
