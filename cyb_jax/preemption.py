"""Stop a run cleanly on SIGTERM, the signal TPU and cluster schedulers send before preempting.

The handler only sets a flag. The training loop reads the flag once per step.
When it is set, the loop saves a checkpoint at the step it reached, waits until
that checkpoint is committed and raises `Preempted`, which `main` turns into
exit status EXIT_CODE.
"""

import contextlib
import signal
import threading
from typing import Iterator

# 128 + SIGTERM (15) = 143, the status a shell reports for a process ended by SIGTERM.
EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """The run stopped on SIGTERM after committing a checkpoint at `step`."""

    def __init__(self, step: int, workdir: str):
        super().__init__(f"Stopped by SIGTERM at step {step}. The checkpoint at step {step} is saved in "
            f"{workdir}/checkpoints.")
        self.step = step
        self.workdir = workdir


class StopRequest:
    """Whether SIGTERM has arrived since the flag was installed."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True


@contextlib.contextmanager
def sigterm_request() -> Iterator[StopRequest]:
    """Install a SIGTERM handler that sets the returned flag, and restore the previous handler on exit."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        # Python accepts signal handlers only in the main thread. Elsewhere, such as a
        # training loop started from a worker thread, SIGTERM keeps its previous action.
        yield request
        return
    previous = signal.signal(signal.SIGTERM, request._handle)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)
