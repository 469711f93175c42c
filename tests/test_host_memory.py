"""rlhf_jax.host_memory: XLA:CPU's per-call buffers stop page-faulting once it is applied;
frozen start-up objects leave the garbage collector's scans."""

import gc
import json
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


def test_retain_freed_memory_is_idempotent():
    first = host_memory.retain_freed_memory()
    assert host_memory.retain_freed_memory() == first


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
