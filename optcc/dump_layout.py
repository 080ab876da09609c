"""Drawing a graph without Graphviz: which boxes a graph becomes, a layered layout, SVG.

``--format svg`` and the HTML page draw with this module, so a dump needs no system
binary. The layout is the classic layered (Sugiyama) scheme, kept simple enough to stay
fast at a few thousand boxes in Python:

1. rank = longest path from the inputs (FX order is topological, one pass);
2. an edge spanning several ranks gets a dummy point on every rank it crosses, so
   residual skips bend around the boxes instead of cutting through them;
3. the order inside each rank comes from a few up/down barycentre sweeps (fewer
   crossings);
4. x is pulled towards the leftmost of each box's neighbours, alternately from above and
   below, while boxes on a rank keep their order and a gap.

Constants (``get_attr``) are left out of drawings, as in ``graph_dot``: a conv's weight
is in its node's details, not a box of its own. A fused region is a cluster of its
reference ops (or one box when collapsed); a model block (``layer1.0``, ``blocks.3``:
the module path of a repeated submodule, from ``node.meta["nn_module_stack"]``) is a
cluster too and collapses into one box.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import networkx as nx
import torch.fx as fx

from .ir import op_name
from .regions import REGION_KEY, is_region, region_module

BOX_H = 34
RANK_GAP = 28  # vertical room between ranks, where the edges run
BOX_GAP = 18
CHAR_W = 6.6  # 11px monospace
MARGIN = 20
BLOCK_MAX = 80  # a block cluster holds at most this many boxes, else the next level down


@dataclass
class Drawn:
    """One box a graph node becomes; ``ident`` is unique in the drawing."""

    ident: str
    node: fx.Node
    inputs: list[str]
    region: str | None = None  # the fused region it is a reference op of


def drawn_nodes(gm: fx.GraphModule) -> list[Drawn]:
    """The boxes of ``gm`` in topological order, with the boxes each one reads.

    A region's reference ops are drawn in its place (``region/op`` idents): its inputs
    read the outer producers, and the ``getitem`` nodes that pick its results read the
    op that computed each one.
    """
    drawn: list[Drawn] = []
    producer: dict[fx.Node, str] = {}  # which box carries a graph value
    for node in gm.graph.nodes:
        if node.op == "get_attr" or node in producer:
            continue
        if not is_region(node):
            drawn.append(Drawn(node.name, node, [producer[a] for a in node.all_input_nodes if a in producer]))
            producer[node] = node.name
            continue
        sub = region_module(gm, node)
        inner: dict[fx.Node, str | None] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for placeholder, arg in zip(placeholders, node.args):
            inner[placeholder] = producer.get(arg)
        results = None
        for sub_node in sub.graph.nodes:
            if sub_node.op == "placeholder":
                continue
            if sub_node.op == "output":
                results = sub_node.args[0]
                continue
            ident = f"{node.name}/{sub_node.name}"
            drawn.append(Drawn(ident, sub_node, [inner[a] for a in sub_node.all_input_nodes if inner.get(a)],
                               region=node.name))
            inner[sub_node] = ident
        if isinstance(results, (tuple, list)):
            for user in node.users:  # getitem(region, i) carries result i
                producer[user] = inner[results[user.args[1]]]
        else:
            producer[node] = inner[results]
    return drawn


def box_text(node: fx.Node) -> tuple[str, str]:
    """(first line, second line) of a box: the op (or input name) and the value's type."""
    from .dump import type_text

    typ = type_text(node.meta.get("val"))
    if node.op == "call_function":
        return op_name(node).removeprefix("aten."), typ
    if node.op == "output":
        return "output", ""
    return f"{node.op}: {node.name}", typ


def module_path(node: fx.Node) -> str:
    """The innermost module a node came from (``layer1.0.conv1``), or ""."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _block_prefixes(path: str) -> list[str]:
    """Prefixes of ``path`` that end at a numbered child: ``layer1.0``, ``blocks.3``..."""
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i, p in enumerate(parts) if p.isdigit()]


def blocks_of(drawn: list[Drawn]) -> dict[str, str]:
    """Box ident -> block path, the shortest numbered prefix holding at most BLOCK_MAX boxes
    (a ViT's ``blocks.3``; mobileone's ``stages.1`` is too big, so ``stages.1.0``)."""
    candidates = {d.ident: _block_prefixes(module_path(d.node)) for d in drawn if d.node.op == "call_function"}
    sizes = Counter(p for prefixes in candidates.values() for p in prefixes)
    chosen = {}
    for ident, prefixes in candidates.items():
        fitting = [p for p in prefixes if sizes[p] <= BLOCK_MAX]
        if fitting or prefixes:
            chosen[ident] = (fitting or prefixes)[0]
    # a block of one box is no block worth collapsing
    counts = Counter(chosen.values())
    return {ident: block for ident, block in chosen.items() if counts[block] > 1}


# ----------------------------------------------------------------------------------------
# The picture: boxes, edges, clusters


@dataclass
class Box:
    ident: str
    label: str
    sub: str
    kind: str  # input | op | output | region | block (the last two: collapsed clusters)
    group: str | None = None  # the cluster it sits in (region or block), expanded view


@dataclass
class Picture:
    boxes: list[Box]
    edges: list[tuple[str, str]]
    clusters: dict[str, str] = field(default_factory=dict)  # cluster id -> its title


def picture(gm: fx.GraphModule, collapse: bool = False) -> Picture:
    """What to draw for ``gm``: every box and cluster, or (``collapse``) one box per cluster."""
    drawn = drawn_nodes(gm)
    block = blocks_of(drawn)
    region_info = {n.name: str(n.meta[REGION_KEY]) for n in gm.graph.nodes if is_region(n)}
    clusters: dict[str, str] = {}
    members: Counter = Counter()
    boxes, rep, collapsed = [], {}, set()
    for d in drawn:
        group = block.get(d.ident) and f"block:{block[d.ident]}"
        if d.region and not group:
            group = f"region:{d.region}"
        if group:
            members[group] += 1
            kind = group.split(":", 1)[0]
            clusters[group] = f"{d.region}: {region_info[d.region]}" if kind == "region" else block[d.ident]
        label, sub = box_text(d.node)
        kind = {"placeholder": "input", "output": "output"}.get(d.node.op, "op")
        if collapse and group:
            rep[d.ident] = group
            if group not in collapsed:
                collapsed.add(group)
                boxes.append(Box(group, group.split(":", 1)[1], "", group.split(":", 1)[0]))
        else:
            rep[d.ident] = d.ident
            boxes.append(Box(d.ident, label, sub, kind, group))
    for group in clusters:  # a block's title names the module class
        if group.startswith("block:"):
            path = group[len("block:"):]
            cls = next((t for d in drawn for p, t in (d.node.meta.get("nn_module_stack") or {}).values() if p == path), "")
            clusters[group] = f"{path}: {str(cls).rsplit('.', 1)[-1]}"
    if collapse:
        for b in boxes:
            if b.kind in ("region", "block"):
                b.sub = f"{members[b.ident]} ops"
                b.label = clusters[b.ident].split(":", 1)[0] if b.kind == "block" else b.label
    edges = list(dict.fromkeys((rep[i], rep[d.ident]) for d in drawn for i in d.inputs if rep[i] != rep[d.ident]))
    return Picture(boxes, edges, {} if collapse else clusters)


# ----------------------------------------------------------------------------------------
# Layered layout


@dataclass
class Layout:
    pos: dict[str, tuple[float, float, float]]  # ident -> (left x, top y, width)
    routes: list[tuple[str, str, list[tuple[float, float]]]]  # (from, to, points)
    width: float
    height: float


def box_width(label: str, sub: str) -> float:
    return max(len(label), len(sub), 4) * CHAR_W + 16


def layout(pic: Picture) -> Layout:
    widths = {b.ident: box_width(b.label, b.sub) for b in pic.boxes}
    order = {b.ident: i for i, b in enumerate(pic.boxes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(order)
    dag.add_edges_from(pic.edges)
    if not nx.is_directed_acyclic_graph(dag):
        # a collapsed block can both feed and read a box outside it: draw that edge, but
        # rank as if only the edges that follow the graph's order existed
        dag.remove_edges_from([(a, b) for a, b in pic.edges if order[a] >= order[b]])
    rank: dict[str, int] = {}
    for v in nx.lexicographical_topological_sort(dag, key=order.get):
        rank[v] = max((rank[p] + 1 for p in dag.predecessors(v)), default=0)

    # dummy points on long edges; chains[(a, b)] lists the points an edge passes
    up: dict[str, list[str]] = {i: [] for i in widths}
    chains: dict[tuple[str, str], list[str]] = {}
    for a, b in pic.edges:
        chain, prev = [], a
        for r in range(rank[a] + 1, rank[b]):
            dummy = f"~{len(widths)}"
            widths[dummy], rank[dummy], up[dummy] = 6.0, r, [prev]
            chain.append(dummy)
            prev = dummy
        up[b].append(prev)
        chains[(a, b)] = chain
    down: dict[str, list[str]] = {i: [] for i in widths}
    for v, us in up.items():
        for u in us:
            down[u].append(v)
    layers: list[list[str]] = [[] for _ in range(max(rank.values(), default=0) + 1)]
    for ident in widths:
        layers[rank[ident]].append(ident)

    index = {v: i for layer in layers for i, v in enumerate(layer)}
    for sweep in range(4):  # barycentre ordering, down then up
        order = layers[1:] if sweep % 2 == 0 else layers[-2::-1]
        neighbours = up if sweep % 2 == 0 else down
        for layer in order:
            keys = {v: (sum(index[n] for n in neighbours[v]) / len(neighbours[v]) if neighbours[v] else index[v])
                    for v in layer}
            layer.sort(key=lambda v: keys[v])
            index.update({v: i for i, v in enumerate(layer)})

    centre: dict[str, float] = {}
    for layer in layers:  # packed left to right to start with
        x = 0.0
        for v in layer:
            centre[v] = x + widths[v] / 2
            x += widths[v] + BOX_GAP
    for sweep in range(6):
        order = layers[1:] if sweep % 2 == 0 else layers[-2::-1]
        neighbours = up if sweep % 2 == 0 else down
        for layer in order:
            # aligned to the leftmost neighbour, not the mean: a mean drifts a long chain
            # sideways at every branch that rejoins it
            want = [min(centre[n] for n in neighbours[v]) if neighbours[v] else centre[v] for v in layer]
            _place(layer, want, widths, centre)

    left = min((centre[v] - widths[v] / 2 for v in widths), default=0.0)
    shift = MARGIN - left
    y_of = lambda r: MARGIN + r * (BOX_H + RANK_GAP)  # noqa: E731
    pos = {b.ident: (centre[b.ident] - widths[b.ident] / 2 + shift, y_of(rank[b.ident]), widths[b.ident])
           for b in pic.boxes}
    routes = []
    for (a, b), chain in chains.items():
        points = [(centre[a] + shift, y_of(rank[a]) + BOX_H)]
        points += [(centre[d] + shift, y_of(rank[d]) + BOX_H / 2) for d in chain]
        points.append((centre[b] + shift, y_of(rank[b])))
        routes.append((a, b, points))
    width = max((x + w for x, _, w in pos.values()), default=0.0) + MARGIN
    return Layout(pos, routes, width, y_of(len(layers)) + MARGIN - RANK_GAP)


def _place(layer: list[str], want: list[float], widths: dict[str, float], centre: dict[str, float]) -> None:
    """Centres near ``want`` with the order and gaps kept: pushed right where boxes
    collide, then pulled back left as far as the box to the right allows."""
    xs = []
    for i, v in enumerate(layer):
        x = want[i]
        if i:
            x = max(x, xs[-1] + (widths[layer[i - 1]] + widths[v]) / 2 + BOX_GAP)
        xs.append(x)
    for i in range(len(layer) - 2, -1, -1):
        limit = xs[i + 1] - (widths[layer[i + 1]] + widths[layer[i]]) / 2 - BOX_GAP
        xs[i] = min(max(want[i], xs[i]) if xs[i] <= limit else limit, limit)
    centre.update(zip(layer, xs))


# ----------------------------------------------------------------------------------------
# SVG

SVG_STYLE = """
.optcc-graph text { font: 11px monospace; fill: #222; }
.optcc-graph .node rect { stroke: #777; stroke-width: 1; }
.optcc-graph .node.op rect { fill: #fff2cc; }
.optcc-graph .node.input rect, .optcc-graph .node.output rect { fill: #cfe8ff; }
.optcc-graph .node.region rect { fill: #d5ecd5; stroke: #4d8f4d; }
.optcc-graph .node.block rect { fill: #e8e8f4; stroke: #6a6aa0; }
.optcc-graph .node.changed rect { stroke: #d9480f; stroke-width: 2; }
.optcc-graph .edge { fill: none; stroke: #8a8a8a; stroke-width: 1; }
.optcc-graph .cluster.region { fill: #eef7ee; stroke: #4d8f4d; }
.optcc-graph .cluster.block { fill: #f5f5fb; stroke: #a0a0c8; stroke-dasharray: 4 3; }
.optcc-graph .cluster text { fill: #555; }
"""


def _attr(text: str) -> str:
    return html.escape(text, quote=True)


def svg(pic: Picture, lay: Layout, title: str = "graph", changed: set[str] = frozenset(),
        standalone: bool = True) -> str:
    """The drawing as SVG; every box is ``<g class="node ..." data-id=IDENT>`` so the page
    can find and select it. ``changed`` boxes (new or rewritten by the stage) get an outline."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="optcc-graph" width="{lay.width:.0f}" '
           f'height="{lay.height:.0f}" viewBox="0 0 {lay.width:.0f} {lay.height:.0f}">',
           f"<title>{_attr(title)}</title>"]
    if standalone:
        out.append(f"<style>{SVG_STYLE}</style>")
    out.append('<g class="clusters">')
    spans: dict[str, list[float]] = {}
    for b in pic.boxes:
        if b.group:
            x, y, w = lay.pos[b.ident]
            s = spans.setdefault(b.group, [x, y, x + w, y + BOX_H])
            spans[b.group] = [min(s[0], x), min(s[1], y), max(s[2], x + w), max(s[3], y + BOX_H)]
    for group, (x0, y0, x1, y1) in spans.items():
        kind = group.split(":", 1)[0]
        out.append(f'<g class="cluster {kind}" data-group="{_attr(group)}"><rect x="{x0 - 6:.0f}" y="{y0 - 16:.0f}" '
                   f'width="{x1 - x0 + 12:.0f}" height="{y1 - y0 + 22:.0f}" rx="6"/>'
                   f'<text x="{x0 - 2:.0f}" y="{y0 - 5:.0f}">{_attr(pic.clusters.get(group, group))}</text></g>')
    out.append('</g><g class="edges">')
    for a, b, points in lay.routes:
        d = " ".join(f"{x:.0f},{y:.0f}" for x, y in points)
        out.append(f'<polyline class="edge" data-from="{_attr(a)}" data-to="{_attr(b)}" points="{d}"/>')
    out.append('</g><g class="nodes">')
    for b in pic.boxes:
        x, y, w = lay.pos[b.ident]
        cls = f"node {b.kind}" + (" changed" if b.ident in changed else "")
        out.append(f'<g class="{cls}" data-id="{_attr(b.ident)}" transform="translate({x:.0f},{y:.0f})">'
                   f'<rect width="{w:.0f}" height="{BOX_H}" rx="5"/>'
                   f'<text x="8" y="14">{_attr(b.label)}</text><text x="8" y="27">{_attr(b.sub)}</text></g>')
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def draw_svg(gm: fx.GraphModule, title: str = "graph") -> str:
    """``gm`` drawn as a standalone SVG file (``--format svg``)."""
    pic = picture(gm)
    return svg(pic, layout(pic), title)


def iter_idents(text: str) -> Iterator[str]:
    """The ``data-id`` of every box in an SVG this module drew (tests count them)."""
    return (html.unescape(m) for m in re.findall(r'<g class="node [^"]*" data-id="([^"]*)"', text))
