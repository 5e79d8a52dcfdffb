"""Trained spam classifier: feature extraction, training, evaluation, model registry.

Public API (see the individual modules):

- :func:`filterd.classify.features.extract_features` -- bytes -> list of string tokens
- :class:`filterd.classify.model.SpamModel` -- ``load(path)``, ``score(raw) -> float``,
  ``thresholds -> (reject, tag)``, ``name``, ``card``
- :class:`filterd.classify.registry.ModelHolder` -- thread-safe holder of the active model
  (``current()``, ``reload()``, ``maybe_reload()``, ``request_reload()``)
"""

from filterd.classify.model import ModelError, SpamModel

__all__ = ["ModelError", "SpamModel"]
