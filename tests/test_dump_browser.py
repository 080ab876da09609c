"""The HTML report page in a real browser (headless Chromium): it loads without errors, draws
one element per graph node in every stage, and its search, click and collapse work.

Without Chromium the test is skipped on a developer's machine (``apt-get install chromium``)
and fails under CI, where ``make test`` installs it (its ``chromium`` target).
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from optcc.dump import write_dumps
from optcc.dump_layout import picture
from optcc.testing.browser import BrowserUnavailable, open_page

from test_dump_html import _run


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    gm, report = _run(("bn_reparam", "block_fusion"))
    [path] = write_dumps(report.dumps, "html", tmp_path_factory.mktemp("page"), report)
    return path, report


@pytest.fixture
def opened(demo_page):
    try:
        with open_page(demo_page[0]) as opened:
            yield opened
    except BrowserUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (`make test` installs Chromium when it runs as root; the browser test must run in CI)")
        pytest.skip(str(e))


def test_demo_page_in_chromium(demo_page, opened, tmp_path):
    _, report = demo_page
    page = opened.page
    assert opened.errors == []
    for k, (name, stage) in enumerate(report.dumps):
        page.click(f'.tab[data-stage="{k}"]')
        assert page.inner_text(f"#stage-{k} h2") == f"{k:02d} after {name}"
        if k:  # the diff reads one line per diff line, no blank lines between them
            shown = page.inner_text(f"#stage-{k} pre.diff").split("\n")
            assert len(shown) == page.locator(f"#stage-{k} pre.diff span").count() and "" not in shown[:-1]
        drawn = page.eval_on_selector_all("#graph svg .node", "els => els.map(e => e.dataset.id)")
        expected = [b.ident for b in picture(stage).boxes]
        assert sorted(drawn) == sorted(expected), f"stage {k} ({name}) draws other boxes than its graph has"
        if picture(stage).clusters:
            page.click("#collapse")
            fewer = page.locator("#graph svg .node").count()
            assert 0 < fewer < len(expected)
            page.click("#collapse")
            assert page.locator("#graph svg .node").count() == len(expected)

    # the last stage: find a convolution by op, open it from the hit list and from its box
    last = len(report.dumps) - 1
    page.click(f'.tab[data-stage="{last}"]')
    target = next(b.ident for b in picture(report.dumps[-1][1]).boxes if "conv" in b.label.lower())
    page.fill("#search", "convolution")
    hits = page.locator("#hits li").all_inner_texts()
    assert target in [h.split()[0] for h in hits], hits
    page.fill("#search", target)
    assert page.locator(f'#graph .node.hit[data-id="{target}"]').count() == 1
    page.press("#search", "Enter")
    assert page.locator("#graph .node.selected").get_attribute("data-id") == target
    assert "what the passes did" in page.inner_text("#details")
    page.fill("#search", "no_such_node_anywhere")
    assert page.locator("#hits li").count() == 0

    page.click("#graph svg .node >> nth=0")
    assert page.locator("#details h3").count() == 1
    assert opened.errors == []

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=False)
    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert image.size == (1400, 900) and high - low > 100  # drawn, not a blank page
