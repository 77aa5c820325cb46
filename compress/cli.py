"""`pipeinfer-cpu compress <verb>`: train, graph, search, transfer, latency-table, finetune, export,
bench, accuracy, reproduce, report.

Errors the user can fix (bad data, unreachable budget, wrong checkpoint, untraceable model) print
one line to stderr and exit with status 1, as pipeinfer-cpu's do (pipeinfer_cpu.errors); `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from compress.budget import DEFAULT_CHANNEL_MULTIPLE
from compress.errors import CompressError
from compress.quantize import ACTIVATIONS, FORMATS, METHODS
from pipeinfer_cpu.errors import one_line_errors

ARCHS = ("resnet20", "resnet32", "resnet56", "resnet110", "vgg16", "mobilenet_v1", "mobilenet_v2",
         "shufflenet_v2")
METHOD_CHOICES = ("gnn", "gnn-skip", "gnn-layers", "mlp", "random", "uniform", "depgraph")


@one_line_errors(CompressError)
def _run_verb(invoke: Callable[[click.Context], Any], ctx: click.Context, debug: bool) -> Any:
    """`invoke(ctx)`; `debug`, the group's --debug, is passed for one_line_errors to read."""
    return invoke(ctx)


class _Group(click.Group):
    """Turns CompressError into one line on stderr, as pipeinfer-cpu's own commands do."""

    def invoke(self, ctx: click.Context) -> Any:
        return _run_verb(super().invoke, ctx, debug=ctx.params["debug"])


@click.group(name="compress", cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def compress_group(debug: bool) -> None:
    """GNN + RL channel pruning of CIFAR-10 CNNs under a FLOPs budget, exported to ONNX."""


def _data_option(f):
    return click.option("--data", "data_root", default=None,
                        help="CIFAR-10 folder (zips, unzipped, or cifar-10-batches-py); "
                             "default $PIPEINFER_CIFAR10 or ../shared/datasets/cifar10.")(f)


def _distill_option(f):
    return click.option("--distill", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
                        help="Weight of knowledge distillation from the unpruned model while fine-tuning "
                             "(0: labels only).")(f)


def _limit_option(f):
    return click.option("--limit-per-class", type=int, default=None,
                        help="Use only the first N images of each class (quick runs).")(f)


def _latency_options(f):
    f = click.option("--min-speedup", type=click.FloatRange(min=1.0), default=None,
                     help="Also keep the predicted latency (by --latency-table) at most 1/X of the "
                          "unpruned model's.")(f)
    return click.option("--latency-table", "latency_path", type=click.Path(dir_okay=False), default=None,
                        help="Per-layer latencies of the target CPU, from `compress latency-table`.")(f)


def _check_latency_pair(latency_path: str | None, min_speedup: float | None) -> None:
    if (latency_path is None) != (min_speedup is None):
        raise click.UsageError("--latency-table and --min-speedup go together")


@compress_group.command()
@click.option("--arch", type=click.Choice(ARCHS), required=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True)
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=0.2, show_default=True,
              help="Peak learning rate (linear warm-up, then cosine to zero).")
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=5e-4, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0.0), default=2.0, show_default=True)
@click.option("--holdout", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Training images kept out for the search reward; 0 trains on all 50,000 (the papers' way).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the model and drop each epoch's last partial batch (one static shape).")
@click.option("--max-seconds", type=click.FloatRange(min=1.0), default=None,
              help="Training-time budget over all calls: after the warm-up epochs the schedule shrinks to "
                   "the epochs predicted to fit.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), default=None,
              help="Resumable run: continue from this file if it exists; write it every 10 epochs and at the end.")
@click.option("--stop-after", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="With --state: stop (state saved) before this many seconds of this call have passed.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@_data_option
@_limit_option
def train(arch: str, out_path: str, epochs: int, batch_size: int, lr: float, weight_decay: float,
          warmup_epochs: float, holdout: int, compile_: bool, max_seconds: float | None,
          state_path: str | None, stop_after: float | None, seed: int, device: str, data_root: str | None,
          limit_per_class: int | None) -> None:
    """Train an unpruned baseline (SGD + Nesterov, warm-up + cosine; bf16 and channels-last on a GPU)
    on the training images outside the held-out split."""
    from compress.finetune import TrainConfig, pick_device
    from compress.pipeline import PipelineConfig, baseline_model, load_datasets
    from compress.resume import ResumeOptions
    from compress.store import check_writable

    if stop_after is not None and state_path is None:
        raise click.UsageError("--stop-after needs --state (the file the run resumes from)")
    resume = ResumeOptions(Path(state_path), stop_after) if state_path else None  # the clock starts here
    cfg = PipelineConfig(arch=arch, target=1.0, out_dir=str(Path(out_path).parent), data_root=data_root,
                         device=device, seed=seed, train_epochs=epochs, limit_per_class=limit_per_class,
                         holdout=holdout)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, seed=seed, max_seconds=max_seconds, compile=compile_,
                       drop_last=compile_)
    check_writable(out_path)
    if state_path:
        check_writable(state_path)
    dev = pick_device(device)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent) as tmp:
        _, meta = baseline_model(cfg, load_datasets(cfg, dev), dev, Path(tmp), tcfg, resume)
        if meta is None:
            click.echo(f"{arch}: stopped for time; state in {state_path} (run the same command to resume)")
            return
        Path(tmp, "baseline.pt").replace(out_path)
    click.echo(f"{arch}: test accuracy {meta['test_acc']:.2f}% after {meta['epochs']} epochs "
               f"({meta['train_seconds']:.0f} s of training) -> {out_path}")


@compress_group.command()
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Architecture (untrained).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Or a checkpoint.")
def graph(arch: str | None, checkpoint: str | None) -> None:
    """Print the pruning-group graph derived from torch-pruning's dependency graph."""
    from compress.graph import FEATURE_NAMES, build_graph
    from compress.prune import build_space

    model, _, _ = _model(arch, checkpoint)
    space = build_space(model)
    g = build_graph(model, space)
    click.echo(f"{g.num_nodes} groups, {g.edge_index.shape[1]} edges, {len(g.blocks)} blocks, "
               f"{space.base_macs / 1e6:.1f} M MACs; features: {', '.join(FEATURE_NAMES)}")
    for i, info in enumerate(space.groups):
        succ = [int(d) for s, d in g.edge_index.t().tolist() if s == i]
        click.echo(f"  [{i}] {info.root} ch={info.channels} block={g.blocks[int(g.block_of[i])]} "
                   f"coupled={len(info.out_layers)} -> {succ}")


def _model(arch: str | None, checkpoint: str | None):
    """The checkpoint's model, else the untrained architecture; its architecture name; and the
    checkpoint's kept channels (None when unpruned)."""
    from compress.models import build_model
    from compress.store import load_checkpoint

    if checkpoint:
        model, info = load_checkpoint(checkpoint, arch)
        return model, info["arch"], info["kept"]
    if arch:
        return build_model(arch).eval(), arch, None
    raise click.UsageError("give --arch or --checkpoint")


def _require_unpruned(checkpoint: str | None, kept: dict | None, why: str) -> None:
    if kept:
        raise CompressError(f"{checkpoint} is already pruned; {why}")


def _read_policy(path: str, arch: str) -> tuple[dict[str, float], int]:
    """A search file's best keep ratios and the channel multiple they were searched with, for a model
    of `arch` (a file that records another architecture is refused; files from before the record
    are checked group by group only, by `check_policy`)."""
    from compress.store import read_json

    searched = read_json(path)
    keep = searched.get("best_keep")
    if not isinstance(keep, dict) or not keep:
        raise CompressError(f"{path} holds no best_keep policy")
    if searched.get("arch", arch) != arch:
        raise CompressError(f"{path} is a policy for {searched['arch']}, not for this {arch} model")
    return keep, searched.get("channel_multiple", DEFAULT_CHANNEL_MULTIPLE)


@compress_group.command()
@click.option("--checkpoint", type=click.Path(), required=True)
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Expected architecture.")
@click.option("--target", type=float, required=True, help="Fraction of MACs to keep, e.g. 0.5.")
@click.option("--method", type=click.Choice(METHOD_CHOICES), default="gnn", show_default=True)
@click.option("--episodes", type=int, default=48, show_default=True)
@click.option("--channel-multiple", type=click.IntRange(min=1), default=DEFAULT_CHANNEL_MULTIPLE,
              show_default=True, help="Round channel counts to multiples of this.")
@click.option("--holdout", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Held-out training images scored per episode (a seeded subset of the 5,000).")
@click.option("--calib-batches", type=int, default=10, show_default=True,
              help="Training batches of 256 for BatchNorm recalibration per episode.")
@_latency_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), required=True)
@_data_option
@_limit_option
def search(checkpoint: str, arch: str | None, target: float, method: str, episodes: int,
           channel_multiple: int, holdout: int, calib_batches: int, latency_path: str | None,
           min_speedup: float | None, seed: int, device: str, out_dir: str, data_root: str | None,
           limit_per_class: int | None) -> None:
    """Search keep ratios under the FLOPs budget (and, with a latency table, a speed-up);
    writes search_<method>.json and .png."""
    from compress.finetune import pick_device
    from compress.graph import build_graph
    from compress.latency import load_predictor
    from compress.pipeline import PipelineConfig, load_datasets
    from compress.prune import build_space
    from compress.search import (SearchConfig, check_budget, prior_policy, pruned_evaluator, run_search,
                                 save_search, verify_budget)
    from compress.store import check_writable, load_checkpoint

    _check_latency_pair(latency_path, min_speedup)
    model, info = load_checkpoint(checkpoint, arch)
    _require_unpruned(checkpoint, info["kept"], "search from the unpruned baseline")
    space = build_space(model, channel_multiple=channel_multiple)
    latency_fn = load_predictor(latency_path, model, space, info["arch"]) if latency_path else None
    scfg = SearchConfig(method=method, target=target, episodes=episodes, seed=seed, min_speedup=min_speedup)
    check_budget(space, scfg, latency_fn)
    check_writable(Path(out_dir) / f"search_{method}.json")
    dev = pick_device(device)
    cfg = PipelineConfig(arch=info["arch"], target=target, out_dir=out_dir, data_root=data_root,
                         device=device, seed=seed, limit_per_class=limit_per_class, holdout=holdout)
    data = load_datasets(cfg, dev)
    model = model.to(dev)
    result = run_search(space, build_graph(model, space),
                        pruned_evaluator(model, space, data.train, data.holdout, calib_batches), scfg,
                        latency_fn=latency_fn, prior=prior_policy(model, space, scfg))
    checked = verify_budget(model, space, result.best_keep)
    out = Path(out_dir)
    save_search(result, out / f"search_{method}.json", out / f"search_{method}.png", arch=info["arch"])
    predicted = "" if result.predicted_speedup is None else \
        f", predicted {result.predicted_speedup:.2f}x faster"
    click.echo(f"{method}: best held-out accuracy {result.best_reward:.2f}% at {checked:.4f} of the MACs "
               f"(torch-pruning counter){predicted} -> {out / f'search_{method}.json'}")


@compress_group.command()
@click.option("--agent", "agent_path", type=click.Path(dir_okay=False), required=True,
              help="search_<method>.agent.pt, written by `search` with an agent method on another depth.")
@click.option("--checkpoint", type=click.Path(), default=None, help="The unpruned network to prune.")
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Or its architecture (untrained).")
@click.option("--target", type=float, required=True, help="Fraction of MACs to keep, e.g. 0.5.")
@click.option("--channel-multiple", type=click.IntRange(min=1), default=None,
              help="Round channel counts to multiples of this [default: the agent's search's].")
@_latency_options
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Policy file (search_<method>.json's fields) for `finetune` and `export --policy`.")
def transfer(agent_path: str, checkpoint: str | None, arch: str | None, target: float,
             channel_multiple: int | None, latency_path: str | None, min_speedup: float | None,
             out_path: str) -> None:
    """Apply a policy network searched on one network to another of its family, without search."""
    from compress.latency import load_predictor
    from compress.prune import build_space
    from compress.search import verify_budget
    from compress.store import check_writable, load_agent, write_json
    from compress.transfer import check_family, transfer_policy

    _check_latency_pair(latency_path, min_speedup)
    agent = load_agent(agent_path)
    model, name, kept = _model(arch, checkpoint)
    check_family(agent["arch"], name)  # before the trace
    _require_unpruned(checkpoint, kept, "transfer to the unpruned network")
    check_writable(out_path)
    multiple = channel_multiple or agent["channel_multiple"]
    space = build_space(model, channel_multiple=multiple)
    latency_fn = load_predictor(latency_path, model, space, name) if latency_path else None
    result = transfer_policy(agent, model, space, name, target, latency_fn, min_speedup)
    counted = verify_budget(model, space, result.keep)
    write_json(out_path, {**result.to_json(target, name, multiple), "macs_ratio_counted": counted})
    click.echo(f"{agent['method']} agent searched on {agent['arch']} -> {name}: {counted:.4f} of the MACs "
               f"(torch-pruning counter), no search -> {out_path}")


@compress_group.command("latency-table")
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Architecture (untrained).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Or an unpruned checkpoint.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--channel-multiple", type=click.IntRange(min=1), default=DEFAULT_CHANNEL_MULTIPLE,
              show_default=True, help="Measure the channel counts this rounding can leave.")
@click.option("--passes", type=click.IntRange(min=1), default=3, show_default=True,
              help="Sweeps over the table; each entry keeps its median.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True)
def latency_table(arch: str | None, checkpoint: str | None, threads: int, channel_multiple: int, passes: int,
                  out_path: str) -> None:
    """Time each convolution at the channel counts pruning can leave, on this CPU (onnxruntime,
    batch 1), for `search --latency-table`."""
    from compress.latency import measure_model
    from compress.store import check_writable, write_json

    model, name, kept = _model(arch, checkpoint)
    _require_unpruned(checkpoint, kept, "measure the unpruned architecture")
    check_writable(out_path)
    table = measure_model(model, name, threads, channel_multiple, passes, progress=True)
    write_json(out_path, table.to_json())
    click.echo(f"{name}: {len(table.shapes)} conv layers, {threads} thread(s), unpruned predicted "
               f"{table.predict_ms({}):.3f} ms -> {out_path}")


@compress_group.command()
@click.option("--checkpoint", type=click.Path(), required=True)
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), required=True,
              help="search_<method>.json written by `search`.")
@click.option("--arch", type=click.Choice(ARCHS), default=None)
@click.option("--epochs", type=int, default=15, show_default=True)
@click.option("--lr", type=float, default=0.02, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per step (a larger batch takes fewer, as fast, steps on a GPU; scale --lr with it).")
@_distill_option
@click.option("--max-seconds", type=click.FloatRange(min=1.0), default=None,
              help="Training-time budget: after the first epoch the schedule shrinks to the epochs "
                   "predicted to fit (may overrun by about an epoch; loading and testing not counted).")
@click.option("--channel-multiple", type=click.IntRange(min=1), default=None,
              help="Round channel counts to multiples of this "
                   f"[default: the policy's, else {DEFAULT_CHANNEL_MULTIPLE}].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True)
@_data_option
@_limit_option
def finetune(checkpoint: str, policy: str, arch: str | None, epochs: int, lr: float, batch_size: int,
             distill: float, max_seconds: float | None, channel_multiple: int | None, seed: int, device: str,
             out_path: str, data_root: str | None, limit_per_class: int | None) -> None:
    """Prune a checkpoint to a searched policy, fine-tune it, report test accuracy."""
    from compress.finetune import pick_device
    from compress.pipeline import PipelineConfig, finetune_one, load_datasets
    from compress.prune import build_space, check_policy
    from compress.store import check_writable, load_checkpoint

    model, info = load_checkpoint(checkpoint, arch)
    keep, searched_multiple = _read_policy(policy, info["arch"])
    channel_multiple = channel_multiple or searched_multiple
    dev = pick_device(device)
    cfg = PipelineConfig(arch=info["arch"], target=1.0, out_dir=str(Path(out_path).parent),
                         data_root=data_root, device=device, seed=seed, finetune_epochs=epochs,
                         finetune_lr=lr, finetune_batch_size=batch_size, distill_weight=distill,
                         limit_per_class=limit_per_class, methods=("policy",))
    model = model.to(dev)
    space = build_space(model, channel_multiple=channel_multiple)
    check_policy(space, keep)  # before the data are loaded
    check_writable(out_path)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent) as tmp:
        row = finetune_one(cfg, model, space, keep, load_datasets(cfg, dev), Path(tmp), "policy",
                           max_seconds=max_seconds)
        Path(tmp, "pruned_policy.pt").replace(out_path)
    click.echo(f"test accuracy {row['test_acc_before_ft']:.2f}% -> {row['test_acc']:.2f}% after "
               f"{row['finetune_epochs']} epochs (lr {lr}, batch {batch_size}, distill {distill}, "
               f"channels x{channel_multiple}), "
               f"{row['macs_ratio']:.4f} of the MACs -> {out_path}")


def _int8_options(f):
    f = click.option("--select-images", type=click.IntRange(min=1), default=2000, show_default=True,
                     help="Held-out training images that score the calibration methods (--int8-method auto).")(f)
    f = click.option("--calib-images", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Held-out training images whose activation ranges calibrate the int8 model.")(f)
    f = click.option("--int8-fp32-ends", is_flag=True,
                     help="Keep the first convolution and the classifier in FP32 (auto tries this itself "
                          "when no all-int8 model is within 0.5 points).")(f)
    f = click.option("--int8-format", type=click.Choice(FORMATS), default="qdq", show_default=True)(f)
    f = click.option("--int8-activations", type=click.Choice(ACTIVATIONS), default="u8", show_default=True,
                     help="u8 (U8S8) is what onnxruntime's x86 CPU provider runs as int8 kernels.")(f)
    f = click.option("--int8-method", type=click.Choice(("auto", *METHODS)), default="auto", show_default=True,
                     help="Activation calibration; auto picks the best on held-out training images.")(f)
    return click.option("--int8", "int8_path", type=click.Path(dir_okay=False), default=None,
                        help="Also write a static int8 model (per-channel weights) here.")(f)


@compress_group.command()
@click.option("--checkpoint", type=click.Path(), default=None)
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="With no checkpoint: export the untrained architecture (for latency only).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True)
@click.option("--opset", type=int, default=18, show_default=True)
@_int8_options
@click.option("--policy", type=click.Path(dir_okay=False), default=None,
              help="First prune to this search file's policy (with --arch alone: a model of the pruned "
                   "shape with untrained weights, for latency only).")
@_data_option
def export(checkpoint: str | None, arch: str | None, out_path: str, opset: int, int8_path: str | None,
           int8_method: str, int8_activations: str, int8_format: str, int8_fp32_ends: bool, calib_images: int,
           select_images: int, policy: str | None, data_root: str | None) -> None:
    """Export to ONNX, run onnx.checker and a parity check against torch (< 1e-4); optionally int8."""
    import numpy as np

    from compress.export import check_parity, export_onnx
    from compress.prune import apply_policy, build_space
    from compress.quantize import Int8Config
    from compress.store import check_writable

    model, model_arch, kept = _model(arch, checkpoint)
    if policy:
        _require_unpruned(checkpoint, kept, "--policy needs an unpruned model")
        keep, multiple = _read_policy(policy, model_arch)
        model = apply_policy(model, build_space(model, channel_multiple=multiple), keep)
    if int8_path:  # before any work: an unwritable path or no calibration images is one line
        check_writable(int8_path)
        config = Int8Config(method="minmax" if int8_method == "auto" else int8_method,
                            activations=int8_activations, fmt=int8_format, fp32_ends=int8_fp32_ends)
        images = _heldout_images(data_root, calib_images, select_images if int8_method == "auto" else 0)
    probe = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    errors: list[float] = []
    path = export_onnx(model, out_path, opset=opset,
                       verify=lambda tmp: errors.append(check_parity(model, tmp, probe)))
    err = errors[0]
    click.echo(f"{path}: onnx.checker passed, max |torch - onnxruntime| = {err:.2e}")
    if int8_path:
        _export_int8(path, Path(int8_path), config, images, choose=int8_method == "auto")


def _heldout_images(data_root: str | None, calib: int, select: int):
    """Normalised calibration images and (images, labels) to choose with, both from the training set's
    seeded held-out split (the search's reward images; never the test set)."""
    import numpy as np

    from compress.data import holdout_split, load_split
    from compress.errors import DataError
    from compress.report import normalised

    try:
        train = load_split(data_root, "train")
        held = holdout_split(train.labels)[1]
    except DataError as err:
        raise DataError(f"--int8 needs calibration images from the CIFAR-10 training set: {err}") from err
    if calib + select > len(held):
        raise CompressError(f"--calib-images + --select-images is {calib + select}; the held-out split "
                            f"has {len(held)}")
    order = np.random.default_rng(0).permutation(held)
    pick = train.subset(order[calib:calib + select])
    return normalised(train.images[order[:calib]]), (normalised(pick.images), pick.labels)


def _export_int8(fp32: Path, out: Path, config, images, choose: bool) -> None:
    from compress.quantize import choose_int8, ops_summary, optimized_ops, quantize_int8

    calibration, selection = images
    if choose:
        picked = choose_int8(fp32, out, calibration, selection, base=config)
        scores = ", ".join(f"{label} {acc:.2f}" for label, acc in picked.scores)
        click.echo(f"int8 calibration on {len(calibration)} held-out images; accuracy on "
                   f"{len(selection[1])} others: FP32 {picked.fp32_acc:.2f}, {scores}; "
                   f"chosen: {picked.config.label}")
        config = picked.config
    else:
        quantize_int8(fp32, out, calibration, config)
    click.echo(f"{out}: int8 ({config.fmt.upper()}, {config.activations.upper()}S8, per-channel weights, "
               f"{config.label}); onnxruntime runs {ops_summary(optimized_ops(out))}")


@compress_group.command()
@click.argument("onnx_files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--runs", type=click.IntRange(min=1), default=300, show_default=True, help="Timed runs per round.")
@click.option("--warmup", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds over all files; the median of the rounds' medians is reported.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
def bench(onnx_files: tuple[str, ...], runs: int, warmup: int, rounds: int, json_out: str | None) -> None:
    """onnxruntime CPU latency at batch 1 with 1 and 2 threads; speed-ups against the first file."""
    import statistics

    from compress.export import interleaved_latency, machine_info, speedups_vs_first
    from compress.store import write_json
    from pipeinfer_cpu.stats import markdown_table

    if len(set(onnx_files)) < len(onnx_files):
        raise CompressError("give each ONNX file once (the rounds are interleaved already)")
    machine = machine_info()
    per = interleaved_latency(onnx_files, rounds=rounds, runs=runs, warmup=warmup)
    median = {f: {t: statistics.median(v) for t, v in d.items()} for f, d in per.items()}
    speedup = speedups_vs_first(per)
    rows = [{"model": f, "1 thread (ms)": round(median[f][1], 3), "2 threads (ms)": round(median[f][2], 3),
             "speed-up 1 thread": round(speedup[f][1], 2), "speed-up 2 threads": round(speedup[f][2], 2)}
            for f in per]
    click.echo(f"{machine['cpu']}, {machine['cores']} cores, {' '.join(machine['simd'])}, onnxruntime "
               f"{machine['onnxruntime']}; medians of {rounds} interleaved rounds of {runs} runs "
               "(speed-up: the median of the per-round ratios to the first file)")
    click.echo(markdown_table(rows, list(rows[0])), nl=False)
    if json_out:
        def by_threads(table: dict) -> dict:  # JSON object keys must be strings
            return {f: {str(t): v for t, v in d.items()} for f, d in table.items()}

        write_json(json_out, {"machine": {**machine, "load_avg_after": machine_info()["load_avg"]},
                              "rounds": rounds, "runs_per_round": runs, "warmup": warmup,
                              "median_ms": by_threads(median), "speedup_vs_first": by_threads(speedup),
                              "round_medians_ms": by_threads(per)})


@compress_group.command()
@click.argument("onnx_files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
@_data_option
@_limit_option
def accuracy(onnx_files: tuple[str, ...], json_out: str | None, data_root: str | None,
             limit_per_class: int | None) -> None:
    """Top-1 accuracy of ONNX files (FP32 or int8) on the CIFAR-10 test images, through onnxruntime."""
    from compress.data import load_split
    from compress.export import onnx_accuracy
    from compress.report import normalised
    from compress.store import write_json

    test = load_split(data_root, "test", limit_per_class)
    x = normalised(test.images)
    result = {f: onnx_accuracy(f, x, test.labels) for f in onnx_files}
    for f, acc in result.items():
        click.echo(f"{f}: {acc:.2f}% of {len(test.labels)} test images")
    if json_out:
        write_json(json_out, {"test_images": len(test.labels), "top1": result})


@compress_group.command()
@click.option("--arch", type=click.Choice(ARCHS), required=True)
@click.option("--target", type=float, required=True)
@click.option("--out-dir", type=click.Path(file_okay=False), required=True)
@click.option("--train-epochs", type=int, default=40, show_default=True)
@click.option("--finetune-epochs", type=int, default=15, show_default=True)
@click.option("--episodes", type=int, default=48, show_default=True)
@_distill_option
@click.option("--time-budget", type=float, default=None,
              help="Seconds for the whole run; epochs and episodes are cut to fit (recorded).")
@click.option("--baseline", type=click.Path(), default=None, help="Skip training: use this checkpoint.")
@click.option("--channel-multiple", type=click.IntRange(min=1), default=DEFAULT_CHANNEL_MULTIPLE,
              show_default=True, help="Round channel counts to multiples of this.")
@_latency_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@_data_option
@_limit_option
def reproduce(arch: str, target: float, out_dir: str, train_epochs: int, finetune_epochs: int,
              episodes: int, distill: float, time_budget: float | None, baseline: str | None,
              channel_multiple: int, latency_path: str | None, min_speedup: float | None, seed: int,
              device: str, data_root: str | None, limit_per_class: int | None) -> None:
    """Train, search (GNN+RL and baselines), prune, fine-tune and test one architecture."""
    from compress.pipeline import PipelineConfig, run_pipeline

    _check_latency_pair(latency_path, min_speedup)
    res = run_pipeline(PipelineConfig(
        arch=arch, target=target, out_dir=out_dir, data_root=data_root, device=device, seed=seed,
        train_epochs=train_epochs, finetune_epochs=finetune_epochs, episodes=episodes,
        distill_weight=distill, baseline=baseline, time_budget_s=time_budget,
        limit_per_class=limit_per_class, channel_multiple=channel_multiple,
        latency_table=latency_path, min_speedup=min_speedup))
    rows = ", ".join(f"{m} {r['test_acc']:.2f}%" for m, r in res["finetuned"].items())
    click.echo(f"{arch}: baseline {res['baseline']['test_acc']:.2f}%; after fine-tuning: {rows}")


@compress_group.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--onnx-dir", type=click.Path(file_okay=False), required=True)
@click.option("--json-out", type=click.Path(dir_okay=False), required=True)
@click.option("--md-out", type=click.Path(dir_okay=False), required=True)
@click.option("--rounds", type=int, default=5, show_default=True,
              help="Interleaved rounds over all models; the median of the rounds is reported.")
@click.option("--runs", type=int, default=200, show_default=True, help="Timed runs per round.")
@click.option("--no-int8", is_flag=True, help="Skip the int8 quantisation of the GNN+RL model.")
@_data_option
def report(run_dirs: tuple[str, ...], onnx_dir: str, json_out: str, md_out: str, rounds: int, runs: int,
           no_int8: bool, data_root: str | None) -> None:
    """Measure finished runs on this machine (ONNX parity, accuracy, latency) and write the table."""
    from compress.report import measure_run, write_report

    measured = []
    for run_dir in run_dirs:
        measured.append(measure_run(run_dir, onnx_dir, data_root, rounds, runs, int8=not no_int8))
        click.echo(f"measured {run_dir}")
    write_report(measured, json_out, md_out)
    click.echo(Path(md_out).read_text())


def main() -> None:
    compress_group(prog_name="compress")


if __name__ == "__main__":
    sys.exit(main())
