"""What the triton backend and its lazily built kernels share, in a leaf module (no import cycle)."""

from __future__ import annotations

import os

import torch

TINY = torch.finfo(torch.float32).tiny


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors through triton's interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
