"""The frame every stage shares: optimizer and train state, checkpoints, the run loop, resume
and guards, metrics, progress."""
