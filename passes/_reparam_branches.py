"""bn_reparam rules for multi-branch convolution blocks (structural re-parameterization).

(Rules are being added; each states its math here.)
"""

from __future__ import annotations

from optcc.rewrite import Rule

RULES: list[Rule] = []
