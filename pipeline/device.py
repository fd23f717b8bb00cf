"""`compute.device` on this machine, apart from the fast path's heavy imports (the sweep stage
asks it before any trial runs)."""
from __future__ import annotations

import torch

from pipeline.config import ConfigError


def resolve_device(spec: str) -> torch.device:
    """`compute.device` as a torch device: auto = the first CUDA device if there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"compute.device: {spec!r} but no CUDA device is available here; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"compute.device: {spec!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device
