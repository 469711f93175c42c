"""Running one command as several JAX processes (one per host): start-up and agreement.

Every process of a multi-host run calls `initialize` before anything touches a JAX backend,
then `check_same_config` with its resolved config:

    if distributed.initialize(cfg.distributed):      # False: one process, nothing to do
        ...
    distributed.check_same_config(config.to_dict(cfg))

Where the process settings come from, first match per key:

    1. config keys     distributed.coordinator_address / num_processes / process_id
    2. environment     RLHF_JAX_COORDINATOR_ADDRESS / RLHF_JAX_NUM_PROCESSES / RLHF_JAX_PROCESS_ID
                       (what `rlhf-jax launch` sets)
    3. the cluster     what JAX detects by itself: Cloud TPU pods, SLURM (inside `srun`), Open
                       MPI (`mpirun`), Kubernetes jobs; so a TPU pod runs the same command on
                       every worker with no extra setting

A partial setting (an address without a process count) outside a detected cluster is refused
with a line naming the missing key. On a plain machine, or a cluster of one process, nothing
is started and the command runs as before.

Two ways JAX's runtime would otherwise hang or abort with a stack trace are turned into one
line each: a coordinator that not every process reaches within `initialization_timeout_s`
(the process prints why and exits with code 2), and a process that fails while the others
still run (`exit_promptly_on_failure`: JAX's exit would wait for every other process at a
shutdown barrier, up to 5 minutes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import traceback
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from rlhf_jax.config import ConfigError, check

log = logging.getLogger(__name__)

ENV_PREFIX = "RLHF_JAX_"
KEYS = ("coordinator_address", "num_processes", "process_id")
# Keys that differ between processes by design; `check_same_config` skips them.
PER_PROCESS_KEYS = ("distributed.process_id",)
START_UP_FAILED = 2  # the exit code of a config mistake (rlhf_jax.train.runner.run_command)
_JAX_TIMEOUT_MARGIN_S = 30  # JAX's own deadline, after ours: it aborts with a stack trace


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others of a multi-process run (see the module docstring).

    Attributes:
      coordinator_address: host:port of process 0, where the others connect (the same on
        every process); None = RLHF_JAX_COORDINATOR_ADDRESS, else the detected cluster's.
      num_processes: how many processes the run has; None = RLHF_JAX_NUM_PROCESSES, else the
        detected cluster's.
      process_id: this process's index, 0 … num_processes - 1; None = RLHF_JAX_PROCESS_ID,
        else the detected cluster's.
      initialization_timeout_s: how long every process waits for all of them to reach the
        coordinator before it stops with an error.
    """

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    initialization_timeout_s: int = 120

    def __post_init__(self):
        check(self.coordinator_address is None or _valid_address(self.coordinator_address),
              "coordinator_address", self.coordinator_address,
              "host:port of process 0, e.g. 10.0.0.1:8476 (or leave it unset)")
        check(self.num_processes is None or self.num_processes >= 1, "num_processes",
              self.num_processes, "1 or more (or leave it unset)")
        check(self.process_id is None or self.process_id >= 0, "process_id", self.process_id,
              "0 … num_processes - 1 (or leave it unset)")
        check(self.initialization_timeout_s >= 1, "initialization_timeout_s",
              self.initialization_timeout_s, "1 or more seconds")


class DistributedError(ConfigError):
    """A process setting that cannot work; `key` names it (config key or variable)."""


def _valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host) and port.isdigit() and 0 < int(port) < 65536


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _both_names(key: str) -> str:
    return f"distributed.{key} (or {_env_name(key)})"


# ----------------------------------------------------------------------------- resolution


def detect_cluster() -> Optional[tuple[str, int]]:
    """(name, process count) of the cluster JAX's `jax.distributed.initialize()` would detect
    by itself, or None; starts nothing.

    JAX lists its cluster environments (Open MPI, SLURM, Cloud TPU on GCE and GKE, Kubernetes;
    mpi4py only on request) in `jax._src.clusters` and has no public call that only asks.
    A detected cluster whose process count cannot be read (a Kubernetes pod outside a job)
    is reported on stderr and treated as none: the command then runs as one process.
    """
    try:
        from jax._src import clusters
        kinds = [env for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]
    except (ImportError, AttributeError):  # another JAX layout: explicit settings still work
        return None
    for env in kinds:
        try:
            if env.is_env_present():
                return env.__name__, int(env.get_process_count())
        except Exception as e:  # detection must never stop a one-process run
            print(f"rlhf-jax: warning: {env.__name__} detected but its process count could "
                  f"not be read ({e}); running as one process. Set {_both_names('num_processes')}"
                  " and the other distributed keys to run as several.", file=sys.stderr)
            return None
    return None


def _from_environ(key: str, environ: Mapping[str, str]):
    raw = environ.get(_env_name(key), "").strip()
    if not raw:
        return None
    if key == "coordinator_address":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(_env_name(key), f"{_env_name(key)}={raw!r} is not an integer; "
                               f"set it to the {key.replace('_', ' ')}") from None


def resolve(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ,
            cluster: Callable[[], Optional[tuple[str, int]]] = detect_cluster
            ) -> Optional[dict]:
    """The keyword arguments of `jax.distributed.initialize` for this process, or None when
    it runs alone. Each key comes from `cfg`, else `RLHF_JAX_<KEY>` in `environ`, else the
    detected cluster (keys left None: JAX fills them in).

    Raises:
      DistributedError: a variable that is not a number, a partial setting outside a
        cluster, or a process id outside 0 … num_processes - 1; the message names the key.
    """
    values = {"coordinator_address": cfg.coordinator_address,
              "num_processes": cfg.num_processes, "process_id": cfg.process_id}
    sources = {key: f"distributed.{key}" for key in KEYS}
    for key in KEYS:
        if values[key] is None:
            values[key], sources[key] = _from_environ(key, environ), _env_name(key)
    given = [key for key in KEYS if values[key] is not None]
    if given and values["num_processes"] == 1:
        _check_process_id(values, sources)
        return None  # one process, by choice
    detected = cluster() if len(given) < len(KEYS) else None
    if detected is None or detected[1] <= 1:
        if not given:
            return None  # a plain machine, or a cluster of one process
        if len(given) < len(KEYS):
            missing = [key for key in KEYS if values[key] is None]
            shown = ", ".join(f"{sources[k]}={values[k]!r}" for k in given)
            raise DistributedError(
                f"distributed.{missing[0]}",
                f"{shown} is set but {' and '.join(map(_both_names, missing))} "
                f"{'is' if len(missing) == 1 else 'are'} not, and no cluster (TPU pod, SLURM, "
                "Open MPI) was detected: set all three on every process, or none")
    address = values["coordinator_address"]
    if address is not None and not _valid_address(address):
        raise DistributedError(sources["coordinator_address"],
                               f"{sources['coordinator_address']} = {address!r} is not host:port "
                               "of process 0, e.g. 10.0.0.1:8476")
    if values["num_processes"] is not None and values["process_id"] is not None:
        _check_process_id(values, sources)
    return values


def _check_process_id(values: dict, sources: dict) -> None:
    """Raises DistributedError unless 0 <= process_id < num_processes."""
    n, pid = values["num_processes"], values["process_id"]
    if n is not None and n < 1:
        raise DistributedError(sources["num_processes"],
                               f"{sources['num_processes']} = {n}: use 1 or more")
    if pid is not None and not 0 <= pid < (n or 1):
        raise DistributedError(sources["process_id"],
                               f"{sources['process_id']} = {pid} is not allowed with "
                               f"{sources['num_processes']} = {n}: use 0 … {(n or 1) - 1}")


# ----------------------------------------------------------------------------- start-up


def initialize(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """Joins the other processes of the run (`jax.distributed.initialize`) when this process
    is one of several; call it before anything touches a JAX backend.

    Idempotent: a second call, or a call after the program initialised `jax.distributed`
    itself, starts nothing. On CPU the processes' collectives go over gloo.

    Args:
      cfg: the run's `distributed` config section.
      environ: where the RLHF_JAX_* variables are read.

    Returns:
      True when this process is one of several (now connected), False when it runs alone.

    Raises:
      DistributedError: a setting that cannot work (see `resolve`), or a coordinator port
        that cannot be served. Processes that do not all reach the coordinator within
        `cfg.initialization_timeout_s` do not raise: each prints one line and exits with
        code 2, since JAX's runtime would abort the process with a stack trace.
    """
    if jax.distributed.is_initialized():
        return True
    settings = resolve(cfg, environ)
    if settings is None:
        return False
    if _backend_started():
        raise RuntimeError("rlhf_jax.distributed.initialize must run before anything touches "
                           "a JAX backend (jax.devices(), an array, a jitted call)")
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # CPU devices of different processes talk over gloo (TCP); without it XLA:CPU has no
        # cross-process collectives. GPUs and TPUs use their own and ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _connect(settings, cfg.initialization_timeout_s)
    log.info("joined the run as process %s of %s", settings["process_id"],
             settings["num_processes"])  # None where the cluster's runtime chose them
    return True


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # JAX's own check then raises instead
        return False


def _connect(settings: dict, timeout_s: int) -> None:
    """`jax.distributed.initialize(**settings)`, ended with one line after `timeout_s`."""
    connected = threading.Event()

    def give_up():
        if connected.wait(timeout_s):
            return
        print(f"rlhf-jax: error: {_timeout_message(settings, timeout_s)}", file=sys.stderr,
              flush=True)
        os._exit(START_UP_FAILED)  # the main thread is blocked inside the runtime's connect

    threading.Thread(target=give_up, name="distributed-start-up-timeout", daemon=True).start()
    try:
        jax.distributed.initialize(**settings,
                                   initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)
    except (RuntimeError, ValueError) as e:  # e.g. the port is taken on process 0
        address = settings.get("coordinator_address") or "the cluster's coordinator address"
        raise DistributedError(
            "distributed.coordinator_address",
            f"could not start the multi-process run at {address} (process "
            f"{settings.get('process_id')} of {settings.get('num_processes')}): "
            f"{' '.join(str(e).split())}; on process 0 the port must be free") from None
    finally:
        connected.set()


def _timeout_message(settings: dict, timeout_s: int) -> str:
    address = settings.get("coordinator_address")
    n, pid = settings.get("num_processes"), settings.get("process_id")
    where = f"the coordinator at {address}" if address else "the cluster's coordinator"
    if pid != 0 and address and not _reachable(address):
        return (f"process {pid} of {n} could not reach {where} within {timeout_s} s: is process "
                "0 running, and is the address reachable from this host? (distributed."
                "coordinator_address or RLHF_JAX_COORDINATOR_ADDRESS; distributed."
                "initialization_timeout_s sets the wait)")
    return (f"not all {n or ''} processes joined {where} within {timeout_s} s (this is process "
            f"{pid}): start every process with the same distributed.coordinator_address and "
            "num_processes and its own process_id, or raise distributed.initialization_timeout_s")


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- agreement


def check_same_config(cfg_dict: Mapping[str, Any], skip: tuple = PER_PROCESS_KEYS) -> None:
    """Refuses to run unless every process has process 0's config (call after `initialize`).

    Processes that read different files, overrides or environments would train different
    things on one mesh and fail later, or not at all. One all-gather of a digest of the
    flattened config settles the common case; only when digests differ are the configs
    themselves gathered, so that the error can name the key and both values.

    Args:
      cfg_dict: the resolved config as a plain dict (`rlhf_jax.config.to_dict(cfg)`).
      skip: dotted keys that differ between processes by design.

    Raises:
      ConfigError: on every process, naming the first key (in process 0's order) in which
        a process differs from process 0, so that all of them stop with the same line.
    """
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    leaves = [[key, value] for key, value in _flatten(cfg_dict) if key not in skip]
    payload = json.dumps(leaves, sort_keys=True, default=repr).encode()
    digest = np.frombuffer(hashlib.sha256(payload).digest()[:16], np.int32)
    summary = multihost_utils.process_allgather(np.append(digest, np.int32(len(payload))))
    if (summary == summary[0]).all():  # [processes, 5]
        return
    sizes = summary[:, -1]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(payload)] = np.frombuffer(payload, np.uint8)
    everyone = multihost_utils.process_allgather(padded)  # [processes, longest payload]
    configs = [dict(json.loads(bytes(row[:size]).decode())) for row, size in zip(everyone, sizes)]
    raise ConfigError(*_first_difference(configs))


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, dotted)
        else:
            yield dotted, value


def _first_difference(configs: list[dict]) -> tuple[str, str]:
    """(key, message) of the first key in which a process's config differs from process 0's."""
    reference = configs[0]
    for pid, other in enumerate(configs[1:], 1):
        for key in [*reference, *(k for k in other if k not in reference)]:
            mine, theirs = (_shown(config, key) for config in (reference, other))
            if mine != theirs:
                return key, (f"config key '{key}' differs between processes: {mine} on process "
                             f"0, {theirs} on process {pid}; every process must run with the "
                             "same config file, overrides and environment")
    raise AssertionError("the config digests differ but the configs do not")


def _shown(config: dict, key: str) -> str:
    return repr(config[key]) if key in config else "(no such key)"


# ----------------------------------------------------------------------------- ending


def exit_promptly_on_failure(run: Callable[[], int]) -> int:
    """Runs a command (`run() -> exit code`); when this process is one of several and the
    command fails, ends the process at once with its code.

    JAX ends a multi-process run at a shutdown barrier: a process that exits waits there for
    every other process, up to 5 minutes, while the others may be waiting for it in a
    collective. A failed process leaves instead (without Python's exit handlers); the others
    then fail fast too (process 0 hosts the coordinator) or are stopped by the launcher.
    """
    try:
        code = run()
    except SystemExit as e:
        if not jax.distributed.is_initialized() or not e.code:
            raise
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # reported below, as Python would have
        if not jax.distributed.is_initialized():
            raise
        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    if code and jax.distributed.is_initialized():
        logging.shutdown()  # flushes the log handlers that exit handlers would have flushed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
