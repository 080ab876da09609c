"""The HTML report page as a person sees it: screenshots of the demo model's page, and how
long a large page (mobileone_s0 before/after bn_reparam) takes to open in headless Chromium.

Both pages are written by the command line, as a user writes them:

    optcc dump demo --passes bn_reparam,block_fusion --format html --out DIR
    optcc dump timm:mobileone_s0 --passes bn_reparam --format html --out DIR

then opened from the file system (``optcc.testing.browser``: Debian's ``chromium`` driven by
Playwright). Open time is the browser's own clock from navigation start to the second
animation frame after the page's script finished (parsed, first drawing laid out and
painted); a stage switch is timed the same way from the click. Medians of ``--runs`` fresh
page loads. The screenshots go to ``--out`` (default docs/dumps).

    .venv/bin/python examples/dump_pages.py [--out docs/dumps] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optcc.hardware import cpu_summary  # noqa: E402
from optcc.testing.browser import find_chromium, open_page  # noqa: E402

_SWITCH = """async (k) => {
  const t0 = performance.now();
  document.querySelector('.tab[data-stage="' + k + '"]').click();
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  return performance.now() - t0;
}"""


def dump(model: str, passes: str, out: Path) -> Path:
    optcc = Path(sys.executable).with_name("optcc")
    subprocess.run([str(optcc), "dump", model, "--passes", passes, "--format", "html", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "dump.html"


def screenshots(page_path: Path, out: Path) -> list[Path]:
    shots = []
    with open_page(page_path, width=1400, height=900) as opened:
        page = opened.page
        assert not opened.errors, opened.errors
        stages = page.evaluate("window.optcc.data.stages.length")
        # after block_fusion: a fused region selected from the search box
        page.fill("#search", "region")
        page.press("#search", "Enter")
        shots.append(out / "demo_block_fusion.png")
        page.screenshot(path=str(shots[-1]))
        # after bn_reparam: the diff against the captured graph
        page.click('.tab[data-stage="1"]')
        page.fill("#search", "convolution")
        page.press("#search", "Enter")
        shots.append(out / "demo_bn_reparam.png")
        page.screenshot(path=str(shots[-1]))
        page.locator("#stage-1 pre.diff").scroll_into_view_if_needed()
        shots.append(out / "demo_bn_reparam_diff.png")
        page.screenshot(path=str(shots[-1]))
        assert stages >= 3 and not opened.errors, opened.errors
    return shots


def timing(page_path: Path, runs: int) -> dict[str, float]:
    opens, switches, nodes = [], [], 0
    for _ in range(runs):
        with open_page(page_path) as opened:
            assert not opened.errors, opened.errors
            opens.append(opened.load_seconds)
            switches.append(opened.page.evaluate(_SWITCH, 0) / 1000.0)   # to the captured graph, the largest
            nodes = opened.page.locator("#graph svg .node").count()
    return {"open": statistics.median(opens), "switch": statistics.median(switches), "nodes": nodes,
            "bytes": page_path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/dumps")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        demo = dump("demo", "bn_reparam,block_fusion", Path(tmp) / "demo")
        for shot in screenshots(demo, out):
            print(f"wrote {shot}")
        large = dump("timm:mobileone_s0", "bn_reparam", Path(tmp) / "mobileone")
        t = timing(large, args.runs)
    print(f"\n{cpu_summary()}; {find_chromium()}")
    print("| page | size | boxes drawn (captured stage) | open (median) | switch to captured stage (median) |")
    print("|---|---|---|---|---|")
    print(f"| mobileone_s0, bn_reparam | {t['bytes'] / 2**20:.1f} MiB | {t['nodes']} | {t['open']:.2f} s "
          f"| {t['switch']:.2f} s |")


if __name__ == "__main__":
    main()
