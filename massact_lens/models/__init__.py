"""Models as the library measures them: raw-weight bridges (:func:`load_model`), the
SmolLM2 cache, checkpoints of the small trained decoders, planted test models and the
explicit-bias attention variants.

>>> from massact_lens.models import load_model, weights_processed
>>> from massact_lens.examples import tiny_model
>>> weights_processed(tiny_model())
False
"""

from massact_lens._core.types import warn_if_processed, weights_processed
from massact_lens.models.load import load_model, model_description

__all__ = ["load_model", "model_description", "warn_if_processed", "weights_processed"]
