"""rlhfkit's logger: library code reports through it, and only the main process prints.

Under ``accelerate launch`` every process runs the same code; a bare ``print`` appears once per process.
:func:`info` and :func:`warning` go to the ``rlhfkit`` logger, whose handler writes to standard output
(whatever ``sys.stdout`` is at the time, so a redirect or pytest's capture sees it) and drops records on
every process but the main one. Progress bars stay with tqdm (each trainer disables its bar off the
main process).

The main process is the one whose ``RANK`` is 0 (unset: a single process). ``accelerate launch`` and
``torchrun`` set ``RANK`` for each process before Python starts; accelerate's own
``PartialState().is_main_process`` reads the same ``process_index`` (accelerate/state.py), but this needs
no initialised state, so it also holds before the first ``Accelerator`` exists. As transformers does
(``transformers/utils/logging.py``), the library's root logger gets its own handler and does not
propagate; ``logging.getLogger("rlhfkit").setLevel(logging.WARNING)`` silences the info lines.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("rlhfkit")


def is_main_process() -> bool:
    """Whether this is the main process of a launched run (``RANK`` 0 or unset)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


class _CurrentStdout(logging.StreamHandler):
    """A stream handler writing to the current ``sys.stdout``, not the one there when it was made."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]  # StreamHandler.stream is a plain attribute
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
    _handler = _CurrentStdout()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _handler.addFilter(_MainProcessOnly())
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def info(message: str) -> None:
    """Print one line of progress or outcome (main process only)."""
    logger.info(message)


def warning(message: str) -> None:
    """Print one line about something the user should know went differently (main process only)."""
    logger.warning(message)
