"""The HTML report of one compilation: a single self-contained page, one section a stage.

Everything is in the file (SVG drawings, data as JSON, CSS, vanilla JavaScript): no
server, no network, no system binary; it opens from the file system. Per stage it shows
the drawn graph (:mod:`optcc.dump_layout`), what the pass did (status, matches, node
counts, time, output error, op counts changed), the rewrites it left alone with their
reasons and nodes, the diff of the graph text against the stage before with changed
lines marked, and, where given, the Triton source of each fused region.

Drawings are laid out in Python when the page is written, not in the browser, so a
2,000-node graph opens at once; each stage's SVG sits in a ``<template>`` and enters the
document only when the stage is shown. A stage with clusters (fused regions, model
blocks) has a second, collapsed drawing (one box per cluster); the toggle swaps them.
Clicking a box shows the node's type, its line of graph text, the model source line it
came from (``stack_trace``) and what every pass did to it; the search box finds a node
by name or op.
"""

from __future__ import annotations

import difflib
import html
import json
from pathlib import Path
from typing import Any, Sequence

import torch.fx as fx

from .dump import graph_text, node_text
from .dump_layout import SVG_STYLE, drawn_nodes, layout, picture, svg
from .report import PassRecord, Report
from .rewrite import source_line

TRACE_LINES = 8  # the innermost frames of a node's stack trace shown in its details


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _lines_by_name(gm: fx.GraphModule) -> dict[str, str]:
    return {n.name: node_text(n) for n in gm.graph.nodes if n.op != "get_attr"}


def _history(stages: Sequence[tuple[str, fx.GraphModule]]) -> list[dict[str, list[str]]]:
    """Per stage, node name -> what each pass did to it (created, rewritten, removed next)."""
    lines = [_lines_by_name(gm) for _, gm in stages]
    out = []
    for k in range(len(stages)):
        events: dict[str, list[str]] = {}
        for name in lines[k]:
            said = []
            for j in range(1, k + 1):
                if name not in lines[j]:
                    continue
                if name not in lines[j - 1]:
                    said.append(f"{stages[j][0]}: created")
                elif lines[j][name] != lines[j - 1][name]:
                    said.append(f"{stages[j][0]}: rewritten from {lines[j - 1][name]}")
            if k + 1 < len(stages) and name not in lines[k + 1]:
                said.append(f"{stages[k + 1][0]}: removed")
            events[name] = said
        out.append(events)
    return out


def _diff(before: str, after: str) -> str:
    """Unified diff of two graph texts as HTML; added and removed lines are marked."""
    rows = []
    for line in difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after", n=2, lineterm=""):
        cls = ("hunk" if line.startswith("@@") else "file" if line.startswith(("---", "+++"))
               else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        rows.append(f'<span class="{cls}">{_esc(line)}</span>')
    # each span is a block (its own line), so a newline between them would add a blank one
    return "".join(rows) if rows else '<span class="ctx">(no change to the graph text)</span>'


def _node_info(gm: fx.GraphModule, events: dict[str, list[str]]) -> dict[str, dict]:
    info = {}
    for d in drawn_nodes(gm):
        node, owner = d.node, d.region or d.node.name
        trace = [line for line in (node.meta.get("stack_trace") or "").strip().splitlines() if line.strip()]
        info[d.ident] = {
            "name": node.name,
            "op": node.op if node.op != "call_function" else node_text(node).split(" = ", 1)[-1].split("(")[0],
            "text": node_text(node),
            "region": d.region,
            "source": source_line(node),
            "trace": "\n".join(trace[-TRACE_LINES:]),
            "history": events.get(owner, []),
        }
    return info


def _record_table(records: Sequence[PassRecord]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("pass", "kind", "status", "matches", "nodes", "time", "rel. error"))
    rows = []
    for r in records:
        err = "-" if r.error is None else f"{r.error:.2e}"
        rows.append(f'<tr class="{_esc(r.status.replace(" ", "-"))}"><td>{_esc(r.name)}</td>'
                    f'<td>{"exact" if r.exact else "approx"}</td><td>{_esc(r.status)}</td><td>{r.matches}</td>'
                    f"<td>{r.nodes_before} &rarr; {r.nodes_after}</td><td>{r.seconds * 1e3:.1f} ms</td><td>{err}</td></tr>")
    return f'<table class="records"><tr>{head}</tr>{"".join(rows)}</table>'


def _pass_section(record: PassRecord) -> str:
    parts = [_record_table([record])]
    if record.message:
        parts.append(f'<p class="message">{_esc(record.message)}</p>')
    changes = record.op_changes()
    if changes:
        rows = "".join(f"<tr><td>{_esc(op)}</td><td>{b}</td><td>{a}</td></tr>" for op, (b, a) in changes.items())
        parts.append(f'<table class="ops"><tr><th>op</th><th>before</th><th>after</th></tr>{rows}</table>')
    left = record.left_alone()
    if left:
        items = []
        for reason, count, nodes in left:
            links = ", ".join(f'<a href="#" class="goto" data-node="{_esc(n.split(" ")[0][1:])}">{_esc(n)}</a>'
                              for n in nodes)
            items.append(f"<li>{count} &times; {_esc(reason)}" + (f" at {links}" if links else "") + "</li>")
        parts.append(f'<h4>left alone</h4><ul class="left-alone">{"".join(items)}</ul>')
    return "\n".join(parts)


def _match_records(stages: Sequence[tuple[str, fx.GraphModule]], records: Sequence[PassRecord]) -> list[PassRecord | None]:
    """The record of the pass that produced each stage (None for the captured graph)."""
    unused = list(records)
    out: list[PassRecord | None] = []
    for name, _ in stages:
        match = next((r for r in unused if r.name.split("(")[0] == name), None)
        if match is not None:
            unused.remove(match)
        out.append(match)
    return out


def render_page(stages: Sequence[tuple[str, fx.GraphModule]], report: Report | None = None,
                kernels: Sequence[tuple[str, str]] = (), title: str = "optcc dump") -> str:
    """The page for ``stages`` (``report.dumps``: the captured graph, then one a pass);
    ``kernels`` are ``(region, Triton source)`` of the last stage."""
    if not stages:
        raise ValueError("render_page needs at least one stage (a name and a graph module)")
    records = _match_records(stages, report.records if report else [])
    events = _history(stages)
    texts = [graph_text(gm) for _, gm in stages]
    data, tabs, sections, templates = [], [], [], []
    for k, (name, gm) in enumerate(stages):
        nodes = _node_info(gm, events[k])
        changed = {ident for ident, info in nodes.items()
                   if any(e.startswith(f"{name}: ") and not e.endswith(": removed") for e in info["history"])} if k else set()
        full = picture(gm)
        templates.append(f'<template id="graph-{k}-full">{svg(full, layout(full), name, changed, standalone=False)}</template>')
        groups: dict[str, list[str]] = {}
        for box in full.boxes:
            if box.group:
                groups.setdefault(box.group, []).append(box.ident)
        if full.clusters:
            small = picture(gm, collapse=True)
            templates.append(f'<template id="graph-{k}-collapsed">{svg(small, layout(small), name, standalone=False)}</template>')
        data.append({"name": name, "nodes": nodes, "groups": groups,
                     "titles": full.clusters, "collapsible": bool(full.clusters)})
        tabs.append(f'<button class="tab" data-stage="{k}">{k:02d} {_esc(name)}</button>')
        body = [f"<h2>{k:02d} after {_esc(name)}</h2>"]
        if records[k] is not None:
            body.append(_pass_section(records[k]))
        if k:
            body.append(f'<h4>graph text: changes against {_esc(stages[k - 1][0])}</h4><pre class="diff">{_diff(texts[k - 1], texts[k])}</pre>')
        body.append(f'<details><summary>graph text ({len(texts[k].splitlines())} lines)</summary><pre>{_esc(texts[k])}</pre></details>')
        if k == len(stages) - 1 and kernels:
            body.append("<h4>generated Triton kernels</h4>")
            body += [f'<details class="kernel"><summary>{_esc(region)}</summary><pre>{_esc(src)}</pre></details>'
                     for region, src in kernels]
        sections.append(f'<section class="stage" id="stage-{k}" hidden>{"".join(body)}</section>')
    summary = ""
    if report is not None:
        summary = _record_table(report.records) + "".join(f'<p class="note">note: {_esc(n)}</p>' for n in report.notes)
    # JSON inside <script>: "</" must not close the element early
    payload = json.dumps({"stages": data}).replace("</", "<\\/")
    return _PAGE.format(title=_esc(title), style=_CSS + SVG_STYLE, summary=summary, tabs="".join(tabs),
                        templates="\n".join(templates), sections="\n".join(sections), data=payload, script=_JS)


def write_html(stages: Sequence[tuple[str, fx.GraphModule]], path: Path, report: Report | None = None,
               kernels: Sequence[tuple[str, str]] = (), title: str = "optcc dump") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(stages, report, kernels, title), encoding="utf-8")
    return path


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
<header><h1>{title}</h1>{summary}
<nav>{tabs}
<input id="search" type="search" placeholder="find a node by name or op" autocomplete="off">
<button id="collapse">collapse blocks</button>
<button id="zoom-in">+</button><button id="zoom-out">&minus;</button>
</nav><ul id="hits"></ul></header>
<main><div id="graph"></div><aside id="details"><p>Click a box for its details.</p></aside></main>
{templates}
{sections}
<script type="application/json" id="optcc-data">{data}</script>
<script>{script}</script>
</body></html>
"""

_CSS = """
body { font: 14px system-ui, sans-serif; margin: 0 1em; color: #222; }
h1 { font-size: 1.3em; margin: .5em 0; } h2 { font-size: 1.15em; } h4 { margin: 1em 0 .3em; }
nav { display: flex; flex-wrap: wrap; gap: .3em; align-items: center; margin: .5em 0; }
.tab.active { background: #345; color: #fff; }
#search { width: 22em; padding: .25em; }
#hits { list-style: none; margin: 0; padding: 0; max-height: 10em; overflow: auto; }
#hits li { cursor: pointer; font-family: monospace; } #hits li:hover { background: #eef; }
main { display: flex; gap: 1em; height: 62vh; }
#graph { flex: 1; overflow: auto; border: 1px solid #ccc; background: #fcfcfc; }
#details { width: 30em; overflow: auto; border: 1px solid #ccc; padding: .5em; font-size: 13px; }
#details pre { white-space: pre-wrap; font-size: 12px; background: #f4f4f4; padding: .3em; }
.optcc-graph .node { cursor: pointer; }
.optcc-graph .node.selected rect { stroke: #1c7ed6; stroke-width: 3; }
.optcc-graph .node.hit rect { fill: #ffd8a8; }
table { border-collapse: collapse; margin: .3em 0; } td, th { border: 1px solid #ccc; padding: .15em .5em; }
tr.rolled-back td, tr.failed td { background: #ffe3e3; }
pre { font-size: 12px; overflow: auto; }
pre.diff { max-height: 30em; border: 1px solid #ddd; }
pre.diff span { display: block; min-height: 1.2em; } .diff .add { background: #d3f9d8; } .diff .del { background: #ffe3e3; }
.diff .hunk { color: #1864ab; background: #e7f5ff; } .diff .file { color: #888; }
"""

_JS = r"""
(function () {
  const DATA = JSON.parse(document.getElementById('optcc-data').textContent);
  const graph = document.getElementById('graph'), details = document.getElementById('details');
  const hits = document.getElementById('hits'), search = document.getElementById('search');
  const collapseButton = document.getElementById('collapse');
  let stage = 0, collapsed = false, zoom = 1, svg = null;

  function esc(s) { return String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c])); }

  function draw() {
    const id = 'graph-' + stage + (collapsed ? '-collapsed' : '-full');
    graph.replaceChildren(document.getElementById(id).content.cloneNode(true));
    svg = graph.querySelector('svg');
    svg.dataset.width = svg.getAttribute('width'); svg.dataset.height = svg.getAttribute('height');
    setZoom(zoom);
  }

  function show(k) {
    stage = k; collapsed = false;
    document.querySelectorAll('.tab').forEach(t => t.classList.toggle('active', +t.dataset.stage === k));
    document.querySelectorAll('section.stage').forEach(s => { s.hidden = s.id !== 'stage-' + k; });
    collapseButton.disabled = !DATA.stages[k].collapsible;
    collapseButton.textContent = 'collapse blocks';
    draw(); hits.replaceChildren();
    details.innerHTML = '<p>Click a box for its details.</p>';
  }

  function setZoom(z) {
    zoom = Math.min(4, Math.max(0.1, z));
    svg.setAttribute('width', svg.dataset.width * zoom); svg.setAttribute('height', svg.dataset.height * zoom);
  }

  function box(ident) { return graph.querySelector('.node[data-id="' + CSS.escape(ident) + '"]'); }

  function groupOf(ident) {
    const groups = DATA.stages[stage].groups;
    return Object.keys(groups).find(g => groups[g].includes(ident));
  }

  function select(ident) {
    const nodes = DATA.stages[stage].nodes;
    if (!(ident in nodes) && !(ident in DATA.stages[stage].groups)) {  // a name: its box or region op
      ident = Object.keys(nodes).find(i => nodes[i].name === ident || i.startsWith(ident + '/')) || ident;
    }
    if (collapsed && !box(ident) && ident in nodes) { collapsed = false; collapseButton.textContent = 'collapse blocks'; draw(); }
    graph.querySelectorAll('.node.selected').forEach(n => n.classList.remove('selected'));
    const el = box(ident);
    if (el) {
      el.classList.add('selected');
      const m = /translate\(([-\d.]+),([-\d.]+)\)/.exec(el.getAttribute('transform'));
      graph.scrollTo({left: m[1] * zoom - graph.clientWidth / 2, top: m[2] * zoom - graph.clientHeight / 2});
    }
    details.innerHTML = describe(ident);
    return !!el;
  }

  function describe(ident) {
    const s = DATA.stages[stage];
    if (ident in s.groups) {
      return '<h3>' + esc(s.titles[ident] || ident) + '</h3><p>' + s.groups[ident].length + ' ops:</p><ul>' +
        s.groups[ident].map(i => '<li><a href="#" class="goto" data-node="' + esc(i) + '">' + esc(i) + '</a></li>').join('') + '</ul>';
    }
    const n = s.nodes[ident];
    if (!n) return '<p>No node ' + esc(ident) + ' in this stage.</p>';
    const history = n.history.length ? n.history.map(h => '<li>' + esc(h) + '</li>').join('') : '<li>unchanged by every pass</li>';
    return '<h3>%' + esc(n.name) + '</h3><p><b>op</b> ' + esc(n.op) + (n.region ? ' (in region ' + esc(n.region) + ')' : '') + '</p>' +
      '<pre>' + esc(n.text) + '</pre>' +
      '<p><b>source</b> ' + (n.source ? esc(n.source) : 'unknown') + '</p>' +
      (n.trace ? '<details><summary>stack trace</summary><pre>' + esc(n.trace) + '</pre></details>' : '') +
      '<p><b>what the passes did</b></p><ul>' + history + '</ul>';
  }

  function find(query) {
    const q = query.trim().toLowerCase(), nodes = DATA.stages[stage].nodes;
    if (!q) return [];
    return Object.keys(nodes).filter(i => i.toLowerCase().includes(q) || nodes[i].op.toLowerCase().includes(q));
  }

  function listHits() {
    graph.querySelectorAll('.node.hit').forEach(n => n.classList.remove('hit'));
    const found = find(search.value);
    found.forEach(i => { const el = box(i); if (el) el.classList.add('hit'); });
    hits.replaceChildren(...found.slice(0, 50).map(i => {
      const li = document.createElement('li');
      li.textContent = i + '  ' + DATA.stages[stage].nodes[i].op;
      li.onclick = () => select(i);
      return li;
    }));
    return found;
  }

  document.querySelectorAll('.tab').forEach(t => t.addEventListener('click', () => show(+t.dataset.stage)));
  graph.addEventListener('click', e => { const n = e.target.closest('.node'); if (n) select(n.dataset.id); });
  document.body.addEventListener('click', e => {
    const a = e.target.closest('a.goto');
    if (a) { e.preventDefault(); select(a.dataset.node); }
  });
  search.addEventListener('input', listHits);
  search.addEventListener('keydown', e => { if (e.key === 'Enter') { const f = listHits(); if (f.length) select(f[0]); } });
  collapseButton.addEventListener('click', () => {
    collapsed = !collapsed; collapseButton.textContent = collapsed ? 'expand blocks' : 'collapse blocks'; draw();
  });
  document.getElementById('zoom-in').onclick = () => setZoom(zoom * 1.25);
  document.getElementById('zoom-out').onclick = () => setZoom(zoom / 1.25);
  graph.addEventListener('wheel', e => { if (e.ctrlKey) { e.preventDefault(); setZoom(zoom * (e.deltaY < 0 ? 1.1 : 1 / 1.1)); } }, {passive: false});

  window.optcc = {show, select, find, listHits, data: DATA};
  show(DATA.stages.length - 1);
  document.body.dataset.ready = 'yes';
})();
"""


# ----------------------------------------------------------------------------------------
# torch.compile: a page per specialisation

from dataclasses import dataclass  # noqa: E402

from .compiler import Pipeline  # noqa: E402


@dataclass
class DumpingPipeline(Pipeline):
    """A pipeline that writes the report page of every specialisation it builds into
    ``dump_dir`` (``spec_000.html``, ``spec_001.html``...): the backend's ``dump`` option
    and ``OPTCC_DUMP``."""

    dump_dir: str = ""
    written: int = 0

    def __post_init__(self) -> None:
        self.dump_after_each = True

    def build(self, capture, flat_inputs):
        spec = super().build(capture, flat_inputs)
        if spec.graph_module is not None:
            kernels = []
            if self.target == "triton":
                from optcc.lowering import with_regions
                from optcc.lowering.runtime import region_sources

                kernels = region_sources(with_regions(spec.graph_module))
            write_html(spec.report.dumps, Path(self.dump_dir) / f"spec_{self.written:03d}.html", spec.report, kernels,
                       title=f"optcc specialisation {self.written}")
            self.written += 1
        return spec
