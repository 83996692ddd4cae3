"""Progress output: rounded stats, a Rich bar with M/N, elapsed and ETA on a TTY, short plain lines
at most every few seconds otherwise, new bars for new loops, warnings kept and shown under --quiet."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from argse_cli import progress as P
from argse_cli.progress import MAX_LINE, Progress, fmt_duration, fmt_stats


class _Clock:
    """A fake monotonic clock (the plain output's rate limit is in seconds)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(P.time, "monotonic", c)
    return c


def test_stats_rounded_to_three_significant_digits():
    # the raw list: cons=[1.265282154083252, 0.11617664247751236]
    s = fmt_stats({"epoch": 3, "cons": [1.265282154083252, 0.11617664247751236], "loss": 0.000123456,
                   "arr": np.array([1234.5678, 2.5e-5]), "f32": np.float32(2.34567), "skip": None, "ok": True})
    assert s == "epoch=3 cons=[1.27, 0.116] loss=0.000123 arr=[1.23e+03, 2.5e-05] f32=2.35 ok=True"
    assert fmt_duration(3725.4) == "1:02:05" and fmt_duration(None) == "-:--:--"


def test_plain_lines_short_and_rate_limited(clock):
    out = io.StringIO()
    p = Progress("train-gate", every_s=5.0, stream=out, tty=False)
    long_stats = {"loss": 0.5, "cons": list(np.linspace(0, 1, 200))}
    for i in range(1, 101):  # 100 steps, 0.1 s apart: 10 s in all
        clock.t += 0.1
        p(i, 100, long_stats)
    lines = out.getvalue().splitlines()
    # the first step, one every 5 s (at 5.1 s and 10.1 s... the last step at 10 s) and the last one
    assert [ln.split()[1] for ln in lines] == ["1/100", "51/100", "100/100"]
    assert all(len(ln) <= MAX_LINE for ln in lines)
    assert lines[0].startswith("[train-gate] 1/100   1% elapsed 0:00:00 eta ")
    assert "elapsed 0:00:10 eta 0:00:00" in lines[-1]
    # ETA from the rate so far: at step 51 of 100 after 5.0 s, 49 steps at 0.098 s each ~ 4.8 s -> 0:00:05
    assert "elapsed 0:00:05 eta 0:00:05" in lines[1]


def test_a_new_loop_starts_a_new_line_sequence(clock):
    out = io.StringIO()
    p = Progress("export-logits", every_s=60.0, stream=out, tty=False)
    for n in (3, 3):  # two splits with the same row count: the step goes back to 1
        for i in range(1, n + 1):
            p(i, n, {"split": "x"})
    p.phase("bootstrap")
    p(1, 2)
    lines = out.getvalue().splitlines()
    assert [ln.split("] ")[1].split()[0] for ln in lines] == ["1/3", "3/3", "1/3", "3/3", "1/2"]
    assert lines[-1].startswith("[export-logits: bootstrap] 1/2")


def test_rich_bar_shows_m_of_n_elapsed_eta_and_rounded_stats():
    out = io.StringIO()
    p = Progress("train-gate", stream=out, tty=True, width=120)
    for i in range(1, 11):
        p(i, 10, {"loss": 1 / 3, "cons": [1.265282154083252, 0.11617664247751236]})
    p.log("early stop at epoch 10/40: val criterion not improved for 15 epochs (best epoch 5)")
    p.phase("bootstrap")
    p(2, 4)
    p.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "train-gate" in text and "10/10" in text and "━" in text  # the bar, M/N
    assert re.search(r"\d:\d\d:\d\d eta", text)  # elapsed, then the ETA column
    assert "loss=0.333 cons=[1.27, 0.116]" in text
    assert "early stop at epoch 10/40" in text
    assert "train-gate: bootstrap" in text and "2/4" in text
    # never wider than the terminal: Rich cuts the stats, it does not wrap the bar away
    assert all(len(ln.rstrip()) <= 120 for ln in text.replace("\r", "\n").splitlines())


def test_quiet_prints_no_progress_but_keeps_and_shows_warnings(clock):
    out = io.StringIO()
    p = Progress("eval", stream=out, tty=False, quiet=True)
    p(1, 2, {"a": 1.0})
    p.log("a log line")
    p.warn("L2D: EM not converged")
    assert out.getvalue() == "warning: L2D: EM not converged\n"
    assert p.warnings == ["L2D: EM not converged"]


def test_track_iterates_with_one_step_per_item(clock):
    out = io.StringIO()
    p = Progress("report", stream=out, tty=False, every_s=0.0)
    assert list(p.track(["a", "b", "c"], "figures")) == ["a", "b", "c"]
    assert [ln.split()[2] for ln in out.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]


def test_a_child_loop_gets_its_own_lines_and_the_parent_keeps_its_count_and_clock(clock):
    # baselines: one step per method, and each ablation gate's epochs as a loop of their own
    out = io.StringIO()
    p = Progress("baselines", stream=out, tty=False, every_s=0.0)
    clock.t += 10.0
    p(1, 3, {"method": "Chow (ce)"})
    child = p.child("no sparsity seed 0: gate epochs")
    for e in range(1, 4):
        clock.t += 1.0
        child(e, 3, {"loss": 0.5})
    child.log("early stop at epoch 3/40: val criterion not improved for 2 epochs (best epoch 1)")
    child.warn("a warning inside the gate")
    child.close()
    p(2, 3, {"method": "no sparsity"})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[baselines] 1/3")
    assert [ln.split("] ")[1].split()[0] for ln in lines[1:4]] == ["1/3", "2/3", "3/3"]
    assert all(ln.startswith("[baselines: no sparsity seed 0: gate epochs] ") for ln in lines[1:4])
    assert lines[4].startswith("early stop at epoch 3/40") and lines[5] == "warning: a warning inside the gate"
    # the parent's loop goes on (2/3, not a new 1/N loop) and its clock counts the child's time
    assert lines[6].startswith("[baselines] 2/3  67% elapsed 0:00:13")
    assert p.warnings == ["a warning inside the gate"]


def test_a_child_bar_shares_the_parents_rich_display_and_is_removed_when_closed():
    out = io.StringIO()
    p = Progress("baselines", stream=out, tty=True, width=120)
    p(1, 3, {"method": "Chow (ce)"})
    child = p.child("hard routing seed 1: gate epochs")
    for e in range(1, 6):
        child(e, 5, {"loss": 0.25})
    assert child._rich is p._rich and len(p._rich.tasks) == 2  # one display, two bars
    child.close()
    assert len(p._rich.tasks) == 1
    p(2, 3)
    p.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "5/5" in text and "2/3" in text
