"""rlhf_jax.host_memory: XLA:CPU's per-call buffers stop page-faulting once it is applied;
frozen start-up objects leave the garbage collector's scans."""

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest

from rlhf_jax import host_memory

SCRIPT = r"""
import json, resource, sys
if sys.argv[1] == "retain":
    from rlhf_jax.host_memory import retain_freed_memory
    assert retain_freed_memory()
import jax, jax.numpy as jnp
# 64 MiB temporaries per call, above glibc's largest mmap threshold (32 MiB)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T))
x, w = jnp.ones((8192, 64), jnp.float32), jnp.ones((64, 2048), jnp.float32) / 64
f(x, w).block_until_ready(); f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x, w).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10))
"""


def faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retained_memory_removes_the_page_faults_of_each_call():
    default, retained = faults_per_call("default"), faults_per_call("retain")
    # Without it each call maps its temporaries afresh and faults them in again: 16 384 faults
    # per 64 MiB with 4 KiB pages (32 with transparent 2 MiB pages where those are always on).
    assert default > 16, default
    assert retained < default / 10, (default, retained)


BIG_BLOCK = r"""
import ctypes, json, resource
from rlhf_jax.host_memory import retain_freed_memory
assert retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 5 << 29  # 2.5 GiB: a freed top of the heap larger than mallopt's largest int (2 GiB)
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    assert block, "malloc failed"
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_freed_block_above_2_gib_stays_in_the_process():
    # A base-sized PPO step frees more than 2 GiB at once; with a 2 GiB trim threshold glibc
    # gave it back and the next step faulted ~500 000 pages in again.
    out = subprocess.run([sys.executable, "-c", BIG_BLOCK], capture_output=True, text=True,
                         timeout=300, check=True)
    first, second = json.loads(out.stdout.strip().splitlines()[-1])
    assert first > 1000, first  # the first touch does fault (4 KiB or 2 MiB pages)
    assert second < first / 100, (first, second)


THREADS = r"""
import ctypes, json, resource, sys, threading
if sys.argv[1] == "retain":
    from rlhf_jax.host_memory import retain_freed_memory
    assert retain_freed_memory() and retain_freed_memory()  # a second call keeps the settings
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 48 << 20  # above glibc's largest mmap threshold (32 MiB)

def cycle():
    block = libc.malloc(size)
    assert block, "malloc failed"
    ctypes.memset(block, 1, size)
    libc.free(block)

def on_a_thread():
    t = threading.Thread(target=cycle)
    t.start()
    t.join()

def faults(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(json.dumps([faults(cycle), faults(cycle), faults(on_a_thread), faults(on_a_thread)]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("mode", ["default", "retain"])
def test_a_freed_block_is_reused_by_the_next_allocation_on_any_thread(mode):
    # XLA:CPU allocates on its worker threads: with one arena, a block freed on one thread is
    # reused on another; with a thread's own arena every allocation faults its pages in again.
    out = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True,
                         timeout=300, check=True)
    first, again, thread, thread_again = json.loads(out.stdout.strip().splitlines()[-1])
    assert first > 1000, first  # the first touch faults (4 KiB or 2 MiB pages)
    if mode == "default":  # glibc maps each block afresh: the test can tell the two apart
        assert min(again, thread, thread_again) > first / 2, (first, again, thread, thread_again)
    else:
        assert max(again, thread, thread_again) < first / 100, (first, again, thread,
                                                                 thread_again)


class FakeLibc:
    """A libc whose mallopt answers `result` and records its calls."""

    def __init__(self, result):
        self.mallopt = FakeMallopt(result)
        self.calls = self.mallopt.calls


class FakeMallopt:
    def __init__(self, result):
        self.calls, self.result, self.argtypes = [], result, None

    def __call__(self, param, value):
        self.calls.append((param, value))
        return self.result


@pytest.mark.parametrize("libc, expected", [(OSError("no libc"), False), (FakeLibc(0), False),
                                            (FakeLibc(1), True)])
def test_it_reports_whether_the_settings_took(monkeypatch, libc, expected):
    def cdll(name):
        if isinstance(libc, Exception):
            raise libc
        return libc

    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory.ctypes, "CDLL", cdll)
    assert host_memory.retain_freed_memory() is expected
    if expected:  # once applied, a second call changes nothing
        calls = list(libc.calls)
        assert host_memory.retain_freed_memory() and libc.calls == calls
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.retain_freed_memory() is False


def test_freeze_live_objects_freezes_what_is_alive_and_collects_garbage_first():
    class Node:
        pass

    garbage = Node()
    garbage.self = garbage  # a reference cycle: only the cyclic collector frees it
    gone = weakref.ref(garbage)
    del garbage
    alive = [Node()]
    try:
        frozen = host_memory.freeze_live_objects()
        assert gone() is None  # collected, not frozen
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # out of the scanned generations
    finally:
        gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())


@pytest.mark.parametrize("environ, expected", [
    ({"JAX_PLATFORMS": "cpu"}, "cpu"),
    ({"JAX_PLATFORMS": "cuda"}, "gpu"),
    ({"JAX_PLATFORMS": "rocm,cpu"}, "gpu"),  # the first entry is tried first
    ({"JAX_PLATFORMS": "tpu,cpu"}, "tpu"),
    ({"JAX_PLATFORM_NAME": "cpu"}, "cpu"),
])
def test_jax_platforms_decides_the_backend(monkeypatch, environ, expected):
    monkeypatch.setattr(host_memory, "_gpu_plugin", lambda: pytest.fail("not asked"))
    assert host_memory.jax_backend(environ) == expected


@pytest.mark.parametrize("tpu_plugin, tpu_chip, gpu_plugin, gpu_device, expected", [
    (False, False, False, False, "cpu"),
    (False, False, True, False, "cpu"),  # a CUDA plugin on a machine without a GPU
    (False, False, True, True, "gpu"),
    (True, False, False, False, "cpu"),  # libtpu without a TPU chip
    (True, True, True, True, "tpu"),  # JAX prefers the TPU
])
def test_without_jax_platforms_the_backend_needs_its_plugin_and_its_device(
        monkeypatch, tpu_plugin, tpu_chip, gpu_plugin, gpu_device, expected):
    monkeypatch.setattr(host_memory, "_tpu_plugin", lambda environ: tpu_plugin)
    monkeypatch.setattr(host_memory, "_tpu_chip", lambda: tpu_chip)
    monkeypatch.setattr(host_memory, "_gpu_plugin", lambda: gpu_plugin)
    exists = host_memory.os.path.exists
    monkeypatch.setattr(host_memory.os.path, "exists",
                        lambda p: gpu_device if p == "/dev/nvidia0" else
                        (False if p in host_memory._GPU_DEVICE_FILES else exists(p)))
    assert host_memory.jax_backend({}) == expected


def test_the_decision_is_the_backend_jax_starts_on_this_machine():
    code = ("import jax; from rlhf_jax.host_memory import jax_backend; "
            "print(jax_backend(), jax.default_backend())")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    decided, started = out.stdout.split()
    assert decided == started


@pytest.mark.parametrize("platforms", ["cuda", "tpu"])
def test_the_allocator_settings_stay_off_where_jax_runs_on_an_accelerator(monkeypatch,
                                                                          platforms):
    libc = FakeLibc(1)
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: libc)
    assert host_memory.retain_freed_memory({"JAX_PLATFORMS": platforms}) is False
    assert libc.calls == []
    assert host_memory.retain_freed_memory({"JAX_PLATFORMS": "cpu"}) is True
    assert libc.calls
