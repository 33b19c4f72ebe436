"""A statistic the training reports share.

>>> import torch
>>> most_common(torch.tensor([3, 5, 5])), most_common(torch.tensor([], dtype=torch.long))
(5, -1)
"""

from __future__ import annotations

import torch


def most_common(values: torch.Tensor) -> int:
    """The most common value (``torch.mode``); -1 when there is none."""
    return int(torch.mode(values).values) if values.numel() else -1
