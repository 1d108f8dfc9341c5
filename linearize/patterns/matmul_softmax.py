"""Pattern: hand-written attention, `softmax(f(q @ k^T)) @ v`, in every form real code writes it.

Anchored on each softmax. From its input we peel score transforms one at a time, outermost first (each a small
expression in `SCORE_STEPS`, any order, any number): additive masks, `masked_fill` / `where` masks, {0, 1}
multiplicative masks, scalar scales (mul, div, `torch.full` constants), gemma2-style logit soft-capping, the max
subtraction some models do before softmax, and clamps at finfo.min; reshapes between [B*H, L, S] and [B, H, L, S] are
looked through. What remains must be `q @ k^T` (matmul / bmm / baddbmm / einsum, any transpose or permute of k).
After the softmax (through casts, dropout, head reshapes, post-softmax zeroing and the attention-sink column drop)
the probabilities must multiply v. Scalar factors on q or k themselves (pre-scaled q, split scale) are folded into
the scale.

The result is the canonical `AttentionSite` (scores = softcap(scale * q k^T) + mask); layout fixes that the
canonical form needs (3-D bmm operands -> [B, H, T, D], pre-transposed k, one combined mask) are inserted as graph
nodes before the site.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from .expr import Cap, Op, canonical_name, transparent
from .expr import match as match_expr
from .graph import arg, layer_index, module_path, shape, value
from .layout import strip_kv_repeat
from .masks import LARGE_NEGATIVE, constant, is_binary, is_hiding_mask
from .site import AttentionSite, NearMiss

NAME = "matmul_softmax"


@dataclass
class Scores:
    """What peeling found between the softmax and q @ k^T."""

    scale: float = 1.0
    softcap: Optional[float] = None
    keep_masks: list = field(default_factory=list)  # (node, negate): bool masks, True = attend
    additive: list = field(default_factory=list)  # (node, factor): float masks added after `factor` scaling
    steps: list = field(default_factory=list)  # names of the steps, outermost first
    nodes: list = field(default_factory=list)
    heads: Optional[tuple] = None  # (B, H) when the model moves scores between [B*H, L, S] and [B, H, L, S]


class NoMatch(Exception):
    """Raised with the reason a softmax is not (or not fully) attention; `partial` holds the nodes matched so far."""

    def __init__(self, reason: str, partial=()):
        super().__init__(reason)
        self.partial = list(partial)


# ----- constants ----------------------------------------------------------------------------------------------

# ----- score steps: (name, expression, handler) ---------------------------------------------------------------

def _scale_mul(s: Scores, c: dict):
    factor = constant(c["s"])
    for x, m in ((c["x"], c["s"]), (c["s"], c["x"])):  # GPT-1: w * b + -1e4 * (1 - b), b a {0, 1} mask
        if factor is None and is_binary(m) and not is_binary(x):
            s.keep_masks.append((m, False))
            return x
    if factor is None:
        raise NoMatch("scores multiplied by a tensor that is not a constant (a learned temperature?)")
    s.scale *= factor
    return c["x"]


def _scale_div(s: Scores, c: dict):
    factor = constant(c["s"])
    if factor is None or factor == 0:
        raise NoMatch("scores divided by a tensor that is not a constant")
    s.scale /= factor
    return c["x"]


def _additive(s: Scores, c: dict):
    """`scores + mask` in either operand order: the scores operand is the one that leads to q @ k^T."""
    for x, mask in ((c["x"], c["mask"]), (c["mask"], c["x"])):
        if isinstance(x, fx.Node) and _peel(x, Scores()) is not None:
            s.additive.append((mask, s.scale))  # scales peeled so far sit outside this mask
            return x
    return None


def _masked_fill(s: Scores, c: dict):
    fill = constant(c["fill"])
    if fill is None or fill > LARGE_NEGATIVE:
        raise NoMatch(f"masked_fill with {c['fill']!r} does not hide keys")
    s.keep_masks.append((c["cond"], True))
    return c["x"]


def _where(s: Scores, c: dict):
    fill = constant(c["fill"])
    if fill is None or fill > LARGE_NEGATIVE:
        raise NoMatch("torch.where mask whose fill value does not hide keys")
    s.keep_masks.append((c["cond"], False))
    return c["x"]


def _softcap(s: Scores, c: dict):
    cap = constant(c["cap"])
    if cap is None or s.scale != 1.0 or s.softcap is not None:
        raise NoMatch("soft-capping with a non-constant cap, or a scale applied after the cap")
    if s.additive and any(f != 1.0 for _, f in s.additive):
        raise NoMatch("soft-capping inside a scaled mask")
    s.softcap = cap
    return c["x"]


def _clamp_low(s: Scores, c: dict):
    """max(x, finfo.min) (XGLM): only turns -inf into the lowest float, which softmax treats the same."""
    low = constant(c["low"])
    return c["x"] if low is not None and low <= LARGE_NEGATIVE else None


def _shift(s: Scores, c: dict):
    """x - max(x): softmax is shift-invariant, so the subtraction changes nothing."""
    return c["x"]


X = Cap("x")
SCORE_STEPS: list[tuple[str, object, Callable]] = [
    ("softcap", Op("mul", Op("tanh", Op("div", X, Cap("cap"))), Cap("cap")), _softcap),
    ("max shift", Op("sub", X, Op("getitem", Op(("max", "amax"), X, -1, keepdim=True), 0)), _shift),
    ("max shift", Op("sub", X, Op("amax", X, -1, keepdim=True)), _shift),
    ("masked_fill", Op("masked_fill", X, Cap("cond"), Cap("fill")), _masked_fill),
    ("clamp", Op(("max", "maximum", "clamp_min"), X, Cap("low")), _clamp_low),
    ("where", Op("where", Cap("cond"), X, Cap("fill")), _where),
    ("scale", Op("mul", X, Cap("s")), _scale_mul),
    ("scale", Op("div", X, Cap("s")), _scale_div),
    ("additive mask", Op("add", X, Cap("mask")), _additive),
]


# ----- q @ k^T ------------------------------------------------------------------------------------------------

@dataclass
class QK:
    q: fx.Node
    k_t: fx.Node  # [.., D, S]
    k: Optional[fx.Node]  # [.., S, D] when the graph has it already
    node: fx.Node
    bias: Optional[fx.Node] = None  # baddbmm: scores = beta * bias + alpha * q @ k^T
    beta: float = 1.0
    alpha: float = 1.0


def _qk(node) -> Optional[QK]:
    node = _skip(node)
    if not isinstance(node, fx.Node):
        return None
    name = canonical_name(node)
    if name in ("matmul", "bmm") and len(node.args) >= 2:
        q, kt = node.args[0], node.args[1]
    elif name == "baddbmm":
        bias, q, kt = (arg(node, i, n) for i, n in enumerate(("input", "batch1", "batch2")))
        beta, alpha = constant(arg(node, 3, "beta", 1.0)), constant(arg(node, 4, "alpha", 1.0))
        if beta is None or alpha is None or not isinstance(kt, fx.Node):
            raise NoMatch("baddbmm with non-constant beta/alpha")
        return QK(q=q, k_t=kt, k=_untransposed(kt), node=node, bias=bias, beta=beta, alpha=alpha)
    elif name == "einsum":
        return _einsum_qk(node)
    else:
        return None
    if not (isinstance(q, fx.Node) and isinstance(kt, fx.Node)):
        return None
    return QK(q=q, k_t=kt, k=_untransposed(kt), node=node)


def _untransposed(kt: fx.Node) -> Optional[fx.Node]:
    """k when kt is k with its last two dims swapped."""
    kt0 = _skip(kt)
    n = len(shape(kt0) or ())
    name = canonical_name(kt0)
    if name == "transpose":
        d0, d1 = arg(kt0, 1, "dim0"), arg(kt0, 2, "dim1")
        if isinstance(d0, int) and isinstance(d1, int) and {d0 % n, d1 % n} == {n - 2, n - 1}:
            return kt0.args[0]
    if name == "permute":
        dims = kt0.args[1:] if len(kt0.args) > 2 else kt0.args[1]
        dims = list(dims) if isinstance(dims, (list, tuple)) else None
        if dims and dims[:-2] == list(range(n - 2)) and dims[-2:] == [n - 1, n - 2]:
            return kt0.args[0]
    if name == "t" and n == 2:
        return kt0.args[0]
    return None


_EINSUM = re.compile(r"^\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z.]+)\s*->\s*([a-zA-Z.]+)\s*$")


def _einsum_parts(node):
    eq = node.args[0] if node.args else None
    ops = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else ())
    m = _EINSUM.match(eq) if isinstance(eq, str) else None
    if not m or len(ops) != 2:
        return None
    return m.groups(), ops


def _einsum_qk(node) -> Optional[QK]:
    parts = _einsum_parts(node)
    if not parts:
        return None
    (a, b, out), (q, k) = parts
    # a = P i d, b = P j d, out = P i j
    if len(a) >= 2 and a[:-2] == b[:-2] == out[:-2] and a[-1] == b[-1] and out[-2:] == a[-2] + b[-2]:
        return QK(q=q, k_t=None, k=k, node=node)
    return None


# ----- the softmax and what follows ----------------------------------------------------------------------------

def _skip(node):
    while transparent(node):
        node = node.args[0]
    return node


def _consumers(node: fx.Node) -> list:
    """Users of `node`, looking through transparent ops."""
    out = []
    for u in node.users:
        out.extend(_consumers(u) if transparent(u) else [u])
    return out


def _pv(prob: fx.Node):
    """The `probs @ v` consumer of the probabilities: (node, v, dropout p) or None.

    Training-mode dropout on the probabilities is looked through and reported (the site then keeps softmax).
    """
    dropout_p = 0.0
    users = _consumers(prob)
    while len(users) == 1:  # reshapes of the heads, post-softmax zeroing, dropout: in any order
        u = users[0]
        if canonical_name(u) in ("dropout", "native_dropout"):
            dropout_p = float(_dropout_p(u))
        elif _through_heads_reshape(u)[1] is None and not _zeroes_masked_probs(u, prob):
            break
        prob, users = u, _consumers(u)
    for u in users:
        name = canonical_name(u)
        if name in ("matmul", "bmm") and len(u.args) >= 2 and _skip(u.args[0]) is prob:
            return u, u.args[1], dropout_p
        if name == "einsum":
            parts = _einsum_parts(u)
            if parts:
                (a, b, out), (p, v) = parts
                if _skip(p) is prob and a[:-2] == b[:-2] == out[:-2] and a[-1] == b[-2] and out == a[:-1] + b[-1]:
                    return u, v, dropout_p
    return None


def _zeroes_masked_probs(node: fx.Node, prob: fx.Node) -> bool:
    """`probs.masked_fill(mask, 0)` after softmax (CPM-Ant): zero for fully hidden rows, as the canonical op gives.
    Only taken when the scores were masked too (checked by the exact rewrite's reproduction tests)."""
    return (canonical_name(node) == "masked_fill" and _skip(node.args[0]) is prob
            and constant(arg(node, 2, "value")) == 0.0)


def _dropout_p(node: fx.Node) -> float:
    p = arg(node, 1, "p", 0.5)
    return p if isinstance(p, (int, float)) else 0.5


def _sinks(softmax_in: fx.Node, softmax: fx.Node):
    """Attention sinks: softmax(cat([scores, sinks], -1))[..., :-1]. Returns (scores, sinks, probs) or None."""
    x = _without_shift(_skip(softmax_in))
    if canonical_name(x) != "cat":
        return None
    tensors, dim = arg(x, 0, "tensors"), arg(x, 1, "dim", 0)
    if not (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (-1, len(shape(x)) - 1)):
        return None
    users = _consumers(softmax)
    if len(users) != 1 or canonical_name(users[0]) != "getitem":
        return None
    idx = users[0].args[1]
    last = idx[-1] if isinstance(idx, tuple) else idx
    if not (isinstance(last, slice) and last.start in (None, 0) and last.stop == -1 and last.step is None):
        return None
    return tensors[0], tensors[1], users[0]


def _without_shift(x):
    """`x - max(x)` -> x (softmax is shift-invariant)."""
    for name, expr, _ in SCORE_STEPS:
        if name == "max shift":
            m = match_expr(expr, x)
            if m is not None:
                return _skip(m.captures["x"])
    return x


def match(node: fx.Node) -> Union[AttentionSite, str, None]:
    if canonical_name(node) not in ("softmax", "_softmax") or node.op not in ("call_function", "call_method"):
        return None
    try:
        return _match_softmax(node)
    except NoMatch as exc:
        return NearMiss(str(exc), [n.name for n in exc.partial])


def _match_softmax(sm: fx.Node) -> Union[AttentionSite, None]:
    x_in = arg(sm, 0, "input") if sm.op == "call_function" else sm.args[0]
    dim = arg(sm, 1, "dim")
    nd = len(shape(sm) or ())
    if dim is None or nd < 3 or dim % nd != nd - 1:
        return None  # softmax over a non-key axis (or 2-D): not attention
    sinks = _sinks(x_in, sm)
    probs = sm
    if sinks:
        x_in, sink_node, probs = sinks
    pv = _pv(probs)
    if pv is None:
        return None  # probabilities are not multiplied with values: router, classifier, ...
    out, v, dropout_p = pv

    scores = Scores()
    qk = _peel(x_in, scores)
    if qk is None:
        raise NoMatch("softmax(...) @ v, but the scores are not a q @ k^T product "
                      f"(peeled: {', '.join(scores.steps) or 'nothing'})", [*scores.nodes, sm, out])
    for t in (qk.q, qk.k if qk.k is not None else qk.k_t, v):
        if _is_parameter(t):
            return None  # a learned matrix (token mixing), not attention
    q = _fold_scalar(qk.q, scores)
    k_src = _fold_scalar(qk.k, scores) if qk.k is not None else None
    site = _site(sm, out, q, k_src, qk, v, scores, sink_node if sinks else None)
    site.dropout_p = dropout_p
    return site


def _peel(x, scores: Scores) -> Optional[QK]:
    """Peel score steps off `x` until q @ k^T is reached; None if something else is in the way."""
    for _ in range(16):
        x, heads = _through_heads_reshape(x)
        scores.heads = heads or scores.heads
        found = _qk(x)
        if found is not None:
            if found.bias is not None:  # baddbmm: its bias is an additive mask, alpha a scale
                scores.additive.append((found.bias, scores.scale * found.beta))
                scores.scale *= found.alpha
            return found
        for name, expr, handler in SCORE_STEPS:
            m = match_expr(expr, _skip(x))
            nxt = handler(scores, m.captures) if m is not None else None
            if nxt is not None:
                x = nxt
                scores.steps.append(name)
                scores.nodes.extend(m.nodes)
                break
        else:
            return None
    return None


def _through_heads_reshape(x):
    """Look through a view/reshape that only splits or merges the batch and head dims ([B*H, L, S] <-> [B, H, L, S]).
    Returns (input, (B, H) or None)."""
    node = _skip(x)
    if canonical_name(node) in ("view", "reshape") and isinstance(node.args[0], fx.Node):
        out_s, in_s = shape(node), shape(node.args[0])
        if out_s and in_s and out_s[-2:] == in_s[-2:] and {len(out_s), len(in_s)} == {3, 4}:
            four = out_s if len(out_s) == 4 else in_s
            if four[0] * four[1] == (in_s if len(in_s) == 3 else out_s)[0]:
                return node.args[0], (four[0], four[1])
    return x, None


def _is_parameter(node) -> bool:
    node = _skip(node)
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    val = value(node)
    return node.op == "placeholder" and isinstance(val, torch.nn.Parameter)


def _fold_scalar(node, scores: Scores):
    """Pre-scaled q or k (`q * c`, `q / c`): fold c into the scale, return the unscaled tensor.

    Stops at a cast: looking through it would hand the rewrite a tensor of another dtype."""
    while isinstance(node, fx.Node):
        inner = node
        name = canonical_name(inner)
        if name in ("mul", "div") and len(inner.args) == 2:
            a, b = inner.args
            if constant(b) is not None and isinstance(a, fx.Node):
                scores.scale = scores.scale * constant(b) if name == "mul" else scores.scale / constant(b)
                node = a
                continue
            if name == "mul" and constant(a) is not None and isinstance(b, fx.Node):
                scores.scale *= constant(a)
                node = b
                continue
        return node
    return node


# ----- building the canonical site ------------------------------------------------------------------------------

def _site(sm, out, q, k, qk: QK, v, scores: Scores, sinks) -> AttentionSite:
    graph = sm.graph
    q_s = shape(q)
    if q_s is None or len(q_s) not in (3, 4):
        raise NoMatch("q is not a 3-D or 4-D tensor")
    with graph.inserting_before(out):
        if k is None:
            k = graph.call_method("transpose", (qk.k_t, -2, -1))
            _set_value(k, value(qk.k_t).transpose(-2, -1))
        mask = _combine_masks(graph, scores)
        if len(q_s) == 3:  # [B*H, T, D] -> [B, H, T, D] when the scores showed B and H, else [B*H, 1, T, D]
            heads = scores.heads or (q_s[0], 1)
            q, k, v = (_split_heads(graph, t, heads) if len(shape(t)) == 3 else t for t in (q, k, v))
            if mask is not None:
                mask = graph.call_function(heads_dim_mask, (mask, heads))
    k_base, k_rep = strip_kv_repeat(k)
    v_base, v_rep = strip_kv_repeat(v)
    if k_rep != v_rep:
        k_base, v_base = k, v
    B, Hq, L, D = shape(q)
    Hkv, S, Dv = shape(k_base)[1], shape(k_base)[2], shape(v_base)[3]
    if Hq % Hkv:
        raise NoMatch(f"query heads ({Hq}) not a multiple of key heads ({Hkv})")
    path = module_path(sm)
    site = AttentionSite(
        node=out, q=q, k=k_base, v=v_base, scale=scores.scale, is_causal=False, attn_mask=mask,
        gqa_groups=Hq // Hkv, pattern=NAME, module_path=path, layer=layer_index(path),
        shape=(B, Hq, Hkv, L, S, D, Dv), matched_nodes=[qk.node, *scores.nodes, sm, out],
    )
    site.softcap, site.sinks, site.mask_kind = scores.softcap, sinks, _mask_kind(scores)
    site.out_rank = len(shape(out))  # the model's own output layout (3-D bmm forms get their heads merged back)
    rows = [s[-2] for m, _ in scores.keep_masks + scores.additive if (s := shape(m)) and len(s) >= 2]
    site.mask_rows = max(rows) if rows else None
    return site


def _split_heads(graph, node, heads):
    new = graph.call_method("unflatten", (node, 0, heads))
    _set_value(new, value(node).unflatten(0, heads))
    return new


def _set_value(node, val):
    node.meta["example_value"] = val


def _combine_masks(graph, scores: Scores):
    """One mask for the canonical form: bool (True = attend) if all masks hide keys, else additive float."""
    if not scores.keep_masks and not scores.additive:
        return None
    node = graph.call_function(combine_masks, (tuple((n, neg) for n, neg in scores.keep_masks),
                                               tuple((n, f) for n, f in scores.additive)))
    return node


def combine_masks(keep, additive):
    """keep: ((bool mask, negate), ...); additive: ((float mask, factor), ...) -> one SDPA-style mask."""
    keep_mask = None
    for m, negate in keep:
        m = ~m.bool() if negate else m.bool()
        keep_mask = m if keep_mask is None else keep_mask & m
    if not additive:
        return keep_mask
    total = None
    for m, factor in additive:
        term = m * factor if factor != 1.0 else m
        total = term if total is None else total + term
    if keep_mask is not None:
        total = total.masked_fill(~keep_mask, float("-inf"))
    return total


def heads_dim_mask(mask, heads):
    """A mask of the 3-D bmm form ([B*H | 1, L, S]) in the canonical [B, H, L, S] layout (4-D masks pass)."""
    if mask.dim() != 3:
        return mask
    return mask.unflatten(0, heads) if mask.shape[0] == heads[0] * heads[1] else mask.unsqueeze(1)


def _mask_kind(scores: Scores) -> Optional[str]:
    """"mask" when every mask only hides keys (0 / -inf / bool), "bias" when one adds real values (ALiBi)."""
    if not scores.keep_masks and not scores.additive:
        return None
    for m, _ in scores.additive:
        if not is_hiding_mask(m):
            return "bias"
    return "mask"
