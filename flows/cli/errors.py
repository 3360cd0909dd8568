"""The one error policy of every `arborl` command: one line on stderr, exit 2, 3 or 1, the traceback logged."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True, log_path=False)  # errors: one line each on stderr

DEBUG = {"on": False}  # --debug: full tracebacks on the console

USER_INPUT_EXIT, INTERNAL_EXIT = 2, 1
LOCKED_EXIT = 3  # another live writer holds the lock of the directory the command would write


@contextlib.contextmanager
def exit_on_errors(what: str, log_dir: str | None = None):
    """One error policy for a command: a failure prints one line on stderr (what failed, the message, a hint) and
    exits 2 for the user's input (config, data, model, reward code, an unreadable artifact), 3 for a conflict
    (another writer's lock, an output location that is not this stage's), 1 for anything else. The traceback goes
    to `<log_dir>/errors.log` where a local `log_dir` is given (appended, with the time and command), to the
    stage's log in Prefect, and, with `arborl --debug`, to the console."""
    from arborl.components.artifacts.manifests import OutputNotOwned
    from arborl.components.artifacts.run_lock import LockHeld
    from arborl.components.artifacts.storage import ArtifactError
    from arborl.components.config import ConfigError
    from arborl.components.evaluation.evaluate import ToolErrors
    from arborl.components.verification.scoring import RewardErrors

    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure gets its line and exit code
        if DEBUG["on"]:
            err_console.print_exception()
        if isinstance(exc, (LockHeld, OutputNotOwned)):
            code, kind = LOCKED_EXIT, "conflict"
        elif isinstance(exc, (ConfigError, ArtifactError, RewardErrors, ToolErrors, FileNotFoundError, KeyError,
                              ValueError)):
            code, kind = USER_INPUT_EXIT, "input"
        else:
            code, kind = INTERNAL_EXIT, "internal error"
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        logged = _log_traceback(log_dir, what, exc)
        hint = ("" if DEBUG["on"] else f" (the traceback: {logged})" if logged
                else " (the traceback: arborl --debug ...)")
        head = (f"{what}: unreadable artifact:" if isinstance(exc, ArtifactError)  # the message names the file
                else f"{what} failed ({kind}): {type(exc).__name__}:")
        err_console.print(f"[red]{escape(head)}[/red] {escape(message)}{hint}", soft_wrap=True)
        raise typer.Exit(code) from None


def _log_traceback(log_dir: str | None, what: str, exc: BaseException) -> str | None:
    """Append `exc`'s traceback to `<log_dir>/errors.log` (local directories only); its path, or None."""
    import datetime
    import traceback

    from arborl.components.artifacts import storage

    if log_dir is None or not storage.is_local(log_dir):
        return None
    path = Path(storage.filesystem(log_dir)[1]) / "errors.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(f"--- {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} {what}: "
                     f"{' '.join(sys.argv)}\n")
            fh.write("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return str(path)


def guarded(what: str):
    """Decorate a command so that its failures follow `exit_on_errors(what)`: one line on stderr, exit 2, 3 or 1."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            with exit_on_errors(what):
                return fn(*args, **kwargs)

        return command

    return wrap
