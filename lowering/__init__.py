"""Lowering of fused regions to generated Triton kernels (``target="triton"``).

Not implemented in this version: ``is_available()`` is False, so ``target="auto"``
chooses Inductor, and asking for ``target="triton"`` explicitly raises
:class:`LoweringNotAvailable` with the alternatives.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


class LoweringNotAvailable(NotImplementedError):
    pass


def is_available() -> bool:
    return False


def lower(gm: Any, flat_inputs: Sequence[Any]) -> Callable:
    raise LoweringNotAvailable(
        "target='triton' is not implemented in this version of optcc; "
        "use target='inductor' (TorchInductor) or target='eager'"
    )
