"""Errors meant for the user: the CLI prints them as one line instead of a traceback, and exits with the code
that tells a requeue script what to do (docs/reliability.md):

    0   done
    2   fix the input (a bad path, file, option or config): running it again as it is fails the same way
    74  storage failed (EIO, a read-only filesystem): check the filesystem before running again
    75  retry later (no disk space, the run or output directory is in use): the same command may succeed later
    130 / 143  stopped by SIGINT / SIGTERM after saving a checkpoint
"""

EXIT_FIX_INPUT = 2
EXIT_STORAGE = 74  # sysexits' EX_IOERR
EXIT_RETRY_LATER = 75  # sysexits' EX_TEMPFAIL


class UserError(Exception):
    """Something the user can fix (bad path, bad file, bad option); the message says what and where."""

    exit_code = EXIT_FIX_INPUT


class RetryLater(Exception):
    """Nothing is wrong with the input, but the work cannot go on now: the disk is full, or another process
    holds the directory. The message names the directory and what is missing or who holds it."""

    exit_code = EXIT_RETRY_LATER


class StorageError(Exception):
    """The filesystem failed a write (EIO, EROFS): one line naming the directory, not a traceback."""

    exit_code = EXIT_STORAGE
