"""Reading the inputs of `evd logs summary` into one Summary, on every
CPU this process may use.

The work is cut into parts: a large plain file into about equal byte
ranges that start at line starts, any other file (.gz, a small one) whole.
With more than one part and more than one CPU, forked workers summarise
the parts and the parent merges their Summaries (every figure is a sum, a
minimum, a maximum or a list of values, so the order does not matter);
stdin, which only this process can read, is read here meanwhile.
Otherwise everything is read here, in order, with no process started.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from evd.tools.logs import journalctl, reading
from evd.tools.logs.summary import Summary

# Work below this is done by this process alone, and a file is cut in
# parts of at least this: starting and feeding a worker costs more than it
# saves on less.  (A .gz file counts as GZIP_RATIO times its size.)
SPLIT_MIN = 16 << 20
GZIP_RATIO = 8
MAX_WORKERS = 8  # beyond this the disk or the page cache, not the CPU, is the limit


@dataclass(frozen=True)
class Selection:
    since: str | None = None
    until: str | None = None
    service: str | None = None


@dataclass(frozen=True)
class Part:
    name: str
    start: int = 0
    end: int | None = None  # None: to the end of the file
    whole: bool = True  # the whole input (plain or .gz), read as reading.blocks does


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan(names: list[str], workers: int, split_min: int = SPLIT_MIN) -> list[Part]:
    """The parts of the named files (stdin is never a part); none if the
    work is too small to share out."""
    files = [name for name in names if name != reading.STDIN]
    sizes = {name: os.path.getsize(name) * (GZIP_RATIO if reading.is_gzip(name) else 1) for name in files}
    if workers < 2 or sum(sizes.values()) < 2 * split_min:
        return []
    parts: list[Part] = []
    for name in files:
        if not reading.is_gzip(name) and sizes[name] >= 2 * split_min:
            # Twice as many parts as workers: one that finds its CPU busy
            # (a shared machine) is helped out by the others.
            cuts = reading.line_starts(name, min(2 * workers, sizes[name] // split_min))
            for start, end in itertools.pairwise(cuts):
                parts.append(Part(name, start, end if end != cuts[-1] else None, whole=False))
        else:
            parts.append(Part(name))
    return parts


def summarise_part(part: Part, selection: Selection) -> tuple[Summary, str | None]:
    """A worker's job: (its Summary, the read error if there was one)."""
    summary = Summary(selection.since, selection.until, selection.service)
    try:
        if part.whole:
            source = reading.open_input(part.name)
            try:
                _feed(summary, reading.blocks(source))
            finally:
                source.close()
        else:
            _feed(summary, reading.range_blocks(part.name, part.start, part.end))
    except reading.InputError as exc:
        return summary, str(exc)
    finally:
        summary.presort()
    return summary, None


def _feed(summary: Summary, blocks: Iterator[tuple[list[bytes], bytes]]) -> None:
    for lines, tail in blocks:
        summary.feed(lines)
        summary.feed_tail(tail)


def summarise(
    names: list[str], selection: Selection, workers: int | None = None, split_min: int = SPLIT_MIN
) -> tuple[Summary, list[str]]:
    """Every input summarised: (the Summary, read errors).  Raises
    InputError, before reading anything, if an input cannot be opened."""
    names = names or [reading.STDIN]
    inputs = reading.open_inputs(names)  # every file readable, or nothing done
    workers = min(workers or cpus(), MAX_WORKERS)
    parts = plan(names, workers, split_min)
    if workers < 2 or len(parts) < 2:
        return _here(inputs, selection)
    stdin = [source for source in inputs if source.name == reading.STDIN]
    for source in inputs:
        if source.name != reading.STDIN:
            source.close()
    total = Summary(selection.since, selection.until, selection.service)
    errors: list[str] = []
    # fork: the workers start with everything imported, at once.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(parts)), mp_context=context) as pool:
        futures: list[Future[tuple[Summary, str | None]]] = [
            pool.submit(summarise_part, part, selection) for part in parts
        ]
        here, here_errors = _here(stdin, selection)
        total.merge(here)
        errors += here_errors
        for future in futures:
            summary, error = future.result()
            total.merge(summary)
            if error:
                errors.append(error)
    return total, errors


def _here(inputs: list[reading.Input], selection: Selection) -> tuple[Summary, list[str]]:
    """The inputs read by this process, in order."""
    summary = Summary(selection.since, selection.until, selection.service)
    errors: list[str] = []
    for source in inputs:
        try:
            _feed(summary, reading.blocks(source))
        except reading.InputError as exc:
            errors.append(str(exc))
        finally:
            source.close()
    return summary, errors


def summarise_journal(journal: journalctl.Journal, selection: Selection) -> tuple[Summary, list[str]]:
    """The journal's entries summarised, read through journalctl (one
    stream: read here).  JournalError if journalctl is missing or fails."""
    command = journalctl.argv(journal, selection.since, selection.until, fields=journalctl.SUMMARY_FIELDS)
    with journalctl.entries(command) as source:
        return _here([source], selection)
