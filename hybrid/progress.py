"""Progress bars that suit both a terminal and a log file.

On a terminal a bar redraws as usual. Written to a file (a SLURM job's log, a `nohup` redirect) every redraw
is another line's worth of text: a 1000-batch evaluation wrote a redraw per batch. There the bar redraws
at most every `LOG_INTERVAL_S` seconds, plus its first and last state.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`, redrawn at most every LOG_INTERVAL_S seconds when its stream (`file`, else
    stderr) is not a terminal; an explicit `mininterval` wins."""
    from tqdm import tqdm

    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
