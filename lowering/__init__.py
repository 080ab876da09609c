"""Lowering of fused regions to generated Triton kernels (``target="triton"``).

``with_regions(gm)`` groups ops into fused regions (:mod:`.partition`) once every rewrite
is done; ``lower(gm, flat_inputs)`` returns a copy of the rewritten graph in which every region a
generator supports launches one generated kernel (cached as files by :mod:`.cache`,
launched by :mod:`.runtime`); the other regions run their reference
subgraph and every op outside regions stays a torch op, with a warning that says which
regions were left and why. Kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` to run
in Triton's interpreter on the CPU (slow; for tests).

Generated: pointwise regions (:mod:`.pointwise`), reduction regions (:mod:`.reduction`),
matmul regions with their epilogue (:mod:`.gemm`), convolution regions as the vendor conv
plus one epilogue kernel, and canonical SDPA nodes through the hand-written flash
attention kernel. They are proven in the interpreter and built for sm_80/sm_90, but not
yet timed on a GPU, so ``is_available()`` is False and ``target="auto"`` keeps choosing
Inductor until they are measured against it.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Any, Callable, Sequence

import torch


class LoweringNotAvailable(RuntimeError):
    pass


def is_available() -> bool:
    """Whether ``target="auto"`` should pick the Triton lowering (not until its kernels
    have been measured on a GPU against Inductor's)."""
    return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def with_regions(gm: Any) -> Any:
    """``gm`` itself if it has fused regions (the user named ``block_fusion``), else a copy
    with regions formed (:mod:`.partition`): the lowering's first step, after every rewrite."""
    from optcc.pass_manager import snapshot
    from optcc.regions import has_regions

    from .partition import form_regions

    if has_regions(gm):
        return gm
    gm = snapshot(gm)
    form_regions(gm)
    return gm


def lower(gm: Any, flat_inputs: Sequence[Any]) -> Callable:
    devices = {x.device.type for x in flat_inputs if isinstance(x, torch.Tensor)}
    if devices - {"cuda"} and not interpreting():
        raise LoweringNotAvailable(
            f"target='triton' runs generated kernels on CUDA tensors, but the inputs are on "
            f"{', '.join(sorted(devices))}; move the model and inputs to a GPU, set TRITON_INTERPRET=1 "
            "to run the kernels in Triton's interpreter (slow, for tests), or use target='inductor'"
        )
    from .runtime import lower_regions

    lowered, left = lower_regions(gm)
    if left:
        reasons = Counter(left.values())
        summary = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
        warnings.warn(f"optcc: {len(left)} region(s) run their reference torch ops instead of a "
                      f"generated kernel: {summary}", stacklevel=2)
    return lowered
