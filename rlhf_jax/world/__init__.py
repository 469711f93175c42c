"""The built-in toy world: tiny models and tokenizers, generated preference and SFT data, the
demo's movie reviews and their hidden gold judge. Only stages, tests, benchmarks and the demo
use it; `rlhf_jax.data` never does."""
