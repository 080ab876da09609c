"""bn_reparam rules for per-channel affine maps next to conv/linear (RepBN, constants).

(Rules are being added; each states its math here.)
"""

from __future__ import annotations

from optcc.rewrite import Rule

RULES: list[Rule] = []
