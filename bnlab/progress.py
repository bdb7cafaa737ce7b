"""What a person sees while a run trains, and what keeps a CPU run fast.

- :class:`Progress`: a tqdm bar on stderr with the live loss and accuracy, and how long the
  run (and, inside a :class:`JobProgress`, the whole job) has left; silent off a terminal.
- :class:`JobProgress`: where a job of several runs stands ("run 2 of 9, about 4 min left").
- :data:`EPOCH_HEADER` / :func:`format_epoch_row`: the aligned table, one row per epoch.
- :func:`cpu_allocator_tuned`: glibc's allocator kept from unmapping large activations.

``bnlab.train`` uses all three; ``bnlab bench train`` times with the allocator tuned.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from collections.abc import Iterator

__all__ = ["EPOCH_HEADER", "JobProgress", "Progress", "cpu_allocator_tuned", "format_duration",
           "format_epoch_row"]


# ---- CPU speed: the allocator ---------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@contextlib.contextmanager
def cpu_allocator_tuned(enabled: bool = True) -> Iterator[None]:
    """Serve large tensors from the reused heap instead of fresh mmaps (glibc only).

    glibc hands out every block over 32 MiB with a new ``mmap`` and unmaps it on free, so
    a (128, 96, 32, 32) float32 activation page-faults on every training step (measured:
    70-80% of a channels_last BN's time). ``mallopt(M_MMAP_MAX, 0)`` keeps such blocks on
    the heap, and a high trim threshold keeps freed memory for the next step. The previous
    settings (glibc's defaults) are restored on exit. A no-op where glibc is absent.
    """
    libc = None
    if enabled and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt  # noqa: B018 - probe that this libc has mallopt
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)          # glibc's default
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)  # glibc's default


# ---- progress -------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """A rough duration a person reads at a glance: ``"40 s"``, ``"4 min"``, ``"2.5 h"``."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class JobProgress:
    """Where a job of ``runs`` training runs stands, for the bar's "about N min left".

    The caller says which run starts (:meth:`start_run`, 1-based) and how many training
    steps a run has; :class:`Progress` reports each run's measured step time. The job's
    time left is this run's plus the runs after it at the measured step time (runs of one
    comparison have the same number of steps; an engine that is slower or faster shifts
    the estimate, so it is "about").
    """

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.index = 0
        self.run_steps = 0
        self.seconds_per_step: float | None = None

    def start_run(self, index: int, steps: int) -> None:
        self.index, self.run_steps = index, steps

    def describe(self) -> str:
        return f"run {self.index} of {self.runs}"

    def left_after_this_run(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return (self.runs - self.index) * self.run_steps * self.seconds_per_step


class Progress:
    """One epoch's bar (tqdm, on stderr, only on a terminal) with the live loss, accuracy,
    images/s and the time left: in this run (``epoch`` of ``epochs``) and, with a ``job``,
    in the whole job: ``run 2 of 9 · b seed 1 epoch 3/10 [...] loss 1.2 acc 0.45 ·
    run about 2 min left · all about 9 min left``.

    ``enabled`` False (``--quiet``) or a stderr that is not a terminal shows nothing.
    """

    def __init__(self, enabled: bool, prefix: str, *, epoch: int = 1, epochs: int = 1,
                 job: JobProgress | None = None) -> None:
        self.enabled = bool(enabled) and sys.stderr.isatty()
        self.prefix = prefix
        self.epoch, self.epochs, self.job = epoch, epochs, job
        self.last = 0.0
        self.started = time.perf_counter()
        self.bar = None

    def _open(self, steps: int) -> None:
        from tqdm import tqdm

        desc = f"{self.job.describe()} · {self.prefix}" if self.job else self.prefix
        self.bar = tqdm(total=steps, desc=desc, file=sys.stderr, leave=False,
                        dynamic_ncols=True, bar_format="{desc} {bar} {n}/{total} {postfix}")

    def update(self, step: int, steps: int, loss: float, acc: float, images_per_s: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.25 and step < steps):
            return
        self.last = now
        if self.bar is None:
            self._open(steps)
        per_step = (now - self.started) / max(step, 1)
        run_left = ((steps - step) + (self.epochs - self.epoch) * steps) * per_step
        text = (f"loss {loss:.4f} acc {acc:.4f} {images_per_s:.0f} img/s · run about "
                f"{format_duration(run_left)} left")
        if self.job is not None:
            self.job.seconds_per_step = per_step
            self.job.run_steps = self.epochs * steps
            after = self.job.left_after_this_run() or 0.0
            text += f" · all about {format_duration(run_left + after)} left"
        self.bar.n = step
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def wants_update(self) -> bool:
        return self.enabled and time.perf_counter() - self.last >= 0.25


EPOCH_HEADER = (f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'test loss':>9}  "
                f"{'test acc':>8}  {'time s':>7}  {'img/s':>7}")


def format_epoch_row(m: dict) -> str:
    """One epoch's metrics as a row under :data:`EPOCH_HEADER`."""
    return (f"{m['epoch']:>5}  {m['train_loss']:>10.4f}  {m['train_acc']:>9.4f}  "
            f"{m['test_loss']:>9.4f}  {m['test_acc']:>8.4f}  {m['epoch_time_s']:>7.1f}  "
            f"{m['images_per_s']:>7.0f}")
