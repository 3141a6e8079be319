"""Host reads of tensor values, recorded: on a GPU each waits for all the work queued before it."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# What reads a tensor's value on the host: on a GPU, each waits for all the work queued before it.
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__}


def _indexes_by_host_list(func, args) -> bool:
    """``x[[0, 2]]``: an index list is copied to the device first, which waits like a read."""
    if func is not torch.Tensor.__getitem__ or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(part, list) for part in index)


class HostReads(TorchFunctionMode):
    """Records the host reads of tensor values made inside it, by name (and indexing by a host
    list, as ``"index list"``)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(func.__name__)
        elif _indexes_by_host_list(func, args):
            self.reads.append("index list")
        return func(*args, **(kwargs or {}))
