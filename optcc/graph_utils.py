"""Reading the graph: what passes and the lowering ask of a node, in one place.

It lives in the core, not in ``passes/``, because the lowering (``lowering/partition.py``)
reads values and shapes too, and ``optcc.lowering`` must not import ``optcc.passes``
(which registers every pass on import).

Values (``node.meta["val"]``, a FakeTensor; see :mod:`optcc.ir`)
    ``val(node)``    the tensor, or None for a Python number, a non-tensor node (BatchNorm's
                     tuple, a SymInt) or a node without meta;
    ``shape(node)``  its sizes as a tuple of ints, None when unknown; ``symbolic=True``
                     returns SymInts as they are. The canonical IR is static, but a
                     constant added by a pass (``ir.add_constant``) gets a fake value with
                     symbolic sizes backed by the real ones until the pass manager
                     re-derives shapes: those are read as their ints (torch specialises
                     them); a size with no value (unbacked) gives None.
    ``dtype(node)``, ``rank(node)``;
    ``broadcasts_to(node, shape)``  its shape broadcasts to ``shape`` without growing it;
    ``same_type(a, b)``  both are tensors of one shape and dtype.

Constants of an argument (a Python number or a frozen ``get_attr`` tensor)
    ``number(arg)``             a Python real (never a bool) as a float;
    ``constant64(gm, arg)``     a number or a floating / int32 / int64 frozen tensor, in float64;
    ``scalar_value(gm, arg)``   a number, ``scalar_tensor(c)`` or a one-element frozen tensor, as a float.

Following a tensor, or one of its dims, through data movement
-------------------------------------------------------------

The ops a walk can pass (:data:`MOVES`) move elements without computing: every element of
the output is one element of the input. So each dim ``d`` of an input either *is* one dim
``e`` of the output (index ``i`` along ``d`` is index ``i`` along ``e``, for every
element), or it is not followed through the op, which then *stops* the walk
(:class:`Stop`, its ``kind`` says how). Per op, input dim ``d`` -> output dim (the walk
producer-ward uses the inverse)::

    permute(p)            p.index(d)                                  (output j is input p[j])
    transpose(i, j)       i <-> j
    unsqueeze(u)          d + (d >= u); output dim u is new           -> "created" going up
    squeeze(dims)         d - #(removed dims < d); a removed d        -> "dropped"
    expand(sizes)         d + k (k new leading dims: "created" going up); a size that
                          changes (1 -> n, a broadcast)               -> "broadcast"
    slice(a, ...)         d (a != d, or a slice of all of d); otherwise -> "sliced"
    select(a, i)          d - (d > a); d == a                         -> "dropped"
    clone, alias          d
    view / reshape / _unsafe_view  from shape A to shape B (row-major, same numel):
        with P = A[0] ... A[d-1] the elements before d, d is kept as the FIRST e with
        B[e] == A[d] and B[0] ... B[e-1] == P; then i_d = (flat div S) mod A[d] on both
        sides (S the product after it, equal too), so the index is the same. Otherwise
        the elements of d are regrouped: the block is the shortest run of dims of A and
        of B, holding d, between two prefix products A and B share (size-1 dims left out):
            "split"    d alone on A's side, several dims on B's    [B, N, C] -> [B, N, H, D] on C
            "merge"    several dims of A, one on B's               [B, H, N, D] -> [B*H, N, D] on H
            "regroup"  several on both sides                       [6, 4] -> [4, 6] on either
            "dropped" / "created"  a size-1 dim with no partner    [2, 1, 3] -> [2, 3] on 1
    an op passed through a ``through`` predicate that is none of the above must keep its
    input's shape (elementwise, e.g. ``x * c``): d; otherwise -> "unknown", as for any op
    whose shapes are not static.

Kinds are stated input -> output whichever way the walk goes; ``Stop.in_dims`` /
``Stop.out_dims`` are the block (the op's input and output dims that hold the followed
elements), so a caller can start a new walk from each of them. ``map_dim(node, d, up=)``
is one step; ``reshape_dim(A, B, d)`` the reshape rule on shapes alone. Ops outside
:data:`MOVES` (``cat``, ``split`` + ``getitem``, ``index``, ...) end a walk as its source
or consumer: what they do to the dim is the caller's question.

Walks. ``dim=None`` follows the tensor only: nothing is mapped and nothing stops.

``walk_up(node, dim)``, producer-ward ("where does this tensor / dim come from"):
    starting with ``node``'s own op, passes every op in ``through`` (its tensor input
    ``args[0]`` a node; with ``single_user=True`` only ops whose output is read once) and
    returns ``Walk(chain, node, dim)``: ``chain`` the ops passed, ``node`` first (when it is
    one); ``walk.node`` the first node not passed (the source, or ``until`` when the walk
    reaches that node); ``walk.dim`` the followed dim in its output.
``walk_down(node, dim)``, consumer-ward along single users ("where does this dim go"):
    while the current value has exactly one user and that user is in ``through`` and
    reads it as ``args[0]``, passes it; ``walk.node`` is that single user when it is not
    passed (the consumer; None when the last value has no or several users), ``walk.dim``
    the followed dim of the value it reads (``walk.value``).
``dim_uses(node, dim)``, consumer-ward through every user (fan-out): one :class:`Use` per
    node that reads the value (or a moved copy of it) and is not passed: the consumer,
    where it reads it (argument position or keyword), the followed dim there, the chain.

A walk that stops ends *at* the op that stopped it: ``walk.node`` is that op (not in the
chain), ``walk.dim`` the dim on the near side (going up: in its output; going down: in its
input), ``walk.stop`` says why. ``walk.dims[i]`` is the followed dim in ``chain[i]``'s
output.

Example (token pruning, timm's ViT in the canonical IR): the token axis of the qkv linear
``[B, N, 3C]`` through ``view [B, N, 3, H, D] -> permute(2, 0, 3, 1, 4) -> slice(0, i, i+1)
-> squeeze(0)`` into SDPA::

    [(u.node, u.index, u.dim) for u in dim_uses(qkv, 1)]   ->  [(sdpa, 0, 2), (sdpa, 1, 2), (sdpa, 2, 2)]
    walk_down(sdpa, 2)    ->  chain [permute, view], node = the output projection, dim 1
    walk_up(q, 2)         ->  node = qkv, dim 1       (and on C: walk_down(qkv, 2) stops with
                                                       a "split" into the (3, H, D) dims)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Union

import torch
import torch.fx as fx

from optcc.ir import get_constant

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------
# Values and constants


def val(node: Any) -> torch.Tensor | None:
    """``node.meta["val"]`` when it is a tensor, else None."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def shape(node: Any, *, symbolic: bool = False) -> tuple | None:
    """The sizes of ``node``'s tensor as ints; None when unknown or not known as numbers
    (with ``symbolic=True`` the sizes as they are, SymInts included)."""
    value = val(node)
    if value is None:
        return None
    if symbolic:
        return tuple(value.shape)
    sizes = []
    for d in value.shape:
        if not isinstance(d, int):
            try:
                d = int(d)  # a SymInt with a hint (see the module docstring)
            except (TypeError, ValueError, RuntimeError):
                return None
        sizes.append(d)
    return tuple(sizes)


def dtype(node: Any) -> torch.dtype | None:
    value = val(node)
    return value.dtype if value is not None else None


def rank(node: Any) -> int | None:
    value = val(node)
    return value.dim() if value is not None else None


def broadcasts_to(node: Any, target: tuple, *, symbolic: bool = False) -> bool:
    """``node`` is a tensor whose shape broadcasts to ``target`` without growing it."""
    own = shape(node, symbolic=symbolic)
    if own is None:
        return False
    try:
        return tuple(torch.broadcast_shapes(own, tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def same_type(a: Any, b: Any) -> bool:
    """Both are tensors of one shape and one dtype."""
    va, vb = val(a), val(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and tuple(va.shape) == tuple(vb.shape)


def number(arg: Any) -> float | None:
    """A Python real number (not a bool) as a float, else None."""
    if isinstance(arg, numbers.Real) and not isinstance(arg, bool):
        return float(arg)
    return None


def constant64(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """A Python number or a floating / int32 / int64 frozen tensor, as a float64 tensor."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return torch.tensor(float(arg), dtype=torch.float64)
    tensor = get_constant(gm, arg)
    if tensor is None or not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        return None
    return tensor.double()


def scalar_value(gm: fx.GraphModule, arg: Any) -> float | None:
    """A Python number, ``scalar_tensor(c)`` or a one-element frozen tensor, as a float."""
    if not isinstance(arg, fx.Node):
        return number(arg)
    if arg.target is aten.scalar_tensor.default and isinstance(arg.args[0], numbers.Real):
        return float(arg.args[0])
    tensor = get_constant(gm, arg)
    if tensor is not None and tensor.numel() == 1:
        return float(tensor.reshape(()))
    return None


# ----------------------------------------------------------------------------------------
# Data-movement ops

PERMUTES = (aten.permute.default, aten.transpose.int)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
SQUEEZES = (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
UNSQUEEZES = (aten.unsqueeze.default,)
EXPANDS = (aten.expand.default,)
SELECTS = (aten.slice.Tensor, aten.select.int)
IDENTITIES = (aten.clone.default, aten.alias.default)
#: Every op a walk knows how to map a dim through; the default ``through``.
MOVES = PERMUTES + VIEWS + SQUEEZES + UNSQUEEZES + EXPANDS + SELECTS + IDENTITIES

Through = Union[Collection[Any], Callable[[fx.Node], bool]]


@dataclass(frozen=True)
class Stop:
    """Why the followed dim does not go through ``node`` (kinds in the module docstring)."""

    node: fx.Node
    kind: str            # split | merge | regroup | dropped | created | broadcast | sliced | unknown
    in_dims: tuple[int, ...] = ()
    out_dims: tuple[int, ...] = ()

    @property
    def reason(self) -> str:
        return {
            "split": "a reshape splits the followed dimension",
            "merge": "a reshape merges the followed dimension with others",
            "regroup": "a reshape regroups the followed dimension with others",
            "dropped": "the followed dimension is removed",
            "created": "the followed dimension is created here (it has no source)",
            "broadcast": "the followed dimension is broadcast",
            "sliced": "the followed dimension is sliced",
        }.get(self.kind, "unknown shapes")


@dataclass
class Walk:
    """The result of :func:`walk_up` / :func:`walk_down` (see the module docstring)."""

    start: fx.Node
    chain: list[fx.Node]
    node: fx.Node | None
    dim: int | None
    dims: list[int | None] = field(default_factory=list)
    stop: Stop | None = None

    @property
    def lineage(self) -> list[fx.Node]:
        """Going up: every value from ``start`` to the source, ``chain + [node]``."""
        return self.chain + ([self.node] if self.node is not None else [])

    @property
    def value(self) -> fx.Node:
        """Going down: the last value passed, the one ``node`` reads."""
        return self.chain[-1] if self.chain else self.start


@dataclass(frozen=True)
class Use:
    """One read of a followed value by a node a walk does not pass (:func:`dim_uses`)."""

    node: fx.Node
    index: int | str            # argument position, or keyword, of the first read
    dim: int | None             # the followed dim in the value read
    chain: tuple[fx.Node, ...]  # the ops passed from the start to that value
    dims: tuple[int | None, ...]
    stop: Stop | None = None    # set when ``node`` is a data-movement op the dim stops at


def _passes(through: Through) -> Callable[[fx.Node], bool]:
    if callable(through):
        return lambda n: n.op == "call_function" and bool(through(n))
    return lambda n: n.op == "call_function" and n.target in through


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def reshape_dim(src: tuple[int, ...], dst: tuple[int, ...], d: int) -> int | tuple[str, tuple, tuple]:
    """Dim ``d`` of shape ``src`` as a dim of shape ``dst`` (a row-major reshape): its index
    there, or ``(kind, src dims, dst dims)`` of the block holding it, with ``kind``
    ``one-to-many`` / ``many-to-one`` / ``regroup`` / ``gone`` read from ``src`` to ``dst``."""
    before = math.prod(src[:d])
    acc = 1
    for e, n in enumerate(dst):
        if acc == before and n == src[d]:
            return e
        acc *= n
        if acc > before:
            break
    p_src = [math.prod(src[:i]) for i in range(len(src) + 1)]
    p_dst = [math.prod(dst[:i]) for i in range(len(dst) + 1)]
    common = set(p_src) & set(p_dst)
    after = p_src[d + 1]
    lo = max((c for c in common if c <= before), default=0)
    hi = min((c for c in common if c >= after), default=p_src[-1])
    src_block = tuple(i for i in range(len(src))
                      if i == d or (src[i] != 1 and p_src[i] >= lo and p_src[i + 1] <= hi))
    dst_block = tuple(e for e in range(len(dst)) if dst[e] != 1 and p_dst[e] >= lo and p_dst[e + 1] <= hi)
    if not dst_block:
        kind = "gone"            # a size-1 dim with no partner
    elif len(src_block) == 1 and len(dst_block) > 1:
        kind = "one-to-many"
    elif len(src_block) > 1 and len(dst_block) == 1:
        kind = "many-to-one"
    else:
        kind = "regroup"
    return kind, src_block, dst_block


def _normal(d: int, n: int) -> int:
    return d % n if n else d


def map_dim(node: fx.Node, d: int | None, *, up: bool) -> int | None | Stop:
    """Dim ``d`` of ``node``'s input as a dim of its output (``up``: output -> input)."""
    if d is None:
        return None
    target = node.target
    src_node = node.args[0]
    in_shape, out_shape = shape(src_node), shape(node)
    in_rank, out_rank = rank(src_node), rank(node)
    if in_rank is None or out_rank is None:
        return Stop(node, "unknown")
    if target in IDENTITIES:
        return d
    if target is aten.permute.default:
        perm = [_normal(p, in_rank) for p in node.args[1]]
        return perm[d] if up else perm.index(d)
    if target is aten.transpose.int:
        i, j = _normal(node.args[1], in_rank), _normal(node.args[2], in_rank)
        return j if d == i else i if d == j else d
    if target is aten.unsqueeze.default:
        u = _normal(node.args[1], out_rank)
        if up:
            return Stop(node, "created", (), (u,)) if d == u else d - (d > u)
        return d + (d >= u)
    if target in SELECTS:
        a = _normal(_arg(node, 1, "dim", 0), in_rank)
        if target is aten.select.int:
            if up:
                return d + (d >= a)
            return Stop(node, "dropped", (a,), ()) if d == a else d - (d > a)
        if d == a and (in_shape is None or out_shape is None or in_shape[a] != out_shape[a]):
            return Stop(node, "sliced", (a,), (a,))
        return d
    if in_shape is None or out_shape is None:
        return Stop(node, "unknown")
    if target in SQUEEZES:
        if target is aten.squeeze.default:
            asked = range(in_rank)
        elif target is aten.squeeze.dim:
            asked = [node.args[1]]
        else:
            asked = node.args[1]
        removed = {_normal(a, in_rank) for a in asked if in_shape[_normal(a, in_rank)] == 1}
        kept = [i for i in range(in_rank) if i not in removed]
        if up:
            return kept[d]
        return Stop(node, "dropped", (d,), ()) if d in removed else kept.index(d)
    if target is aten.expand.default:
        k = out_rank - in_rank
        if up:
            if d < k:
                return Stop(node, "created", (), (d,))
            d_in, d_out = d - k, d
        else:
            d_in, d_out = d, d + k
        if in_shape[d_in] != out_shape[d_out]:
            return Stop(node, "broadcast", (d_in,), (d_out,))
        return d_out if not up else d_in
    if target in VIEWS:
        if up:
            mapped = reshape_dim(out_shape, in_shape, d)
        else:
            mapped = reshape_dim(in_shape, out_shape, d)
        if isinstance(mapped, int):
            return mapped
        how, near, far = mapped
        in_dims, out_dims = (far, near) if up else (near, far)
        if how == "gone":
            kind = "created" if up else "dropped"
        elif how == "regroup":
            kind = "regroup"
        elif (how == "one-to-many") != up:
            kind = "split"   # one input dim -> several output dims
        else:
            kind = "merge"
        return Stop(node, kind, in_dims, out_dims)
    # an op passed by a predicate: followed only when it keeps its input's shape
    return d if in_shape == out_shape else Stop(node, "unknown")


def walk_up(node: fx.Node, dim: int | None = None, *, through: Through = MOVES,
            single_user: bool = False, until: fx.Node | None = None) -> Walk:
    """Producer-ward from ``node``'s output (see the module docstring); ``until``: end at
    that node (not passed) when the walk reaches it."""
    passes = _passes(through)
    chain: list[fx.Node] = []
    dims: list[int | None] = []
    current, d = node, dim
    while (current is not until and isinstance(current, fx.Node) and passes(current) and current.args
           and isinstance(current.args[0], fx.Node) and (not single_user or len(current.users) == 1)):
        mapped = map_dim(current, d, up=True)
        if isinstance(mapped, Stop):
            return Walk(node, chain, current, d, dims, mapped)
        chain.append(current)
        dims.append(d)
        current, d = current.args[0], mapped
    return Walk(node, chain, current, d, dims)


def walk_down(node: fx.Node, dim: int | None = None, *, through: Through = MOVES) -> Walk:
    """Consumer-ward from ``node``'s output along single users (see the module docstring)."""
    passes = _passes(through)
    chain: list[fx.Node] = []
    dims: list[int | None] = []
    current, d = node, dim
    while len(current.users) == 1:
        user = next(iter(current.users))
        if not (passes(user) and user.args and user.args[0] is current):
            return Walk(node, chain, user, d, dims)
        mapped = map_dim(user, d, up=False)
        if isinstance(mapped, Stop):
            return Walk(node, chain, user, d, dims, mapped)
        chain.append(user)
        dims.append(mapped)
        current, d = user, mapped
    return Walk(node, chain, None, d, dims)


def _read_at(user: fx.Node, value: fx.Node) -> int | str:
    for i, a in enumerate(user.args):
        if a is value or (isinstance(a, (list, tuple)) and any(x is value for x in a)):
            return i
    for k, a in user.kwargs.items():
        if a is value or (isinstance(a, (list, tuple)) and any(x is value for x in a)):
            return k
    return -1


def dim_uses(node: fx.Node, dim: int | None = None, *, through: Through = MOVES) -> list[Use]:
    """Every read of ``node``'s value, through the ops in ``through`` (see the module docstring)."""
    passes = _passes(through)

    def visit(value: fx.Node, d, chain: tuple, dims: tuple) -> Iterator[Use]:
        for user in value.users:
            if passes(user) and user.args and user.args[0] is value:
                mapped = map_dim(user, d, up=False)
                if isinstance(mapped, Stop):
                    yield Use(user, 0, d, chain, dims, mapped)
                else:
                    yield from visit(user, mapped, chain + (user,), dims + (mapped,))
            else:
                yield Use(user, _read_at(user, value), d, chain, dims)

    return list(visit(node, dim, (), ()))
