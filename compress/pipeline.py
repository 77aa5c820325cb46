"""The whole experiment for one architecture, from one seeded command: train the baseline (or load
it), search with GNN+RL and each baseline under the same budget of evaluations, prune, fine-tune,
test. Every stage rewrites `results.json` atomically, so a run cut short keeps what it finished."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compress.budget import DEFAULT_CHANNEL_MULTIPLE, LatencyFn
from compress.data import Split, holdout_split, load_split
from compress.errors import DataError
from compress.finetune import DeviceData, TrainConfig, Trainer, evaluate, pick_device, recalibrate_bn, train
from compress.graph import build_graph
from compress.latency import load_predictor
from compress.models import build_model
from compress.prune import PruneSpace, apply_policy, build_space, count_macs
from compress.resume import ResumeOptions, train_resumable
from compress.search import (DETERMINISTIC, METHODS, SearchConfig, SearchResult, check_budget, plot_curves,
                             prior_policy, pruned_evaluator, run_search, save_search)
from compress.store import check_writable, load_checkpoint, save_checkpoint, write_json


@dataclass(frozen=True)
class PipelineConfig:
    arch: str
    target: float
    out_dir: str
    data_root: str | None = None
    device: str = "auto"
    seed: int = 0
    train_epochs: int = 40
    finetune_epochs: int = 15
    finetune_lr: float = 0.02
    finetune_batch_size: int = 256
    distill_weight: float = 0.0  # fine-tune the pruned model partly towards the unpruned one's outputs
    episodes: int = 48
    methods: tuple[str, ...] = METHODS
    baseline: str | None = None  # existing checkpoint: skip training
    time_budget_s: float | None = None  # whole run; train 45%, search 25%, fine-tune 30%
    limit_per_class: int | None = None  # small runs (tests)
    holdout: int = 5000
    channel_multiple: int = DEFAULT_CHANNEL_MULTIPLE
    latency_table: str | None = None  # with min_speedup: also bound the latency predicted by this table
    min_speedup: float | None = None


@dataclass(frozen=True)
class Datasets:
    train: DeviceData
    holdout: DeviceData | None  # None when every training image trains (holdout 0, the papers' way)
    test: DeviceData


def load_datasets(cfg: PipelineConfig, device: torch.device) -> Datasets:
    full = load_split(cfg.data_root, "train", cfg.limit_per_class)
    test = load_split(cfg.data_root, "test", cfg.limit_per_class)
    cl = device.type == "cuda"
    if cfg.holdout == 0:
        return Datasets(DeviceData(full, device, cl), None, DeviceData(test, device, cl))
    n_hold = min(cfg.holdout, len(full.labels) // 10)
    train_idx, hold_idx = holdout_split(full.labels, n_hold, cfg.seed)
    return Datasets(DeviceData(full.subset(train_idx), device, cl), DeviceData(full.subset(hold_idx), device, cl),
                    DeviceData(test, device, cl))


def round_to_half(model: nn.Module) -> None:
    """Round weights through fp16 in place, so reported accuracy is that of the saved checkpoint."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _budget(cfg: PipelineConfig, share: float) -> float | None:
    return None if cfg.time_budget_s is None else cfg.time_budget_s * share


def baseline_train_config(cfg: PipelineConfig) -> TrainConfig:
    """The pipeline's own schedule: `cfg.train_epochs`, cut to 45% of a time budget if one is set."""
    return TrainConfig(epochs=cfg.train_epochs, seed=cfg.seed, warmup_epochs=2, max_seconds=_budget(cfg, 0.45))


def baseline_model(cfg: PipelineConfig, data: Datasets, device: torch.device, out: Path,
                   tcfg: TrainConfig | None = None,
                   resume: ResumeOptions | None = None) -> tuple[nn.Module, dict | None]:
    """Load `cfg.baseline`, or train one with `tcfg` (default `baseline_train_config`), resuming
    from and saving to `resume.path` if given. Writes out/baseline.pt once training is complete;
    the meta is None when a resumable run stopped early (run the same command again)."""
    if cfg.baseline:
        model, info = load_checkpoint(cfg.baseline, cfg.arch)
        model = model.to(device)
        return model, {**info["meta"], "source": cfg.baseline,  # re-measured on this run's splits
                       "test_acc": evaluate(model, data.test, amp=False),
                       "holdout_acc": _holdout_acc(model, data)}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    tcfg = tcfg or baseline_train_config(cfg)
    trainer = Trainer(model, data.train, tcfg)
    if resume is None:
        res = trainer.run(lambda e, l: _log(f"{cfg.arch} epoch {e} loss {l:.3f}"))
    else:
        settings = {"arch": cfg.arch, "holdout": cfg.holdout, "limit_per_class": cfg.limit_per_class,
                    "device": device.type, **asdict(tcfg)}
        res = train_resumable(trainer, settings, resume, lambda msg: _log(f"{cfg.arch} {msg}"))
    if not res.finished:
        return model, None
    round_to_half(model)
    meta = {"epochs": res.epochs, "train_seconds": round(res.seconds, 1), "seed": cfg.seed,
            "train_config": asdict(replace(tcfg, epochs=res.epochs, max_seconds=None)),
            "train_images": len(data.train), "device": _device_name(device),
            "test_acc": evaluate(model, data.test, amp=False), "holdout_acc": _holdout_acc(model, data)}
    save_checkpoint(out / "baseline.pt", model, cfg.arch, meta=meta)
    return model, meta


def _holdout_acc(model: nn.Module, data: Datasets) -> float | None:
    return None if data.holdout is None else evaluate(model, data.holdout, amp=False)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_before_work(cfg: PipelineConfig, out: Path) -> LatencyFn | None:
    """Before any data are loaded or epochs trained: the output folder must be writable, the
    latency table (if any) must describe this architecture, and the FLOPs budget and speed-up must
    be reachable. Returns the latency predictor, if there is a table."""
    check_writable(out / "results.json")
    model = build_model(cfg.arch).eval()
    space = build_space(model, channel_multiple=cfg.channel_multiple)
    latency_fn = load_predictor(cfg.latency_table, model, space, cfg.arch) if cfg.latency_table else None
    check_budget(space, SearchConfig(target=cfg.target, min_speedup=cfg.min_speedup), latency_fn)
    return latency_fn


def search_all(cfg: PipelineConfig, model: nn.Module, space: PruneSpace, data: Datasets, out: Path,
               record: Callable[[], None], results: dict[str, Any],
               latency_fn: LatencyFn | None = None) -> dict[str, SearchResult]:
    """Every method of `cfg.methods` in the same harness, under the FLOPs budget and, with
    `latency_fn`, the speed-up bound."""
    graph = build_graph(model, space)
    evaluate_keep = pruned_evaluator(model, space, data.train, data.holdout)
    evaluate_keep({g.root: 1.0 for g in space.groups})  # warm-up (kernel selection, allocator)
    t0 = time.time()
    evaluate_keep({g.root: 0.5 for g in space.groups})  # times one episode
    per_eval = time.time() - t0
    episodes = cfg.episodes
    learners = [m for m in cfg.methods if m not in DETERMINISTIC]
    if cfg.time_budget_s is not None and learners:
        episodes = max(8, min(episodes, int(_budget(cfg, 0.25) / len(learners) / max(per_eval, 1e-3))))
    found: dict[str, SearchResult] = {}
    for method in cfg.methods:
        scfg = SearchConfig(method=method, target=cfg.target, episodes=episodes, seed=cfg.seed,
                            min_speedup=cfg.min_speedup)
        found[method] = run_search(space, graph, evaluate_keep, scfg, latency_fn=latency_fn,
                                   prior=prior_policy(model, space, scfg))
        save_search(found[method], out / f"search_{method}.json", arch=cfg.arch)
        results["search"][method] = {"holdout_best": found[method].best_reward,
                                     "evaluations": found[method].evaluations,
                                     "seconds": round(found[method].seconds, 1),
                                     "predicted_speedup": found[method].predicted_speedup}
        _log(f"{cfg.arch} search {method}: best held-out {found[method].best_reward:.2f}")
        record()
    try:
        plot_curves(found, out / "search_curves.png", f"{cfg.arch} @ {cfg.target:.0%} FLOPs")
    except ImportError as err:  # matplotlib is optional on a GPU host; the JSON has the curves
        _log(f"no learning-curve PNG: {err}")
    return found


def finetune_one(cfg: PipelineConfig, model: nn.Module, space: PruneSpace, keep: dict[str, float],
                 data: Datasets, out: Path, method: str, epochs: int | None = None,
                 max_seconds: float | None = None) -> dict[str, Any]:
    """Prune to `keep`, fine-tune, test. With `epochs` the schedule is fixed; without, a time cap
    (`max_seconds`, else the pipeline's fine-tuning share of its budget) may cut `cfg.finetune_epochs`
    (the pipeline then reuses that count for every method)."""
    pruned = apply_policy(model, space, keep)
    macs, params = count_macs(pruned)
    recalibrate_bn(pruned, data.train, 10)
    before = evaluate(pruned, data.test, amp=False)
    n_ft = max(1, len(cfg.methods))
    cap = None if epochs else (max_seconds or _budget(cfg, 0.30 / n_ft))
    fcfg = TrainConfig(epochs=epochs or cfg.finetune_epochs, lr=cfg.finetune_lr, seed=cfg.seed,
                       batch_size=cfg.finetune_batch_size, warmup_epochs=1, max_seconds=cap,
                       distill_weight=cfg.distill_weight)
    res = train(pruned, data.train, fcfg, teacher=model if cfg.distill_weight else None)
    round_to_half(pruned)
    kept = space.kept_channels(keep)
    row = {"macs_ratio": macs / space.base_macs, "params": params, "test_acc_before_ft": before,
           "test_acc": evaluate(pruned, data.test, amp=False), "finetune_epochs": res.epochs,
           "finetune_seconds": round(res.seconds, 1), "planned_epochs": fcfg.epochs,
           "max_seconds": cap, "finetune_lr": fcfg.lr, "finetune_batch_size": fcfg.batch_size,
           "distill_weight": fcfg.distill_weight,
           "distill_temperature": fcfg.distill_temperature, "channel_multiple": space.channel_multiple}
    save_checkpoint(out / f"pruned_{method}.pt", pruned, cfg.arch, kept=kept, meta={**row, "keep": keep})
    return row


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage for `cfg.arch`; returns (and writes) the results dictionary."""
    start = time.time()
    out = Path(cfg.out_dir)
    latency_fn = check_before_work(cfg, out)  # predictions depend on channel counts, not on weights
    device = pick_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"arch": cfg.arch, "target": cfg.target, "device": str(device),
                               "config": asdict(cfg), "search": {}, "finetuned": {}}
    record = lambda: write_json(out / "results.json", {**results, "seconds": round(time.time() - start, 1)})
    data = load_datasets(cfg, device)
    if data.holdout is None:
        raise DataError("the search reward needs held-out training images (holdout > 0)")
    _log(f"{cfg.arch}: data train {len(data.train)} holdout {len(data.holdout)} test {len(data.test)}")
    model, meta = baseline_model(cfg, data, device, out)
    macs, params = count_macs(model)
    results["baseline"] = {**meta, "macs": macs, "params": params}
    _log(f"{cfg.arch} baseline test acc {meta.get('test_acc')}")
    record()
    space = build_space(model, channel_multiple=cfg.channel_multiple)
    found = search_all(cfg, model, space, data, out, record, results, latency_fn)
    epochs = None  # the first fine-tune fixes the epoch count for all, so methods compare fairly
    for method, res in found.items():
        results["finetuned"][method] = finetune_one(cfg, model, space, res.best_keep, data, out, method, epochs)
        epochs = results["finetuned"][method]["finetune_epochs"]
        _log(f"{cfg.arch} {method}: {results['finetuned'][method]}")
        record()
    record()
    return results
