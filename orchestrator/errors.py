"""The small exception hierarchy the CLI turns into one line and an exit code."""


class StockpotError(Exception):
    """Base of every error stockpot raises on purpose; `exit_code` is what the CLI returns.
    `restart` is what a supervisor does when it ends a life (orchestrator/ending.py): "never"
    (a restart cannot fix it), "always" (it may pass), or "once" (restart; the same failure at
    the same step again stops)."""

    exit_code = 1
    restart = "once"


class ConfigError(StockpotError):
    """The config (file or `key=value` override) is wrong; the message says how to fix it."""

    exit_code = 2
    restart = "never"


def require(ok: bool, message: str, error: type[StockpotError] = ConfigError) -> None:
    """Raise `error(message)` unless `ok`: the one-line check every validator uses (bad config
    by default; a manifest check passes CheckpointCorrupt)."""
    if not ok:
        raise error(message)


class UsageError(StockpotError):
    """A command was pointed at the wrong thing (no run dir, bad output name, ...)."""

    exit_code = 2
    restart = "never"


class StorageError(StockpotError):
    """A storage operation failed for good (after retries, or a permanent error)."""

    restart = "always"  # an outage may end


class CheckpointError(StockpotError):
    """A save was not committed (the previous committed checkpoint is untouched)."""


class CheckpointCorrupt(StockpotError):
    """A committed checkpoint fails verification (size, checksum, or an unsafe manifest)."""

    exit_code = 3
    restart = "never"  # restore already fell back to an older one when it could


def one_line(exc: BaseException) -> str:
    """A problem as it travels between ranks and into logs: one line. Our own errors read as
    their message (it is written for the user); anything else is prefixed with its type."""
    text = " ".join(str(exc).split())[:500]
    if isinstance(exc, StockpotError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
