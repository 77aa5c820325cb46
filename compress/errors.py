"""Exception hierarchy: every user-facing failure is a CompressError with a one-line message."""


class CompressError(Exception):
    """Base class; the CLI prints `str(err)` on one line and exits non-zero."""


class DataError(CompressError):
    """The data set is missing, incomplete or corrupt."""


class TraceError(CompressError):
    """The dependency graph could not be built, or it found nothing to prune."""


class BudgetError(CompressError):
    """The FLOPs budget cannot be met with the allowed keep ratios."""


class CheckpointError(CompressError):
    """A checkpoint is unreadable or belongs to another architecture."""


class ExportError(CompressError):
    """ONNX export, checking or parity failed."""
