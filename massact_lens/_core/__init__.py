"""The library's engine room: types, hook names, batching, the one forward loop, statistics.

Nothing here imports from the rest of the package; every other subpackage builds on it.
Public names defined here are re-exported where a user looks for them
(:mod:`massact_lens.find`, :mod:`massact_lens.interventions`, ...).
"""
