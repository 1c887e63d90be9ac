"""The check of a dataset's records that runs on every training start, before any batch is built, and
the record of what `data.on_bad_sample` dropped.

Readers check each manifest line or JSON entry as they read it; this module adds what they cannot
see cheaply: every image is decoded once, so a truncated, empty or non-image file is found now, not
by a data-loader worker mid-epoch. With `data.on_bad_sample=raise` (the default) the first bad sample stops the run with one
`DataError` naming the manifest file and line, the image and the problem; with `skip` the bad
samples are dropped and listed in a `SkipLog`, which the run writes to `skipped.jsonl`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from mmqa.atomic import write_atomic
from mmqa.data.images import load_image
from mmqa.data.readers.base import SKIP_HINT, OnBad
from mmqa.data.records import ImageRecord
from mmqa.errors import ConfigError, DataError

ON_BAD_SAMPLE = ("raise", "skip")
CHECK_DRAFT_SIZE = 32  # JPEGs are checked at a reduced scale of at least this many pixels a side
SUMMARY_KINDS, SUMMARY_EXAMPLES, SUMMARY_CHARS = 4, 2, 80  # the log's skip summary stays a line


@dataclass
class Skipped:
    split: str
    where: str  # "file:line", "file: entry[i]": the manifest place of the sample
    problem: str


class SkipLog:
    """What `data.on_bad_sample` does with a bad sample: 'raise' stops, 'skip' drops it and keeps a note."""

    def __init__(self, mode: str) -> None:
        if mode not in ON_BAD_SAMPLE:
            raise ConfigError(f"data.on_bad_sample={mode!r} is not an option; valid: {', '.join(ON_BAD_SAMPLE)}")
        self.mode = mode
        self.skipped: list[Skipped] = []

    def reader_callback(self, split: str) -> OnBad | None:
        """The `on_bad` a reader gets: None (so it raises) unless bad samples are skipped."""
        if self.mode == "raise":
            return None
        return lambda where, error: self.add(split, where, error)

    def add(self, split: str, where: str, error: DataError) -> None:
        message = str(error)
        problem = message.removeprefix(f"{where}: ")
        self.skipped.append(Skipped(split, where, problem))

    def summary(self) -> str:
        """Short whatever the count: e.g. "skipped 3 bad samples: 2 not a readable image, 1 malformed JSON;
        first: train.jsonl:4 (not a readable image ...)". At most `SUMMARY_KINDS` kinds and
        `SUMMARY_EXAMPLES` examples, each cut to `SUMMARY_CHARS`; the full list is `write`'s file."""
        kinds = Counter(_kind(s.problem) for s in self.skipped).most_common()
        named = ", ".join(f"{n} {k}" for k, n in kinds[:SUMMARY_KINDS])
        if len(kinds) > SUMMARY_KINDS:
            named += f", {sum(n for _, n in kinds[SUMMARY_KINDS:])} of {len(kinds) - SUMMARY_KINDS} other kinds"
        examples = "; ".join(_cut(f"{Path(s.where).name} ({s.problem})") for s in self.skipped[:SUMMARY_EXAMPLES])
        return f"skipped {len(self.skipped)} bad samples: {named}; first: {examples}"

    def write(self, path: Path) -> None:
        """One JSON object per skipped sample (split, where, problem), written atomically."""
        write_atomic(path, "".join(json.dumps(asdict(s)) + "\n" for s in self.skipped))


def _kind(problem: str) -> str:
    """The problem without its particulars: quoted text (a key name stays), paths and numbers dropped,
    then the text before the first ':', '(' or '[' ("conflicting repeat of line", "malformed JSON")."""
    problem = re.sub(r"'(?![\w.]+')[^']*'|\"[^\"]*\"|[^\s:]*/[^\s:]*|(?<![\w-])\d+", "", problem).lstrip(": ")
    return " ".join(re.split(r"[:(\[]", problem, maxsplit=1)[0].split())


def _cut(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def check_images(records: dict[str, list[ImageRecord]], log: SkipLog) -> dict[str, list[ImageRecord]]:
    """Decode every distinct image once; return the records whose image decodes (all of them, or a
    `DataError` for the first bad one, when `log.mode` is 'raise')."""
    paths = sorted({r.image for recs in records.values() for r in recs})
    # PIL decodes outside the GIL, so threads use every core; 4800 64 px PNGs take about a second.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = {p: e for p, e in zip(paths, pool.map(_problem, paths)) if e is not None}
    if not problems:
        return records
    bad = [(split, r) for split, recs in records.items() for r in recs if r.image in problems]
    if log.mode == "raise":
        _, r = bad[0]
        more = f" (and {len(problems) - 1} more unreadable images)" if len(problems) > 1 else ""
        raise DataError(f"{r.source}: {problems[r.image]}{more}; {SKIP_HINT} trains without them")
    for split, r in bad:
        log.skipped.append(Skipped(split, r.source, problems[r.image]))
    return {split: [r for r in recs if r.image not in problems] for split, recs in records.items()}


def _problem(path: Path) -> str | None:
    try:
        load_image(path, draft_size=CHECK_DRAFT_SIZE)
    except DataError as e:
        return str(e)
    return None

