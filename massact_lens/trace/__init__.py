"""Trace a massive activation back to what writes it: the block, the attention / MLP
writes, the MLP channels and the down-projection weights (super weights).

>>> from massact_lens.trace import lineage
>>> callable(lineage)
True
"""

from massact_lens.trace.writers import Lineage, lineage

__all__ = ["Lineage", "lineage"]
