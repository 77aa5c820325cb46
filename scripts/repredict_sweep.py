"""Predict a finished `netlab sweep` again with the performance model, without running it again.

For a sweep measured on a machine we no longer have (the lent 16-core one) or a model that has changed
since: loads DIR/sweep.json, predicts every point with the given calibrations (`hosts calibrate`
timings of the target and of the draft), and rewrites DIR/sweep.json, sweep.md and the plots with the
new predictions and errors. The measurements are untouched.

    python scripts/repredict_sweep.py DIR --calibration T.json --draft-calibration D.json [--acceptance A]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeinfer_cpu.app.bench import BenchConfig
from pipeinfer_cpu.app.sweep import PredictSetup, draft_token_cost, predict_point, write_sweep_report
from pipeinfer_cpu.modelfiles.models import read_model_info
from pipeinfer_cpu.timings import load_calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--draft-calibration", type=Path, required=True)
    parser.add_argument("--acceptance", type=float, help="default: the sweep's own")
    parser.add_argument("--model", type=Path, help="the target, for its shape (default: the embedded model's "
                                                   "shape, which the synthetic bench pair shares)")
    args = parser.parse_args()
    report = json.loads((args.sweep_dir / "sweep.json").read_text())
    info = read_model_info(args.model) if args.model else None
    n_embd, n_vocab = (info.n_embd, info.n_vocab) if info else (576, 49152)
    draft = load_calibration(args.draft_calibration)
    setup = PredictSetup(load_calibration(args.calibration), n_embd, n_vocab,
                         args.acceptance or report["acceptance_for_prediction"], draft_token_cost(draft))
    config = BenchConfig(Path("-"), (), report["stages"], report["threads"], report["n_tokens"], (),
                         wire_dtype=report["wire_dtype"])
    for point in report["points"]:
        point["prediction"] = predict_point(setup, point["link"], point["mode"], config)
        measured = point["median"]["decode_tok_s"]
        point["error"] = (point["prediction"]["decode_tok_s"] - measured) / measured if measured else None
    report.update(calibration=str(args.calibration), draft_calibration=str(args.draft_calibration),
                  draft_token_ms=setup.draft_token_s * 1e3)
    report["how"] += (f" Predictions redone by scripts/repredict_sweep.py with {args.calibration} and "
                      f"{args.draft_calibration} (draft: {setup.draft_token_s * 1e3:.2f} ms per drafted token).")
    print(write_sweep_report(report, args.sweep_dir).split("Sweep:")[0])


if __name__ == "__main__":
    main()
