"""Options of the ``rotatek`` backend, validated once, frozen afterwards.

``torch.compile(model, backend="rotatek", options={...})`` hands its ``options`` dict to
:meth:`RotateKConfig.from_options`; every key is a field below. A wrong key or value raises a
one-line ``ValueError`` that names the option and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

SOLVERS = ("auto", "eigh", "subspace")
SPANS = ("visual", "prompt")
KERNELS = ("auto", "triton", "reference")
METHODS = ("rotatek", "think", "spark")
INNERS = ("inductor", "eager")
BACKEND_OPTIONS = ("inner", "mode")  # options of the backend object, next to the config's fields


@dataclasses.dataclass(frozen=True)
class RotateKConfig:
    """What the backend compresses and how.

    Parameters
    ----------
    key_channels : int, optional
        ``r``: Key channels kept per KV head for the compressed span. Clipped to ``head_dim``.
    key_keep_ratio : float, optional
        ``r / head_dim`` in (0, 1], used when ``key_channels`` is not given. Default 0.25.
    query_aware : {"auto", True, False}
        ``True``: weight the Key covariance by the norms of the last ``query_window`` queries (the
        paper's basis). ``False``: plain K-only PCA. ``"auto"`` (default): each row and KV head
        takes whichever of the two bases reproduces the window's attention better (the query-aware
        basis fitted on the window's first half, both judged on its second half,
        :func:`rotatek_compile.state.compress_layers`); on Gemma 3 the query-aware basis was 15–18×
        worse than K-only PCA, on SmolLM2 1.7–1.8× better (``docs/fidelity.md``). With token pruning
        (``token_keep < 1``), ``"auto"`` is the query-aware basis. With ``kv_budget``, ``"auto"``
        lets each layer's rotated tier take whichever basis the window's attention error prefers.
    query_window : int
        ``W``: how many of the last prompt queries weight the covariance.
    solver : {"auto", "eigh", "subspace"}
        Exact eigendecomposition, or ``subspace_iters`` steps of subspace iteration with Cholesky
        orthonormalisation (the official code's choice). ``"auto"``: ``"subspace"`` on CUDA, where
        batched ``eigh`` of ``d×d`` matrices dominates the prefill-time cost (about 11 of 13.5 ms per
        8B-shaped layer on an H100, ``benchmarks/compress_cost.py``), ``"eigh"`` elsewhere.
    subspace_iters : int
        Iterations of the subspace solver.
    span : {"visual", "prompt"}
        ``"visual"``: compress the image tokens; a prompt without image tokens falls back to
        ``"prompt"``. ``"prompt"``: compress the whole prompt except its last ``query_window``
        tokens (text-only models).
    kernel : {"auto", "triton", "reference"}
        Decode kernel, and the compression's statistics kernels (window shares, covariances).
        ``"auto"`` takes Triton on CUDA and the PyTorch reference elsewhere.
    method : {"rotatek", "think", "spark"}
        Channel-compression method: RotateK (rotation + mean correction), ThinK (per-head channel
        selection, no rotation) or SparK-style (per-token channel selection).
    token_keep : float
        Fraction of span tokens kept by attention-score token pruning, in (0, 1]. 1 keeps all.
    kv_budget : float, optional
        Tiered cache under one byte budget, in (0, 1]: the span may keep this fraction of its
        uncompressed KV bytes (true bytes: every stored tensor, the basis included). Per layer, at
        prefill, the span's tokens ranked by window attention are split into an exact tier, a
        RotateK tier at ``r`` channels and a dropped tail (:mod:`rotatek_compile.tiers`): token-only
        (no rotated tier) and RotateK on every token are among the candidates, and the window's
        queries choose between them. Needs ``method="rotatek"`` and ``token_keep=1``; ``r``
        defaults to ``head_dim / 2`` here.
    group_products : bool
        Decode graphs run their bias-free weight products through one op, ``rotatek.grouped_linear``,
        those that share an input (q, k, v; gate, up) as one call: one Triton launch on CUDA when
        the step has at most 16 rows and 16-bit weights
        (:mod:`rotatek_compile.passes.group_products`); elsewhere the op runs the same ``F.linear``
        calls as the model. Default ``True``; ``False`` leaves the products as the model wrote them.
    """

    key_channels: Optional[int] = None
    key_keep_ratio: Optional[float] = None
    query_aware: Union[bool, str] = "auto"
    query_window: int = 32
    solver: str = "auto"
    subspace_iters: int = 5
    span: str = "visual"
    kernel: str = "auto"
    method: str = "rotatek"
    token_keep: float = 1.0
    kv_budget: Optional[float] = None
    group_products: bool = True

    def __post_init__(self) -> None:
        if self.key_channels is not None:
            _check(_is_int(self.key_channels) and self.key_channels >= 1,
                   "key_channels", "a positive int", self.key_channels)
        if self.key_keep_ratio is not None:
            _check(_is_real(self.key_keep_ratio) and 0 < self.key_keep_ratio <= 1,
                   "key_keep_ratio", "a float in (0, 1]", self.key_keep_ratio)
        if self.key_channels is not None and self.key_keep_ratio is not None:
            raise ValueError("rotatek option key_channels and key_keep_ratio: give one, not both")
        _check(isinstance(self.query_aware, bool) or self.query_aware == "auto",
               "query_aware", "'auto', True or False", self.query_aware)
        _check(_is_int(self.query_window) and self.query_window >= 1,
               "query_window", "a positive int", self.query_window)
        _check(self.solver in SOLVERS, "solver", _one_of(SOLVERS), self.solver)
        _check(_is_int(self.subspace_iters) and self.subspace_iters >= 1,
               "subspace_iters", "a positive int", self.subspace_iters)
        _check(self.span in SPANS, "span", _one_of(SPANS), self.span)
        _check(self.kernel in KERNELS, "kernel", _one_of(KERNELS), self.kernel)
        if self.kernel == "triton" and not _has_cuda():
            raise ValueError("rotatek option kernel='triton' needs a CUDA device and this machine has "
                             "none: use 'auto' (Triton on CUDA, the PyTorch reference elsewhere) or 'reference'")
        _check(self.method in METHODS, "method", _one_of(METHODS), self.method)
        _check(_is_real(self.token_keep) and 0 < self.token_keep <= 1,
               "token_keep", "a float in (0, 1]", self.token_keep)
        _check(isinstance(self.group_products, bool), "group_products", "True or False", self.group_products)
        if self.kv_budget is not None:
            _check(_is_real(self.kv_budget) and 0 < self.kv_budget <= 1,
                   "kv_budget", "a float in (0, 1] (a fraction of the span's KV bytes)", self.kv_budget)
            _check(self.method == "rotatek", "kv_budget", "method='rotatek' (its rotated tier is RotateK), "
                   f"not method={self.method!r}", self.kv_budget)
            _check(self.token_keep == 1.0, "kv_budget", "token_keep=1 (the budget decides which tokens "
                   f"are dropped), not token_keep={self.token_keep!r}", self.kv_budget)

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None,
                     backend_options: tuple[str, ...] = BACKEND_OPTIONS) -> "RotateKConfig":
        """Build from ``torch.compile``'s ``options`` dict, rejecting unknown keys.

        ``backend_options`` (``inner``, ``mode``) belong to the backend, not to this config: they
        are named in the unknown-option message but must be taken out of ``options`` first.
        """
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                listed = ", ".join(sorted(known | set(backend_options)))
                raise ValueError(f"rotatek option {key!r} is unknown; known options: {listed}")
        return cls(**options)

    def solver_for(self, device: Any) -> str:
        """The solver that runs on ``device`` (a ``torch.device``): ``solver``, with ``"auto"`` resolved."""
        if self.solver != "auto":
            return self.solver
        return "subspace" if getattr(device, "type", device) == "cuda" else "eigh"

    def channels_for(self, head_dim: int) -> int:
        """``r`` for a layer of this ``head_dim``: ``key_channels`` clipped, or the ratio rounded up
        (default 1/4, or 1/2 for the rotated tier of ``kv_budget``)."""
        if self.key_channels is not None:
            return min(self.key_channels, head_dim)
        default = 0.25 if self.kv_budget is None else 0.5
        ratio = default if self.key_keep_ratio is None else self.key_keep_ratio
        return max(1, min(head_dim, math.ceil(ratio * head_dim)))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_of(choices: tuple) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


def _check(ok: bool, option: str, allowed: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"rotatek option {option}={got!r} is invalid: expected {allowed}")
