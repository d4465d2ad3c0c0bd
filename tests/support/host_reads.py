"""Counting the reads of tensor values into Python: on a GPU each one waits for the device.

A CUDA graph capture refuses them, and a sampling loop that reads inside every attention call stalls the GPU
at each read (the foundation's benchmark measured +60 % from one read per attention call). Checked on the
CPU, where the same Python runs.
"""
from __future__ import annotations

import collections
import os
import pathlib
import traceback

import torch

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}


class HostReads(torch.overrides.TorchFunctionMode):
    """Within `with HostReads() as reads:`, `reads.total` counts host reads and `reads.where` says where
    (file:line of the first frame outside torch); `forbid=True` fails on the first one instead."""

    def __init__(self, forbid: bool = False):
        super().__init__()
        self.forbid = forbid
        self.where = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            if self.forbid:
                raise AssertionError(f"a tensor is read back to the host: {func.__name__}")
            frame = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}torch{os.sep}" not in f.filename][-1]
            self.where[f"{func.__name__} at {pathlib.Path(frame.filename).name}:{frame.lineno}"] += 1
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return "; ".join(f"{n} x {where}" for where, n in self.where.most_common())
