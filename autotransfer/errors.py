"""One error hierarchy for user mistakes: the CLI prints them as one line, exit code 1
(UsageError: 2).

Messages follow "found -> expected -> fix". Bugs are not AutotransferErrors and keep
their traceback.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class AutotransferError(Exception):
    """A problem the user can fix; the message says how."""


class DataError(AutotransferError):
    """The dataset folder is missing, empty or malformed."""


class BackboneError(AutotransferError):
    """Unknown backbone, or its weights cannot be had."""


class PlanError(AutotransferError):
    """A Plan with values that do not fit together or do not fit the backbone."""


class RunError(AutotransferError):
    """A RUN folder that is not (or not yet) an autotransfer run."""


class UsageError(AutotransferError):
    """Options that do not fit together; the CLI exits 2 for it, as for any wrong command line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM (`kill`, `timeout`, a scheduler) or a notebook's stop button during
    `fit`; the message says what was kept and where. A KeyboardInterrupt, so that it stops
    whatever called `fit`."""


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: Python's default would end the process at once, and Lightning's
    handler lets the next DataLoader error (its workers got the signal too) fail the trial
    as a bug; either way a search lost the trial's Plan instead of queueing it again."""
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def interruptible(kept: Callable[[], str]) -> Iterator[None]:
    """Turn Ctrl-C, however it arrives (a KeyboardInterrupt, or the exit(1) Lightning makes
    of it once it has saved its weights), into Interrupted(`kept()`); SIGTERM too, unless
    the program has its own handler for it."""
    from autotransfer.search import is_ctrl_c

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    term = main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if term:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    except Interrupted:
        raise
    except BaseException as exc:
        if not is_ctrl_c(exc):
            raise
        raise Interrupted(kept()) from None
    finally:  # Lightning ignores every later Ctrl-C once it caught one (SIG_IGN, for its
        # shutdown): in a notebook the kernel could then never be interrupted again
        if main and handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)
        if term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)



def user_file_error(exc: BaseException) -> str | None:
    """One line for an error raised by a user's file or folder; None for anything else.

    OSError (missing, read-only, full, a file where a folder should be), text that is not
    UTF-8 or not JSON, an image too large to decode: the CLI prints the line and exits 1.
    Anything else is a bug in autotransfer and keeps its traceback.
    """
    import errno
    import json

    from PIL import Image

    from autotransfer.features import cache_dir

    if isinstance(exc, OSError) and exc.filename is not None:
        where = f"'{exc.filename}'" + (f" -> '{exc.filename2}'" if exc.filename2 else "")
        if exc.errno in (errno.EROFS, errno.ENOSPC):
            fix = "pass a path on a writable disk with free space (--out, AUTOTRANSFER_CACHE)"
        elif str(exc.filename).startswith(str(cache_dir().parent)):
            fix = "it is in autotransfer's cache; point AUTOTRANSFER_CACHE to a writable folder"
        else:
            fix = {
                FileExistsError: "it is a file where a folder is needed; pass a folder or a new path (e.g. --out)",
                NotADirectoryError: "part of that path is a file, not a folder; pass another path (e.g. --out)",
                IsADirectoryError: "it is a folder where a file is needed; pass a file path",
                FileNotFoundError: "it (or its folder) does not exist; create the folder or pass an existing path",
                PermissionError: "make it readable and writable (chmod u+rw) or pass another path (e.g. --out)",
            }.get(type(exc), "check the path and pass another one if needed")
        return f"{where}: {exc.strerror or exc}; {fix}"
    if isinstance(exc, Image.DecompressionBombError):
        return f"an image is too large to decode safely ({exc}); resize it, or leave it out"
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is damaged ({exc}); restore it, or rerun the command that wrote it"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file that should be UTF-8 text is not ({exc}); pass the right file, or restore it"
    return None
