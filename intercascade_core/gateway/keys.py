"""API keys of the gateway: a file of key hashes, each naming a tenant.

The file holds no key, only its SHA-256, so reading it (or a backup of it) gives no access.
One entry per line, ``#`` starts a comment::

    # sha256(key) in hex                                               tenant
    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  team-a

Make an entry with ``printf %s "$KEY" | sha256sum``. A tenant name is 1-64 characters of
letters, digits and ``._-``; several keys may name the same tenant. A request presents
its key as ``Authorization: Bearer KEY`` (what every OpenAI SDK sends).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError

__all__ = ["MAX_KEYS_FILE_BYTES", "KeyRing", "hash_key", "load_keys"]

#: the largest keys file read (about 10,000 entries)
MAX_KEYS_FILE_BYTES = 1 << 20
_HEX = re.compile(r"[0-9a-f]{64}")
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: the longest key looked up (longer Authorization values are refused unhashed)
_MAX_KEY_CHARS = 4096


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Key hashes and their tenants (from :func:`load_keys`)."""

    tenants: dict[str, str]
    source: str = "<keys>"

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of an ``Authorization: Bearer KEY`` header, or None when it is
        missing, malformed or names no key of the ring."""
        if not authorization or len(authorization) > _MAX_KEY_CHARS:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        return self.tenants.get(hash_key(key))

    @property
    def tenant_names(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.tenants.values())))


def load_keys(path: str | Path) -> KeyRing:
    """Read a keys file (module docstring). Raises :class:`InvalidArgumentError`
    naming the file and line of the first bad entry, or an empty file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as e:
        raise InvalidArgumentError("keys", f"cannot read the keys file {p}: {e.strerror or e}") from None
    if len(raw) > MAX_KEYS_FILE_BYTES:
        raise InvalidArgumentError("keys", f"{p}: larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError("keys", f"{p}: not UTF-8 text") from None
    tenants: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        parts = body.split()
        where = f"{p}:{n}"
        if len(parts) != 2:
            raise InvalidArgumentError(
                "keys", f"{where}: expected 'SHA256HEX TENANT', got {len(parts)} fields"
            )
        digest, tenant = parts[0].lower(), parts[1]
        if not _HEX.fullmatch(digest):
            raise InvalidArgumentError(
                "keys", f"{where}: the first field must be 64 hex digits (sha256 of the key; "
                "the key itself never goes in this file)"
            )
        if not _TENANT.fullmatch(tenant):
            raise InvalidArgumentError(
                "keys", f"{where}: tenant {tenant[:80]!r} must be 1-64 letters, digits or ._-"
            )
        if tenants.get(digest, tenant) != tenant:
            raise InvalidArgumentError(
                "keys", f"{where}: this key hash already names tenant {tenants[digest]!r}"
            )
        tenants[digest] = tenant
    if not tenants:
        raise InvalidArgumentError("keys", f"{p}: no key entries (a keys file with no key admits nobody)")
    return KeyRing(tenants, str(p))
