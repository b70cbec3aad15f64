"""`python -m codegen2.launch TORCHRUN-ARGS`: torchrun, exiting with the documented code its workers exited with.

torchrun exits 1 whenever a worker fails, whatever that worker's code, so a requeue script behind it could never
tell "retry later" (75) from "fix the input" (2) or a crash. This runs torchrun's own launcher, with the same
arguments, and maps its failed workers' codes to one (`launcher_exit_code`, docs/reliability.md).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable

from .errors import EXIT_FIX_INPUT, EXIT_RETRY_LATER, EXIT_STORAGE

EXIT_CRASH = 1  # torchrun's own code for a failed worker
STOPPED = (130, 143)  # stopped by SIGINT / SIGTERM (after saving a checkpoint, when training)
# Most telling first: one worker's bad input or failing storage outranks the peers that only saw it go (75).
DOCUMENTED = (EXIT_FIX_INPUT, EXIT_STORAGE, EXIT_RETRY_LATER, *STOPPED)


def launcher_exit_code(failures: Iterable[tuple[int, float]]) -> int:
    """The one exit code for the failed workers' (exit code, time of failure).

    Once a worker fails, torchrun stops the others with SIGTERM, then SIGKILL 30 s later: a worker that died of
    SIGTERM (or SIGINT) is "stopped" (143, 130), and one killed later than the first failure is ignored. Any other
    undocumented code (a traceback, a signal such as the OOM killer's) is a crash, 1, never requeued; otherwise the
    most telling documented code wins, so that 75 means every worker that failed on its own said "retry later".
    """
    failures = list(failures)
    first = min((when for _, when in failures), default=0.0)
    codes = set()
    for code, when in failures:
        if code in (-signal.SIGINT, -signal.SIGTERM):
            code = 128 - code
        elif code < 0 and when > first:
            continue
        codes.add(code)
    if not codes or not codes <= set(DOCUMENTED):
        return EXIT_CRASH
    return next(code for code in DOCUMENTED if code in codes)


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv` (default: this command's arguments); its exit code as `launcher_exit_code` says."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        code = launcher_exit_code((failure.exitcode, failure.timestamp) for _, failure in failures)
        listed = ", ".join(f"rank {rank} exited {failure.exitcode}" for rank, failure in failures)
        print(f"launch: {listed}: exit {code} (docs/reliability.md)", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # the launcher itself was told to stop (scancel, preemption)
        print(f"launch: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
