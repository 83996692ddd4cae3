"""argse: selective classification on long-tailed data (AR-GSE).

The distribution is ``argse`` (``pip install argse``, the ``argse`` command); the Python package
is ``argse_cli`` (``import argse_cli``).

Public Python API (numpy in, numpy out; torch tensors accepted too), loaded lazily so that the
CLI's cache check stays fast:

- ``plugin_predict(eta, alpha, class_to_group, beta=None)``
- ``plugin_margin(eta, alpha, mu, c, class_to_group, beta=None)``
- ``build_gating_features(posteriors)``
- ``selective_metrics(...)``, ``rc_curve(...)``, ``aurc(...)``
- ``load_rejector(key, store=None)``: a stored gate + rejector, ``.apply(logits_per_expert)``
- ``load_gate_split(key, split="test", store=None)``: a stored gate's mixture eta, rule, labels
  and weights on one split of its logits
- ``results(eval_or_report_key, store=None)``: tidy ``pandas.DataFrame`` (one row per method x
  seed x view x protocol x metric, with CIs); ``result_records`` without pandas
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "plugin_predict": "argse_cli.core.rule",
    "plugin_margin": "argse_cli.core.rule",
    "chow_margin": "argse_cli.core.rule",
    "acceptance_prob": "argse_cli.core.rule",
    "build_gating_features": "argse_cli.core.gate",
    "selective_metrics": "argse_cli.metrics",
    "rc_curve": "argse_cli.metrics",
    "aurc": "argse_cli.metrics",
    "load_rejector": "argse_cli.apply",
    "load_gate_split": "argse_cli.analysis",
    "results": "argse_cli.analysis",
    "result_records": "argse_cli.analysis",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'argse_cli' has no attribute {name!r}")
