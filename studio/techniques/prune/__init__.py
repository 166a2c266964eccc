"""Pruning blocks, one technique per module: magnitude (zeroing weights), structured (removing FFN
neurons / conv channels) and heads (removing attention heads). Structured and head pruning make the model
smaller and dense; `surgery` holds the weight slicing they share. Importing this package registers the
three blocks."""

from studio.techniques.prune import heads, magnitude, structured  # noqa: F401  (imported to register)
