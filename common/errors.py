"""The errors a user sees, each one line: what is wrong and where (common.launch.errors_as_one_line prints them).

Every module of common/ raises these; this module imports nothing of common/, so it sits below every other one (no
import circles). RewardError is the rewards package's own (rewards/ imports nothing from common/).
"""
import contextlib

from rewards.base import RewardError


class ConfigError(ValueError):
    """Flags that do not fit together, or a value out of its range."""


class DataError(ValueError):
    """A dataset problem, named by file:line."""


class ModelError(ValueError):
    """A model path, LoRA target or model option."""


class CheckpointError(ValueError):
    """A resume path or an output folder."""


class OutputError(OSError):
    """The run could not write an output (a full disk, a read-only or vanished folder): the path and the cause."""


USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, OutputError, RewardError)


@contextlib.contextmanager
def writing(what: str, path):
    """Around a write: an OSError becomes one OutputError line naming `what`, the path and the cause."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror or e}") from None
