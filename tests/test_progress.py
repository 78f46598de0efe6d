"""Progress bars redraw as usual on a terminal and at most every 30 s into a log file: a 1000-batch
evaluation under nohup or SLURM wrote one redraw per batch into its log."""

import io

from hybrid.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_into_a_file_redraws_rarely_and_on_a_terminal_as_usual():
    log, terminal = io.StringIO(), _Terminal()
    bar = progress_bar(range(3), file=log)
    assert bar.mininterval == LOG_INTERVAL_S == 30.0
    assert list(bar) == [0, 1, 2] and "3/3" in log.getvalue()  # its last state is still written
    assert progress_bar(range(3), file=terminal).mininterval == 0.1  # tqdm's own
    assert progress_bar(range(3), file=log, mininterval=1.0).mininterval == 1.0  # an explicit one wins
