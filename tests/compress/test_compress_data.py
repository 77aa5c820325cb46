"""Data layouts, the held-out split, and one small end-to-end run of the whole pipeline."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest

from compress.data import CLASSES, holdout_split, load_split


def test_holdout_split_is_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    train, held = holdout_split(labels, 200, seed=0)
    again_train, again_held = holdout_split(labels, 200, seed=0)
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    assert not np.array_equal(held, holdout_split(labels, 200, seed=1)[1])
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    assert np.bincount(labels[held]).tolist() == [20] * 10


def test_original_batches_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": [i % 10 for i in range(20)]}, fh)
    test = load_split(tmp_path, "test")
    assert test.images.shape == (20, 32, 32, 3) and test.images.dtype == np.uint8
    with open(folder / "test_batch", "rb") as fh:
        raw = pickle.load(fh)[b"data"]
    assert np.array_equal(test.images[3], raw[3].reshape(3, 32, 32).transpose(1, 2, 0))
    train = load_split(folder, "train", limit_per_class=3)
    assert train.images.shape == (30, 32, 32, 3) and np.bincount(train.labels).tolist() == [3] * 10


def test_zip_and_unzipped_folder_agree(cifar_root, tmp_path):
    from_zip = load_split(cifar_root, "test", limit_per_class=5)
    with zipfile.ZipFile(cifar_root / "cifar10-test.zip") as zf:
        for cls in CLASSES:
            names = sorted(n for n in zf.namelist() if n.startswith(f"test/{cls}/") and n.endswith(".jpg"))[:5]
            for name in names:
                zf.extract(name, tmp_path)
    from_folder = load_split(tmp_path, "test")
    assert from_zip.images.shape == (50, 32, 32, 3)
    assert np.array_equal(from_zip.images, from_folder.images)
    assert np.array_equal(from_zip.labels, from_folder.labels)
    assert from_zip.images.std() > 20  # real pictures, not blank decodes


def test_reproduce_end_to_end_small(cifar_root, cli, tmp_path):
    out = tmp_path / "run"
    result = cli("reproduce", "--arch", "resnet20", "--target", 0.5, "--out-dir", out, "--data", cifar_root,
                 "--limit-per-class", 30, "--train-epochs", 1, "--finetune-epochs", 1, "--episodes", 3,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output + str(result.exception)
    res = json.loads((out / "results.json").read_text())
    assert set(res["finetuned"]) == {"gnn", "mlp", "random", "uniform"}
    for method, row in res["finetuned"].items():
        assert 0.49 <= row["macs_ratio"] <= 0.5 + 1e-6, (method, row)
        assert 0.0 <= row["test_acc"] <= 100.0 and (out / f"pruned_{method}.pt").exists()
        search = json.loads((out / f"search_{method}.json").read_text())
        assert len(search["rewards"]) == (1 if method == "uniform" else 3)
        assert search["best_so_far"] == list(np.maximum.accumulate(search["rewards"]))
    assert (out / "search_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["baseline"]["macs"] > 4e7 and (out / "baseline.pt").exists()
