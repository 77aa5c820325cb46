"""The project's exceptions, and the one-line error reporting that the `pipeinfer-cpu` and
`compress` commands share. A `UserError` is shown to the user as one line, without a traceback.

Standard library only: both packages import it, and neither should pay for the other's dependencies."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, NoReturn, TypeVar

Command = TypeVar("Command", bound=Callable[..., Any])


class PipeinferError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(PipeinferError):
    """Bad input from the user: a file, a flag, a hostfile. The message is the whole explanation."""


class ModelError(UserError):
    """A model file that is missing, truncated, not GGUF, or of an architecture we have not verified."""


class HostfileError(UserError):
    """A hostfile that cannot be parsed; the message names the file and the line."""


class LaunchError(UserError):
    """The MPI job cannot be started: no mpiexec, an unreachable host, too few ranks."""


class ClusterError(PipeinferError):
    """A rank failed or stopped answering while the job ran; the message names the rank and host."""


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    """What the user sees of an error we expected: `error: <message>` on stderr, then exit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line_errors(*error_types: type[Exception]) -> Callable[[Command], Command]:
    """A decorator for commands: an error of `error_types` ends the program with one line (see
    exit_with_error) and status 1, Ctrl-C with status 130, neither with a traceback. The
    traceback comes back under --debug: the command's own `debug` keyword argument (a click flag),
    `--debug` anywhere on the command line, or PIPEINFER_DEBUG set."""
    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            debug = kwargs.get("debug", False) or "--debug" in sys.argv or bool(os.environ.get("PIPEINFER_DEBUG"))
            try:
                return command(*args, **kwargs)
            except error_types as exc:
                if debug:
                    raise
                exit_with_error(str(exc))
            except KeyboardInterrupt:
                sys.exit(130)
        return wrapper  # type: ignore[return-value]
    return decorate
