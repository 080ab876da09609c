"""Differential fuzzing of the exact passes against eager PyTorch (optcc/testing/fuzz/).

Every registered exact pass alone, and the default exact pipeline, must reproduce eager
outputs (relative error <= 1e-5 in fp32) on random small models, with verification off so
that rollback cannot hide a wrong rewrite, and without raising.

``OPTCC_FUZZ_EXAMPLES`` sets the number of random models (default 120, which keeps the
suite inside its time budget on the slower AVX2 machines),
``OPTCC_FUZZ_MAX_BLOCKS`` their size (default 2 blocks) and ``OPTCC_FUZZ_WORKERS`` the
number of processes (default: one per core, at most 2); ``make fuzz`` runs many more.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from optcc.testing.fuzz import STATS, run_examples

EXAMPLES = int(os.environ.get("OPTCC_FUZZ_EXAMPLES", "120"))
MAX_BLOCKS = int(os.environ.get("OPTCC_FUZZ_MAX_BLOCKS", "2"))
WORKERS = int(os.environ.get("OPTCC_FUZZ_WORKERS", str(min(2, os.cpu_count() or 1))))


def test_exact_passes_match_eager_on_random_models():
    shares = [EXAMPLES // WORKERS + (i < EXAMPLES % WORKERS) for i in range(WORKERS)]
    if WORKERS == 1:
        results = [run_examples(EXAMPLES, MAX_BLOCKS)]
    else:
        # Capture is single-threaded Python: one process per core halves the wall time.
        with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_examples, shares, [MAX_BLOCKS] * WORKERS))
    for result in results:
        STATS.merge(result)
    failures = [r["failure"] for r in results if r["failure"]]
    assert not failures, "\n\n".join(failures)
    assert sum(r["examples"] for r in results) >= EXAMPLES
