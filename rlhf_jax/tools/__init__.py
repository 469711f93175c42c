"""Commands around training: `rlhf-jax generate` (sampling a prompts file)."""
