"""Progress in a log: whole lines every 10 % (and when a minute passed), never a bar's redraws."""

from __future__ import annotations

import io

import pytest
from tqdm.std import tqdm as std_tqdm

from prefopt import progress
from prefopt.progress import LineProgress, format_interval, progress_bar


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_tqdm_bar_and_a_file_gets_lines():
    assert isinstance(progress_bar(range(3), desc="x", file=Terminal()), std_tqdm)
    assert isinstance(progress_bar(range(3), desc="x", file=io.StringIO()), LineProgress)
    # disabled: tqdm's no-op, which writes nothing anywhere
    off = progress_bar(range(3), desc="x", file=io.StringIO(), disable=True)
    assert isinstance(off, std_tqdm) and off.disable


def test_a_kept_bar_writes_a_line_per_ten_percent_and_one_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=40, desc="train", unit="step", file=out, clock=clock)
    for step in range(1, 41):
        clock.now += 2.0  # 10 % every 8 s
        if step % 4 == 0:
            bar.set_postfix(loss=f"{1 / step:.4f}", acc="0.50")
        bar.update(1)
    bar.close()
    bar.close()  # a second close adds nothing
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # 4, 8, ..., 36 steps are 10 % ... 90 %; 40 is written once, by close
    assert [line.split(" ")[1] for line in lines] == [f"{n}/40" for n in range(4, 41, 4)]
    assert lines[0] == "train: 4/40 step (10%) [0:08 elapsed, 1:12 left, 2.00 s/step] loss=0.2500, acc=0.50"
    assert lines[-1] == "train: 40/40 step (100%) [1:20 elapsed, 2.00 s/step] loss=0.0250, acc=0.50"


def test_a_quick_bar_is_one_line_and_a_long_one_writes_between_its_percentages():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=10, desc="sample", unit="batch", file=out, clock=clock)
    for _ in range(10):
        clock.now += 0.4  # 4 s in all: less than LINE_MIN_SECONDS between two 10 % marks
        bar.update(1)
    bar.close()
    assert out.getvalue() == "sample: 10/10 batch (100%) [0:04 elapsed, 2.50 batch/s]\n"

    out = io.StringIO()
    bar = LineProgress(total=4, desc="train", unit="step", file=out, clock=clock)
    clock.now += 70
    bar.update(1)  # 25 %, and over a minute since the start
    clock.now += 1
    bar.update(1)  # 50 %, but a second after the last line
    bar.close()  # an interrupted run ends its bar at 2 of 4 steps
    assert out.getvalue().splitlines() == ["train: 1/4 step (25%) [1:10 elapsed, 3:30 left, 70.00 s/step]",
                                           "train: 2/4 step (50%) [1:11 elapsed, 1:11 left, 35.50 s/step]"]


def test_big_steps_write_one_line_per_crossing_and_a_resumed_bar_starts_past_its_initial_count():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=100, initial=35, desc="train", unit="step", file=out, clock=clock)
    for _ in range(3):
        clock.now += 10
        bar.update(25)  # 60, 85, 110 -> lines at 60 % and 85 %, then none past the total until close
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["60/100", "85/100", "110/100"]
    # the rate counts the steps of this run only (25 per 10 s), not the 35 done before it
    assert "2.50 step/s" in lines[0] and "0:16 left" in lines[0]


def test_a_transient_bar_is_silent_unless_it_runs_a_minute():
    out, clock = io.StringIO(), Clock()
    for _ in progress_bar(range(10), desc="eval", leave=False, file=out):
        clock.now += 1.0  # the real clock: this loop takes microseconds
    assert out.getvalue() == ""

    bar = LineProgress(range(4), desc="eval 8 pairs", unit="batch", leave=False, file=out, clock=clock)
    for _ in bar:
        clock.now += 25.0  # 4 batches of 25 s: a line after the third (75 s), and the closing one
    assert out.getvalue().splitlines() == [
        "eval 8 pairs: 3/4 batch (75%) [1:15 elapsed, 0:25 left, 25.00 s/batch]",
        "eval 8 pairs: 4/4 batch (100%) [1:40 elapsed, 25.00 s/batch]",
    ]


def test_an_unknown_total_counts_and_writes_after_the_interval(monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 5.0)
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(desc="tokenizing", unit=" rows", leave=False, file=out, clock=clock)
    for _ in range(4):
        clock.now += 2.0
        bar.update(1000)
    bar.close()
    assert out.getvalue().splitlines() == ["tokenizing: 3000 rows [0:06 elapsed, 500.00 rows/s]",
                                           "tokenizing: 4000 rows [0:08 elapsed, 500.00 rows/s]"]


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0:00"), (59.6, "1:00"), (3599, "59:59"), (3723, "1:02:03")])
def test_format_interval(seconds, text):
    assert format_interval(seconds) == text
