"""Kill the last stage of a 3-stage answer and let `--on-failure reshard` finish it; compare with `single`.

    python scripts/reshard_kill.py --out bench-results/local-2core/faults [--mode pipeinfer --draft ngram]

Writes reshard-MODE.json: the recovery statistics (`recoveries` of --stats-json) and whether the text
equals `single`'s. The same thing, asserted, is tests/test_faults.py's reshard test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PROMPT = "Tell me a very long story about the sea."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="pipeline")
    parser.add_argument("--draft")
    parser.add_argument("-n", type=int, default=120)
    parser.add_argument("--after-bytes", type=int, default=80, help="Kill once this much of the answer is shown.")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    hosts = tmp / "three.txt"
    hosts.write_text("localhost\nlocalhost\nlocalhost\n")
    common = ["--chat-template", "-p", PROMPT, "-n", str(args.n)]
    single = subprocess.run(["pipeinfer-cpu", "run", "--mode", "single", *common], capture_output=True, text=True).stdout
    stats = tmp / "stats.json"
    draft = ["--draft", args.draft] if args.draft else []
    job = subprocess.Popen(["pipeinfer-cpu", "run", "--hostfile", str(hosts), "--mode", args.mode, *draft,
                            "--on-failure", "reshard", "--timeout", "10", "--stats-json", str(stats), *common],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks: list[psutil.Process] = []
    while len(ranks) < 4:
        ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
                 if p.cmdline()[-2:] in (["-m", "pipeinfer_cpu.head"], ["-m", "pipeinfer_cpu.rank"])]
        time.sleep(0.1)
    seen = b""
    os.set_blocking(job.stdout.fileno(), False)
    while len(seen) < args.after_bytes:
        try:
            seen += os.read(job.stdout.fileno(), args.after_bytes - len(seen))
        except BlockingIOError:
            time.sleep(0.01)
    os.kill(max(p.pid for p in ranks), signal.SIGKILL)  # the last rank started: stage 3
    rest, stderr = job.communicate(timeout=300)
    text = seen.decode() + rest
    record = json.loads(stats.read_text())
    result = {"mode": args.mode, "draft": args.draft, "exit_code": job.returncode, "equals_single": text == single,
              "n_generated_after": record["n_generated"], "recoveries": record["recoveries"], "stderr": stderr}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"reshard-{args.mode}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "stderr"}, indent=1))
    sys.exit(0 if text == single else 1)


if __name__ == "__main__":
    main()
