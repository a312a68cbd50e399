"""Export the repository as a JSONL fine-tuning set in chat format.

The paper's follow-up to online teaching is *periodic offline fine-tuning* of the weak
model on what the strong model taught. :func:`export_finetune` writes one example per
entry, in the OpenAI chat fine-tuning format (also read by most open-source trainers)::

    {"messages": [
        {"role": "system", "content": "<system prompt>"},          # omitted when None
        {"role": "user", "content": "<the query>"},
        {"role": "assistant", "content": "Strategy: <strategy>\\n\\nAnswer: <answer>"}],
     "metadata": {"id": 3, "tenant": "default", "source_model": "...", "source_level": 1,
                  "created_at": 12.0, "uses": 4}}

All text passes through :func:`~intercascade_core.core.sanitize.sanitize_text` (control
characters, length bounds). The file is written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.repository import Entry, Repository
from ..core.sanitize import MAX_ANSWER_CHARS, MAX_QUERY_CHARS, MAX_STRATEGY_CHARS, sanitize_text
from ..errors import InvalidArgumentError
from .store import atomic_write_bytes

__all__ = ["DEFAULT_SYSTEM_PROMPT", "chat_example", "export_finetune"]

DEFAULT_SYSTEM_PROMPT = (
    "You solve problems step by step: first state the general strategy, then give the "
    'final answer on the last line as "Answer: <answer>".'
)


def chat_example(
    entry: Entry, *, system: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[dict[str, str]]:
    """The chat messages of one fine-tuning example (see the module docstring)."""
    q = sanitize_text(entry.query, max_chars=MAX_QUERY_CHARS)
    s = sanitize_text(entry.strategy, max_chars=MAX_STRATEGY_CHARS)
    a = sanitize_text(entry.answer, max_chars=MAX_ANSWER_CHARS)
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": q})
    msgs.append({"role": "assistant", "content": f"Strategy: {s}\n\nAnswer: {a}"})
    return msgs


def export_finetune(
    repo: Repository,
    path: str | os.PathLike[str],
    *,
    tenant: str | None = None,
    uses: npt.ArrayLike | None = None,
    min_uses: int = 0,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    dedupe_queries: bool = True,
    template: Callable[[Entry], list[dict[str, str]]] | None = None,
) -> int:
    """Write the fine-tuning set of ``repo`` to ``path`` (JSONL); return the number of
    examples.

    ``tenant`` restricts the export to one tenant (never mixes tenants otherwise than
    asked). ``uses``/``min_uses`` keep only entries placed in at least ``min_uses``
    prompts. ``dedupe_queries`` drops entries whose (tenant, query) repeats an earlier
    one. ``template`` replaces :func:`chat_example` (it must return a list of
    ``{"role", "content"}`` messages).
    """
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if tenant is not None and not isinstance(tenant, str):
        raise InvalidArgumentError("tenant", f"must be a str or None, got {type(tenant).__name__}")
    if isinstance(min_uses, bool) or not isinstance(min_uses, int) or min_uses < 0:
        raise InvalidArgumentError("min_uses", f"must be an int >= 0, got {min_uses!r}")
    n = len(repo)
    u = np.zeros(n, dtype=np.int64) if uses is None else np.asarray(uses)
    if u.shape != (n,):
        raise InvalidArgumentError("uses", f"must have shape ({n},), got {u.shape}")
    seen: set[tuple[str, str]] = set()
    lines: list[bytes] = []
    for row, e in enumerate(repo.entries):
        if tenant is not None and e.tenant != tenant:
            continue
        if int(u[row]) < min_uses:
            continue
        if dedupe_queries:
            key = (e.tenant, e.query.strip())
            if key in seen:
                continue
            seen.add(key)
        msgs = template(e) if template is not None else chat_example(e, system=system)
        _check_messages(msgs, row)
        meta: Mapping[str, Any] = {
            "id": e.id,
            "tenant": e.tenant,
            "source_model": e.source_model,
            "source_level": e.source_level,
            "created_at": e.created_at,
            "uses": int(u[row]),
        }
        lines.append(
            json.dumps({"messages": msgs, "metadata": meta}, ensure_ascii=True).encode("ascii")
            + b"\n"
        )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, b"".join(lines))
    return len(lines)


def _check_messages(msgs: Any, row: int) -> None:
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and m["role"] in ("system", "user", "assistant")
            and isinstance(m["content"], str)
            for m in msgs
        )
    )
    if not ok:
        raise InvalidArgumentError(
            "template", f"row {row}: must return a list of {{role, content}} messages"
        )
