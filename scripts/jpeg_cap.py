"""What the JPEG copy of CIFAR-10 costs in accuracy, measured with a recipe of known result (issue 18).

The shared CIFAR-10 is a JPEG re-encoding (quality 75) of the original images. Every published
ResNet-56 figure (93.3-93.7%) is on the original files, so before a baseline trained here is judged
against them, this measures the copy's own ceiling: airbench (Keller Jordan's CIFAR-10 speed-run
recipes, `pip install airbench`), whose author reports 94.01% (airbench94) and 96.05% (airbench96)
mean test accuracy on the original files, is run unchanged on this copy's images. The difference is
what the copy costs a well-trained network.

    python scripts/jpeg_cap.py --data DIR --runs 5 --variants 94,96 --out cap.json    # needs a GPU

airbench reads its data from ./cifar10/{train,test}.pt (uint8 NHWC images, labels), so this writes those
from the copy (compress.data's loader: canonical class order) in a scratch folder and runs there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the accuracies airbench's author reports on the original CIFAR-10 files (README of airbench 0.1.8)
PUBLISHED = {"94": 94.01, "95": 95.01, "96": 96.05}


def write_airbench_data(data: Path | None, folder: Path) -> None:
    import torch

    from compress.data import CLASSES, load_split

    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        part = load_split(data, split)
        torch.save({"images": torch.from_numpy(part.images), "labels": torch.from_numpy(part.labels),
                    "classes": list(CLASSES)}, folder / "cifar10" / f"{split}.pt")


def run_variant(variant: str, runs: int) -> dict:
    import airbench

    train = getattr(airbench, f"train{variant}")
    getattr(airbench, f"warmup{variant}")()  # compiles and warms up, as airbench's own runner does
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    plain, tta = [], []
    for run in range(runs):
        model = train(run=run, verbose=True)
        plain.append(100 * airbench.evaluate(model, test, tta_level=0))
        tta.append(100 * airbench.evaluate(model, test, tta_level=2))
    return {"runs": runs, "test_acc_tta2": tta, "test_acc_no_tta": plain,
            "mean_tta2": statistics.mean(tta), "published_on_original": PUBLISHED.get(variant),
            "copy_costs_points": PUBLISHED[variant] - statistics.mean(tta) if variant in PUBLISHED else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="The CIFAR-10 copy (compress.data's layouts).")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variants", default="94", help="airbench recipes, comma-separated: 94, 95, 96.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = args.data.resolve() if args.data else None
    result: dict = {"data": str(data), "variants": {}}
    with tempfile.TemporaryDirectory() as scratch:
        write_airbench_data(data, Path(scratch))
        os.chdir(scratch)
        for variant in args.variants.split(","):
            start = time.time()
            result["variants"][variant] = run_variant(variant, args.runs)
            result["variants"][variant]["seconds"] = time.time() - start
            print(json.dumps({variant: result["variants"][variant]}), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
