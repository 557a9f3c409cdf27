"""The `ckpt-watch` command line. Commands only parse options and call plain functions.

Exit codes: 0 ok, 2 bad usage or config, 1 runtime failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ckpt_watch.config import Config, ConfigError, load_config
from ckpt_watch.redact import RedactFilter

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Evaluate every LoRA checkpoint of a fine-tuning run as it lands.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]


OWN_LOGGER = "ckpt_watch"


class _ThirdPartyFilter(logging.Filter):
    """Below WARNING, only ckpt-watch's own records pass: libraries that lower their own logger's
    level (or log under names nobody listed, e.g. `httpx2` for one request line per HTTP call)
    still reach the handler at WARNING and above only."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        return own or record.levelno >= logging.WARNING


def setup_logging(verbose: bool) -> None:
    """ckpt-watch's own loggers at INFO (DEBUG with -v); every third-party logger at WARNING
    (INFO with -v, which brings back e.g. one line per HTTP request)."""
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, rich_tracebacks=True)
        fmt = "%(message)s"
    else:
        # journald / CI: plain lines, one event per line
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactFilter())  # no URL credentials in any log line, whoever logs it
    if not verbose:
        handler.addFilter(_ThirdPartyFilter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger(OWN_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)
    # MLflow gives its loggers their own handler and level when it is imported (later than this):
    # its documented variable sets that level; a value the user set wins
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


def print_config_errors(exc: ConfigError) -> None:
    err.print(f"[bold red]invalid configuration[/] ({len(exc.errors)} problem(s)):")
    for path, reason in exc.errors:
        err.print(f"  [cyan]{path}[/]: {reason}", highlight=False)


def _load(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print_config_errors(exc)
        raise typer.Exit(2) from None


def _check_engine(cfg: Config) -> None:
    """A managed vLLM server's launch command must be able to import vllm: exit 2 now, naming
    `engine.launch.command`, rather than when the server dies while starting."""
    launch = cfg.engine.launch
    if cfg.engine.kind != "vllm" or launch is None:
        return
    from ckpt_watch.engines.preflight import VLLMPreflightError, check_vllm_command

    try:
        check_vllm_command(launch.command, env={**os.environ, **launch.env})
    except VLLMPreflightError as exc:
        print_config_errors(ConfigError([(exc.field, str(exc))]))
        raise typer.Exit(2) from None


def _engine_failed(exc: Exception) -> typer.Exit:
    """An engine that cannot start or serve: its message (it says what to do), exit code 1."""
    err.print(f"[bold red]engine error[/]: {exc}", highlight=False)
    return typer.Exit(1)


@app.command()
def run(
    config: ConfigOpt,
    watch: Annotated[
        Path | None, typer.Option("--watch", "-w", help="Trainer output dir (overrides watch.dir).")
    ] = None,
    root: Annotated[
        Path | None, typer.Option("--root", help="A folder of runs, one per subfolder (overrides watch.root).")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Evaluate what is due now, then exit.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo evaluations already done.")] = False,
    exit_after_final: Annotated[bool, typer.Option(
        "--exit-after-final",
        help="Exit once the final checkpoint (global_step >= max_steps) and all due before it are "
             "evaluated: exit 1 if any evaluation failed (a Kubernetes Job's sidecar).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Watch a trainer's output dir and evaluate each checkpoint as it lands."""
    setup_logging(verbose)
    if watch and root:
        print_config_errors(ConfigError([("--root", "give --watch (one run) or --root (a folder of runs), not both")]))
        raise typer.Exit(2)
    overrides: dict[str, Any] = {}
    if watch:  # either one replaces both of the config's
        overrides = {"watch.dir": str(watch), "watch.root": None}
    elif root:
        overrides = {"watch.root": str(root), "watch.dir": None}
    cfg = _load(config, overrides)
    if cfg.watch.dir is None and cfg.watch.root is None:
        print_config_errors(ConfigError([("watch.dir", "no watch directory: set watch.dir (or watch.root), "
                                                       "or pass --watch (or --root)")]))
        raise typer.Exit(2)
    _check_engine(cfg)
    from ckpt_watch.core import EngineError
    from ckpt_watch.daemon import Daemon
    from ckpt_watch.locking import LockHeld

    try:
        code = asyncio.run(Daemon(cfg, once=once, force=force, exit_after_final=exit_after_final).run())
    except ConfigError as exc:
        print_config_errors(exc)
        raise typer.Exit(2) from None
    except LockHeld as exc:
        err.print(f"[red]cannot start[/]: {exc}. One daemon per results dir and run; stop the other "
                  "one, or give this one another results_dir / run_name.", highlight=False)
        raise typer.Exit(2) from None
    except EngineError as exc:
        raise _engine_failed(exc) from None
    raise typer.Exit(code)


@app.command("eval")
def eval_(
    config: ConfigOpt,
    paths: Annotated[list[Path] | None, typer.Argument(help="Checkpoint folders to evaluate.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Also evaluate the base model (step 0).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo evaluations already done.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Evaluate the given checkpoint folders (and/or the base model) once."""
    setup_logging(verbose)
    if not paths and not base:
        err.print("give checkpoint folders and/or --base")
        raise typer.Exit(2)
    cfg = _load(config)
    _check_engine(cfg)
    from ckpt_watch.core import CheckpointError, EngineError
    from ckpt_watch.oneshot import evaluate_paths

    try:
        failed = asyncio.run(evaluate_paths(cfg, list(paths or []), base=base, force=force))
    except CheckpointError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    except ConfigError as exc:  # e.g. a judge whose scoring method cannot be decided
        print_config_errors(exc)
        raise typer.Exit(2) from None
    except EngineError as exc:
        raise _engine_failed(exc) from None
    raise typer.Exit(1 if failed else 0)


@app.command()
def status(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (only its results_dir).")] = None,
    results: Annotated[Path | None, typer.Option("--results", help="Results dir, instead of a config.")] = None,
    run_name: Annotated[str | None, typer.Option("--run", help="Only this run (default: every run).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema in ckpt_watch/status.py).")] = False,
) -> None:
    """Is it keeping up? Daemon and engine, lag, backlog, failures, MLflow outbox, headline metrics.

    Reads the results dir only: no model, no judge key, no MLflow server needed. Exit 1 when
    there is no ledger (or no such run) yet."""
    from ckpt_watch.status import StatusError, gather, render, results_dir_of

    if (config is None) == (results is None):
        err.print("give -c CONFIG or --results DIR")
        raise typer.Exit(2)
    notes: list[str] = []
    if config is not None:
        try:
            results, notes = results_dir_of(config)
        except ConfigError as exc:
            print_config_errors(exc)
            raise typer.Exit(2) from None
    for note in notes:
        err.print(f"[dim]config: {note} (not needed for status)[/]", highlight=False)
    try:
        found = gather(results, run_name)
    except StatusError as exc:
        err.print(str(exc), highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    else:
        render(found, out)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    judge_check: Annotated[bool, typer.Option(
        "--judge-check/--no-judge-check",
        help="Contact the judge endpoint to decide judge.method: auto, as the daemon does at start-up.")] = True,
    engine_check: Annotated[bool, typer.Option(
        "--engine-check/--no-engine-check",
        help="Check that a managed vLLM server's launch command can import vllm; skip it to validate "
             "a config written for another machine.")] = True,
) -> None:
    """Check a config file; print every bad field with its dotted path.

    With `judge.method: auto`, this contacts the judge endpoint
    (its /tokenize route or one probe request) to decide the method,
    as the daemon does at start-up; --no-judge-check skips that.
    Exit 2: bad config or undetectable method; 1: judge unreachable."""
    cfg = _load(config)
    if engine_check:
        _check_engine(cfg)
    judge_line = _validate_judge(cfg) if judge_check else ""
    out.print(f"[green]ok[/]: {config} — {len(cfg.suites)} suite(s): {', '.join(cfg.suites)}; "
              f"engine {cfg.engine.kind}; base model {cfg.base_model}{judge_line}")


def _validate_judge(cfg: Config) -> str:
    """'; judge method M (how)' when a suite needs the judge, else ''; exits 2 / 1 on failure."""
    if cfg.judge is None or not any(s.needs_judge() for s in cfg.suites.values()):
        return ""
    from ckpt_watch.judge import JudgeUnavailable, detect_judge_method

    try:
        method, how = asyncio.run(detect_judge_method(cfg.judge))
    except ConfigError as exc:  # JudgeMethodError: judge.method cannot be decided
        print_config_errors(exc)
        raise typer.Exit(2) from None
    except JudgeUnavailable as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(1) from None
    return f"; judge method {method} ({how})"


@app.command()
def suites() -> None:
    """List the built-in suites and their options."""
    from ckpt_watch.suites.base import suite_types

    for name, st in sorted(suite_types().items()):
        t = Table(title=f"{name}: {st.summary}", title_justify="left")
        for col in ("option", "type", "default", "description"):
            t.add_column(col)
        for field, info in st.config_model.model_fields.items():
            if field == "type":
                continue
            default = "" if info.is_required() else repr(info.get_default(call_default_factory=True))
            t.add_row(field, str(info.annotation).replace("typing.", ""), default[:40], info.description or "")
        out.print(t)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo writes its run and results.")] = Path(
        "demo-output"),
    steps: Annotated[int, typer.Option(help="Training steps.")] = 40,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 10,
    engine: Annotated[str, typer.Option(help="hf (in-process) or vllm (managed CPU server).")] = "hf",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a small LoRA on CPU and watch ckpt-watch evaluate every checkpoint as it lands."""
    setup_logging(verbose)
    from ckpt_watch.core import EngineError
    from ckpt_watch.demo.run import run_demo

    try:
        code = run_demo(out_dir, steps=steps, save_steps=save_steps, engine=engine)
    except EngineError as exc:
        raise _engine_failed(exc) from None
    raise typer.Exit(code)


# --- report (issue 14) ---
@app.command()
def report(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config file: its results_dir, source personas and collapse thresholds.")] = None,
    results: Annotated[Path | None, typer.Option(
        "--results", help="Results dir to report on (without a config, or instead of its results_dir).")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where to write index.html and the chart PNGs (default: <results dir>/report).")] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
) -> None:
    """Write a static HTML report (no network needed) of every run's curves, from the JSON results."""
    if config is None and results is None:
        err.print("give -c CONFIG or --results DIR")
        raise typer.Exit(2)
    cfg = _load(config) if config is not None else None
    from ckpt_watch.report import ReportError, write_report

    try:
        page = write_report(results or cfg.results_dir, out_dir, config=cfg, config_path=config)
    except ReportError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    out.print(f"report: {page}", highlight=False)
    if open_page:
        import webbrowser

        webbrowser.open(page.as_uri())
# --- end report (issue 14) ---


@app.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown) generated from the config models."""
    from ckpt_watch.reference import render

    typer.echo(render())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
