"""The ``rotatek`` torch.compile backend.

For each graph Dynamo hands over:

1. find the attention sites (:mod:`rotatek_compile.passes.find_attention`);
2. prefill graph → :func:`~rotatek_compile.passes.rewrite.rewrite_prefill`, which compresses each
   layer's Keys inside the graph (:mod:`rotatek_compile.prefill`); at run time hand HF
   zero-storage stand-ins in their place;
   decode graph on a compressed cache → :func:`~rotatek_compile.passes.rewrite.rewrite_decode`,
   feeding each layer's compressed state in and the grown stand-ins back;
   any other graph → unchanged;
3. compile the result with Inductor (or run it as is, ``inner="eager"``).

The registered entry point is :func:`rotatek_backend`; ``options`` become a :class:`RotateKConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

import rotatek_compile.ops  # noqa: F401  (registers torch.ops.rotatek.*)
from rotatek_compile.config import INNERS, RotateKConfig
from rotatek_compile.passes.find_attention import CROSS_ATTENTION, SkippedSite, sites_and_skips
from rotatek_compile.passes.group_products import group_products
from rotatek_compile.passes.rewrite import (
    RewrittenGraph, SiteSlots, rewrite_decode, rewrite_merge, rewrite_prefill, state_inputs)
from rotatek_compile.passes.visual_span import to_token_mask
from rotatek_compile.prefill import PrefillRun, SpanOf, running
from rotatek_compile.state import (
    CompressedLayer, KeptExact, attached, become_stand_in, derived_from_stand_in, plain, stand_in)

logger = logging.getLogger("rotatek_compile")


class RotateKCacheError(RuntimeError):
    """A compressed cache reached code that cannot read it (e.g. beam search reordered it)."""


class _RecompileLimitWarning(logging.Filter):
    """Turns Dynamo's "hit config.recompile_limit" log record into one WARNING of ours.

    Past that limit Dynamo runs the frame uncompiled: new requests get an exact, uncompressed
    cache (compression silently off), and a compressed cache reaching that code raises
    :class:`RotateKCacheError` (see :class:`rotatek_compile.state.StandIn`). The backend is not
    called then, so this filter on Dynamo's logger is the one place that sees it happen.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()  # Dynamo logs it once per frame that hits the limit
        if "recompile_limit" in message and "hit config" in message:
            logger.warning(
                "rotatek: Dynamo hit its recompile limit (torch._dynamo.config.recompile_limit): "
                "new request shapes now run uncompiled, every layer exact and uncompressed, and a "
                "compressed cache that reaches them raises RotateKCacheError; raise the limit "
                "(README, 'Many request shapes')")
        return True


_RECOMPILE_LIMIT_WARNING = _RecompileLimitWarning()


# Graphs one model needs for ordinary traffic: prefill and decode, batch 1 and batch > 1 (Dynamo
# specialises size 1), first and later turns, each first traced static and then dynamic.
RECOMPILE_LIMIT = 64
_TORCH_DEFAULT_RECOMPILE_LIMIT = 8


def _raise_recompile_limit() -> None:
    """Raise Dynamo's per-function recompile limit from torch's default to :data:`RECOMPILE_LIMIT`.

    Past the limit the model would run uncompiled (exact, uncompressed, or refused on a compressed
    cache). A limit the user set (anything but torch's default) is kept.
    """
    config = torch._dynamo.config
    if config.recompile_limit == _TORCH_DEFAULT_RECOMPILE_LIMIT:
        config.recompile_limit = RECOMPILE_LIMIT
        logger.info("rotatek: torch._dynamo.config.recompile_limit raised from %d to %d",
                    _TORCH_DEFAULT_RECOMPILE_LIMIT, RECOMPILE_LIMIT)


def _watch_recompile_limit() -> None:
    dynamo_logger = logging.getLogger("torch._dynamo.convert_frame")
    if _RECOMPILE_LIMIT_WARNING not in dynamo_logger.filters:
        dynamo_logger.addFilter(_RECOMPILE_LIMIT_WARNING)


@dataclasses.dataclass
class GraphReport:
    """What the backend did to one graph (``rotatek_compile.explain`` collects these)."""

    phase: str  # "prefill" | "decode" | "other" (graphs left unchanged that hold attention)
    rewritten: list[str]
    skipped: list[tuple[str, str]]
    # prefill, filled at run time: rewritten sites whose last call kept the exact cache, and why
    kept_exact: dict[str, str] = dataclasses.field(default_factory=dict)
    # decode: rotatek.grouped_linear ops made of the weight products (passes.group_products)
    grouped_products: int = 0


class RotateKBackend:
    """A torch.compile backend object; ``reports`` lists every graph it compiled."""

    def __init__(self, config: RotateKConfig, inner: str = "inductor", mode: Optional[str] = None):
        if inner not in INNERS:
            raise ValueError(f"rotatek option inner={inner!r} is invalid: expected one of 'inductor', 'eager'")
        if mode is not None and mode not in _inductor_modes():
            raise ValueError(f"rotatek option mode={mode!r} is invalid: expected one of "
                             f"{', '.join(repr(m) for m in _inductor_modes())}")
        self.config = config
        self.inner = inner
        self.mode = mode
        self.reports: list[GraphReport] = []
        self._warned: set[str] = set()  # reasons already given in a WARNING
        self.kept_exact: dict[str, str] = {}  # layer → why a prefill kept its exact cache (latest)
        self.saw_image_input = False  # some graph took pixel_values: the model sees images
        _watch_recompile_limit()
        _raise_recompile_limit()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if any(_is_image_input(node.name) for node in gm.graph.find_nodes(op="placeholder")):
            self.saw_image_input = True
        from rotatek_compile.static_cache import compile_static  # imports this module

        static = compile_static(self, gm, example_inputs)  # graphs on HF's StaticCache
        if static is not None:
            return static
        compressed = {i for i, x in enumerate(example_inputs) if attached(x) is not None}
        if compressed:
            plan = rewrite_decode(gm, self.config.method, self.config.kernel, compressed)
            read = {slot.past_keys_input for slot in plan.sites} if plan else set()
            # Not even a graph that reads only their length passes: in the models seen doing it
            # (Step3p7, Qwen4-Exp) it builds a decode mask in a graph apart from the attention, and
            # in Qwen4-Exp that mask carries a sparse-attention selection the cache cannot follow.
            if compressed - read:
                raise RotateKCacheError(
                    f"rotatek: {len(compressed - read)} compressed Key caches reach code that was not "
                    "rewritten to read them (an attention pattern the pass does not recognise)")
        else:
            plan = rewrite_prefill(gm, self.config.query_window) or rewrite_merge(gm)
        if plan is None:
            return self._plain(gm, example_inputs)
        if plan.phase == "merge":
            return _MergeRunner(plan, self._compile(plan.module, list(example_inputs)))
        report = self._report(plan)
        if plan.phase == "prefill":
            return _PrefillRunner(plan, self._compile(plan.module, list(example_inputs), cudagraphs=False), self,
                                  report)
        extra, symbols = _state_inputs(_compressed_layers(plan, example_inputs)), []
        if self.inner == "inductor":
            extra, symbols = _symbolic_state(plan, extra, self.config.method)
        checks = StateShapeChecks(symbols, self.config.method)
        self.group_products(plan, report)
        compiled = self._compile(plan.module, list(example_inputs) + extra)
        checks.take_guards()
        return _DecodeRunner(plan, compiled, checks)

    def group_products(self, plan: Any, report: GraphReport) -> None:
        """A rewritten decode graph's weight products as ``rotatek.grouped_linear`` ops, those that
        share an input as one (:mod:`rotatek_compile.passes.group_products`), unless
        ``group_products=False``."""
        if not self.config.group_products:
            return
        report.grouped_products = group_products(plan.module.graph, self.config.kernel)
        if report.grouped_products:
            plan.module.recompile()

    def _compile(self, module: fx.GraphModule, example_inputs: list, cudagraphs: bool = True) -> Callable:
        """The inner compiler; ``cudagraphs=False`` for a prefill, even in ``mode="reduce-overhead"``:
        a prefill runs once per request, at a new length each time, a recording would keep its
        activations (the full-width Keys among them) in the CUDA-graph memory pool, and its
        compression reads token counts on the host. HF's recipe runs the prefill uncaptured too."""
        if self.inner == "eager":
            return module
        example_inputs = [plain(x) for x in example_inputs]  # Inductor sees plain tensors
        from torch._inductor.compile_fx import compile_fx

        patches = dict(torch._inductor.list_mode_options(self.mode)) if self.mode else {}
        if not cudagraphs:
            patches["triton.cudagraphs"] = False
        return compile_fx(module, example_inputs, config_patches=patches)

    def _plain(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        sites, skipped = sites_and_skips(gm.graph)
        compiled = _carrying_span(self._compile(gm, list(example_inputs)), example_inputs)
        if not sites and not skipped:
            return compiled
        decode = [s for s in sites if not s.is_prefill and s.past_keys.op == "placeholder"]
        skipped = list(skipped) + [SkippedSite(s.layer, s.attention, _NOT_FILLED) for s in decode]
        self.reports.append(GraphReport("other", [], [(s.layer, s.reason) for s in skipped]))
        self._tell(skipped, rewritten=0)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        return _guard_stand_ins(compiled, [placeholders.index(s.past_keys) for s in decode])

    def _report(self, plan: RewrittenGraph) -> GraphReport:
        report = GraphReport(plan.phase, [s.layer for s in plan.sites],
                             [(s.layer, s.reason) for s in plan.skipped])
        self.reports.append(report)
        logger.info("rotatek: %s graph, %d attention sites rewritten, %d left exact",
                    plan.phase, len(plan.sites), len(plan.skipped))
        self._tell(plan.skipped, rewritten=len(plan.sites))
        return report

    def _tell(self, skipped: Sequence[SkippedSite], rewritten: int) -> None:
        """Log each layer left exact: one WARNING per reason (per backend) where compression is
        off although the layer could be compressed, INFO otherwise.

        A graph where no layer is compressed at all (every decoder layer a sliding window, say)
        warns for every reason.
        """
        by_reason: dict[str, list[str]] = {}
        for site in skipped:
            if site.reason == _NOT_FILLED and site.layer in self.kept_exact:  # by the byte rule
                logger.info("rotatek: %s left exact: its prefill kept the exact cache (%s)",
                            site.layer, self.kept_exact[site.layer])
                continue
            logger.info("rotatek: %s left exact: %s", site.layer, site.reason)
            if site.compressible or (rewritten == 0 and "sliding-window" in site.reason):
                by_reason.setdefault(site.reason, []).append(site.layer)
        for reason, layers in by_reason.items():
            if reason not in self._warned:
                self._warned.add(reason)
                logger.warning("rotatek: compression is off for %d layer(s) (%s): %s",
                               len(layers), ", ".join(dict.fromkeys(layers)), reason)


_NOT_FILLED = "its cache was not filled by a rotatek-compiled prefill"


# Graph inputs that carry an image into the model: pixels, patches, or features computed outside
_IMAGE_INPUTS = ("pixel_values", "flattened_patches", "image_features", "image_embeds", "vision_feature",
                 "image_grid", "image_sizes", "pixel_attention_mask")


def _is_image_input(placeholder: str) -> bool:
    name = placeholder.lower()
    return "_kwargs_" in name and any(kind in name for kind in _IMAGE_INPUTS)


def _inductor_modes() -> tuple[str, ...]:
    return ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _guard_stand_ins(compiled: Callable, past_keys_inputs: list[int]) -> Callable:
    """Refuse to run a graph that would read a compressed cache (or a copy of it) as Keys."""

    def run(*args):
        if any(derived_from_stand_in(args[i]) for i in past_keys_inputs):
            raise RotateKCacheError(
                "rotatek: a compressed KV cache reached a graph that cannot read it: beam search "
                "(cache reordering), cache cropping and mixing compiled with uncompiled calls are "
                "not supported")
        return compiled(*args)

    return run


def _compressed_layers(plan: RewrittenGraph, args: Sequence[Any]) -> list[CompressedLayer]:
    """The compressed layer each site's past Keys carry; a clear error where one carries none."""
    layers = []
    for slot in plan.sites:
        layer = attached(args[slot.past_keys_input])
        if layer is None:
            raise RotateKCacheError(
                f"rotatek: the Key cache of {slot.layer} was not produced by a rotatek-compiled "
                "prefill (beam search reordering, cache cropping and caches filled outside the "
                "compiled model are not supported)")
        layers.append(layer)
    return layers


def _state_inputs(layers: list[CompressedLayer]) -> list[torch.Tensor]:
    """The layers' tensors, flattened in the order of ``rewrite.state_inputs(method)``."""
    tensors = []
    for layer in layers:
        tensors += [*layer.span_key_parts, layer.span_values, layer.span_mask,
                    layer.keys, layer.values, layer.mask]
    return tensors


def _symbolic_state(plan: RewrittenGraph, state: list[torch.Tensor],
                    method: str) -> tuple[list[torch.Tensor], list]:
    """Fake tensors for the state inputs, with the span and rest lengths as symbols of their own.

    Left to AOTAutograd, the state tensors would get duck-sized symbols, tying e.g. the rest
    length to any other dimension of the same value on the first call, which later calls break.
    Each length gets a fresh symbol instead; batch, heads and head dims reuse the symbols (or
    constants) of HF's cache tensors, which Dynamo guards. Returns the fakes and the symbols.
    """
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    fake_mode = torch._guards.detect_fake_mode()
    if fake_mode is None or fake_mode.shape_env is None:
        return state, []
    shape_env = fake_mode.shape_env
    symbols = []

    def length(value: int, name: str):
        source = ConstantSource(name)
        symbol = shape_env.create_symbol(value, source, dynamic_dim=DimDynamic.DYNAMIC,
                                         do_not_specialize_zero_one=True)
        symbols.append((symbol, name))
        return shape_env.create_symintnode(symbol, hint=value, source=source)

    placeholders = list(plan.module.graph.find_nodes(op="placeholder"))
    fakes = []
    names = state_inputs(method)
    for i, slot in enumerate(plan.sites):
        real = state[i * len(names):(i + 1) * len(names)]
        batch, heads, _, dim = placeholders[slot.past_keys_input].meta["example_value"].shape
        value_dim = placeholders[slot.past_values_input].meta["example_value"].shape[-1]
        span = length(real[names.index("span_values")].shape[2], f"rotatek_span_{i}")
        rest = length(real[names.index("rest_keys")].shape[2], f"rotatek_rest_{i}")
        rank = real[0].shape[-1]
        key_shapes = {
            "rotatek": [(batch, heads, span, rank), (batch, heads, dim, rank), (batch, heads, dim)],
            "think": [(batch, heads, span, rank), (batch, heads, rank)],
            "spark": [(batch, heads, span, rank), (batch, heads, span, rank), (batch, heads, span)],
        }[method]
        shapes = key_shapes + [(batch, heads, span, value_dim), (batch, span),
                               (batch, heads, rest, dim), (batch, heads, rest, value_dim), (batch, rest)]
        with fake_mode:
            fakes += [torch.empty(shape, dtype=t.dtype, device=t.device) for shape, t in zip(shapes, real)]
    return fakes, symbols


class StateShapeChecks:
    """What compiling assumed about the state lengths, checked on every call instead of by Dynamo.

    Dynamo can only guard what it traced; the guards that compiling put on the state-length
    symbols (in practice ``length >= 2``, a stride assumption) are taken out of its shape
    environment and evaluated here from the real state. A call that breaks one raises.
    """

    def __init__(self, symbols: list, method: str):
        self.symbols = symbols
        self.state_names = state_inputs(method)  # one site's state inputs, in order
        self.expressions: list = []
        self._checks: list = []

    def take_guards(self) -> None:
        fake_mode = torch._guards.detect_fake_mode()
        if not self.symbols or fake_mode is None:
            return
        ours = {symbol for symbol, _ in self.symbols}
        kept, taken = [], []
        for guard in fake_mode.shape_env.guards:
            (taken if guard.expr.free_symbols & ours else kept).append(guard)
        fake_mode.shape_env.guards[:] = kept
        self.expressions = [guard.expr for guard in taken]
        logger.debug("rotatek: state-length guards checked at run time: %s", self.expressions)
        self._compile_checks()

    def _compile_checks(self) -> None:
        """Each guard over our symbols alone as a Python function of the lengths (fast per call);
        guards that also involve Dynamo's symbols are Dynamo's to check."""
        import sympy

        ordered = [symbol for symbol, _ in self.symbols]
        self._checks = [(expression, sympy.lambdify(ordered, expression))
                        for expression in self.expressions
                        if expression.free_symbols <= set(ordered)]

    def check(self, state: list[torch.Tensor]) -> None:
        if not self.expressions:
            return
        per_site = len(self.state_names)
        span_values, rest_keys = self.state_names.index("span_values"), self.state_names.index("rest_keys")
        lengths = []
        for i in range(len(self.symbols) // 2):  # a span and a rest symbol per site
            site = state[i * per_site: (i + 1) * per_site]
            lengths += [site[span_values].shape[2], site[rest_keys].shape[2]]
        for expression, holds in self._checks:
            if not holds(*lengths):
                raise RotateKCacheError(f"rotatek: the compressed cache breaks an assumption of the "
                                        f"compiled decode step ({expression} with lengths {lengths})")


_SPAN_TAG = "_rotatek_span"


class _MergeRunner:
    """Runs a graph that merges image features; tags the merged embeddings with the mask."""

    def __init__(self, plan: RewrittenGraph, compiled: Callable):
        self.plan, self.compiled = plan, compiled

    def __call__(self, *args):
        outputs = list(self.compiled(*args))
        for merged, mask in zip(self.plan.merge_outputs, self.plan.span_outputs):
            setattr(outputs[merged], _SPAN_TAG, outputs[mask])
        return outputs[: self.plan.num_outputs]


class _PrefillRunner:
    """Runs the prefill graph, which compresses each site's Keys as it goes
    (:class:`~rotatek_compile.prefill.PrefillRun`), then hands HF stand-ins carrying them.

    A layer that :func:`compress_layers` keeps exact (its compressed form would not be smaller)
    hands HF its real Keys and Values; the decode graph then leaves that site exact.
    """

    def __init__(self, plan: RewrittenGraph, compiled: Callable, backend: RotateKBackend,
                 report: Optional[GraphReport] = None):
        self.plan, self.compiled, self.backend, self.config = plan, compiled, backend, backend.config
        self.report = report

    def __call__(self, *args):
        run = self._run(args)
        with running(run):
            outputs = list(self.compiled(*args))
        return self._handed_over(run, outputs, args)

    def _run(self, args: tuple) -> PrefillRun:
        """The run that this call's graph feeds."""
        return PrefillRun(self.config, [slot.scale for slot in self.plan.sites], self._span_of(args))

    def _span_of(self, args: tuple) -> SpanOf:
        return lambda masks, batch, length: self._span(masks, args, batch, length)

    def _handed_over(self, run: PrefillRun, outputs: list, args: tuple) -> list:
        """The graph's outputs, with each compressed site's Keys and Values as stand-ins that carry
        its layer (HF's buffers that came in as inputs become stand-ins themselves), and the Keys
        and Values of each site kept exact."""
        plan = self.plan
        if self.report is not None:
            self.report.kept_exact.clear()
        reduced = 0  # layers that store less than HF's exact cache would
        for site, slot in enumerate(plan.sites):
            if site not in run.layers:
                raise RotateKCacheError(f"rotatek: the prefill graph did not compress {slot.layer}")
            layer = run.layers[site]
            if isinstance(layer, KeptExact):
                self._keep_exact(slot.layer, layer)
                _hand_exact(outputs, slot, run.exact.get(site))
                continue
            reduced += bool(layer.split.compressed or layer.split.dropped)
            key_shape, keys_like, value_shape, values_like = run.shapes[site]
            _hand_stand_in(outputs, args, slot.keys_output, slot.past_keys_input, key_shape, keys_like, layer)
            _hand_stand_in(outputs, args, slot.values_output, slot.past_values_input, value_shape, values_like, None)
        self._tell_if_only_cross_attention_holds_the_image(reduced, run.source)
        outputs = outputs[: plan.num_outputs]
        if run.span is not None:
            _tag_hidden_states(outputs, run.span)
        return outputs

    def _tell_if_only_cross_attention_holds_the_image(self, reduced: int, source: str) -> None:
        """One WARNING where no self-attention layer of a decoder with cross-attention stored less
        (``reduced`` layers did): an encoder-decoder whose image is in the encoder, so the decoder's
        own prompt has no image token, and the cross-attention cache that holds the image is never
        compressed."""
        names = [slot.layer for slot in self.plan.sites]
        cross = [s.layer for s in self.plan.skipped if s.reason == CROSS_ATTENTION]
        reason = "cross-attention holds the image"
        if not cross or not names or reduced or reason in self.backend._warned:
            return
        self.backend._warned.add(reason)
        logger.warning("rotatek: compression is off for all %d self-attention layer(s) (%s): nothing of the "
                       "decoder's own prompt was compressed (span: %s); what the encoder read (the image, in a "
                       "vision encoder-decoder) reaches this decoder by cross-attention (%s), whose cache is "
                       "not compressed",
                       len(names), ", ".join(names), source, ", ".join(dict.fromkeys(cross)))

    def _keep_exact(self, name: str, layer: KeptExact) -> None:
        """Record a layer left with HF's exact cache (its Keys and Values are not replaced)."""
        logger.info("rotatek: %s kept exact: %s", name, layer.reason)
        self.backend.kept_exact[name] = layer.reason
        if self.report is not None:
            self.report.kept_exact[name] = layer.reason

    def _span(self, masks: list[torch.Tensor], args: tuple, batch: int,
              length: int) -> tuple[Optional[torch.Tensor], str]:
        """``[B, S]`` image-token mask (``None`` for the prompt fallback), and what it is.

        From this graph's own image merges (``masks``), or else from merged embeddings that an
        earlier graph returned and tagged (:class:`_MergeRunner`) and that come in as inputs here.
        ``batch`` and ``length``: the prompt's rows and positions.
        """
        head = f"the prompt minus its last {self.config.query_window} tokens"
        if self.config.span != "visual":
            return None, f"{head} (span='prompt')"
        if not masks:
            masks = [getattr(a, _SPAN_TAG) for a in args if isinstance(a, torch.Tensor) and hasattr(a, _SPAN_TAG)]
        span = None
        for candidate in masks:
            mask = to_token_mask(candidate, batch, length)
            if mask is not None:
                span = mask if span is None else span | mask
        if span is not None and bool(span.any()):
            return span, "image tokens"
        why = "no image tokens in the prompt" if masks else "no image merge found in the graph"
        if self.backend.saw_image_input and why not in self.backend._warned:
            self.backend._warned.add(why)
            logger.warning("rotatek: the model takes images but %s: compressing %s instead (an image "
                           "merge the pass does not recognise, or a text-only prompt)", why, head)
        return None, f"{head} ({why})"


def _hand_exact(outputs: list, slot: SiteSlots, exact: Optional[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Return the run's copies of a layer kept exact (``exact``: made in the graph) where the graph
    returned its Keys and Values."""
    for index, tensor in zip((slot.keys_output, slot.values_output), exact or ()):
        if index >= 0:
            outputs[index] = tensor


def _hand_stand_in(outputs: list, args: tuple, output: int, input_: int, shape: torch.Size, like: torch.Tensor,
                   layer: Optional[CompressedLayer]) -> None:
    """Give HF a stand-in of ``shape`` carrying ``layer``: as the graph's output (for a buffer made
    in the graph, which Dynamo stores in the cache), or HF's own buffer, a graph input, made one."""
    if output >= 0:
        outputs[output] = stand_in(shape, like, layer)
    if input_ >= 0:
        become_stand_in(args[input_], layer)


def _tag_hidden_states(outputs: list, span: torch.Tensor) -> None:
    """Tag the returned ``[B, S, ...]`` tensors with the image span, for a later graph of the same
    prefill (Dynamo splits some decoders, e.g. at DeepStack's feature injection after layer 0)."""
    for output in outputs:
        if isinstance(output, torch.Tensor) and output.dim() >= 2 and tuple(output.shape[:2]) == tuple(span.shape):
            setattr(output, _SPAN_TAG, span)


def _carrying_span(compiled: Callable, example_inputs: Sequence[Any]) -> Callable:
    """A graph left unchanged passes the image span on: when an input carries it (hidden states
    tagged by an earlier graph of the same prefill), its ``[B, S, ...]`` outputs carry it too.

    Prefills that Dynamo splits into several graphs need it: DeepStack's feature injection after
    a layer, a MoE block between two layers' attention graphs.
    """
    candidates = [i for i, x in enumerate(example_inputs)
                  if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and x.dim() >= 2]
    if not candidates:
        return compiled

    def run(*args):
        outputs = compiled(*args)
        for i in candidates:
            span = getattr(args[i], _SPAN_TAG, None)
            if span is not None:
                _tag_hidden_states(outputs, span)
                break
        return outputs

    return run


class _DecodeRunner:
    """Runs a decode graph on the compressed state attached to HF's cache stand-ins."""

    def __init__(self, plan: RewrittenGraph, compiled: Callable, checks: StateShapeChecks):
        self.plan, self.compiled, self.checks = plan, compiled, checks

    def __call__(self, *args):
        plan = self.plan
        layers = _compressed_layers(plan, args)
        checked = [(args[slot.mask_input], layer, slot.layer) for slot, layer in zip(plan.sites, layers)
                   if slot.mask_input >= 0]
        if checked:
            _check_padding_only(checked)
        state = _state_inputs(layers)
        self.checks.check(state)
        outputs = list(self.compiled(*map(plain, args), *state))
        del state
        grown = outputs[plan.num_outputs:]
        for i, (slot, layer) in enumerate(zip(plan.sites, layers)):
            keys, values, mask = grown[3 * i: 3 * i + 3]
            past_keys, past_values = args[slot.past_keys_input], args[slot.past_values_input]
            added = keys.shape[2] - layer.keys.shape[2]
            key_shape = (*past_keys.shape[:2], past_keys.shape[2] + added, past_keys.shape[3])
            value_shape = (*past_values.shape[:2], past_values.shape[2] + added, past_values.shape[3])
            outputs[slot.keys_output] = stand_in(key_shape, past_keys, layer.with_rest(keys, values, mask))
            outputs[slot.values_output] = stand_in(value_shape, past_values, None)
        return outputs[: plan.num_outputs]


def _check_padding_only(checked: list[tuple[torch.Tensor, CompressedLayer, str]]) -> None:
    """Decode masks built in another graph must mask padding only: the compressed cache keeps its
    own validity and reads the mask only for the new tokens (``rewrite._new_token_mask``).

    ``checked``: ``(mask, layer, name)`` per site. The last query's row over the past positions
    must allow exactly the tokens the layer holds (both segments' real slots) plus those it
    dropped at prefill. A mask that carries more (the token selection of a sparse-attention
    indexer) raises instead of being silently ignored. One host sync per step for all layers (a
    mask shared by several layers is counted once); only for models whose attention runs in a
    graph apart from its mask.
    """
    seen: dict[int, torch.Tensor] = {}  # id(mask) → [B|1] tokens it allows
    agrees = []
    for mask, layer, name in checked:
        if id(mask) not in seen:
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            if allowed.dim() != 4:
                raise RotateKCacheError(f"rotatek: the decode attention mask of {name} ({tuple(mask.shape)}) is "
                                        "built outside its graph and has no [B, heads, queries, keys] form to check")
            past = allowed.shape[-1] - allowed.shape[-2]
            seen[id(mask)] = allowed[:, 0, -1, :past].sum(dim=1)
        held = layer.held_tokens()  # [B]
        if layer.dropped is not None:
            held = held + torch.tensor(layer.dropped, device=held.device)
        agrees.append((seen[id(mask)] == held).all())
    if bool(torch.stack(agrees).all()):
        return
    name = next(name for (_, _, name), ok in zip(checked, agrees) if not bool(ok))
    raise RotateKCacheError(
        f"rotatek: the decode attention mask of {name} hides tokens that are not padding (a token "
        "selection, e.g. a sparse-attention indexer), which the compressed cache cannot follow "
        "(not supported)")


class RotateKOptionError(ValueError):
    """A bad ``rotatek`` option. Raised from the first graph, it reaches the caller as is:
    Dynamo passes :class:`torch._dynamo.exc.ShortenTraceback` errors through unwrapped."""


def _option_error(error: ValueError) -> Exception:
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover (torch without it: Dynamo wraps the ValueError)
        return error

    class _Unwrapped(RotateKOptionError, ShortenTraceback):
        pass

    unwrapped = _Unwrapped(str(error))
    unwrapped.first_useful_frame = None  # ShortenTraceback's: keep the whole traceback
    return unwrapped


def rotatek_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                    options: Optional[dict] = None, mode: Optional[str] = None) -> Callable:
    """``torch.compile(..., backend="rotatek", options={...})`` lands here (entry point).

    ``options`` are :class:`RotateKConfig` fields plus ``inner`` ("inductor" or "eager": what
    compiles the rewritten graph). torch calls a registered backend only with the first graph,
    so a bad option is reported then, as a :class:`RotateKOptionError` (a ``ValueError``) whose
    one-line message names the option; ``rotatek_compile.backend(**options)`` checks at once.
    """
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    try:
        backend = _shared_backend(RotateKConfig.from_options(options), inner, mode)
    except ValueError as error:
        raise _option_error(error) from None
    return backend(gm, example_inputs)


_SHARED: dict[tuple, RotateKBackend] = {}


def _shared_backend(config: RotateKConfig, inner: str, mode: Optional[str]) -> RotateKBackend:
    """One backend object per set of options: torch calls the registered function once per graph,
    and what one graph learns (images seen, warnings given) must reach the next."""
    key = (config, inner, mode)
    if key not in _SHARED:
        _SHARED[key] = RotateKBackend(config, inner=inner, mode=mode)
    return _SHARED[key]
