"""`rlhf-jax launch`: run one command as several processes on this machine.

    rlhf-jax launch --processes 2 --devices-per-process 4 -- sft --config configs/sft_tiny.yaml

starts `python -m rlhf_jax.cli sft --config ...` twice, as processes 0 and 1 of one run: each
gets RLHF_JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), RLHF_JAX_NUM_PROCESSES and
RLHF_JAX_PROCESS_ID, which `rlhf_jax.distributed.initialize` reads. Where JAX will run on the
CPU (`host_memory.jax_backend`), each process gets its own M CPU devices (XLA's
--xla_force_host_platform_device_count) and JAX_PLATFORMS=cpu unless set; on a GPU host each
process gets M GPUs of its own through CUDA_VISIBLE_DEVICES. This is how the multi-host path
is tested on one machine, and how a GPU box runs one process per GPU.

Every line the processes print comes out prefixed with their index (`[1] step 3 ...`), on
stdout or stderr as they printed it. The launcher's exit code is the first non-zero exit code
of a process (128 + N for one killed by signal N), 0 when all succeed. When a process fails
or is killed, or the launcher gets SIGINT or SIGTERM, the others get SIGTERM (a training run
saves a checkpoint) and SIGKILL after --grace-s seconds; each process runs in its own process
group, so whatever it started goes too, and on Linux the processes die with the launcher.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import BinaryIO, Mapping, Optional, Sequence

from rlhf_jax.host_memory import jax_backend

PROG = "rlhf-jax launch"
USAGE_EXIT = 2
POLL_S = 0.05
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
# A segment ends at \n, \r\n, or a lone \r (progress bars redraw their line with it).
_SEGMENT = re.compile(rb"[^\r\n]*(?:\r\n|\n|\r(?=[^\n]))")


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} --processes N [--devices-per-process M] [--port P] -- "
                         "<command> [args]",
        description="Run an rlhf-jax command as N processes of one multi-process run on this "
                    "machine; each line of their output is prefixed with the process index.")
    parser.add_argument("--processes", type=int, required=True, metavar="N",
                        help="how many processes to start")
    parser.add_argument("--devices-per-process", type=int, default=1, metavar="M",
                        help="CPU devices of each process on CPU, GPUs of each on a GPU host "
                             "(default 1)")
    parser.add_argument("--port", type=int, default=0, metavar="P",
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--grace-s", type=float, default=10.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when stopping the processes "
                             "(default 10)")
    # The command after -- is a program of its own (`python script.py`), not an rlhf-jax
    # command: for scripts that call rlhf_jax.distributed themselves, and for tests.
    parser.add_argument("--program", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv[:split])
    return args, argv[split + 1:]


def _usage_error(args: argparse.Namespace, command: list[str]) -> Optional[str]:
    from rlhf_jax.cli import COMMANDS

    if args.processes < 1 or args.devices_per_process < 1:
        return "--processes and --devices-per-process take 1 or more"
    if not 0 <= args.port < 65536:
        return f"--port {args.port}: use 1 … 65535, or leave it out for a free port"
    if not command:
        return ("no command: put it after --, e.g. rlhf-jax launch --processes 2 -- sft "
                "--config configs/sft_tiny.yaml")
    if not args.program and (command[0] not in COMMANDS or command[0] == "launch"):
        close = difflib.get_close_matches(command[0], [c for c in COMMANDS if c != "launch"], 1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"'{command[0]}' is not an rlhf-jax command to launch{hint}"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs processes may be given: CUDA_VISIBLE_DEVICES's entries when set, else one
    per /dev/nvidiaN device file."""
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    found = [name for name in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", name)] \
        if os.path.isdir("/dev") else []
    return [name[len("nvidia"):] for name in sorted(found, key=lambda n: int(n[6:]))]


def child_environ(environ: Mapping[str, str], index: int, processes: int, port: int,
                  devices: int, gpus: Optional[list[str]]) -> dict:
    """The environment of process `index`: its place in the run and its own devices (the
    `devices`-long slice of `gpus` on a GPU host, `devices` CPU devices otherwise)."""
    env = dict(environ)
    env.update(RLHF_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               RLHF_JAX_NUM_PROCESSES=str(processes), RLHF_JAX_PROCESS_ID=str(index))
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # not every interface
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines as they are printed, not at exit
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[index * devices:(index + 1) * devices])
    else:
        flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _die_with_launcher():
    """The `preexec_fn` of each process: on Linux, the kernel sends it SIGKILL when the
    launcher dies, however the launcher dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not between fork and exec
    launcher = os.getpid()

    def in_child():
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != launcher:  # the launcher died before the line above
            os.kill(os.getpid(), signal.SIGKILL)
    return in_child


def forward(stream: BinaryIO, prefix: bytes, out, lock: threading.Lock) -> None:
    """Copies `stream` to `out` (a binary or text file) until it ends, each line (or
    progress-bar redraw) prefixed."""
    pending = b""
    fd = stream.fileno()
    while True:
        chunk = os.read(fd, 1 << 16)
        pending += chunk
        if not chunk and pending and not pending.endswith((b"\n", b"\r")):
            pending += b"\n"  # the last line had no newline
        elif not chunk and pending.endswith(b"\r"):
            pending += b"\n"  # a lone \r at the end is a line's end too
        segments = [m.group() for m in _SEGMENT.finditer(pending)]
        if segments:
            text = b"".join(prefix + segment for segment in segments)
            with lock:
                out.write(text if isinstance(out, io.RawIOBase | io.BufferedIOBase)
                          else text.decode(errors="replace"))
                out.flush()
            pending = pending[sum(map(len, segments)):]
        if not chunk:
            return


def _binary(stream):
    """The binary file under a text stream (sys.stdout), or the stream where there is none."""
    return getattr(stream, "buffer", stream)


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Processes:
    """The started processes: their exits, and stopping the rest."""

    def __init__(self, popens: list[subprocess.Popen]):
        self.popens = list(popens)
        self.codes: list[Optional[int]] = [None] * len(self.popens)
        self.first_failure: Optional[int] = None  # exit code of the first process that failed

    def poll(self) -> bool:
        """Records exits; True while any process runs."""
        for i, p in enumerate(self.popens):
            if self.codes[i] is None and p.poll() is not None:
                self.codes[i] = exit_code(p.returncode)
                if self.codes[i] and self.first_failure is None:
                    self.first_failure = self.codes[i]
        return any(code is None for code in self.codes)

    def signal_groups(self, sig: int, running_only: bool = True) -> None:
        for p, code in zip(self.popens, self.codes):
            if code is None or not running_only:
                try:
                    os.killpg(p.pid, sig)  # the process and whatever it started
                except (ProcessLookupError, PermissionError):
                    pass

    def stop(self, grace_s: float) -> None:
        """SIGTERM to every running process, SIGKILL to those still there after `grace_s`."""
        self.signal_groups(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.poll() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.signal_groups(signal.SIGKILL)
        for p in self.popens:
            p.wait()
        self.poll()


def run(command: list[str], processes: int, devices: int, port: int, grace_s: float,
        environ: Mapping[str, str] = os.environ) -> int:
    """Starts `command` as processes 0 … processes - 1 of one run and waits for them.

    Returns the first non-zero exit code of a process, else 128 + N when the launcher was
    stopped by signal N, else 0.
    """
    gpus = visible_gpus(environ) if jax_backend(environ) == "gpu" else None
    if gpus is not None and len(gpus) < processes * devices:
        print(f"{PROG}: error: {processes} processes × {devices} GPUs need {processes * devices} "
              f"GPUs; this host shows {len(gpus)}", file=sys.stderr)
        return USAGE_EXIT
    port = port or free_port()
    received: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, _: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    group = Processes([])
    preexec = _die_with_launcher()
    try:
        for i in range(processes):
            group.popens.append(subprocess.Popen(
                command, env=child_environ(environ, i, processes, port, devices, gpus),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, preexec_fn=preexec))
            group.codes.append(None)
        _wait(group, received, grace_s)
    except OSError as e:  # a program that cannot be started
        group.stop(0)
        print(f"{PROG}: error: cannot start {command[0]!r}: {e}", file=sys.stderr)
        return USAGE_EXIT
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if group.first_failure is not None:
        return group.first_failure
    return 128 + received[0] if received else 0


def _wait(group: Processes, received: list[int], grace_s: float) -> None:
    """Forwards the processes' output until every one has ended, stopping the rest when one
    fails or the launcher gets a signal."""
    lock = threading.Lock()
    # Threads only once every process is started: `preexec_fn` runs between fork and exec,
    # where a lock another thread held at the fork would never be released.
    threads = [threading.Thread(target=forward, daemon=True,
                                args=(stream, f"[{i}] ".encode(), _binary(out), lock))
               for i, p in enumerate(group.popens)
               for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
    for t in threads:
        t.start()
    while group.poll() and not received and group.first_failure is None:
        time.sleep(POLL_S)
    if group.poll():
        group.stop(grace_s)
    group.signal_groups(signal.SIGKILL, running_only=False)  # whatever they left behind
    for t in threads:
        t.join(timeout=5)  # a leftover holding a pipe open must not hold the launcher


def cli(argv: Sequence[str]) -> int:
    args, command = _parse(argv)
    wrong = _usage_error(args, command)
    if wrong:
        print(f"{PROG}: error: {wrong}", file=sys.stderr)
        return USAGE_EXIT
    if not args.program:
        command = [sys.executable, "-m", "rlhf_jax.cli", *command]
    return run(command, args.processes, args.devices_per_process, args.port, args.grace_s)
