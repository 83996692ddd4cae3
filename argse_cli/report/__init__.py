"""Report layer: LaTeX tables (:mod:`.tables`) and matplotlib figures (:mod:`.figures`).

Kept light: nothing is imported here, so ``import argse_cli.report`` pulls in neither numpy nor
matplotlib.
"""
