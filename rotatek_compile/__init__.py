"""rotatek_compile: a torch.compile backend that keeps a channel-pruned Key cache (RotateK).

``model.compile(backend="rotatek", options={"key_channels": 32})`` needs no import of this
package (the backend is registered as a ``torch_dynamo_backends`` entry point).
"""

from rotatek_compile.backend import RotateKBackend, RotateKCacheError
from rotatek_compile.config import RotateKConfig
from rotatek_compile.explain import CacheBytes, Explanation, cache_bytes, explain, span_split
from rotatek_compile import generate_check

generate_check.install()  # one WARNING where generate() would bypass a rotatek-compiled forward


def backend(config: RotateKConfig | None = None, *, inner: str = "inductor", mode: str | None = None,
            **options) -> RotateKBackend:
    """A backend object for ``torch.compile(backend=...)``, from a config or option keywords.

    Options are checked here, at once. ``mode`` is Inductor's (``"reduce-overhead"``: CUDA graphs,
    ``"max-autotune"``, ...): ``torch.compile`` refuses ``mode`` together with ``options``, so
    pass both here instead::

        model.compile(backend=rotatek_compile.backend(key_channels=32, mode="reduce-overhead"))
    """
    if config is not None and options:
        raise ValueError("rotatek: pass a RotateKConfig or option keywords, not both")
    return RotateKBackend(config or RotateKConfig.from_options(options), inner=inner, mode=mode)


__all__ = ["RotateKBackend", "RotateKCacheError", "RotateKConfig", "CacheBytes", "Explanation",
           "backend", "cache_bytes", "explain", "span_split"]
