"""The live progress display and the final summary of ``rlfleet run`` (driver, CLI only).

On a terminal the display is one line rewritten in place; anywhere else (a log file, CI)
it prints one plain line per update, so logs stay readable. Library code never calls
this: :func:`rlfleet.launch.job.run` takes a ``progress`` callback and the command line
passes :meth:`Progress.update`. Log records and the live line share the terminal: inside
:meth:`Progress.keep_logs_apart` every log record first clears the live line, then the
line is drawn again below the record, so neither lands on the end of the other.
Thread-safe: updates and log records (from any thread) take one lock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

__all__ = ["Progress", "format_progress", "format_summary"]


def _num(value: Any, fmt: str = ".0f", missing: str = "-") -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, fmt)


def _si(value: Any) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_progress(record: Mapping[str, Any]) -> str:
    """One line describing a metrics record: frames, rates, buffer, return, lag."""
    parts = [
        f"{_num(record.get('wall_s'), '.0f')}s",
        f"frames {_si(record.get('frames'))}",
        f"({_si(record.get('frames_per_s'))}/s)",
        f"buffer {_si(record.get('buffer/size'))}",
        f"learner {_si(record.get('learner/steps'))} steps ({_num(record.get('learner/steps_per_s'))}/s)",
        f"return {_num(record.get('return_mean'), '.1f')}",
        f"episodes {_si(record.get('episodes'))}",
        f"lag {_num(record.get('learner/policy_lag'), '.1f')} learner steps",
    ]
    return "  ".join(parts)


def format_summary(summary: Mapping[str, Any]) -> str:
    """A small two-column table of a finished run's summary."""
    rows = [
        ("run directory", str(summary.get("run_dir", "-"))),
        ("stopped by", str(summary.get("stop_reason", "-"))),
        ("frames", _num(summary.get("frames"))),
        ("learner steps", _num(summary.get("learner_steps"))),
        ("wall time", f"{_num(summary.get('wall_s'), '.1f')} s"),
        ("start-up", f"{_num(summary.get('startup_s'), '.1f')} s (Ray, placement, actors)"),
        ("frames/s collecting", _num(summary.get("frames_per_s"))),
        ("episodes", _num(summary.get("episodes"))),
        ("mean return (last episodes)", _num(summary.get("mean_return"), ".1f")),
        ("policy version", _num(summary.get("policy_version"))),
        ("collector restarts", _num(summary.get("restarts"))),
    ]
    if summary.get("policy_path"):
        rows.append(("exported policy", str(summary["policy_path"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


class Progress:
    """Shows metrics records as they come (driver, CLI).

    Args:
        stream: where to write (default ``sys.stdout``).
        live: rewrite one line in place; None: only when ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if live is None else live
        self._shown = False
        self._line = ""
        self._lock = threading.RLock()

    def update(self, record: Mapping[str, Any]) -> None:
        """Show one record: in place on a terminal, else as a new line."""
        line = format_progress(record)
        with self._lock:
            if self.live:
                width = shutil.get_terminal_size((120, 20)).columns - 1
                self._line = line[:width]
                self.stream.write("\r\x1b[2K" + self._line)
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
            self._shown = True

    def message(self, text: str) -> None:
        """A line of its own (stop reasons, warnings), without breaking the live line."""
        with self._lock:
            self.close_line()
            self.stream.write(text + "\n")
            self.stream.flush()

    def close_line(self) -> None:
        """End the live line so the next output starts on a fresh line."""
        with self._lock:
            if self.live and self._shown:
                self.stream.write("\n")
                self.stream.flush()
            self._shown = False

    def summary(self, summary: Mapping[str, Any]) -> None:
        """Print the final summary table."""
        with self._lock:
            self.close_line()
            self.stream.write("run finished\n" + format_summary(summary) + "\n")
            self.stream.flush()

    @contextlib.contextmanager
    def keep_logs_apart(self, logger: logging.Logger | None = None) -> Iterator[None]:
        """Within the block, log records of ``logger`` (default: the root logger's
        handlers) never share a line with the live progress line."""
        target = logger if logger is not None else logging.getLogger()
        originals = list(target.handlers)
        wrapped = [_ApartHandler(h, self) for h in originals]
        for old, new in zip(originals, wrapped):
            target.removeHandler(old)
            target.addHandler(new)
        try:
            yield
        finally:
            for old, new in zip(originals, wrapped):
                target.removeHandler(new)
                target.addHandler(old)

    def _around_log(self, emit: Any, record: logging.LogRecord) -> None:
        with self._lock:
            live = self.live and self._shown
            if live:  # wipe the live line, print the record, draw the line again
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
            emit(record)
            if live:
                self.stream.write(self._line)
                self.stream.flush()


class _ApartHandler(logging.Handler):
    """Wraps a handler so its records go through :meth:`Progress._around_log`."""

    def __init__(self, inner: logging.Handler, progress: Progress) -> None:
        super().__init__(inner.level)
        self.inner = inner
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress._around_log(self.inner.handle, record)
