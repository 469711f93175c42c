"""One module per training stage: its config, its pure step and its job in the shared run
frame (`rlhf_jax.train.loop`)."""
