"""Data layouts, the held-out split, and one small end-to-end run of the whole pipeline."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest

from compress.data import CLASSES, holdout_split, load_split
from compress_fixtures import cifar_root, cli, small_run  # noqa: F401  (pytest fixtures)


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


def test_reproduce_end_to_end_small(small_run):
    out = small_run
    res = json.loads((out / "results.json").read_text())
    assert set(res["finetuned"]) == {"gnn", "mlp", "random", "uniform", "depgraph"}
    epochs = {row["finetune_epochs"] for row in res["finetuned"].values()}
    assert epochs == {1}  # every method gets the same fine-tuning schedule
    for method, row in res["finetuned"].items():
        assert 0.49 <= row["macs_ratio"] <= 0.5 + 1e-6, (method, row)
        assert 0.0 <= row["test_acc"] <= 100.0 and (out / f"pruned_{method}.pt").exists()
        search = json.loads((out / f"search_{method}.json").read_text())
        assert len(search["rewards"]) == (1 if method in ("uniform", "depgraph") else 3)
        assert search["best_so_far"] == list(np.maximum.accumulate(search["rewards"]))
    assert (out / "search_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["baseline"]["macs"] > 4e7 and (out / "baseline.pt").exists()


def test_report_measures_a_finished_run(small_run, cifar_root, cli, tmp_path):
    result = cli("report", small_run, "--onnx-dir", tmp_path / "onnx", "--json-out", tmp_path / "r.json",
                 "--md-out", tmp_path / "r.md", "--rounds", 1, "--runs", 5, "--data", cifar_root)
    assert result.exit_code == 0, result.output + str(result.exception)
    [measured] = json.loads((tmp_path / "r.json").read_text())
    gpu_run, cpu = measured["gpu_run"], measured["cpu"]
    assert set(cpu) == {"baseline", "gnn", "mlp", "random", "uniform", "depgraph", "gnn_int8"}
    for name, row in cpu.items():
        assert row["1_thread_ms"] > 0 and row["2_thread_ms"] > 0
        if name == "gnn_int8":
            continue
        assert row["parity_max_abs"] < 1e-4
        torch_row = gpu_run["baseline"] if name == "baseline" else gpu_run["finetuned"][name]
        assert abs(row["onnx_test_acc"] - torch_row["test_acc"]) <= 1.0  # same weights, fp32 both
    table = (tmp_path / "r.md").read_text()
    assert table.count("| resnet20 |") == 7 and "GNN+RL" in table


def test_reproduce_from_an_existing_baseline(small_run, cifar_root, cli, tmp_path):
    out = tmp_path / "again"
    result = cli("reproduce", "--arch", "resnet20", "--target", 0.7, "--out-dir", out, "--data", cifar_root,
                 "--limit-per-class", 30, "--finetune-epochs", 1, "--episodes", 2, "--device", "cpu",
                 "--baseline", small_run / "baseline.pt")
    assert result.exit_code == 0, result.output + str(result.exception)
    res = json.loads((out / "results.json").read_text())
    first = json.loads((small_run / "results.json").read_text())
    assert res["baseline"]["test_acc"] == first["baseline"]["test_acc"]  # same weights, same test set
    assert not (out / "baseline.pt").exists()  # nothing trained
    assert all(0.69 <= r["macs_ratio"] <= 0.7 + 1e-6 for r in res["finetuned"].values())

