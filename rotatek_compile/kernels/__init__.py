"""Kernels: ``reference`` (plain PyTorch: the CPU path and every kernel's oracle), and on CUDA
``triton_decode`` (the decode attention) and ``triton_compress`` (the compression's statistics)."""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger("rotatek_compile")


@functools.cache
def _triton_compress() -> Optional[ModuleType]:
    try:
        from rotatek_compile.kernels import triton_compress
    except ImportError as error:  # triton missing, or the kernel module not built for this triton
        logger.warning("rotatek: Triton compression kernels unavailable (%s); using the reference", error)
        return None
    return triton_compress


def compress_kernels(device: torch.device, kernel: str = "auto") -> Optional[ModuleType]:
    """The fused statistics kernels (:mod:`rotatek_compile.kernels.triton_compress`) for tensors on
    ``device`` under the ``kernel`` option, or ``None`` where the reference runs (CPU, ``"reference"``)."""
    if kernel == "reference" or device.type != "cuda":
        return None
    return _triton_compress()
