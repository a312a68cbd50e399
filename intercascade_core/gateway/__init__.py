"""``intercascade serve``: the cascade as an OpenAI-compatible HTTP gateway.

Other systems point an OpenAI SDK at it (``base_url="http://HOST:PORT/v1"``, model
``"intercascade"``) and get the cascade's decided answer, with the decision in an
``intercascade`` extension object and ``x-intercascade-*`` headers. Modules:

* :mod:`.server` — options, building the gateway, uvicorn with a graceful drain;
* :mod:`.app` — the Starlette routes and error objects;
* :mod:`.engine` — one request through :meth:`~intercascade_core.service.Cascade.aask`;
* :mod:`.protocol` — the OpenAI wire format (pure);
* :mod:`.batching` — embeddings micro-batched on a worker thread;
* :mod:`.keys` — the keys file (sha256 of each key -> tenant);
* :mod:`.audit` — the online risk audit fed by ``/v1/feedback``;
* :mod:`.metrics` — ``/metrics`` for Prometheus;
* :mod:`.demo` — the simulated cascade of ``serve --demo``.

Needs the ``serve`` extra (``pip install 'intercascade[serve]'``); this package's root
imports none of it, so :func:`require_serve_extra` can say what is missing.
"""

from __future__ import annotations

import importlib.util

from ..errors import DependencyMissingError

__all__ = ["require_serve_extra"]

_EXTRA = ("starlette", "uvicorn", "prometheus_client")


def require_serve_extra() -> None:
    """Raise :class:`DependencyMissingError` naming the missing packages of the extra."""
    missing = [m for m in _EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyMissingError(
            f"intercascade serve needs {', '.join(missing)}: pip install 'intercascade[serve]'"
        )
