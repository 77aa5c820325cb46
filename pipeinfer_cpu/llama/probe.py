"""`python -m pipeinfer_cpu.llama.probe VARIANT.so`: load one CPU backend variant in a process of its
own, decode a batch and a few tokens, exit 0. A variant this CPU cannot run kills only this process
(SIGILL), which is how cpubackend.probe_variant learns it."""

import sys
from pathlib import Path

from pipeinfer_cpu.errors import PipeinferError
from pipeinfer_cpu.llama.runtime import exercise_variant


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m pipeinfer_cpu.llama.probe LIBGGML_CPU_VARIANT.so", file=sys.stderr)
        return 2
    try:
        exercise_variant(Path(argv[0]))
    except PipeinferError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
