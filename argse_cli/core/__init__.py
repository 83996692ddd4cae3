"""The one method core: the rule (Theorem 1) and its fits (Algorithms 1 and 2).

- :mod:`argse_cli.core.rule`: h(x), m(x) of the group-aware plug-in rule, Chow's rule, thresholds
  for a target coverage, the fitted-rule dataclasses;
- :mod:`argse_cli.core.plugin_fit`: Algorithm 1 (coverage- and cost-matched CS-plug-in), the lambda
  search, Algorithm 2 (Plug-in[Worst]), all vectorised over the coverage grid.
"""
