"""Test set-up shared by every test: offline hubs, the Triton interpreter, golden files."""

import os

# Before anything imports transformers/timm/triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

GOLDEN_DIR = Path(__file__).parent / "golden"

# Under pytest-xdist (make test), each worker process takes its share of the cores, so the
# workers do not oversubscribe the CPU with torch's intra-op threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite tests/golden/<pass>/<case>.txt from the current output")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def golden(request):
    """``golden(pass_name, case, text)``: compare ``text`` with the stored golden file."""
    update = request.config.getoption("--update-goldens")

    def check(pass_name: str, case: str, text: str) -> None:
        path = GOLDEN_DIR / pass_name / f"{case}.txt"
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"no golden file {path}; create it with `pytest --update-goldens`"
        expected = path.read_text()
        assert text == expected, (
            f"graph after {pass_name} differs from {path} "
            "(if the change is intended, rerun with --update-goldens and review the diff)\n"
            f"--- expected\n{expected}\n--- got\n{text}"
        )

    return check


def pytest_terminal_summary(terminalreporter):
    """How many random models the differential fuzzer checked (printed with or without -s)."""
    import sys

    fuzz = sys.modules.get("optcc.testing.fuzz")
    if fuzz is not None and fuzz.STATS.examples:
        stats = fuzz.STATS
        terminalreporter.write_line(
            f"optcc fuzz: {stats.examples} random models, {stats.pass_runs} pass pipelines compared "
            f"with eager, {stats.triton_runs} of them also as Triton kernels, "
            f"{stats.settled_in_float64} fp32 differences of ill-conditioned models found exact in float64 "
            f"({stats.cpu_seconds:.0f} CPU s)"
        )
