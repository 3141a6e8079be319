"""rotatek_compile: a torch.compile backend that keeps a channel-pruned Key cache (RotateK).

``model.compile(backend="rotatek", options={"key_channels": 32})`` needs no import of this
package (the backend is registered as a ``torch_dynamo_backends`` entry point).
"""

from rotatek_compile.backend import RotateKBackend, RotateKCacheError
from rotatek_compile.config import RotateKConfig
from rotatek_compile.explain import CacheBytes, Explanation, cache_bytes, explain


def backend(config: RotateKConfig | None = None, **options) -> RotateKBackend:
    """A backend object for ``torch.compile(backend=...)``, from a config or option keywords
    (plus ``inner`` and ``mode``, as in ``options=`` of :func:`rotatek_compile.backend.rotatek_backend`)."""
    if config is not None and options:
        raise ValueError("rotatek: pass a RotateKConfig or option keywords, not both")
    inner, mode = options.pop("inner", "inductor"), options.pop("mode", None)
    return RotateKBackend(config or RotateKConfig.from_options(options), inner=inner, mode=mode)


__all__ = ["RotateKBackend", "RotateKCacheError", "RotateKConfig", "CacheBytes", "Explanation",
           "backend", "cache_bytes", "explain"]
