"""`rlhf-jax launch`: every process's output prefixed with its index, the first failure's
exit code, and no process left behind when one fails or the launcher is stopped."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlhf_jax import cli
from rlhf_jax.tools import launch

# Each child writes its pid (and a grandchild's) to DIR/<index>.pid, then acts by its index.
CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    index, directory, mode = os.environ["RLHF_JAX_PROCESS_ID"], sys.argv[1], sys.argv[2]
    pids = [os.getpid()]
    if mode == "stop" and index == "0":  # something the process started goes too
        pids.append(subprocess.Popen(["sleep", "600"]).pid)
    if mode == "stop" and index == "1":  # one that ignores SIGTERM gets SIGKILL
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(directory, index + ".tmp"), "w") as f:
        f.write(" ".join(map(str, pids)))
    os.replace(os.path.join(directory, index + ".tmp"), os.path.join(directory, index + ".pid"))
    print(f"out {index}: {os.environ['RLHF_JAX_NUM_PROCESSES']} processes at "
          f"{os.environ['RLHF_JAX_COORDINATOR_ADDRESS']}, {os.environ['XLA_FLAGS']}, "
          f"{os.environ['JAX_PLATFORMS']}")
    print(f"err {index}", file=sys.stderr)
    sys.stdout.write(f"bar {index} 1/2\\rbar {index} 2/2\\r")
    sys.stdout.flush()
    if mode == "fail" and index == "1":
        while not os.path.exists(os.path.join(directory, "0.pid")):
            time.sleep(0.05)
        sys.exit(3)
    time.sleep(600)
""")


def start(tmp_path, mode, *options):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_jax.cli", "launch", "--processes", "2",
         "--devices-per-process", "3", *options, "--program", "--", sys.executable,
         str(script), str(tmp_path), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # bytes: text mode would turn \r into \n
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})


def pids(tmp_path, index, timeout=30):
    path = tmp_path / f"{index}.pid"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"process {index} never started"
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pid_list, seconds):
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pid_list):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_failing_process_sets_the_exit_code_and_the_other_is_stopped(tmp_path):
    proc = start(tmp_path, "fail")
    other = pids(tmp_path, 0)
    out, err = (stream.decode() for stream in proc.communicate(timeout=30))
    assert proc.returncode == 3
    assert gone_within(other, 30)
    for i in (0, 1):  # each line prefixed with its process index, on the stream it was on
        port = out.split(f"[{i}] out {i}: 2 processes at 127.0.0.1:")[1].split(",")[0]
        assert int(port) > 0
        assert (f"[{i}] out {i}: 2 processes at 127.0.0.1:{port}, "
                "--xla_force_host_platform_device_count=3, cpu\n") in out
        assert f"[{i}] bar {i} 1/2\r" in out and f"[{i}] bar {i} 2/2\r" in out  # redraws
        assert f"[{i}] err {i}\n" in err and f"err {i}" not in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", ["launcher SIGTERM", "child SIGKILL"])
def test_stopping_leaves_no_process_behind(tmp_path, stop):
    proc = start(tmp_path, "stop", "--grace-s", "1")
    first, second = pids(tmp_path, 0), pids(tmp_path, 1)
    assert len(first) == 2 and all(map(alive, first + second))  # child 0 and its `sleep`
    if stop == "launcher SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.kill(first[0], signal.SIGKILL)
    proc.communicate(timeout=30)
    # SIGTERM ends process 0 (128 + 15); process 1 ignores it and gets SIGKILL after 1 s.
    assert proc.returncode == (143 if stop == "launcher SIGTERM" else 137)
    assert gone_within(first + second, 30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal")
def test_the_processes_die_with_a_killed_launcher(tmp_path):
    proc = start(tmp_path, "stop")
    first, second = pids(tmp_path, 0), pids(tmp_path, 1)
    proc.kill()  # no chance to stop anything: the kernel does
    proc.communicate(timeout=30)
    try:
        assert gone_within([first[0], second[0]], 30)
    finally:
        os.kill(first[1], signal.SIGKILL)  # what process 0 started is not the kernel's to end


def test_usage_mistakes_end_in_one_line(capsys):
    assert cli.main(["launch", "--processes", "2", "--", "sfd"]) == 2
    assert "'sfd' is not an rlhf-jax command to launch; did you mean 'sft'?" in \
        capsys.readouterr().err
    assert cli.main(["launch", "--processes", "2"]) == 2
    assert "no command: put it after --" in capsys.readouterr().err
    assert cli.main(["launch", "--processes", "0", "--", "sft"]) == 2
    assert "launch" in cli.COMMANDS and "launch" in cli._usage()


def test_an_rlhf_jax_command_runs_in_every_process():
    out = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "launch", "--processes", "2",
                          "--", "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for i in (0, 1):
        assert f"[{i}] usage: rlhf-jax generate" in out.stdout


def test_child_environment_on_cpu_and_on_a_gpu_host():
    user = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_fast_math=false",
            "JAX_PLATFORMS": "cpu,tpu", "PATH": "/bin"}
    env = launch.child_environ(user, 1, 2, 1234, 4, None)
    assert env["XLA_FLAGS"] == ("--xla_cpu_fast_math=false "
                                "--xla_force_host_platform_device_count=4")
    assert env["JAX_PLATFORMS"] == "cpu,tpu"  # the user's choice stays
    assert (env["RLHF_JAX_COORDINATOR_ADDRESS"], env["RLHF_JAX_NUM_PROCESSES"],
            env["RLHF_JAX_PROCESS_ID"]) == ("127.0.0.1:1234", "2", "1")
    assert launch.child_environ({}, 0, 2, 1234, 1, None)["JAX_PLATFORMS"] == "cpu"
    gpus = launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5,6,7"})
    env = launch.child_environ({}, 1, 2, 1234, 2, gpus)
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and "XLA_FLAGS" not in env


def test_a_gpu_host_with_too_few_gpus_is_refused(capsys):
    environ = {"JAX_PLATFORMS": "cuda", "CUDA_VISIBLE_DEVICES": "0"}
    assert launch.run(["true"], 2, 1, 0, 1.0, environ) == 2
    assert "2 processes × 1 GPUs need 2 GPUs; this host shows 1" in capsys.readouterr().err


def test_forward_prefixes_lines_and_progress_redraws():
    read, write = os.pipe()
    out = io.BytesIO()
    with os.fdopen(read, "rb") as stream:
        thread = threading.Thread(target=launch.forward,
                                  args=(stream, b"[7] ", out, threading.Lock()))
        thread.start()
        for part in (b"a\r\nhalf", b" line\nbar 1\r", b"bar 2\rlast"):
            os.write(write, part)
            time.sleep(0.05)
        os.close(write)
        thread.join(timeout=10)
    assert out.getvalue() == b"[7] a\r\n[7] half line\n[7] bar 1\r[7] bar 2\r[7] last\n"
