"""`rlhf-jax <command> ...`: one entry point, each command implemented by its own module.

Every command module exposes `cli(argv: list[str]) -> int`; it is imported only when its
command runs, so `rlhf-jax --help` stays instant and a broken stage cannot break the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Mapping, MutableMapping, Optional, Sequence

COMMANDS = {
    "demo": ("rlhf_jax.demo.pipeline", "run the whole RLHF pipeline on a built-in task (CPU, minutes)"),
    "sft": ("rlhf_jax.stages.sft", "supervised fine-tuning on demonstrations"),
    "rm": ("rlhf_jax.stages.rm", "train a reward model on preference pairs"),
    "ppo": ("rlhf_jax.stages.ppo", "fine-tune a policy with PPO against a reward model"),
    "generate": ("rlhf_jax.tools.generate", "sample completions for a file of prompts"),
    "launch": ("rlhf_jax.tools.launch", "run a command as several processes on this machine"),
}
# Commands that run no JAX in their own process: none of the start-up below applies to them.
WITHOUT_JAX = ("launch",)


CACHE_ENV = "RLHF_JAX_COMPILE_CACHE"
CACHE_MAX_BYTES = 4 << 30  # least recently used programs go first beyond this
_CACHE_OFF = ("", "0", "off", "none", "false")


def compile_cache_dir(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The directory where commands keep XLA's compiled programs between runs, or None.

    A rerun (a resumed training run, the same `generate` again) then loads its programs
    instead of compiling them: a base-size generate call's first call took 10.2 s cold and
    4.1 s from the cache on a 2-core CPU. `JAX_COMPILATION_CACHE_DIR`, when set, is jax's own
    setting and wins; otherwise `RLHF_JAX_COMPILE_CACHE` names the directory (`off` turns
    the cache off); by default `$XDG_CACHE_HOME/rlhf_jax/xla` (`~/.cache/rlhf_jax/xla`).
    A directory that cannot be created is reported and the command runs without a cache.
    """
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    path = environ.get(CACHE_ENV)
    if path is not None and path.strip().lower() in _CACHE_OFF:
        return None
    if path is None:
        base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "rlhf_jax", "xla")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {path}")
    except OSError as e:
        print(f"rlhf-jax: warning: compilation cache directory {path} is not usable ({e}); "
              f"running without it. Set {CACHE_ENV} to a writable directory, or to 'off'.",
              file=sys.stderr)
        return None
    return path


def use_compile_cache(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Points jax at `compile_cache_dir()` (capped at CACHE_MAX_BYTES unless
    JAX_COMPILATION_CACHE_MAX_SIZE says otherwise); returns the directory or None."""
    cache = compile_cache_dir(environ)
    if cache is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        if ("JAX_COMPILATION_CACHE_MAX_SIZE" not in environ
                and importlib.util.find_spec("filelock") is not None):  # jax's eviction needs it
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return cache


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhf-jax <command> [options]   (rlhf-jax <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def quiet_advice(environ: MutableMapping[str, str] = os.environ) -> None:
    """Turns off transformers' advisory warnings (unless the user set the variable).

    Importing transformers without torch prints "PyTorch was not found. Models won't be
    available..." as the first line of every command, in a project whose models never need
    torch: transformers serves only tokenizers here. Read when transformers is imported, so
    this runs before any command module is.
    """
    environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs `rlhf-jax <command> ...`; returns the exit code."""
    quiet_advice()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"rlhf-jax: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in WITHOUT_JAX:
        return int(importlib.import_module(COMMANDS[name][0]).cli(rest) or 0)
    from rlhf_jax.distributed import exit_promptly_on_failure
    from rlhf_jax.host_memory import freeze_live_objects, retain_freed_memory

    retain_freed_memory()  # before the first XLA buffer: no page faults per step
    use_compile_cache()
    module = importlib.import_module(COMMANDS[name][0])
    freeze_live_objects()  # the imports: full garbage collections stop rescanning them
    # One of several processes that fails leaves at once: JAX's exit would wait for the others.
    return exit_promptly_on_failure(lambda: int(module.cli(rest) or 0))


if __name__ == "__main__":
    sys.exit(main())
