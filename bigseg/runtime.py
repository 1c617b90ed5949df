"""Process-wide CPU settings made once at start-up by the entry point (the CLI, a benchmark, a
notebook): how OpenMP threads wait, how many compute threads run, and whether glibc keeps freed
large blocks for reuse. Library code never calls these; they are passed in as values.

- OpenMP threads spin between parallel regions by default; on a machine with any other load a
  spinning thread holds a core the other work needs, and a training step took 52 s instead of
  13.7 s here. Passive waiting (threads sleep on a futex) costs little on an idle machine (see
  `benchmarks/train_speed.py`) and keeps torch fast on a busy one. libgomp reads the policy when it
  loads, so it must be set before torch is imported.
- glibc serves every block above its mmap threshold (at most 32 MiB, adaptive) with a fresh
  mmap and returns it on free: every large activation of every forward pass is page-faulted
  again, zero-filled by the kernel. Raising the thresholds keeps those blocks on the heap for the
  next step (training's memory is the same every step, so nothing grows).
- SIGTERM is what `kill`, systemd, SLURM, CI runners and torchrun send to stop a job. By default
  it ends Python at once, so a training run would lose everything since its last epoch and a
  prediction its last journal entry. `stop_on_terminate` makes the first SIGTERM stop a job the
  way Ctrl-C does (the job saves what it has and says how to go on); a second one ends the process
  at once, as before.
- Python drops an exception raised while it runs a finaliser or an at-fork callback ("Exception
  ignored in ..."): a stop that lands while a DataLoader forks its next epoch's workers (logging's
  fork hook) or shuts the last ones down would be lost, and the job would run on. The handlers
  also record the stop, and long loops call `check_stop` at each step to raise one that was lost.
- A stop that cuts a training step in two would make the resumed run differ from an uninterrupted
  one; inside `whole_step` the first stop waits for the step's end (a second Ctrl-C does not).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
_kept = False
_stop_signal: int | None = None
_pending = False
_deferred = False  # inside `whole_step`: a stop waits for its end


def prefer_passive_waiting() -> bool:
    """Let idle OpenMP threads sleep instead of spin, unless the user chose a policy. Returns
    whether it took effect (False once torch is imported: libgomp has read its settings)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: torch's default, one per core); returns the count."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def keep_freed_memory(threshold_mib: int = 1024) -> bool:
    """Serve blocks up to `threshold_mib` from glibc's heap and never hand free heap memory back
    to the kernel (mallopt); False where the C library is not glibc. After a few steps the heap
    holds every activation size a training step needs and no page is faulted again."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # values are C ints: at most 2 GiB - 1
    size = min(threshold_mib << 20, _INT_MAX)
    global _kept
    _kept = bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _kept


def keeps_freed_memory() -> bool:
    """Whether `keep_freed_memory` took effect in this process (it changes torch's CPU speed)."""
    return _kept


def _glibc(function: str):
    """`function` of glibc, or None where the C library is another."""
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):
        return None


def stop_on_terminate() -> bool:
    """Turn the first SIGTERM into a KeyboardInterrupt in the main thread (what Ctrl-C raises), so
    every job's Ctrl-C path runs: training saves `last.pt`, prediction keeps its journal. A second
    SIGTERM kills the process at once. Ctrl-C keeps Python's behaviour, and both are recorded for
    `check_stop`. Returns False where handlers cannot be set (not the main thread, or a platform
    without SIGTERM)."""
    global _stop_signal, _pending
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return False
    _stop_signal, _pending = None, False
    signal.signal(signal.SIGTERM, _on_terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (`nohup`, `&`)
        signal.signal(signal.SIGINT, _on_interrupt)
    return True


def stop_signal() -> int:
    """The signal that stopped this process's job: SIGTERM after `stop_on_terminate` caught one,
    else SIGINT (Ctrl-C). Shells report a job stopped by signal N with exit code 128 + N."""
    return _stop_signal if _stop_signal is not None else signal.SIGINT


def check_stop() -> None:
    """Raise the KeyboardInterrupt of a stop the handlers caught but Python dropped (it landed in a
    finaliser or an at-fork callback); nothing when no stop is pending. A job's loop calls this once
    per step, so such a stop ends the job at the next step instead of never."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt


def stop_handled() -> None:
    """A job caught the stop's KeyboardInterrupt and ends: nothing is pending for a later job of
    the same process (a notebook, the test suite)."""
    global _pending
    _pending = False


@contextlib.contextmanager
def whole_step():
    """Work a stop must not cut in two (a training step: a stop raised in its forward pass would
    leave batchnorm statistics updated for a step the resumed run does again, one raised in the
    optimiser's update half the parameters moved). Under the handlers of `stop_on_terminate`, a
    Ctrl-C or SIGTERM inside it is raised when it ends; a second Ctrl-C stops at once."""
    global _deferred
    check_stop()
    _deferred = True
    try:
        yield
    finally:
        _deferred = False
    check_stop()


def _on_terminate(signum: int, frame) -> None:
    global _stop_signal, _pending
    _stop_signal, _pending = signum, True
    signal.signal(signum, signal.SIG_DFL)
    if _deferred:
        _say_deferred("")
        return
    raise KeyboardInterrupt


def _on_interrupt(signum: int, frame) -> None:
    global _pending
    if _deferred and not _pending:
        _pending = True
        _say_deferred(" (Ctrl-C again to stop at once)")
        return
    _pending = True
    raise KeyboardInterrupt


def _say_deferred(more: str) -> None:
    # os.write: a signal handler may run inside a print to stderr, whose buffer is not reentrant
    with contextlib.suppress(OSError):
        os.write(2, f"\nstopping at the end of this step{more}\n".encode())


def ignore_terminate(worker_id: int = 0) -> None:
    """For worker processes (a DataLoader's `worker_init_fn`): leave SIGTERM to the main process,
    so that a stop sent to the whole process group (systemd, a CI runner, `kill -- -PGID`) does not
    kill a worker before the main process has saved its work. Workers still end when the main
    process shuts them down or dies."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
