"""The errors a user sees, each one line: what is wrong and where (common.launch.errors_as_one_line prints them).

Every module of common/ raises these; this module imports nothing of common/, so it sits below every other one (no
import circles). RewardError is the rewards package's own (rewards/ imports nothing from common/).
"""
import contextlib
import os
import re

from safetensors import SafetensorError

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


class TrainingError(RuntimeError):
    """Training went wrong in a way the run detects (the loss, gradients or weights became NaN or infinite)."""


USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, OutputError, RewardError, TrainingError)


def write_cause(e: BaseException) -> str:
    """The cause of a failed write in a few words: the OS's own (e.g. "No space left on device"), also when the writer
    wraps it (safetensors raises SafetensorError("Error while serializing: I/O error: ... (os error 28)"))."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"os error (\d+)|code: (\d+)", str(e))  # safetensors: "... (os error 28)", or its Debug form
    return os.strerror(int(m.group(1) or m.group(2))) if m else " ".join(str(e).split())[:160]


@contextlib.contextmanager
def writing(what: str, path):
    """Around a write: an OSError, or a writer's wrapped one (safetensors' SafetensorError), becomes one OutputError
    line naming `what`, the path and the cause."""
    try:
        yield
    except OutputError:
        raise
    except (OSError, SafetensorError) as e:
        raise OutputError(f"cannot write {what} {path}: {write_cause(e)}") from None
