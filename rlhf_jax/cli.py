"""`rlhf-jax <command> ...`: one entry point, each command implemented by its own module.

Every command module exposes `cli(argv: list[str]) -> int`; it is imported only when its
command runs, so `rlhf-jax --help` stays instant and a broken stage cannot break the others.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "demo": ("rlhf_jax.demo.pipeline", "run the whole RLHF pipeline on a built-in task (CPU, minutes)"),
    "sft": ("rlhf_jax.sft", "supervised fine-tuning on demonstrations"),
    "rm": ("rlhf_jax.rm", "train a reward model on preference pairs"),
    "ppo": ("rlhf_jax.ppo_loop", "fine-tune a policy with PPO against a reward model"),
    "generate": ("rlhf_jax.generate", "sample completions for a file of prompts"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhf-jax <command> [options]   (rlhf-jax <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    from rlhf_jax.host_memory import retain_freed_memory

    retain_freed_memory()  # before the first XLA buffer: no page faults per step
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
