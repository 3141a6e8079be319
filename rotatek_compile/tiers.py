"""Which span tokens stay exact: the attention sinks.

A few tokens take most of the attention in many layers ("attention sinks": the first token of a
prompt, a delimiter, ViT register-like tokens of an image span). A rank-``r`` basis shared by
thousands of span tokens barely sees such a lone outlier, and every later query attends to it, so
compressing it costs far more than its share of the bytes. Measured on SmolLM2-135M real weights
(``docs/fidelity.md``): token 0 takes 47–98% of the window's attention over the prompt in layers
12–29, and a delimiter ~25–47 tokens in takes 20–83% in layers 3–10; on Gemma-3-270M token 0
takes 48–62% in the global layers. Their Keys are *not* large (0.25–1.2× the median span Key norm
on SmolLM2), so a Key-norm rule would miss them; the rule reads the attention itself.

The rule, per batch row (every method, every span kind)::

    share_h(s) = mean over the window's queries of KV head h's group of softmax_span(q·k_s·scale)
    sinks      = {first real token of the row, if in the span}
               ∪ {the SINK_LIMIT - 1 span tokens of largest max_h share_h(s), those with
                  share ≥ max(SINK_SHARE, SINK_FACTOR / n)}       (n: the row's span tokens)

and in a batch every row takes as many sinks as the row with the most (the next tokens by share):
segments are as wide as their widest row, so equal counts cost no padding slots.

A sink leaves the compressed span and joins the exact (full-width) rest segment of the cache, so
the decode kernel does not change and the row keeps every token it had.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rotatek_compile.kernels import reference

# A span token with at least this share of some KV head's window attention is a sink. Uniform
# attention over a 1000-token span gives 0.001 per token; the sinks measured take 0.2–0.98.
SINK_SHARE = 0.1
# ... and at least this many times the uniform share 1/n: in a short span (under 100 tokens) every
# token has a large share without standing out.
SINK_FACTOR = 10.0
# At most this many sinks per row and layer (the first real token included): each costs d - r Key
# elements more than a compressed token.
SINK_LIMIT = 4


def window_share(queries: Tensor, keys: Tensor, scale: float, span: Tensor) -> Tensor:
    """Mean attention probability each span token gets from the window's queries.

    ``queries`` ``[B, Hq, W, d]``, ``keys`` ``[B, H, S, d]``, ``span`` ``[B, S]`` bool →
    ``[B, H, S]`` fp32: per KV head, the softmax over the span tokens of each window query of the
    head's group, averaged over those ``G·W`` queries (a row sums to 1 over its span, 0 elsewhere).
    """
    group_queries = queries.shape[1] // keys.shape[1] * queries.shape[2]  # G·W
    return reference.token_scores(queries, keys, scale, span) / group_queries


def attention_sinks(queries: Tensor, keys: Tensor, scale: float, span: Tensor, valid: Tensor) -> Tensor:
    """The span tokens that stay exact (see the module docstring for the rule).

    Parameters
    ----------
    queries : Tensor
        ``[B, Hq, W, d]`` post-RoPE queries of the last ``W`` prompt tokens.
    keys : Tensor
        ``[B, H, S, d]`` post-RoPE Keys of the whole prompt.
    scale : float
        The layer's softmax scale.
    span : Tensor
        ``[B, S]`` bool, the tokens to compress (real tokens only).
    valid : Tensor
        ``[B, S]`` bool, the real tokens (left padding is ``False``).

    Returns
    -------
    Tensor
        ``[B, S]`` bool, a subset of ``span`` with at most :data:`SINK_LIMIT` tokens per row, the
        same number in every row (as far as its span has tokens).
    """
    batch, length = span.shape
    rows = torch.arange(batch, device=span.device)
    first = valid.int().argmax(dim=1)  # [B] first real token (0 for a row with none)
    sinks = torch.zeros_like(span)
    sinks[rows, first] = span[rows, first]
    extra = min(SINK_LIMIT - 1, length)
    if extra <= 0 or not bool(span.any()):
        return sinks
    share = window_share(queries, keys, scale, span).amax(dim=1)  # [B, S]
    share = share.masked_fill(sinks | ~span, -1.0)
    top, where = share.topk(extra, dim=-1)  # [B, extra], by share descending
    threshold = (SINK_FACTOR / span.sum(dim=1, keepdim=True).clamp_min(1)).clamp_min(SINK_SHARE)  # [B, 1]
    outliers = int((top >= threshold).sum(dim=1).max())  # the most any row has
    taken = (torch.arange(extra, device=span.device) < outliers) & (top >= 0)  # [B, extra] real span tokens
    sinks[rows[:, None].expand_as(where), where] |= taken
    return sinks
