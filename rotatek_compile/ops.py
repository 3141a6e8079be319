"""``torch.ops.rotatek.*``: the only bridge between the graph passes and the kernels.

Each op is a ``torch.library.custom_op`` with a ``register_fake``, so FX graphs can hold it and
Inductor treats it as opaque. On CPU the plain-PyTorch reference runs; on CUDA the Triton kernel
runs unless ``kernel="reference"`` is asked for.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from rotatek_compile import kernels
from rotatek_compile.kernels import reference

logger = logging.getLogger("rotatek_compile")


def _triton_decode():
    module = kernels.triton_module("triton_decode")
    return None if module is None else module.decode_attention_triton


def _use_triton(implementation: str, device: torch.device) -> bool:
    if implementation == "reference":
        return False
    if implementation == "triton":
        if _triton_decode() is None:
            raise RuntimeError("rotatek option kernel='triton' needs the triton package: pip install triton")
        return True
    return device.type == "cuda" and _triton_decode() is not None


def _attention_output_like(query: Tensor, values: Tensor) -> Tensor:
    """The decode ops' output for fake tensors: ``[B, Hq, (T,) dv]`` in ``query``'s dtype."""
    return query.new_empty(*query.shape[:-1], values.shape[-1])


@torch.library.custom_op("rotatek::decode_attention", mutates_args=())
def decode_attention(
    query: Tensor,
    span_keys: Tensor,
    rotation: Tensor,
    mean_residual: Tensor,
    span_values: Tensor,
    span_mask: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor,
    scale: float,
    implementation: str = "auto",
) -> Tensor:
    """Decode attention over the compressed span plus the full-channel segment.

    Shapes as :func:`rotatek_compile.kernels.reference.decode_attention`: ``query`` ``[B, Hq, d]``
    (one new token) → ``[B, Hq, dv]``, or ``[B, Hq, T, d]`` (a chunk of ``T`` new tokens, the last
    ``T`` of ``keys``, causal) → ``[B, Hq, T, dv]``. The Triton kernel serves one-token steps;
    chunks run the reference. ``implementation`` is the ``kernel`` option (the name ``kernel``
    would collide with Inductor's fallback-kernel keyword).
    """
    args = (query, span_keys, rotation, mean_residual, span_values, span_mask, keys, values, mask, scale)
    if query.dim() == 3 and _use_triton(implementation, query.device):
        return _triton_decode()(*args)
    return reference.decode_attention(*args)


@decode_attention.register_fake
def _(query, span_keys, rotation, mean_residual, span_values, span_mask, keys, values, mask, scale,
      implementation="auto"):
    return _attention_output_like(query, values)


@torch.library.custom_op("rotatek::sparse_decode_attention", mutates_args=())
def sparse_decode_attention(
    query: Tensor,
    span_key_values: Tensor,
    span_key_channels: Tensor,
    span_key_fill: Tensor,
    span_values: Tensor,
    span_mask: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor,
    scale: float,
) -> Tensor:
    """Decode attention when each span token keeps its own channels (SparK-style).

    ``span_key_values``/``span_key_channels`` ``[B, H, Sv, r]``, ``span_key_fill`` ``[B, H, Sv]``;
    the span's logits are read off the sparse form, so the Keys are never rebuilt to full width.
    """
    return reference.sparse_decode_attention(query, span_key_values, span_key_channels, span_key_fill,
                                             span_values, span_mask, keys, values, mask, scale)


@sparse_decode_attention.register_fake
def _(query, span_key_values, span_key_channels, span_key_fill, span_values, span_mask, keys, values, mask, scale):
    return _attention_output_like(query, values)


_last_causal_flag: tuple = (None, False)  # (weakref to the flag tensor, its value): one read per graph call


def _is_plain_causal(causal: Tensor) -> bool:
    """``bool(causal)``, read once per flag tensor: every layer of a graph call shares one (Inductor
    hands each op call a new view of its buffer, hence the view's base). Each read waits for the
    device, which a prefill must do once, not per layer: the host then stays ahead of the device,
    which the compression queued behind the prefill's layers needs (:mod:`rotatek_compile.prefill`)."""
    global _last_causal_flag
    import weakref

    flag = causal if causal._base is None else causal._base
    ref, value = _last_causal_flag
    if ref is None or ref() is not flag:
        value = bool(causal)
        _last_causal_flag = (weakref.ref(flag), value)
    return value


@torch.library.custom_op("rotatek::prefill_attention", mutates_args=())
def prefill_attention(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor, causal: Tensor,
                      scale: float, enable_gqa: bool) -> Tensor:
    """``sdpa(query, keys, values, attn_mask=mask)`` of a prefill, run as ``is_causal=True`` when
    the boolean ``mask`` is exactly the top-left causal mask (``causal``: a 0-dim bool tensor the
    graph computes once for all layers).

    A compiled model always hands SDPA a materialised mask (HF cannot skip it while tracing), and
    SDPA cannot use its flash kernel with a mask: at 16k tokens on an H200 the masked kernel took
    5× longer. Both branches compute the same attention. During CUDA-graph capture the flag cannot
    be read, so the masked branch runs. Returns ``[B, Hq, L, dv]`` laid out as ``[B, L, Hq, dv]``
    (:func:`_prefill_output`), so that HF's ``transpose(1, 2).contiguous()`` after it copies nothing.
    """
    return _prefill(query, keys, values, lambda: mask, causal, scale, enable_gqa)


@torch.library.custom_op("rotatek::prefill_attention_lazy_mask", mutates_args=())
def prefill_attention_lazy_mask(query: Tensor, keys: Tensor, values: Tensor, causal: Tensor, scale: float,
                                enable_gqa: bool, mask_builder: str, mask_tensors: list[Tensor],
                                mask_sizes: list[int]) -> Tensor:
    """:func:`prefill_attention` with the mask built only when it is not causal:
    ``MASK_BUILDERS[mask_builder](*mask_tensors, *mask_sizes)`` (the graph's own mask computation,
    from the graph inputs it reads). A mask that is an input of the op is materialised by Inductor
    whether it is read or not: ``[B, 1, L, S]`` bytes, 4.3 GB at 64k tokens.
    """
    build = functools.partial(MASK_BUILDERS[mask_builder], *mask_tensors, *mask_sizes)
    return _prefill(query, keys, values, build, causal, scale, enable_gqa)


# mask builders by key (a hash of their code): GraphModules cut from prefill graphs by the pass
MASK_BUILDERS: dict[str, torch.nn.Module] = {}


def _prefill(query: Tensor, keys: Tensor, values: Tensor, mask, causal: Tensor, scale: float,
             enable_gqa: bool) -> Tensor:
    """The body of both prefill ops; ``mask()`` gives the ``[B, 1|Hq, L, S]`` boolean mask."""
    capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
    length = query.shape[2]
    if not capturing and _is_plain_causal(causal):
        if keys.shape[2] > length:
            # top-left causal: no query sees a key past position L (a StaticCache's buffer is longer
            # than its prompt); the flash kernel takes is_causal only with L = S
            keys, values = keys[:, :, :length], values[:, :, :length]
        if keys.shape[2] != length:
            keys, values, enable_gqa = _repeat_kv_heads(query, keys, values, enable_gqa)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    else:
        keys, values, enable_gqa = _repeat_kv_heads(query, keys, values, enable_gqa)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask(), scale=scale, enable_gqa=enable_gqa)
    result = _prefill_output(query, values)
    if out.stride() == result.stride():  # SDPA's fused kernels write this layout themselves
        return out
    return result.copy_(out)


def _repeat_kv_heads(query: Tensor, keys: Tensor, values: Tensor, enable_gqa: bool) -> tuple[Tensor, Tensor, bool]:
    """Keys and Values with one head per query head, as HF's ``repeat_kv`` gives them.

    SDPA's memory-efficient CUDA kernel (masks, and ``is_causal`` with ``L ≠ S``) has no grouped
    heads: with ``enable_gqa`` it falls back to the math kernel, which materialises ``[B, Hq, L, S]``
    fp32 scores (35 GB per layer at 16k tokens and 32 heads).
    """
    if not enable_gqa or keys.shape[1] == query.shape[1]:
        return keys, values, enable_gqa
    groups = query.shape[1] // keys.shape[1]
    return keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1), False


def _prefill_output(query: Tensor, values: Tensor) -> Tensor:
    """An empty ``[B, Hq, L, dv]`` with the memory order ``[B, L, Hq, dv]`` (what the flash and
    memory-efficient kernels return, and what the attention's output projection reads)."""
    batch, heads, length, _ = query.shape
    return query.new_empty(batch, length, heads, values.shape[-1]).transpose(1, 2)


@prefill_attention.register_fake
def _(query, keys, values, mask, causal, scale, enable_gqa):
    return _prefill_output(query, values)


@prefill_attention_lazy_mask.register_fake
def _(query, keys, values, causal, scale, enable_gqa, mask_builder, mask_tensors, mask_sizes):
    return _prefill_output(query, values)


@torch.library.custom_op("rotatek::kept_copy", mutates_args=())
def kept_copy(tensor: Tensor) -> Tensor:
    """A contiguous copy that Inductor neither fuses nor moves.

    The prefill graph copies each layer's query window and the mask's last row for the layer's
    compression (``rotatek.compress_site``). As plain ``clone`` nodes (when the graph returned them),
    Inductor fused the copies of all layers into one kernel at the end of the graph, which kept
    every layer's whole query alive until then (+0.12 GB per layer at 16k tokens); as an opaque op
    each copy runs where it stands, right after its layer's attention.
    """
    return tensor.clone(memory_format=torch.contiguous_format)


@kept_copy.register_fake
def _(tensor):
    return tensor.new_empty(tensor.shape)


def _triton_gemv():
    return kernels.triton_module("triton_gemv")


@torch.library.custom_op("rotatek::grouped_linear", mutates_args=())
def grouped_linear(x: Tensor, weights: list[Tensor], implementation: str = "auto") -> list[Tensor]:
    """``[F.linear(x, w) for w in weights]``: a decode step's bias-free weight products of ``x``
    ``[..., K]`` (1 to 3 of them: q, k, v; gate, up; o) in one launch where the Triton kernel serves
    them (CUDA, at most 16 rows, 16-bit weights: :mod:`rotatek_compile.kernels.triton_gemv`), else
    one ``F.linear`` each, as the model ran them. ``implementation`` is the ``kernel`` option."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    if implementation != "reference" and x.is_cuda:
        module = _triton_gemv()
        if module is not None and module.supports(rows, weights):
            return [y.view(*x.shape[:-1], y.shape[-1]) for y in module.grouped_linear_triton(rows, weights)]
    return [torch.nn.functional.linear(x, w) for w in weights]


@grouped_linear.register_fake
def _(x, weights, implementation="auto"):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]
