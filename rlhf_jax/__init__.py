"""rlhf_jax: a JAX/Flax trainer for the whole RLHF pipeline (SFT, reward model, PPO)."""

__version__ = "0.1.0"
