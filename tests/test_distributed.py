"""rlhf_jax.distributed: where the process settings come from, a real two-process run over
JAX's distributed runtime (gloo on CPU), and the one-line endings of what would hang."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from rlhf_jax import config, distributed
from rlhf_jax.config import ConfigError
from rlhf_jax.distributed import DistributedConfig, DistributedError, resolve
from rlhf_jax.tools.launch import free_port

ENV = {"RLHF_JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "RLHF_JAX_NUM_PROCESSES": "4",
       "RLHF_JAX_PROCESS_ID": "2"}


def no_cluster():
    return None


def never_asked():
    raise AssertionError("the cluster is not consulted when every key is set")


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("fields, key", [
    ({"coordinator_address": "10.0.0.1"}, "coordinator_address"),  # no port
    ({"coordinator_address": "10.0.0.1:99999"}, "coordinator_address"),
    ({"num_processes": 0}, "num_processes"),
    ({"process_id": -1}, "process_id"),
    ({"initialization_timeout_s": 0}, "initialization_timeout_s"),
])
def test_config_refuses_values_that_cannot_work(fields, key):
    with pytest.raises(ConfigError) as e:
        DistributedConfig(**fields)
    assert e.value.key == key


def test_config_round_trips_through_a_plain_dict():
    cfg = DistributedConfig("[::1]:8476", 2, 1, 30)
    assert config.from_dict(DistributedConfig, config.to_dict(cfg)) == cfg


def test_nothing_set_and_no_cluster_is_one_process():
    assert resolve(DistributedConfig(), {}, no_cluster) is None
    assert distributed.initialize(DistributedConfig(), {}) is False  # no cluster on this machine


def test_the_environment_sets_every_key_and_the_config_wins_per_key():
    assert resolve(DistributedConfig(), ENV, never_asked) == {
        "coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 2}
    cfg = DistributedConfig(process_id=3, coordinator_address="10.0.0.9:1234")
    assert resolve(cfg, ENV, never_asked) == {
        "coordinator_address": "10.0.0.9:1234", "num_processes": 4, "process_id": 3}
    assert resolve(DistributedConfig("h:1", 2, 1), {}, never_asked) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}


@pytest.mark.parametrize("cfg, environ, key, named", [
    (DistributedConfig(coordinator_address="h:1"), {}, "distributed.num_processes",
     "RLHF_JAX_NUM_PROCESSES"),
    (DistributedConfig(), {"RLHF_JAX_COORDINATOR_ADDRESS": "h:1", "RLHF_JAX_PROCESS_ID": "0"},
     "distributed.num_processes", "RLHF_JAX_COORDINATOR_ADDRESS='h:1'"),
    (DistributedConfig(num_processes=2, process_id=0), {}, "distributed.coordinator_address",
     "RLHF_JAX_COORDINATOR_ADDRESS"),
])
def test_a_partial_setting_outside_a_cluster_is_refused_naming_the_missing_key(cfg, environ,
                                                                               key, named):
    with pytest.raises(DistributedError) as e:
        resolve(cfg, environ, no_cluster)
    assert e.value.key == key
    assert key in str(e.value) and named in str(e.value)


@pytest.mark.parametrize("environ, key", [
    ({**ENV, "RLHF_JAX_NUM_PROCESSES": "two"}, "RLHF_JAX_NUM_PROCESSES"),
    ({**ENV, "RLHF_JAX_PROCESS_ID": "4"}, "RLHF_JAX_PROCESS_ID"),  # of 4: 0 … 3
    ({**ENV, "RLHF_JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "RLHF_JAX_COORDINATOR_ADDRESS"),
])
def test_a_bad_variable_is_refused_naming_the_variable(environ, key):
    with pytest.raises(DistributedError) as e:
        resolve(DistributedConfig(), environ, no_cluster)
    assert e.value.key == key and key in str(e.value)


def test_a_detected_cluster_fills_the_keys_left_unset():
    def slurm_of_four():
        return "SlurmCluster", 4

    assert resolve(DistributedConfig(), {}, slurm_of_four) == {
        "coordinator_address": None, "num_processes": None, "process_id": None}
    assert resolve(DistributedConfig(coordinator_address="n1:9000"), {}, slurm_of_four) == {
        "coordinator_address": "n1:9000", "num_processes": None, "process_id": None}
    assert resolve(DistributedConfig(), {}, lambda: ("SlurmCluster", 1)) is None  # one task
    assert resolve(DistributedConfig(num_processes=1), {}, never_asked) is None  # by choice


def test_jax_cluster_detection_sees_a_slurm_step(monkeypatch):
    for name in ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for name in slurm:
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect_cluster() is None
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.detect_cluster() == ("SlurmCluster", 4)


def test_first_difference_names_the_first_key_in_process_0s_order():
    same = {"seed": 0, "optim.lr": 1e-3, "mesh.data": 2}
    key, message = distributed._first_difference(
        [same, same, {**same, "optim.lr": 2e-3, "mesh.data": 4}])
    assert key == "optim.lr"
    assert "0.001 on process 0, 0.002 on process 2" in message
    key, message = distributed._first_difference([same, {**same, "extra": 1}])
    assert key == "extra" and "(no such key) on process 0, 1 on process 1" in message


def test_one_process_checks_nothing_and_keeps_its_exit_code():
    distributed.check_same_config({"seed": 0})  # no collective: jax.distributed is not started
    assert distributed.exit_promptly_on_failure(lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):
        distributed.exit_promptly_on_failure(lambda: 1 // 0)


# ----------------------------------------------------------------------------- several processes


RUN = textwrap.dedent("""
    import os, sys, time
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rlhf_jax import distributed
    from rlhf_jax.config import ConfigError

    assert distributed.initialize(distributed.DistributedConfig())
    assert distributed.initialize(distributed.DistributedConfig())  # once only: no second start
    pid = jax.process_index()
    seed = int(sys.argv[1]) if pid == 1 else 0
    try:
        distributed.check_same_config(
            {"seed": seed, "mesh": {"data": -1}, "distributed": {"process_id": pid}})
    except ConfigError as e:
        print(f"refused {e.key}: {e}", flush=True)
        sys.exit(2)
    if len(sys.argv) > 2:  # process 1 fails while process 0 works on
        if pid == 1:
            distributed.exit_promptly_on_failure(lambda: 5)
        time.sleep(120)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    local = np.arange(jax.local_device_count(), dtype=np.float32) + 10 * pid  # [0 1] [10 11]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print(f"process {pid} of {jax.process_count()}: {jax.local_device_count()} local devices "
          f"of {jax.device_count()}, sum {float(total)}", flush=True)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(RUN)
    return str(path)


def launch(*args, timeout=120):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "launch", *args],
                         capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - start


def test_two_processes_of_two_devices_all_reduce_over_the_runtime(script):
    out, _ = launch("--processes", "2", "--devices-per-process", "2", "--program", "--",
                    sys.executable, script, "0")
    assert out.returncode == 0, out.stderr
    for pid in (0, 1):  # one global array over 4 devices of 2 processes
        assert f"[{pid}] process {pid} of 2: 2 local devices of 4, sum 22.0" in out.stdout


def test_a_different_seed_is_refused_on_every_process_naming_the_key(script):
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, script, "7"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RLHF_JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
             "RLHF_JAX_NUM_PROCESSES": "2", "RLHF_JAX_PROCESS_ID": str(pid),
             "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"})
        for pid in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    line = ("refused seed: config key 'seed' differs between processes: 0 on process 0, "
            "7 on process 1")
    for p, stdout in zip(procs, outs):
        assert p.returncode == 2 and line in stdout, stdout


def test_a_failed_process_leaves_without_waiting_for_the_others(script):
    # Process 0 sleeps 120 s; JAX's exit in process 1 would wait for it at a shutdown barrier.
    out, elapsed = launch("--processes", "2", "--grace-s", "1", "--program", "--",
                          sys.executable, script, "0", "fail")
    assert out.returncode == 5, out.stderr
    assert elapsed < 30


@pytest.mark.parametrize("pid, says", [
    (1, "process 1 of 2 could not reach the coordinator at 127.0.0.1:{port} within 2 s"),
    (0, "not all 2 processes joined the coordinator at 127.0.0.1:{port} within 2 s"),
])
def test_a_coordinator_not_reached_in_time_ends_in_one_line(pid, says):
    port = free_port()
    code = ("from rlhf_jax import distributed\n"
            "distributed.initialize(distributed.DistributedConfig(initialization_timeout_s=2))\n"
            "print('joined')")
    env = {**os.environ, "RLHF_JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "RLHF_JAX_NUM_PROCESSES": "2", "RLHF_JAX_PROCESS_ID": str(pid)}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert time.monotonic() - start < 30
    assert out.returncode == 2 and "joined" not in out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("rlhf-jax: error: " + says.format(port=port)), out.stderr
    assert "Traceback" not in out.stderr and "Check failure" not in out.stderr
