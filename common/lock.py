"""One run per output folder: an exclusive lock held for the run's life (by its main process).

A requeued job overlapping its predecessor, or a command submitted twice, would otherwise both write the same
checkpoints and log every epoch twice. The lock is the kernel's (`flock` on <output_dir>/.run.lock): it goes with
the process that holds it, so a run killed by anything, kill -9 included, never leaves a lock that blocks the next.
The file names its holder (host, pid, start time) for the refusal's one line. A process holds a folder's lock once:
a later run in the same process (a notebook, the tests) takes it over from an earlier one that ended with an error.
"""
import fcntl
import json
import os
import socket
import time

from common.errors import ConfigError, writing

NAME = ".run.lock"
_HELD = {}  # realpath of a lock file -> its open file, held by this process


class OutputLock:
    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, NAME)

    def check(self):
        """Refuse in one line if another process holds the folder; takes nothing and writes nothing (before the model
        loads: `acquire` at the run's first write takes it)."""
        if os.path.realpath(self.path) in _HELD or not os.path.lexists(self.path):
            return
        if not os.path.isfile(self.path):  # a folder (or a dangling link) of that name: no lock can be taken
            raise ConfigError(f"{self.path} is not a lock file (a folder or a broken link?): remove it, or choose "
                              "another --output-dir")
        with open(self.path) as f:
            self._try(f)
            fcntl.flock(f, fcntl.LOCK_UN)

    def acquire(self):
        """Take the lock, creating the lock file, or refuse in one line naming the run that holds it."""
        key = os.path.realpath(self.path)
        if key in _HELD:
            return self
        with writing("the run's lock", self.path):
            f = open(self.path, "a+")
        self._try(f)
        with writing("the run's lock", self.path):  # a disk already full fails here
            f.truncate(0)
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
            f.flush()
        _HELD[key] = f
        return self

    def release(self):
        f = _HELD.pop(os.path.realpath(self.path), None)
        if f is not None:
            f.close()  # closing drops the flock

    def _try(self, f):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self.path)
            f.close()
            raise ConfigError(f"another run is writing to {os.path.dirname(self.path)} ({holder}); wait for it to "
                              "end or choose another --output-dir") from None


def _holder(path) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file does not say which"
