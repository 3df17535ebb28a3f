"""The errors a user can cause, and how an entry point reports them.

Every mistake a user can fix (a config value, a corpus, a checkpoint, the launch environment) is a
``UserError`` whose message is one sentence naming the thing to fix. Entry points catch ``UserError`` alone
and turn it into ``"<kind> error: <message>"`` on stderr and an exit status from ``EXIT_CODES``; anything
else is a bug and keeps its traceback. Each kind also subclasses the builtin it replaced (``ValueError`` or
``RuntimeError``) so callers that caught those keep working.

This module is the bottom layer: it imports nothing from the package.
"""
from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake the user can fix; the message is one sentence naming it."""

    kind = "input"


class InputError(UserError, ValueError):
    """A command-line argument or input file a tool cannot use; the message names the flag or file to fix."""

    kind = "input"


class ConfigError(UserError, ValueError):
    """A mistake in the configuration; the message names the key to fix."""

    kind = "config"


class LayoutError(UserError, ValueError):
    """A parallel layout that cannot work for this world or model; one sentence naming what to change."""

    kind = "config"


class DataError(UserError, ValueError):
    """A corpus, index or data setting is unusable; the message says which and what to do."""

    kind = "data"


class LaunchError(UserError, RuntimeError):
    """The launcher's environment cannot describe this process's place in the job."""

    kind = "launch"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded or written; the message names it and the fix."""

    kind = "checkpoint"


class ModelLoadError(UserError, RuntimeError):
    """A path that does not hold a loadable model (inference, export, evaluation); names it and the fix."""

    kind = "checkpoint"


class RunLockError(UserError, RuntimeError):
    """Another trainer holds the run directory (training/run_lock.py); the message says which, and what to do."""

    kind = "run directory"


class SandboxUnavailable(UserError, RuntimeError):
    """Untrusted code was about to run without isolation and the caller did not allow it (eval/sandbox.py)."""

    kind = "sandbox"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on: it diverged (too many non-finite steps in a row) or its state is not finite
    (training/guard.py). Not a mistake in an input, but the user acts on it the same way: one sentence."""

    kind = "training"


# The exit status of a run that ended on a user error, by kind (launchers and Slurm scripts test for 2); a kind
# that needs its own gets it here and nowhere else. 3: the run stopped on a fault of its own (it diverged),
# as does a rank whose heartbeat watchdog ends the job (parallel/watchdog.py).
EXIT_CODES = {"config": 2, "data": 2, "launch": 2, "checkpoint": 2, "input": 2, "sandbox": 2, "run directory": 2, "training": 3}

# Errors that are identical on every rank (the same config everywhere; the lock's and the skip decision are
# reduced over all ranks): one rank says them (rank 0, which also holds the lock's details).
SAME_ON_EVERY_RANK = frozenset({"config", "run directory", "training"})


def exit_code(exc: BaseException) -> int:
    """The process exit status for ``exc`` (see ``EXIT_CODES``)."""
    return EXIT_CODES.get(getattr(exc, "kind", "input"), 2)


def report(exc: UserError, rank: int = 0, stream=None) -> int:
    """Print ``"<kind> error: <message>"`` (config errors on rank 0 only) and return the exit status."""
    kind = getattr(exc, "kind", "input")
    if kind not in SAME_ON_EVERY_RANK or rank == 0:
        print(f"{kind} error: {exc}", file=stream or sys.stderr, flush=True)
    return exit_code(exc)
