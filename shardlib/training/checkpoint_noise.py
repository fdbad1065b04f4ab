"""What Orbax and tensorstore print around a failed checkpoint read or write, kept from the user.

Orbax reports a failed background write (a full disk) by logging the same
traceback from several threads and then raising at the next wait; listing the
steps of a directory whose ``_CHECKPOINT_METADATA`` is damaged (or missing)
logs an absl ERROR (or WARNING) and carries on; tensorstore's callbacks and asyncio add "Event loop is
closed" and "Task exception was never retrieved". While a
``shardlib.training.checkpoint.Checkpointer`` is open, absl's ERROR records
(and Orbax's warnings) are held back (:class:`OrbaxErrors`, ``held``); the other two are dropped
whenever they name Orbax or tensorstore. What failed surfaces once, as the
Checkpointer's one-line error, whose cause :func:`gist` condenses.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import traceback


def _mentions_checkpoint_io(*texts: str) -> bool:
    return any("orbax" in t or "tensorstore" in t or "Event loop is closed" in t for t in texts)


def _quiet_unraisable(previous):
    """``sys.unraisablehook`` without the exceptions Orbax's event loops and tensorstore's callbacks
    leave behind after a failed write or read (``Event loop is closed``, coroutines never awaited)."""

    def hook(unraisable) -> None:
        files = [frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback)]
        if not _mentions_checkpoint_io(str(unraisable.exc_value), repr(unraisable.object), *files):
            previous(unraisable)

    hook.shardlib_quiet = True
    return hook


class _AsyncioLeftovers(logging.Filter):
    """asyncio's "Task exception was never retrieved" for Orbax's write tasks, logged when they are
    garbage collected, possibly long after the CheckpointError (so this filter stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and _mentions_checkpoint_io(record.getMessage()))


_ASYNCIO_LEFTOVERS = _AsyncioLeftovers()


def _install_leftover_filters() -> None:
    """Idempotent, process-wide and narrow: only records that name Orbax or tensorstore are dropped."""
    logging.getLogger("asyncio").addFilter(_ASYNCIO_LEFTOVERS)  # a no-op when already there
    if not getattr(sys.unraisablehook, "shardlib_quiet", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


class OrbaxErrors(logging.Filter):
    """Holds back absl ERROR records (Orbax logs one failure's traceback from several threads), and
    Orbax's own warnings (a step's metadata file missing), while a Checkpointer is open: what failed
    is raised once, as a CheckpointError. Kept in ``held``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: collections.deque = collections.deque(maxlen=50)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and "orbax" in record.pathname):
            self.held.append(record.getMessage())
            return False
        return True

    def install(self) -> None:
        logging.getLogger("absl").addFilter(self)
        _install_leftover_filters()

    def remove(self) -> None:
        logging.getLogger("absl").removeFilter(self)


# tensorstore's error text: a chain of drivers before what failed, JSON specs after it.
_DRIVER_CHAIN = re.compile(r'Error opening "\w+" driver: ')
_SPECS = " [tensorstore_spec"


def gist(err: BaseException, limit: int = 240) -> str:
    """One line about the innermost cause, its OS error first. Orbax wraps tensorstore errors that
    nest a few long paths and dump a whole spec: the spec and the chain of drivers are dropped,
    and a text still too long loses its middle, so that what was read (the array, the file) and
    why it failed both stay."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).split("\n", 1)[0].split(" See full TensorStore details", 1)[0]
    text = _DRIVER_CHAIN.sub("", text.split(_SPECS, 1)[0]).strip()
    if len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} ... {text[-half:]}"
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    if code := re.search(r"os_error_code='?(\d+)", str(err)):
        return f"{os.strerror(int(code.group(1)))}; {text}"
    return text
