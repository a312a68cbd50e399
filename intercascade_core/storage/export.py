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
characters, length bounds). The file is written atomically (temp file, fsync, rename);
a target that is a directory or not a regular file (a device, a FIFO) is refused.

:func:`open_for_export` reads what the library writes, without modifying it: a version
saved by :func:`~intercascade_core.storage.store.save`, a
:class:`~intercascade_core.storage.journal.DurableStore` directory (its ``CURRENT`` snapshot
plus the journal records after it, as a reopen would recover them) and the store
directory of the :class:`~intercascade_core.service.Cascade` service (one durable store per
level in ``level<i>/``). :func:`export_sources` writes several of them into one file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.repository import Entry, Repository
from ..core.sanitize import MAX_ANSWER_CHARS, MAX_QUERY_CHARS, MAX_STRATEGY_CHARS, sanitize_text
from ..errors import CorruptStoreError, InvalidArgumentError, StoreError
from .journal import CURRENT, DurableStore
from .store import MANIFEST, Verify, atomic_write_bytes, open_repository

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ExportSource",
    "chat_example",
    "check_output_file",
    "export_finetune",
    "export_sources",
    "open_for_export",
]

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
    n = len(repo)
    u = np.zeros(n, dtype=np.int64) if uses is None else np.asarray(uses)
    if u.shape != (n,):
        raise InvalidArgumentError("uses", f"must have shape ({n},), got {u.shape}")
    return export_sources([ExportSource(repo, u)], path, tenant=tenant, min_uses=min_uses, system=system,
                          dedupe_queries=dedupe_queries, template=template)


@dataclass(frozen=True, slots=True, eq=False)
class ExportSource:
    """One repository to export with its usage counters (aligned with its rows).

    ``level``: the service level it belongs to (written into each example's metadata),
    None for a lone repository. ``path``: the snapshot it was read from; ``replayed``:
    journal records applied on top of it."""

    repository: Repository
    uses: npt.NDArray[np.int64]
    level: int | None = None
    path: Path | None = None
    replayed: int = 0


def export_sources(
    sources: Sequence[ExportSource],
    path: str | os.PathLike[str],
    *,
    tenant: str | None = None,
    min_uses: int = 0,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    dedupe_queries: bool = True,
    template: Callable[[Entry], list[dict[str, str]]] | None = None,
) -> int:
    """:func:`export_finetune` over several repositories (e.g. every level of a service
    store), in order, into one file; duplicates are dropped across all of them. Each
    example of a source with a ``level`` has ``"level"`` in its metadata."""
    if tenant is not None and not isinstance(tenant, str):
        raise InvalidArgumentError("tenant", f"must be a str or None, got {type(tenant).__name__}")
    if isinstance(min_uses, bool) or not isinstance(min_uses, int) or min_uses < 0:
        raise InvalidArgumentError("min_uses", f"must be an int >= 0, got {min_uses!r}")
    p = Path(path)
    check_output_file(p, "path")
    seen: set[tuple[str, str]] = set()
    lines: list[bytes] = []
    for src in sources:
        if not isinstance(src, ExportSource):
            raise InvalidArgumentError("sources", f"must hold ExportSource records, got {type(src).__name__}")
        u = np.asarray(src.uses)
        if u.shape != (len(src.repository),):
            raise InvalidArgumentError("uses", f"must have shape ({len(src.repository)},), got {u.shape}")
        for row, e in enumerate(src.repository.entries):
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
            meta: dict[str, Any] = {
                "id": e.id,
                "tenant": e.tenant,
                "source_model": e.source_model,
                "source_level": e.source_level,
                "created_at": e.created_at,
                "uses": int(u[row]),
            }
            if src.level is not None:
                meta["level"] = src.level
            lines.append(
                json.dumps({"messages": msgs, "metadata": meta}, ensure_ascii=True).encode("ascii")
                + b"\n"
            )
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, b"".join(lines))
    return len(lines)


def check_output_file(path: Path, argument: str) -> None:
    """Refuse an output path that names no file (``""``, ``.``), a directory or anything
    but a regular file: an atomic write replaces the target by a new regular file, which
    for ``/dev/null`` or a FIFO would destroy it (and as root, succeed)."""
    if path.name in ("", ".", ".."):
        raise InvalidArgumentError(argument, f"{os.fspath(path)!r} names no file")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InvalidArgumentError(argument, f"{path}: cannot be checked ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError(argument, f"{path} is a directory; name a file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(argument, f"{path} exists and is not a regular file; it is not replaced")


# --------------------------------------------------------------------------- reading stores
_LEVEL_DIR = re.compile(r"level(0|[1-9][0-9]{0,5})")


def open_for_export(
    path: str | os.PathLike[str], *, level: int | None = None, verify: Verify = "full"
) -> tuple[ExportSource, ...]:
    """The repositories under ``path``, read only, whatever the library wrote there:

    * a saved version (``manifest.json``): that repository;
    * a durable store (``CURRENT``): its snapshot plus the journal records after it;
    * a service store (``level0/``, ``level1/``, ... each a durable store): every level,
      weakest first, or only ``level``.

    Nothing is written, locked or truncated (a torn journal tail, as a live writer may
    leave it mid-append, is left out). ``verify`` is passed to
    :func:`~intercascade_core.storage.store.open_repository`. Raises a
    :class:`StoreError` naming what is missing or damaged.
    """
    root = Path(path)
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
        raise InvalidArgumentError("level", f"must be an int >= 0, got {level!r}")
    if not root.is_dir():
        raise StoreError(root, "not a directory (no saved repository here)")
    if (root / MANIFEST).exists() or (root / CURRENT).exists():
        if level is not None:
            raise InvalidArgumentError(
                "level", f"{root} holds one repository; a level applies to a service store (level<i>/ folders)"
            )
        if (root / MANIFEST).exists():
            stored = open_repository(root, verify=verify)
            return (ExportSource(stored.repository, np.asarray(stored.uses), None, stored.path),)
        return (_read_durable(root, verify, None),)
    found = sorted(
        (int(m.group(1)), d) for d in root.iterdir()
        if (m := _LEVEL_DIR.fullmatch(d.name)) is not None and d.is_dir()
    )
    if not found:
        raise StoreError(
            root, "holds no repository: expected manifest.json (a saved repository), CURRENT (a durable "
            "store) or level0/, level1/, ... (a service store)"
        )
    if [i for i, _ in found] != list(range(len(found))):
        raise CorruptStoreError(root, f"level folders {[i for i, _ in found]} are not level0 .. level{len(found) - 1}")
    if level is not None:
        if level >= len(found):
            raise InvalidArgumentError("level", f"{root} has levels 0..{len(found) - 1}, got {level}")
        found = [found[level]]
    return tuple(_read_durable(d, verify, i) for i, d in found)


def _snapshot_name(root: Path) -> str:
    """The snapshot ``CURRENT`` names, read with a bound (never blocking on a FIFO)."""
    cur = root / CURRENT
    try:
        fd = os.open(cur, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise StoreError(cur, "missing: not a durable store") from None
    except OSError as e:
        raise StoreError(cur, f"cannot read ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptStoreError(cur, "not a regular file")
        raw = os.read(fd, 256)
    except OSError as e:
        raise StoreError(cur, f"cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if not name.startswith("snap-") or "/" in name or name in ("snap-.", "snap-.."):
        raise CorruptStoreError(cur, f"does not name a snapshot directory: {raw[:80]!r}")
    return name


def _read_durable(root: Path, verify: Verify, level: int | None) -> ExportSource:
    """A durable store's state as a reopen recovers it, through the read-only open of
    :class:`DurableStore` (no lock, nothing written; checkpoint races retried). The
    embedding model and dimension it checks are the snapshot's own."""
    for attempt in range(3):
        name = _snapshot_name(root)
        try:  # the structure only, to learn (model, dim); the open below verifies fully
            manifest = open_repository(root / name, verify="size").manifest
        except StoreError:
            if attempt < 2 and _snapshot_name(root) != name:
                continue  # a checkpoint replaced the snapshot since CURRENT was read
            raise
        with DurableStore.open(root, dim=manifest.dim, model_id=manifest.embedding_model, verify=verify,
                               readonly=True) as ds:
            return ExportSource(ds.repository, np.asarray(ds.uses, dtype=np.int64), level, ds.snapshot_path,
                                ds.replayed)
    raise StoreError(root, "a writer checkpointed three times while it was read; retry")


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
