"""torchrun with a one-line report when a training process fails.

`python -m lmforge.train.torchrun ARGS` takes exactly torchrun's arguments. A worker that
fails has already printed its own `error:` line, and torchrun's traceback and failure
table would bury it. This entry point prints one line with the rank and exit status
instead, and exits with that status. `lmforge --debug train` runs torchrun itself, with
its full report.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def exit_status(exitcode: int) -> int:
    """Map a worker's exit code (negative for a signal) to a shell exit status."""
    if exitcode < 0:
        return 128 + (-exitcode)
    return exitcode if 0 < exitcode < 256 else 1


def main(argv: list[str] | None = None) -> None:
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            try:
                ending = f"was killed by {signal.Signals(-failure.exitcode).name}"
            except ValueError:
                ending = f"was killed by signal {-failure.exitcode}"
        else:
            ending = f"exited with status {failure.exitcode}"
        print(
            f"error: training process rank {rank} {ending}; its own messages are above "
            "(rerun with --debug for torchrun's full report)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(exit_status(failure.exitcode))


if __name__ == "__main__":
    main()
