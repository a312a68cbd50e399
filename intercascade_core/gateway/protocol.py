"""The OpenAI wire format of the gateway: requests in, completions, chunks and errors out.

Pure functions over plain data, so the HTTP layer only moves bytes. What a request may
hold is deliberately narrow: the cascade answers with prompts and sampling parameters
fixed at calibration (its (α, δ) guarantee holds for those), so a parameter that would
change them (``temperature``, ``max_tokens``, tools...) is refused with a 400 naming it,
never silently ignored.

Accepted request fields: ``model`` (``"intercascade"`` for the cascade, or a level's id for a
direct call to that level), ``messages``, ``stream``, ``stream_options.include_usage``,
``n`` (1 only) and the extension object ``intercascade`` (``family``: ``"math"`` or
``"mcq"``; ``query_id``: a label for the outcome). The cascade takes one problem per
request: exactly one ``user`` message. A direct call forwards the messages as given.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from ..core.sanitize import find_labels
from ..core.state import Outcome, Usage
from ..core.tasks import Family

__all__ = [
    "CASCADE_MODEL",
    "MAX_BODY_BYTES",
    "ChatRequest",
    "RequestError",
    "chunks",
    "completion",
    "decision",
    "decision_headers",
    "error_body",
    "parse_chat_request",
    "parse_feedback",
    "usage_of",
    "without_strategy",
]

#: the model id of the cascade itself
CASCADE_MODEL = "intercascade"
#: the largest request body read (larger: 413)
MAX_BODY_BYTES = 1 << 20
#: the deepest JSON nesting read (a chat request nests 4 deep)
MAX_DEPTH = 32
_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n", "intercascade"})
_ROLES = frozenset({"system", "developer", "user", "assistant"})
_EXTENSION = frozenset({"family", "query_id"})
#: words per streamed content chunk
CHUNK_WORDS = 8
_WORD = re.compile(r"\s*\S+\s*|\s+")


class RequestError(Exception):
    """A request the gateway refuses: its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """An OpenAI error object (what the SDKs parse into their exceptions)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat-completions request (module docstring)."""

    model: str
    messages: tuple[Mapping[str, str], ...]
    stream: bool = False
    include_usage: bool = False
    family: Family = "math"
    query_id: str = ""

    def problem(self) -> str:
        """The cascade's query text: the one user message (else a 400)."""
        roles = [m["role"] for m in self.messages]
        if roles != ["user"]:
            raise RequestError(
                400, "the cascade answers one problem per request with its calibrated prompts: "
                f"send exactly one 'user' message (got roles {roles[:8]})",
                param="messages", code="unsupported_messages",
            )
        text = self.messages[0]["content"]
        if not text.strip():
            raise RequestError(400, "the user message is empty", param="messages")
        return text


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _depth(value: object, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping once past ``limit``."""
    stack: list[tuple[object, int]] = [(value, 1)]
    deepest = 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def load_json(body: bytes) -> Any:
    """Parse a request body as JSON (400 naming why it is not)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not UTF-8 text") from None
    except RecursionError:
        raise RequestError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, and ints past the digit limit
        raise RequestError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise RequestError(400, f"the request body nests deeper than {MAX_DEPTH} levels")
    return data


def _content(value: object, i: int) -> str:
    """A message's text: a string, or an array of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise RequestError(
                    400, f"messages[{i}].content[{j}] must be a text part "
                    "({'type': 'text', 'text': ...}); other parts are not supported",
                    param=f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(
        400, f"messages[{i}].content must be a string or an array of text parts, "
        f"got {_json_type(value)}", param=f"messages[{i}].content",
    )


def parse_chat_request(body: bytes, models: Sequence[str]) -> ChatRequest:
    """Validate a chat-completions body; ``models`` are the ids served (404 otherwise)."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {_json_type(data)}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        name = unknown[0]
        raise RequestError(
            400, f"unsupported parameter {name[:80]!r}: the cascade's thresholds hold for the "
            "prompts and sampling parameters it was calibrated with, so it accepts only "
            f"{sorted(_FIELDS)}", param=name[:80], code="unsupported_parameter",
        )
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, f"'model' must be a non-empty string, got {_json_type(model)}",
                           param="model")
    if model not in models:
        raise RequestError(
            404, f"the model {model[:100]!r} does not exist; this gateway serves {list(models)}",
            param="model", code="model_not_found",
        )
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, f"'messages' must be a non-empty array, got {_json_type(raw)}",
                           param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object, got {_json_type(m)}",
                               param=f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            got = repr(role[:40]) if isinstance(role, str) else _json_type(role)
            raise RequestError(400, f"messages[{i}].role must be one of {sorted(_ROLES)}, "
                               f"got {got}", param=f"messages[{i}].role")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise RequestError(400, f"messages[{i}]: unsupported field {extra[0][:80]!r}",
                               param=f"messages[{i}]")
        messages.append({"role": str(role), "content": _content(m.get("content"), i)})
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be a boolean, got {_json_type(stream)}",
                           param="stream")
    include_usage = False
    opts = data.get("stream_options")
    if opts is not None:
        if not stream:
            raise RequestError(400, "'stream_options' is only allowed with 'stream': true",
                               param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise RequestError(400, "'stream_options' may hold only 'include_usage'",
                               param="stream_options")
        iu = opts.get("include_usage", False)
        if not isinstance(iu, bool):
            raise RequestError(400, "'stream_options.include_usage' must be a boolean",
                               param="stream_options")
        include_usage = iu
    n = data.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(400, f"'n' must be 1 (one decided answer per request), got {n!r:.40}",
                           param="n")
    family: Family = "math"
    query_id = ""
    ext = data.get("intercascade")
    if ext is not None:
        if not isinstance(ext, dict) or set(ext) - _EXTENSION:
            raise RequestError(400, f"'intercascade' may hold only {sorted(_EXTENSION)}",
                               param="intercascade")
        fam = ext.get("family", "math")
        if fam not in get_args(Family):
            raise RequestError(400, f"'intercascade.family' must be one of {get_args(Family)}",
                               param="intercascade.family")
        family = fam
        qid = ext.get("query_id", "")
        if not isinstance(qid, str) or len(qid) > 200:
            raise RequestError(400, "'intercascade.query_id' must be a string of at most 200 "
                               "characters", param="intercascade.query_id")
        query_id = qid
    return ChatRequest(model, tuple(messages), stream, include_usage, family, query_id)


def parse_feedback(body: bytes) -> tuple[str, bool]:
    """``{"id": completion id, "correct": bool}`` of ``POST /v1/feedback``."""
    data = load_json(body)
    if not isinstance(data, dict) or set(data) != {"id", "correct"}:
        raise RequestError(400, "feedback is a JSON object with exactly 'id' (a completion id) "
                           "and 'correct' (a boolean)")
    cid, correct = data["id"], data["correct"]
    if not isinstance(cid, str) or not 0 < len(cid) <= 200:
        raise RequestError(400, "'id' must be the id of a completion", param="id")
    if not isinstance(correct, bool):
        raise RequestError(400, f"'correct' must be a boolean, got {_json_type(correct)}",
                           param="correct")
    return cid, correct


# ----------------------------------------------------------------------------- responses
def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def usage_of(outcome: Outcome) -> dict[str, int]:
    """OpenAI ``usage``: every call made for the request (answers and teaching, all levels)."""
    total = Usage()
    for u in (*outcome.usage, *outcome.teach_usage):
        total = total + u
    return {
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "total_tokens": total.tokens,
    }


def decision(outcome: Outcome, names: Sequence[str], thresholds: Sequence[float]) -> dict[str, Any]:
    """The cascade's decision, as the ``intercascade`` extension object.

    ``level``/``model``/``confidence``/``threshold`` are the accepting level's (for a
    discarded query: the last level that answered); ``deferred`` is whether any level
    passed the query on; a threshold of None abstains (it is infinite: that level
    accepts nothing, e.g. after a risk alarm).
    """
    answered = [i for i, c in enumerate(outcome.confidences) if c is not None]
    at = outcome.level if outcome.level is not None else (answered[-1] if answered else None)
    shown = [
        {"level": i, "entry_id": s.entry_id, "similarity": round(s.similarity, 6)}
        for i, level in enumerate(outcome.strategies) for s in level
    ]
    return {
        "status": outcome.status,
        "accepted": outcome.status == "accepted",
        "level": at,
        "model": names[at] if at is not None else None,
        "confidence": _finite(outcome.confidences[at]) if at is not None else None,
        "threshold": _finite(thresholds[at]) if at is not None else None,
        "deferred": outcome.status != "accepted" or (outcome.level or 0) > 0,
        "strategies_shown": shown,
        "strategy_stored": bool(outcome.stored_in),
        "stored_in": list(outcome.stored_in),
        "strategy_rejected": outcome.strategy_rejected,
        "levels": [
            {
                "model": names[i],
                "asked": outcome.confidences[i] is not None or outcome.failures[i] is not None,
                "confidence": _finite(outcome.confidences[i]),
                "threshold": _finite(thresholds[i]),
                "failure": outcome.failures[i],
            }
            for i in range(len(names))
        ],
        "outcome_index": outcome.index,
    }


def decision_headers(d: Mapping[str, Any]) -> dict[str, str]:
    """The decision mirrored in ``x-intercascade-*`` response headers."""

    def show(v: object) -> str:
        if v is None:
            return "none"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    return {
        "x-intercascade-status": show(d["status"]),
        "x-intercascade-level": show(d["level"]),
        "x-intercascade-model": show(d["model"]),
        "x-intercascade-confidence": show(d["confidence"]),
        "x-intercascade-threshold": show(d["threshold"]),
        "x-intercascade-deferred": show(d["deferred"]),
        "x-intercascade-strategies-shown": str(len(d["strategies_shown"])),
        "x-intercascade-strategy-stored": show(d["strategy_stored"]),
    }


def completion(
    cid: str, created: int, model: str, text: str, usage: Mapping[str, int],
    extension: Mapping[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` object with the decision under ``intercascade``."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": dict(usage),
        "intercascade": dict(extension),
    }


def without_strategy(text: str) -> str:
    """A teacher's reply without its ``Strategy:`` section: what the client asked for is the
    answer; the strategy is the cascade's (stored, and shown to later prompts)."""
    labels = list(find_labels(text))
    for i, m in enumerate(labels):
        if m.label == "strategy":
            end = labels[i + 1].line_start if i + 1 < len(labels) else len(text)
            return (text[: m.line_start] + text[end:]).rstrip()
    return text


def chunks(
    cid: str, created: int, model: str, text: str, usage: Mapping[str, int] | None,
    extension: Mapping[str, Any],
) -> Iterator[bytes]:
    """The SSE events of a streamed completion, ending with ``data: [DONE]``.

    The text is the decided answer, so it is sent whole once decided: a role chunk
    carrying the decision, the content in pieces of :data:`CHUNK_WORDS` words, a
    ``finish_reason`` chunk and, with ``include_usage``, a usage chunk with no choices.
    """
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": choices, **extra}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    def delta(d: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

    yield event(delta({"role": "assistant", "content": ""}), intercascade=dict(extension))
    words = _WORD.findall(text)
    for i in range(0, len(words), CHUNK_WORDS):
        yield event(delta({"content": "".join(words[i : i + CHUNK_WORDS])}))
    yield event(delta({}, "stop"))
    if usage is not None:
        yield event([], usage=dict(usage))
    yield b"data: [DONE]\n\n"
