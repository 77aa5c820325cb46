"""The project's exceptions. A `UserError` is shown to the user as one line, without a traceback."""


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
