"""S-Aware Gating (SAG) of ASkDAgger (arXiv 2508.05310) on a stream of batches (numpy only).

The rejector accepts x iff ``s(x) >= gamma`` (``score`` = margin, higher = more confident);
a rejected sample is handed to a human (it is "queried"). The threshold gamma is recomputed
after every batch on a window of the most recent labelled samples so that one rate hits a
target S:

- ``sensitivity``  share of the model's errors that are rejected
  ``P(rejected | h(x) != y)``;
- ``specificity``  share of the model's correct predictions that are accepted
  ``P(accepted | h(x) = y)``;
- ``success``      share of the system's outputs that are correct, a rejected sample counting
  as handled correctly: ``P(accepted, h(x) = y) + P(rejected) = 1 - P(accepted, h(x) != y)``.

Random queries (``p_rand``): each sample is, independently with probability p_rand, rejected
at random whatever its score (exploration, as in ASkDAgger). With ``feedback="rejected"`` only
rejected samples reveal whether the model was right (the human's label arrives only for queried
samples); the random queries are then the only labels from the accepted region, and each
labelled sample carries the inverse-propensity weight ``1 / P(labelled)`` (1 below gamma,
1/p_rand above), which keeps the window's rates unbiased. With ``feedback="all"`` (replaying a
labelled split) every sample is labelled with weight 1. The gamma solve accounts for the random
rejections: e.g. the sensitivity reached is ``p + (1 - p) P(s < gamma | err)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MODES", "SAGReplay", "batch_rate", "sag_gamma", "sag_stream"]

MODES = ("sensitivity", "specificity", "success")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def sag_gamma(
    score: Any, correct: Any, mode: str, target: float, p_rand: float = 0.0, weight: Any = None
) -> float | None:
    """Threshold gamma on a window so that the mode's (weighted) rate reaches ``target``.

    With p = p_rand and F the window's weighted empirical distributions:

    - sensitivity: the smallest gamma with ``F(s < gamma | err) >= (S - p) / (1 - p)``
      (-inf if that is <= 0); gamma is the next float above the matching error score;
    - specificity: the largest gamma with ``F(s >= gamma | correct) >= S / (1 - p)``
      (-inf, accept all, if S > 1 - p cannot be reached);
    - success: the smallest gamma with ``F(s >= gamma, err) <= (1 - S) / (1 - p)``
      (-inf if accepting everything already meets it).

    Returns None when the window holds no sample of the needed kind (no error for sensitivity,
    no correct one for specificity, empty window for success): the caller keeps its gamma.
    """
    _check_mode(mode)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    c = np.asarray(correct).reshape(-1).astype(bool)
    w = np.ones_like(s) if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
    p = float(p_rand)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p_rand must be in [0, 1), got {p}")
    if mode == "sensitivity":
        sel = ~c
        if not sel.any():
            return None
        need = (target - p) / (1.0 - p)
        if need <= 0:
            return -math.inf
        o = np.argsort(s[sel], kind="stable")
        es, ew = s[sel][o], w[sel][o]
        frac = np.cumsum(ew) / ew.sum()
        j = min(int(np.searchsorted(frac, need - 1e-12, side="left")), es.size - 1)
        return float(np.nextafter(es[j], np.inf))
    if mode == "specificity":
        sel = c
        if not sel.any():
            return None
        need = target / (1.0 - p)
        if need > 1.0:
            return -math.inf
        if need <= 0:
            return math.inf
        o = np.argsort(-s[sel], kind="stable")
        cs, cw = s[sel][o], w[sel][o]
        frac = np.cumsum(cw) / cw.sum()
        j = min(int(np.searchsorted(frac, need - 1e-12, side="left")), cs.size - 1)
        return float(cs[j])
    # success
    if s.size == 0:
        return None
    bound = (1.0 - target) / (1.0 - p)
    o = np.argsort(s, kind="stable")
    ss, ew = s[o], (w * ~c)[o]
    tot = w.sum()
    uniq = np.unique(ss)
    suffix = np.concatenate([np.cumsum(ew[::-1])[::-1], [0.0]])
    g = suffix[np.searchsorted(ss, uniq, side="left")] / tot  # F(s >= u, err) per unique u
    ok = np.flatnonzero(g <= bound + 1e-12)
    if ok.size == 0:
        return float(np.nextafter(uniq[-1], np.inf))
    return -math.inf if ok[0] == 0 else float(uniq[ok[0]])


def batch_rate(accept: Any, correct: Any, mode: str) -> float:
    """The mode's rate on one batch (nan when undefined, e.g. no error for sensitivity)."""
    _check_mode(mode)
    a = np.asarray(accept, dtype=bool)
    c = np.asarray(correct, dtype=bool)
    if mode == "sensitivity":
        n = (~c).sum()
        return float((~a & ~c).sum() / n) if n else math.nan
    if mode == "specificity":
        n = c.sum()
        return float((a & c).sum() / n) if n else math.nan
    return float(((a & c).sum() + (~a).sum()) / a.size) if a.size else math.nan


def _counts(accept: np.ndarray, correct: np.ndarray, mode: str) -> tuple[float, float]:
    """(numerator, denominator) of the mode's rate, for cumulative rates."""
    if mode == "sensitivity":
        return float((~accept & ~correct).sum()), float((~correct).sum())
    if mode == "specificity":
        return float((accept & correct).sum()), float(correct.sum())
    return float((accept & correct).sum() + (~accept).sum()), float(accept.size)


def _jl(x: Any) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(x, dtype=np.float64)]


@dataclass(frozen=True)
class SAGReplay:
    """How :func:`sag_stream` replays the stream.

    ``order`` (indices): the stream order (default: as stored). ``feedback``: ``"all"`` (every
    sample is labelled, weight 1) or ``"rejected"`` (only rejected samples are, inverse-propensity
    weighted; see the module docstring). ``gamma0``: the threshold before the first update
    (default +inf: query everything). ``warmup_batches``: batches left out of the
    ``post_warmup_*`` summaries (default ``ceil(window / batch_size)``, the batches needed to fill
    the window).
    """

    order: Any = None
    feedback: str = "all"
    gamma0: float = math.inf
    warmup_batches: int | None = None


def sag_stream(
    score: Any,
    correct: Any,
    mode: str,
    target: float,
    window: int,
    batch_size: int,
    p_rand: float = 0.0,
    seed: int = 0,
    *,
    replay: SAGReplay = SAGReplay(),
) -> dict[str, Any]:
    """Replay a stream in batches with SAG: gamma before each batch, update after it.

    Before batch b the current gamma is applied: accept iff ``s >= gamma`` and the sample was not
    randomly rejected (probability ``p_rand``). After the batch its labelled samples (all of them,
    or only the rejected ones with ``replay.feedback="rejected"``) join a window holding the last
    ``window`` labelled samples and gamma is re-solved on it with :func:`sag_gamma`; ``replay``
    (:class:`SAGReplay`) also sets the order, gamma0 and the warm-up.

    Returns a JSON-friendly dict: per batch ``batch_end`` (samples seen), ``gamma`` (the
    threshold applied, None = +-inf), ``rate`` (the mode's rate on that batch, None if
    undefined), ``coverage`` (accepted share), ``cumulative_rate`` (pooled counts from the
    start); summaries ``post_warmup_rate`` (pooled after warm-up), ``post_warmup_coverage``,
    ``post_warmup_mean_abs_dev`` (mean over batches of |rate - target|), and the settings.
    """
    s_all, c_all = _stream_inputs(score, correct, mode, window, batch_size, p_rand, replay)
    idx = np.arange(s_all.size) if replay.order is None else np.asarray(replay.order, np.int64)
    warmup = replay.warmup_batches
    if warmup is None:
        warmup = int(math.ceil(window / batch_size))
    rng = np.random.default_rng(seed)
    win = _Window(window)
    log = _BatchLog(mode, warmup)
    gamma = float(replay.gamma0)
    for b in range(int(math.ceil(idx.size / batch_size))):
        sl = idx[b * batch_size : (b + 1) * batch_size]
        s, c = s_all[sl], c_all[sl]
        rand_rej = rng.random(s.size) < p_rand
        above = s >= gamma
        accept = above & ~rand_rej
        log.add(b, gamma, accept, c, int(min((b + 1) * batch_size, idx.size)))
        # feedback -> window -> new gamma
        if replay.feedback == "all":
            win.push(s, c, np.ones(s.size))
        else:
            lab = ~accept
            win.push(s[lab], c[lab], np.where(above, 1.0 / p_rand, 1.0)[lab])
        new = sag_gamma(win.s, win.c, mode, target, p_rand, win.w)
        if new is not None:
            gamma = new
    settings = {"mode": mode, "target": float(target), "p_rand": float(p_rand),
                "window": int(window), "batch_size": int(batch_size),
                "warmup_batches": int(warmup), "feedback": replay.feedback, "n": int(idx.size)}  # fmt: skip
    return {**settings, **log.summary(target)}


def _stream_inputs(
    score: Any,
    correct: Any,
    mode: str,
    window: int,
    batch_size: int,
    p_rand: float,
    replay: SAGReplay,
) -> tuple[np.ndarray, np.ndarray]:
    """(s [N] float64, correct [N] bool), after checking the mode and the stream settings."""
    _check_mode(mode)
    if replay.feedback not in ("all", "rejected"):
        raise ValueError(f"feedback must be 'all' or 'rejected', got {replay.feedback!r}")
    if replay.feedback == "rejected" and p_rand <= 0.0:
        raise ValueError("feedback='rejected' needs p_rand > 0 (no label above gamma otherwise)")
    if window < 1 or batch_size < 1:
        raise ValueError("window and batch_size must be >= 1")
    s_all = np.asarray(score, dtype=np.float64).reshape(-1)
    c_all = np.asarray(correct).reshape(-1).astype(bool)
    if s_all.shape != c_all.shape:
        raise ValueError("score and correct must have the same length")
    return s_all, c_all


class _Window:
    """The last ``size`` labelled samples: score ``s``, correct ``c``, weight ``w`` = 1 / P(labelled)."""

    def __init__(self, size: int):
        self.size = size
        self.s = np.empty(0)
        self.c = np.empty(0, dtype=bool)
        self.w = np.empty(0)

    def push(self, s: np.ndarray, c: np.ndarray, w: np.ndarray) -> None:
        self.s = np.concatenate([self.s, s])[-self.size :]
        self.c = np.concatenate([self.c, c])[-self.size :]
        self.w = np.concatenate([self.w, w])[-self.size :]


class _BatchLog:
    """Per-batch gamma / rate / coverage / cumulative rate, and the pooled post-warm-up counts."""

    def __init__(self, mode: str, warmup: int):
        self.mode, self.warmup = mode, warmup
        self.gammas: list[float] = []
        self.rates: list[float] = []
        self.covs: list[float] = []
        self.cums: list[float] = []
        self.ends: list[int] = []
        self.num = self.den = 0.0
        self.pw_num = self.pw_den = self.pw_acc = self.pw_n = 0.0

    def add(self, b: int, gamma: float, accept: np.ndarray, c: np.ndarray, end: int) -> None:
        self.gammas.append(gamma)
        self.rates.append(batch_rate(accept, c, self.mode))
        self.covs.append(float(accept.mean()) if accept.size else math.nan)
        k_num, k_den = _counts(accept, c, self.mode)
        self.num, self.den = self.num + k_num, self.den + k_den
        self.cums.append(self.num / self.den if self.den else math.nan)
        self.ends.append(end)
        if b >= self.warmup:
            self.pw_num, self.pw_den = self.pw_num + k_num, self.pw_den + k_den
            self.pw_acc, self.pw_n = self.pw_acc + accept.sum(), self.pw_n + accept.size

    def summary(self, target: float) -> dict[str, Any]:
        r = np.asarray(self.rates, dtype=np.float64)[self.warmup :]
        return {
            "batch_end": self.ends,
            "gamma": _jl(self.gammas),
            "rate": _jl(self.rates),
            "coverage": _jl(self.covs),
            "cumulative_rate": _jl(self.cums),
            "post_warmup_rate": self.pw_num / self.pw_den if self.pw_den else None,
            "post_warmup_coverage": self.pw_acc / self.pw_n if self.pw_n else None,
            "post_warmup_mean_abs_dev": (
                float(np.nanmean(np.abs(r - target))) if np.isfinite(r).any() else None
            ),
        }
