"""Kernels: ``reference`` (plain PyTorch: the CPU path and every kernel's oracle), and on CUDA
``triton_decode`` (the decode attention), ``triton_compress`` (the compression's statistics) and
``triton_gemv`` (decode steps' weight products that share an input, in one launch)."""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType
from typing import Callable, Optional

import torch

logger = logging.getLogger("rotatek_compile")

# rotatek.grouped_linear (:mod:`rotatek_compile.kernels.triton_gemv`): the Triton kernel serves inputs
# of at most this many rows (its dot pads them to 16), and groups of at most this many weights (q, k, v).
GEMV_MAX_ROWS = 16
GEMV_MAX_GROUP = 3


def on_inputs_device(launch: Callable) -> Callable:
    """``launch`` (a Triton kernel's entry point) run with its first tensor's CUDA device current:
    Triton launches on the current device, and a model spread over several GPUs
    (``device_map="auto"``) runs layers whose tensors live on another one. The first argument that
    is a tensor, or a sequence of them, decides."""
    @functools.wraps(launch)
    def on_device(*args, **kwargs):
        first = _first_tensor(args)
        if first is None or first.device.type != "cuda" or first.device.index == torch.cuda.current_device():
            return launch(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launch(*args, **kwargs)
    return on_device


def _first_tensor(args: tuple) -> Optional[torch.Tensor]:
    for arg in args:
        if isinstance(arg, (list, tuple)) and arg:
            arg = arg[0]
        if isinstance(arg, torch.Tensor):
            return arg
    return None


@functools.cache
def triton_module(name: str) -> Optional[ModuleType]:
    """``rotatek_compile.kernels.<name>`` (a Triton kernel module), or ``None`` with one WARNING
    when it cannot be imported (triton missing, or the module not built for this triton)."""
    try:
        return importlib.import_module(f"rotatek_compile.kernels.{name}")
    except ImportError as error:
        logger.warning("rotatek: Triton kernels %s unavailable (%s); using the reference", name, error)
        return None


def compress_kernels(device: torch.device, kernel: str = "auto") -> Optional[ModuleType]:
    """The fused statistics kernels (:mod:`rotatek_compile.kernels.triton_compress`) for tensors on
    ``device`` under the ``kernel`` option, or ``None`` where the reference runs (CPU, ``"reference"``)."""
    if kernel == "reference" or device.type != "cuda":
        return None
    return triton_module("triton_compress")
