"""The fault matrix measured: each case of tests/test_fault_matrix.py once, with that test's own runner.

    python scripts/fault_matrix.py bench-results/local-2core/faults/matrix.json

One record per case: the exit code, the error line, the time from the first rank gone to the job's
end, the whole run's time, whether any rank was left and how much of the answer was shown.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_fault_matrix import CORRUPT, DEATHS, STALLS, _run_args, run_job  # noqa: E402

from pipeinfer_cpu.modelfiles.models import default_model_path  # noqa: E402


def measure(cache: Path, case: str, faults: str, args: list[str]) -> dict:
    started = time.monotonic()
    outcome = run_job(cache, args, faults)
    return {"case": case, "faults": faults, "code": outcome.code, "after_death_s": outcome.after_death_s,
            "total_s": time.monotonic() - started, "error": outcome.errors[0] if outcome.errors else None,
            "left": outcome.left, "shown_bytes": len(outcome.stdout)}


def main() -> None:
    cache = Path(tempfile.mkdtemp())
    run_job(cache, _run_args())  # the shards written once, before anything is timed
    cases = [(f"stage dies: {moment}", faults, _run_args(*extra)) for moment, (faults, extra, _, _) in DEATHS.items()]
    cases.append(("draft rank dies", "3:die:3:draft",
                  _run_args("--mode", "pipeinfer", "--draft", str(default_model_path()))))
    cases += [(f"stage stalls: {moment}", faults, _run_args()) for moment, (faults, _, _) in STALLS.items()]
    cases += [(f"corrupt: {name}", faults, _run_args()) for name, (faults, _, _) in CORRUPT.items()]
    rows = []
    for case in cases:
        rows.append(measure(cache, *case))
        print(json.dumps(rows[-1]), flush=True)
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
