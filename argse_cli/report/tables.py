"""LaTeX (booktabs) tables for the report, all in one style (:func:`table_env`).

Style shared by every table: ``table`` float, caption ABOVE (at most 3 lines), ``\\label``,
booktabs rules, the tabular shrunk to the line width only when it is wider (never enlarged), the
conventions in a table note below it (``\\footnotesize``), and an optional banner line (e.g. a
smoke-recipe warning) under the caption.

Cells (:func:`main_table`):

- ``ci_mode="halfwidth"``: ``mean $\\pm$ h`` with h the half-width of the 95% bootstrap CI of the
  seed mean; ``"column"``: ``mean $\\pm$ std`` plus a ``95% CI`` column ``[lo, hi]`` after each
  AURC column; ``"none"``: ``mean $\\pm$ std``. ``std`` is over seeds with ``ddof = 1``; a single
  seed shows the mean alone; a missing value shows ``--``.
- AURC = mean of the selective risk over the weighted-coverage grid 0.01, 0.02, ..., 1.00
  (:data:`argse_cli.metrics.AURC_CONVENTION`).
- Bold rule (decided by the report stage, :mod:`argse_cli.report.compare`): in each column the
  method with the lowest mean is bold iff the paired-bootstrap 95% CI of the seed-mean difference
  ``stat(best) - stat(runner-up)`` lies entirely below 0.
- Every caption names its view (long-tailed weights ``w_lt`` or balanced weights ``w_bal``).

Tables need ``\\usepackage{booktabs}`` and ``\\usepackage{graphicx}`` (``\\resizebox``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AURC_SENTENCE",
    "BOLD_RULE",
    "CI_MODES",
    "Column",
    "VIEW_PHRASE",
    "default_columns",
    "fmt_ci",
    "fmt_halfwidth",
    "fmt_mean_std",
    "latex_escape",
    "main_table",
    "mean_std",
    "sensitivity_table",
    "standalone_document",
    "table_env",
]

CI_MODES = ("halfwidth", "column", "none")

VIEW_PHRASE = {
    "lt": r"long-tailed weights ($w_{\mathrm{lt}}$)",
    "bal": r"balanced weights ($w_{\mathrm{bal}}$)",
}
AURC_SENTENCE = (
    r"AURC: mean of the selective risk over the weighted-coverage grid "
    r"$0.01, 0.02, \ldots, 1.00$."
)
BOLD_RULE = (
    r"Bold: the best mean whose paired-bootstrap 95\% CI of the difference to the runner-up "
    r"excludes 0."
)

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape the LaTeX special characters ``\\ & % $ # _ { } ~ ^`` of plain text."""
    return "".join(_ESCAPES.get(ch, ch) for ch in str(text))


@dataclass(frozen=True)
class Column:
    """One numeric table column.

    ``key`` indexes the values; ``header`` is LaTeX; ``group`` is the spanning header above it
    (columns with the same consecutive group share one ``\\cmidrule``); ``stat`` is the name of
    the bootstrapped statistic (:func:`argse_cli.metrics.bootstrap.stat_names`).
    """

    key: str
    header: str
    group: str | None = None
    stat: str | None = None


def _pct(lv: float) -> str:
    return f"{100 * lv:g}\\%"


def default_columns(levels: Sequence[float] = (0.7, 0.8, 0.9)) -> list[Column]:
    """Balanced AURC, worst AURC, balanced error at ``levels``, worst-group error at ``levels``.

    Keys equal the bootstrap statistic names (``aurc_balanced``, ``balanced_error@0.7``, ...).
    """
    cols = [
        Column("aurc_balanced", "bal.", "AURC", "aurc_balanced"),
        Column("aurc_worst", "worst", "AURC", "aurc_worst"),
    ]
    for lv in levels:
        k = f"balanced_error@{lv:g}"
        cols.append(Column(k, _pct(lv), "Balanced error at coverage", k))
    for lv in levels:
        k = f"worst_error@{lv:g}"
        cols.append(Column(k, _pct(lv), "Worst-group error at coverage", k))
    return cols


def _clean(values: Sequence[float] | None) -> list[float]:
    return [float(v) for v in (values or []) if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[float] | None) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof = 1); std is None for fewer than 2 values, both None if empty."""
    v = _clean(values)
    if not v:
        return None, None
    m = math.fsum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in v) / (len(v) - 1))


def fmt_mean_std(values: Sequence[float] | None, digits: int = 3) -> str:
    """``"0.123 $\\pm$ 0.004"`` (std over seeds, ddof = 1); one value: ``"0.123"``; none: ``"--"``."""
    m, s = mean_std(values)
    if m is None:
        return "--"
    if s is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} $\\pm$ {s:.{digits}f}"


def fmt_halfwidth(mean: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``"0.123 $\\pm$ 0.010"`` with 0.010 = (hi - lo) / 2 of the CI; no CI: the mean; none: ``--``."""
    if mean is None or not math.isfinite(float(mean)):
        return "--"
    if ci is None or any(v is None or not math.isfinite(float(v)) for v in ci):
        return f"{float(mean):.{digits}f}"
    h = (float(ci[1]) - float(ci[0])) / 2
    return f"{float(mean):.{digits}f} $\\pm$ {h:.{digits}f}"


def fmt_ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    """``"[0.101, 0.130]"``; none: ``--``."""
    if ci is None or any(v is None or not math.isfinite(float(v)) for v in ci):
        return "--"
    return f"[{float(ci[0]):.{digits}f}, {float(ci[1]):.{digits}f}]"


def _header_rows(columns: Sequence[Column], lead: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Spanning header row (+ cmidrules) and the column header row.

    ``lead`` are the text columns left of ``columns`` (e.g. Method, Setting), ``extra`` those right.
    """
    lines = []
    if any(c.group for c in columns):
        spans: list[tuple[str | None, int]] = []
        for c in columns:
            if spans and spans[-1][0] == c.group and c.group is not None:
                spans[-1] = (c.group, spans[-1][1] + 1)
            else:
                spans.append((c.group, 1))
        cells, rules, pos = [""] * len(lead), [], len(lead) + 1
        for g, n in spans:
            if g is None:
                cells += [""] * n
            else:
                cells.append(f"\\multicolumn{{{n}}}{{c}}{{{g}}}")
                rules.append(f"\\cmidrule(lr){{{pos}-{pos + n - 1}}}")
            pos += n
        cells += [""] * len(extra)
        lines.append(" & ".join(cells) + r" \\")
        if rules:
            lines.append(" ".join(rules))
    lines.append(" & ".join([*lead, *(c.header for c in columns), *extra]) + r" \\")
    return lines


def _n_seeds(cols: Mapping[str, Sequence[float]]) -> int:
    return max((len(_clean(v)) for v in cols.values()), default=0)


def table_env(spec: str, head: Sequence[str], body: Sequence[str], caption: str, label: str, *,
              note: str | None = None, banner: str | None = None) -> str:
    """The one table style: caption above, label, booktabs, shrink-to-fit, note below.

    ``head`` / ``body``: LaTeX rows (``\\midrule`` lines allowed in ``body``); ``caption``, ``note``
    and ``banner`` are LaTeX already (escape plain text with :func:`latex_escape`). The tabular is
    scaled down to ``\\linewidth`` only when it is wider (``\\resizebox`` with ``\\ifdim``).
    """
    lines = [
        r"% requires \usepackage{booktabs} and \usepackage{graphicx}",
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{caption}}}",
        f"\\label{{{label}}}",
    ]
    if banner:
        lines.append(f"{{\\small\\bfseries {banner}\\par}}\\smallskip")
    lines += [
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        *head,
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}}",
    ]
    if note:
        lines.append(f"\\par\\smallskip{{\\footnotesize\\raggedright {note}\\par}}")
    lines += [r"\end{table}", ""]
    return "\n".join(lines)


def _with_ci_columns(columns: Sequence[Column]) -> list[Column]:
    """Each AURC column followed by its ``95% CI`` column (key ``<key>#ci``), same group."""
    out: list[Column] = []
    for c in columns:
        out.append(c)
        if c.key.startswith("aurc"):
            out.append(Column(f"{c.key}#ci", r"95\% CI", c.group, None))
    return out


def main_table(
    entries: Mapping[str, Mapping[str, Sequence[float]]],
    columns: Sequence[Column],
    bold: Mapping[str, str | None] | None,
    caption: str,
    label: str,
    *,
    sections: Sequence[Sequence[str]] | None = None,
    seeds_column: bool = True,
    digits: int = 3,
    ci: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    ci_mode: str = "none",
    note: str | None = None,
    banner: str | None = None,
) -> str:
    """A booktabs ``table``: one row per method (``entries[method][column.key]`` = values over seeds).

    Cells: ``ci_mode`` ``"none"`` -> :func:`fmt_mean_std`; ``"halfwidth"`` -> :func:`fmt_halfwidth`
    of the seed mean and ``ci[method][column.key] = (lo, hi)``; ``"column"`` -> mean +- std and a
    CI column after each AURC column. A value cell is ``\\textbf`` only where ``bold[column.key]``
    names that method. ``sections`` (lists of method names) are separated by ``\\midrule``; by
    default one section in ``entries`` order. Method names are LaTeX-escaped; ``caption``,
    ``note`` and ``banner`` are LaTeX already.
    """
    if ci_mode not in CI_MODES:
        raise ValueError(f"ci_mode must be one of {CI_MODES}, got {ci_mode!r}")
    if ci_mode != "none" and ci is None:
        raise ValueError(f"ci_mode={ci_mode!r} needs ci")
    bold = bold or {}
    ci = ci or {}
    if sections is None:
        sections = [list(entries)]
    cols = _with_ci_columns(columns) if ci_mode == "column" else list(columns)
    extra = ["seeds"] if seeds_column else []
    spec = "l" + "c" * len(cols) + "r" * len(extra)
    body: list[str] = []
    first = True
    for sec in sections:
        rows = [m for m in sec if m in entries]
        if not rows:
            continue
        if not first:
            body.append(r"\midrule")
        first = False
        for m in rows:
            cells = [latex_escape(m)]
            for c in cols:
                if c.key.endswith("#ci"):
                    cells.append(fmt_ci(ci.get(m, {}).get(c.key[:-3]), digits))
                    continue
                if ci_mode == "halfwidth":
                    txt = fmt_halfwidth(mean_std(entries[m].get(c.key))[0], ci.get(m, {}).get(c.key), digits)
                else:
                    txt = fmt_mean_std(entries[m].get(c.key), digits)
                if bold.get(c.key) == m and txt != "--":
                    txt = f"\\textbf{{{txt}}}"
                cells.append(txt)
            if seeds_column:
                cells.append(str(_n_seeds(entries[m])))
            body.append(" & ".join(cells) + r" \\")
    return table_env(spec, _header_rows(cols, ["Method"], extra), body, caption, label, note=note, banner=banner)


def sensitivity_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    caption: str,
    label: str,
    *,
    digits: int = 3,
    note: str | None = None,
    banner: str | None = None,
) -> str:
    """Booktabs table of a sensitivity study: one row per (method, setting), no bold.

    ``rows[i] = {"method": str, "setting": str, "values": {column.key: [values over seeds]}}``;
    rows of one method are grouped (``\\midrule`` between methods) in order of appearance.
    """
    spec = "ll" + "c" * len(columns) + "r"
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    body: list[str] = []
    for i, m in enumerate(methods):
        if i:
            body.append(r"\midrule")
        for r in rows:
            if r["method"] != m:
                continue
            vals = r.get("values", {})
            cells = [latex_escape(m), latex_escape(r.get("setting") or "--")]
            cells += [fmt_mean_std(vals.get(c.key), digits) for c in columns]
            cells.append(str(_n_seeds(vals)))
            body.append(" & ".join(cells) + r" \\")
    head = _header_rows(columns, ["Method", "Setting"], ["seeds"])
    return table_env(spec, head, body, caption, label, note=note, banner=banner)


def standalone_document(body: str) -> str:
    """A minimal compilable LaTeX document around ``body``: the standard ``article`` class with
    booktabs and graphicx (what every table and ``figures.tex`` need)."""
    return "\n".join(
        [
            r"\documentclass{article}",
            r"\usepackage{booktabs}",
            r"\usepackage{graphicx}",
            r"\begin{document}",
            body,
            r"\end{document}",
            "",
        ]
    )
