"""The embedded end-to-end demo: `rlhf-jax demo` (see pipeline.py)."""
