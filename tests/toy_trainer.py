"""A minimal trainer on the Runner, run in a subprocess by tests/test_runner.py.

usage: python toy_trainer.py OUT_DIR STEPS [every=N] [nan_at=K] [on_non_finite=stop|skip] [sleep=S]
Prints FINAL <hex digest of params> at the end.
"""

import hashlib
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlhf_jax.train import optim  # noqa: E402
from rlhf_jax.train.checkpoint import CheckpointConfig  # noqa: E402
from rlhf_jax.train.runner import GuardConfig, NonFiniteError, Runner  # noqa: E402


def batch(step, nan_at):
    rng = np.random.default_rng(step)  # batch k is a pure function of k: resumable
    x = rng.normal(size=(16, 8)).astype(np.float32)
    if step == nan_at:
        x[0, 0] = np.nan
    return x, x @ np.arange(8, dtype=np.float32)


def main():
    out, steps = sys.argv[1], int(sys.argv[2])
    opts = dict(a.split("=") for a in sys.argv[3:])
    tx = optax.adam(0.05)
    guard = GuardConfig(on_non_finite=opts.get("on_non_finite", "stop"))

    @jax.jit
    def step_fn(state, x, y):
        def loss_fn(p):
            return jnp.mean((x @ p["w"] - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new, norms = optim.apply_gradients_if_finite(state, grads, tx, loss)
        return new, {"loss": loss, **norms}

    with Runner(out, CheckpointConfig(every=int(opts.get("every", 2)), keep=2), guard,
                log=print) as run:
        return loop(run, steps, opts, step_fn, tx)


def loop(run, steps, opts, step_fn, tx):
    state = optim.create_state({"w": jnp.zeros(8)}, tx)
    start, state, meta = run.resume(state)
    print("START", start, flush=True)
    step = start
    try:
        with run.preemptible():
            for step in range(start + 1, steps + 1):
                state, metrics = step_fn(state, *batch(step, int(opts.get("nan_at", -1))))
                time.sleep(float(opts.get("sleep", 0)))
                print("STEP", step, flush=True)
                if not run.after_step(step, state, metrics, {"data_position": step}):
                    return run.exit_code()
    except NonFiniteError as e:
        print(f"error: {e}", flush=True)
        return 3
    run.finish(step, state, {"data_position": step})
    digest = hashlib.sha256(np.asarray(state.params["w"]).tobytes()).hexdigest()
    print("FINAL", digest, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
