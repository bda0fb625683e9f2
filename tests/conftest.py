"""Strict JAX settings for the whole test suite."""

import jax

# Implicit rank promotion hides shape bugs; make it an error in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
