"""The fault matrix measured: each case of tests/test_fault_matrix.py once, with its test's own runner.

    python scripts/fault_matrix.py bench-results/local-2core/faults/matrix.json

Writes one record per case: the exit code, the error line, the time from the first rank gone to the
job's end, the whole run's time, and whether any rank was left.
"""

import sys, json, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_fault_matrix import run_job, _run_args, DEATHS, STALLS, CORRUPT
from pipeinfer_cpu.modelfiles.models import default_model_path
cache = Path(tempfile.mkdtemp())
rows = []
def row(name, faults, args):
    t = time.monotonic(); o = run_job(cache, args, faults); total = time.monotonic() - t
    rows.append({"case": name, "faults": faults, "code": o.code, "after_death_s": o.after_death_s, "total_s": total,
                 "error": o.errors[0] if o.errors else None, "left": o.left, "shown_bytes": len(o.stdout)})
    print(json.dumps(rows[-1]), flush=True)
run_job(cache, _run_args())  # warm the shard cache
for m, (f, extra, _, _) in DEATHS.items(): row(f"stage dies: {m}", f, _run_args(*extra))
row("draft rank dies", "3:die:3:draft", _run_args("--mode", "pipeinfer", "--draft", str(default_model_path())))
for m, (f, _, _) in STALLS.items(): row(f"stage stalls: {m}", f, _run_args())
for m, (f, _, _) in CORRUPT.items(): row(f"corrupt: {m}", f, _run_args())
json.dump(rows, open(sys.argv[1], "w"), indent=1)
