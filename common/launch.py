"""What each process of a run needs from its launch (`python script.py` or `accelerate launch`): CPU threads per
process, a user error printed as one line once per machine, a stop asked by a signal, and an end that never hangs."""
import contextlib
import os
import signal
import sys
import threading
import time

from common.errors import USER_ERRORS


def set_cpu_threads(world_size, threads=0):
    """On a CPU without OMP_NUM_THREADS: `threads` torch threads (--cpu-threads), or if 0 the cores this process may
    use / the processes of this machine (torch's own default gives every process every core, which oversubscribes
    under accelerate launch). OMP_NUM_THREADS=N overrides both; on a busy machine 1 is much faster (docs/scale.md#threads)."""
    import torch
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))


def end_processes(accelerator, code=0):
    """The last call of a run, in place of accelerator.end_training() (COLLECTIVE). One process: end_training() (and
    with a non-zero `code`, exit with it). Several: a barrier, the trackers finish, and every process exits at once
    with `code`, skipping the process
    group's teardown. Why: freeing DDP's reducer or the process group (in end_training's destroy_process_group, or
    at interpreter exit) joins gloo's worker threads while holding the GIL, and a worker still releasing the last
    collective's work needs the GIL to free that work's tensors: a deadlock at exit, seen in 1 of 30 2-process CPU
    launches (py-spy: the main thread in ~ProcessGroupGloo -> std::thread::join, the worker in ~AsyncWork ->
    gil_scoped_acquire; bench/launch_exits.py). gloo has no shutdown that joins its workers first. Everything of
    the run is written and closed before this call; stdout and stderr are flushed."""
    if accelerator.num_processes <= 1:
        accelerator.end_training()
        if code:
            sys.exit(code)
        return
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- a stop asked by a signal ---------------------------------------------------------------------------------------
# SIGTERM (what schedulers send before preempting a job), SIGINT (Ctrl-C), SIGHUP (the terminal or ssh session closed)
# and SIGUSR1 (Slurm's warning before a time limit, `sbatch --signal=USR1@120`) do not kill the run: they ask it to
# stop at its next safe point (common/run.py: after the model loads, the prompts are encoded or the base model is
# evaluated, after the epoch's rollout, or after its training and evaluation), where it writes a checkpoint and exits
# 128 + the signal's number. A second Ctrl-C stops at once (one line, no checkpoint).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_asked = []  # the signals received, in order


def _on_signal(signum, frame):
    if _asked and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _asked.append(signum)
    print(f"\n{signal_name(signum)}: stopping at the end of this phase with a checkpoint (Ctrl-C again: at "
          "once, without one)", file=sys.stderr, flush=True)


def signal_name(signum) -> str:
    return signal.Signals(signum).name


def stop_signal() -> int | None:
    """The first stop signal this process received, or None."""
    return _asked[0] if _asked else None


def request_stop(signum=signal.SIGTERM):
    """Ask for a stop as the signal would (tests, or an embedding program)."""
    _asked.append(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Within: the STOP_SIGNALS ask for a stop instead of killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _asked.clear()


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _peer_lost(e) -> bool:
    """A collective failed because another process stopped (gloo: the peer closed or reset its connection; FSDP's
    all-gather in a forward hook meets the reset, a DDP collective the close)."""
    import torch.distributed as dist
    return isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(
        why in str(e) for why in ("closed by peer", "reset by peer"))


def clear_bars():
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


@contextlib.contextmanager
def errors_as_one_line(grace_seconds=5.0):
    """Around a script's main(): a user error (USER_ERRORS) becomes `error: ...` on stderr, exit code 1, no
    traceback. Under `accelerate launch` (WORLD_SIZE > 1) every process meets the same error (the checks are the
    same on every rank), so local rank 0 prints it and the others wait `grace_seconds` first: the launcher stops
    them as soon as rank 0 has exited, so the line is printed once per machine; an error of one rank alone (a reward
    raising on its own rows) is printed by that rank after the wait, and the processes whose collectives then fail
    for want of it exit quietly (their traceback would only say a peer left). Launched processes end without
    Python's teardown (os._exit; end_processes says why)."""
    try:
        with stop_on_signals():
            yield
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run could take a checkpoint
        clear_bars()
        print("\ninterrupted: stopped at once; the last checkpoint written is intact", file=sys.stderr, flush=True)
        if _launched():
            os._exit(130)
        sys.exit(130)
    except USER_ERRORS as e:
        if not _launched():
            clear_bars()
            sys.exit(f"error: {e}")
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            time.sleep(grace_seconds)
        clear_bars()
        sys.stdout.flush()
        print(f"\nerror: {e}", file=sys.stderr, flush=True)  # on its own line, after another rank's progress bar
        os._exit(1)
    except Exception as e:
        if _launched() and _peer_lost(e):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise
