"""The `ckpt-watch` command line. Commands only parse options and call plain functions.

Exit codes: 0 ok, 2 bad usage or config, 1 runtime failure.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ckpt_watch.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Evaluate every LoRA checkpoint of a fine-tuning run as it lands.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, rich_tracebacks=True)
        fmt = "%(message)s"
    else:
        # journald / CI: plain lines, one event per line
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "httpcore", "openai", "urllib3", "watchdog", "filelock", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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


@app.command()
def run(
    config: ConfigOpt,
    watch: Annotated[
        Path | None, typer.Option("--watch", "-w", help="Trainer output dir (overrides watch.dir).")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Evaluate what is due now, then exit.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo evaluations already done.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Watch a trainer's output dir and evaluate each checkpoint as it lands."""
    setup_logging(verbose)
    cfg = _load(config, {"watch.dir": str(watch)} if watch else None)
    if cfg.watch.dir is None:
        print_config_errors(ConfigError([("watch.dir", "no watch directory: set watch.dir or pass --watch")]))
        raise typer.Exit(2)
    from ckpt_watch.daemon import Daemon

    try:
        code = asyncio.run(Daemon(cfg, once=once, force=force).run())
    except ConfigError as exc:
        print_config_errors(exc)
        raise typer.Exit(2) from None
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
    from ckpt_watch.core import CheckpointError
    from ckpt_watch.oneshot import evaluate_paths

    try:
        failed = asyncio.run(evaluate_paths(cfg, list(paths or []), base=base, force=force))
    except CheckpointError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    raise typer.Exit(1 if failed else 0)


@app.command()
def status(
    config: ConfigOpt,
    run_name: Annotated[str | None, typer.Option("--run", help="Run name (default: from the config).")] = None,
) -> None:
    """Show the ledger: checkpoints seen and evaluations done, pending, failed, skipped."""
    cfg = _load(config)
    from ckpt_watch.daemon import Paths
    from ckpt_watch.ledger import Ledger

    paths = Paths.of(cfg)
    if not paths.ledger.exists():
        err.print(f"no ledger yet at {paths.ledger}: nothing has run with this config")
        raise typer.Exit(1)
    ledger = Ledger(paths.ledger)
    runs = [run_name] if run_name else ledger.runs()
    for run in runs:
        t = Table(title=f"run {run}: evaluations")
        for col in ("step", "suite", "state", "tries", "updated", "note"):
            t.add_column(col, overflow="fold")
        style = {"done": "green", "failed": "red", "pending": "yellow", "running": "cyan", "skipped": "dim"}
        for r in ledger.evals(run):
            t.add_row(str(r.step), r.suite, f"[{style[r.state]}]{r.state}[/]", str(r.attempts),
                      r.updated_at[:19], (r.error or "")[:80])
        out.print(t)
        c = Table(title=f"run {run}: checkpoints")
        for col in ("step", "state", "tries", "path", "note"):
            c.add_column(col, overflow="fold")
        for k in ledger.checkpoints(run):
            c.add_row(str(k.step), k.state, str(k.attempts), k.path or "", (k.error or "")[:80])
        out.print(c)
    ledger.close()


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Check a config file; print every bad field with its dotted path."""
    cfg = _load(config)
    out.print(f"[green]ok[/]: {config} — {len(cfg.suites)} suite(s): {', '.join(cfg.suites)}; "
              f"engine {cfg.engine.kind}; base model {cfg.base_model}")


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
) -> None:
    """Train a small LoRA on CPU and watch ckpt-watch evaluate every checkpoint as it lands."""
    setup_logging(False)
    from ckpt_watch.demo.run import run_demo

    raise typer.Exit(run_demo(out_dir, steps=steps, save_steps=save_steps, engine=engine))


@app.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown) generated from the config models."""
    from ckpt_watch.reference import render

    typer.echo(render())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
