"""`pipeinfer-cpu netlab sweep`: every mode over a grid of emulated links, measured (and predicted by
the performance model).

The sweep runs each (bandwidth, delay, mode) point as `bench` runs a mode (app/bench.py: one real job
over the prompts, its statistics read back), `--repeats` times, and reports the medians; with a
calibration it also asks plan/predict.py for the same point (the head's own scheduler on a
simulated clock) and reports the error of that prediction.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

from pipeinfer_cpu.app.bench import BenchConfig
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_write, atomic_write_text
from pipeinfer_cpu.stats import markdown_table, write_json
from pipeinfer_cpu.timings import Calibration, load_calibration
from pipeinfer_cpu.wire.links import LinkSpec

SWEEP_MODES = ("pipeline", "speculative", "pipeinfer")
WITHIN = 0.15  # a prediction this close to the measured tokens/s (relative) counts as a hit
RUN_TIMEOUT_S = 900.0  # one job: every prompt of one repeat of one point


@dataclass(frozen=True)
class SweepGrid:
    """The links (every bandwidth with every delay) and the modes of a sweep, each checked once."""

    bandwidths: tuple[str, ...]
    delays: tuple[str, ...]
    modes: tuple[str, ...]

    @staticmethod
    def parse(bandwidths: str, delays: str, modes: str) -> "SweepGrid":
        """`1gbit,100mbit`, `0.1ms,1ms`, `pipeline,pipeinfer`: a UserError for an empty list, a bad link
        value (LinkSpec's own message) or an unknown mode."""
        lists = {}
        for name, text in (("--bandwidth", bandwidths), ("--delay", delays), ("--modes", modes)):
            lists[name] = tuple(v.strip() for v in text.split(",") if v.strip())
            if not lists[name]:
                raise UserError(f"{name} needs at least one value (comma-separated), got {text!r}")
        unknown = [m for m in lists["--modes"] if m not in SWEEP_MODES]
        if unknown:
            raise UserError(f"unknown sweep mode {unknown[0]!r} (choose from {', '.join(SWEEP_MODES)})")
        grid = SweepGrid(lists["--bandwidth"], lists["--delay"], lists["--modes"])
        for bandwidth in grid.bandwidths:
            for delay in grid.delays:
                LinkSpec.parse(link_setting(bandwidth, delay))
        return grid

    def points(self) -> list[tuple[str, str, str]]:
        """(bandwidth, delay, mode) of every point, in the order given."""
        return [(b, d, m) for b in self.bandwidths for d in self.delays for m in self.modes]


def link_setting(bandwidth: str, delay: str) -> str:
    return f"bw={bandwidth},delay={delay}"


@dataclass(frozen=True)
class PredictSetup:
    """What the performance model needs besides the link: the target's timings and shape, the draft's
    cost per drafted token, the acceptance."""

    calibration: Calibration
    n_embd: int
    n_vocab: int
    acceptance: float
    draft_token_s: float = 0.0


def draft_token_cost(calibration: Calibration) -> float:
    """One drafted token: the whole draft model for one token on its (first) host: every layer and the output."""
    timing = calibration.hosts[0]
    return timing.run_s(1) + calibration.n_layers * timing.layer_s(1) + timing.output_s(1)


def predict_point(setup: PredictSetup, link: str, mode: str, config: BenchConfig) -> dict:
    """The model's prediction for one point: `--link` shapes every pair of ranks, the head's hop to stage 0
    and the draft's too (head_local=False); stages on the calibration's hosts, layers split equally."""
    from pipeinfer_cpu.head.specdecode import SpecSettings
    from pipeinfer_cpu.plan.inputs import ModelInputs
    from pipeinfer_cpu.plan.predict import predict

    spec = LinkSpec.parse(link)
    inputs = ModelInputs.from_calibration(setup.calibration, config.stages, spec, setup.n_embd, setup.n_vocab,
                                          head_local=False, acceptance=setup.acceptance,
                                          draft_token_s=setup.draft_token_s, draft_link=spec,
                                          wire_dtype=config.wire_dtype)
    settings = None if mode == "pipeline" else SpecSettings(mode, draft_max=config.draft_max or 8)
    p = predict(inputs, mode, n_tokens=config.n_tokens, spec=settings)
    return {"decode_tok_s": p.tokens_per_s, "itl_mean_ms": p.itl_mean_s * 1e3, "acceptance": p.acceptance,
            "bottleneck": p.bottleneck, "saturated": p.saturated}


def median_summary(summaries: list[dict]) -> dict:
    """The median over repeats of each key figure (None where no repeat has it), and tok/s's range."""
    out: dict = {}
    for key in ("decode_tok_s", "itl_mean_ms", "itl_p50_ms", "acceptance", "decode_bytes_per_token"):
        values = [s[key] for s in summaries if s.get(key) is not None]
        out[key] = median(values) if values else None
    speeds = [s["decode_tok_s"] for s in summaries if s.get("decode_tok_s") is not None]
    out["decode_tok_s_range"] = [min(speeds), max(speeds)] if speeds else None
    return out


PROMPT_KEYS = ("n_prompt", "n_generated", "decode_tokens_per_s", "ttft_s", "drafted", "accepted", "runs_launched",
               "runs_cancelled", "decode_bytes_per_token")
STAGE_KEYS = ("rank", "layers", "compute_s", "wall_s", "runs_computed", "runs_cancelled_during")


def key_stats(run: dict) -> dict:
    """What the sweep keeps of one prompt's statistics: speed, speculation counts, and each rank's compute
    (compute_s / runs_computed is a run's cost there: what a calibration predicts)."""
    return {**{key: run.get(key) for key in PROMPT_KEYS},
            "stages": [{key: stage.get(key) for key in STAGE_KEYS} for stage in run.get("stages", ())]}


def sweep_point(bandwidth: str, delay: str, mode: str, config: BenchConfig, repeats: list[dict],
                prediction: dict | None) -> dict:
    """One point of the report: its link, mode, command, each repeat's key stats, the medians and the
    prediction with its error (predicted - measured) / measured."""
    measured = median_summary([r["summary"] for r in repeats])
    error = None
    if prediction is not None and measured["decode_tok_s"]:
        error = (prediction["decode_tok_s"] - measured["decode_tok_s"]) / measured["decode_tok_s"]
    return {"bandwidth": bandwidth, "delay": delay, "link": link_setting(bandwidth, delay), "mode": mode,
            "command": repeats[0]["command"], "repeats": repeats, "median": measured, "prediction": prediction,
            "error": error}


def run_sweep(grid: SweepGrid, config: BenchConfig, model: Path | None, draft: Path | None, n_repeats: int,
              predict_setup: PredictSetup | None, head: dict, out_dir: Path) -> dict:
    """Run every point `n_repeats` times, in rounds (each round runs every point once, so a drift in the
    machine's speed touches all points alike, not the ones run last), under a progress bar on stderr;
    sweep.json is rewritten after each run, so a sweep that stops leaves what it measured."""
    from tqdm import tqdm

    from pipeinfer_cpu.app.bench import ModeSpec, mode_spec, run_mode
    from pipeinfer_cpu.app.prompts import escape

    common = ("--hostfile", str(config.hostfile)) + (("--model", str(model)) if model else ())
    points = grid.points()
    predictions = {point: predict_point(predict_setup, link_setting(*point[:2]), point[2], config)
                   for point in points} if predict_setup else {}
    repeats: dict[tuple[str, str, str], list[dict]] = {point: [] for point in points}
    report = {**head, "points": []}
    with tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=len(points) * n_repeats, desc="netlab sweep", unit="run", file=sys.stderr) as bar:
        prompts_file = Path(tmp) / "prompts.txt"
        prompts_file.write_text("".join(escape(prompt) + "\n" for prompt in config.prompts))
        for _ in range(n_repeats):
            for point in points:
                bandwidth, delay, mode = point
                bar.set_postfix_str(f"{bandwidth} {delay} {mode}")
                spec = mode_spec(mode, replace(config, link=link_setting(bandwidth, delay)))
                extra = ("--draft", str(draft)) if mode != "pipeline" else ()
                row = run_mode(ModeSpec(spec.label, spec.args + extra), prompts_file, config.n_tokens, common,
                               RUN_TIMEOUT_S)
                repeats[point].append({"command": row["command"], "summary": row["summary"],
                                       "prompts": [key_stats(run) for run in row["runs"]]})
                bar.update()
                report["points"] = [sweep_point(*p, config, repeats[p], predictions.get(p)) for p in points
                                    if repeats[p]]
                write_json(report, out_dir / "sweep.json")
    return report


# -- sweep report: sweep.json, sweep.md, sweep-tokens.png, sweep-heatmap.png -------------------------------

def _rate_bps(bandwidth: str) -> float:
    return LinkSpec.parse(f"bw={bandwidth}").rate_bps or float("inf")


def _delay_s(delay: str) -> float:
    return LinkSpec.parse(f"delay={delay}").delay_s


def prediction_summary(points: list[dict]) -> str | None:
    """`max |error| ...; K of N points within +-15%`, or None when nothing was predicted."""
    scored = [p for p in points if p.get("error") is not None]
    if not scored:
        return None
    worst = max(scored, key=lambda p: abs(p["error"]))
    hits = sum(abs(p["error"]) <= WITHIN for p in scored)
    by_mode = ", ".join(f"{mode} {sum(abs(p['error']) <= WITHIN for p in scored if p['mode'] == mode)}/"
                        f"{sum(p['mode'] == mode for p in scored)}"
                        for mode in dict.fromkeys(p["mode"] for p in scored))
    return (f"PREDICTED vs measured decode tok/s: max |error| {abs(worst['error']):.0%} ({worst['mode']}, "
            f"{worst['link']}); {hits} of {len(scored)} points within ±{WITHIN:.0%} ({by_mode})")


def sweep_table(report: dict) -> str:
    """The markdown table: one row per point, medians over repeats, and the prediction where there is one."""
    predicted = any(p.get("prediction") for p in report["points"])
    rows = []
    for p in report["points"]:
        m, pred = p["median"], p.get("prediction") or {}
        low_high = m.get("decode_tok_s_range")
        row = {"model": report.get("pair_label", ""), "bandwidth": p["bandwidth"], "delay": p["delay"],
               "mode": p["mode"], "decode tok/s (median)": m["decode_tok_s"],
               "min-max": f"{low_high[0]:.1f}-{low_high[1]:.1f}" if low_high else None,
               "ITL mean ms": m["itl_mean_ms"], "accept": m["acceptance"],
               "decode B/token": m["decode_bytes_per_token"]}
        if predicted:
            row.update({"PREDICTED tok/s": pred.get("decode_tok_s"),
                        "error %": None if p.get("error") is None else round(100 * p["error"], 1),
                        "predicted bottleneck": pred.get("bottleneck")})
        rows.append(row)
    columns = list(rows[0]) if rows else ["bandwidth"]
    return markdown_table(rows, columns)


def write_sweep_report(report: dict, out_dir: Path) -> str:
    """Write sweep.json, sweep.md and the two plots under out_dir (each atomically); return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, out_dir / "sweep.json")
    summary = prediction_summary(report["points"])
    commands = "\n".join(f"- {p['mode']} over {p['link']}: `{p['command']}`" for p in report["points"])
    markdown = (f"## {report['title']}\n\n{report.get('machine', '')}\n\n{report.get('how', '')}\n\n"
                f"{sweep_table(report)}\n" + (f"{summary}\n\n" if summary else "") +
                f"Sweep: `{report.get('sweep_command', '')}`\n\nCommands (each repeat the same):\n{commands}\n")
    atomic_write_text(out_dir / "sweep.md", markdown)
    if report["points"]:
        plot_tokens(report, out_dir / "sweep-tokens.png")
        plot_heatmaps(report, out_dir / "sweep-heatmap.png")
    return markdown


def _figure(n_panels: int, width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, n_panels, figsize=(width * n_panels + 1, 4.2), squeeze=False, layout="constrained")
    return plt, figure, list(axes[0])


def _save(plt, figure, title: str, path: Path) -> None:
    figure.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def plot_tokens(report: dict, path: Path) -> None:
    """Decode tokens/s (median, bar: min-max over repeats) against bandwidth (log x), one line per mode,
    one panel per delay; the prediction dashed in the same colour."""
    points = report["points"]
    delays = sorted({p["delay"] for p in points}, key=_delay_s)
    modes = list(dict.fromkeys(p["mode"] for p in points))
    plt, figure, axes = _figure(len(delays), 4.0)
    for axis, delay in zip(axes, delays):
        for index, mode in enumerate(modes):
            chosen = sorted((p for p in points if p["delay"] == delay and p["mode"] == mode),
                            key=lambda p: _rate_bps(p["bandwidth"]))
            xs = [_rate_bps(p["bandwidth"]) / 1e6 for p in chosen]
            ys = [p["median"]["decode_tok_s"] for p in chosen]
            spans = [p["median"]["decode_tok_s_range"] or [y, y] for p, y in zip(chosen, ys)]
            bars = [[y - s[0] for y, s in zip(ys, spans)], [s[1] - y for y, s in zip(ys, spans)]]
            axis.errorbar(xs, ys, yerr=bars, marker="o", capsize=3, color=f"C{index}", label=mode)
            if any(p.get("prediction") for p in chosen):
                axis.plot(xs, [p["prediction"]["decode_tok_s"] for p in chosen], linestyle="--", marker="x",
                          color=f"C{index}", label=f"{mode} PREDICTED")
        axis.set(xscale="log", xlabel="link bandwidth (Mbit/s)", ylabel="decode tokens/s", title=f"delay {delay}")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(plt, figure, report["title"], path)


def plot_heatmaps(report: dict, path: Path) -> None:
    """One bandwidth x delay heat map of the median decode tokens/s per mode (one colour scale)."""
    points = report["points"]
    bandwidths = sorted({p["bandwidth"] for p in points}, key=_rate_bps, reverse=True)
    delays = sorted({p["delay"] for p in points}, key=_delay_s)
    modes = list(dict.fromkeys(p["mode"] for p in points))
    speeds = [p["median"]["decode_tok_s"] or 0.0 for p in points]
    plt, figure, axes = _figure(len(modes), 3.6)
    for axis, mode in zip(axes, modes):
        cell = {(p["delay"], p["bandwidth"]): p["median"]["decode_tok_s"] for p in points if p["mode"] == mode}
        grid = [[cell.get((d, b)) or float("nan") for b in bandwidths] for d in delays]
        image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=max(speeds) or 1, aspect="auto")
        for row, delay in enumerate(delays):
            for column, bandwidth in enumerate(bandwidths):
                value = cell.get((delay, bandwidth))
                axis.text(column, row, "-" if value is None else f"{value:.1f}", ha="center", va="center",
                          color="white", fontsize=8)
        axis.set_xticks(range(len(bandwidths)), bandwidths)
        axis.set_yticks(range(len(delays)), delays)
        axis.set(xlabel="bandwidth", ylabel="one-way delay", title=f"{mode}: decode tok/s")
    figure.colorbar(image, ax=axes, shrink=0.8)
    _save(plt, figure, report["title"], path)


# -- the sweep command --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepRequest:
    """What `netlab sweep` was asked: the grid, the runs' shared settings, the models, the prediction's inputs."""

    grid: SweepGrid
    config: BenchConfig  # its `link` is set per point
    out_dir: Path
    repeats: int = 3
    agreement: float | None = None  # a SYNTHETIC bench pair of this agreement (cost ratio 3.4) ...
    pair_dir: Path | None = None  # ... built or reused here (default: OUT/pair)
    model: Path | None = None  # ... or this target and draft
    draft: Path | None = None
    calibration: Path | None = None  # --predict: the target's `hosts calibrate` timings
    draft_calibration: Path | None = None  # the draft's, for its cost per drafted token
    acceptance: float | None = None  # the prediction's (default: the synthetic pair's measured agreement)
    command_line: str = ""

    def __post_init__(self) -> None:
        speculative = any(mode != "pipeline" for mode in self.grid.modes)
        if self.repeats < 1 or self.config.n_tokens < 2 or self.config.stages < 1 or self.config.threads < 1:
            raise UserError("--repeats, --stages and --threads must be at least 1, -n at least 2")
        if self.agreement is not None and (self.model is not None or self.draft is not None):
            raise UserError("give --agreement (a SYNTHETIC pair) or --model/--draft, not both")
        if speculative and self.agreement is None and self.draft is None:
            raise UserError("speculative and pipeinfer need --draft or --agreement")
        if self.calibration is None and (self.draft_calibration or self.acceptance is not None):
            raise UserError("--draft-calibration and --acceptance go with --predict")
        if self.calibration is not None and speculative and self.draft_calibration is None:
            raise UserError("--predict with speculative modes needs --draft-calibration (`hosts calibrate` of the draft)")
        if self.calibration is not None and speculative and self.agreement is None and self.acceptance is None:
            raise UserError("--predict with --draft needs --acceptance (the pair's top-1 agreement)")
        if self.acceptance is not None and not 0 <= self.acceptance <= 1:
            raise UserError(f"--acceptance must be in [0, 1], got {self.acceptance}")


def sweep(request: SweepRequest) -> str:
    """Check everything, build (or reuse) the pair, run the grid, write the report; return its markdown."""
    from pipeinfer_cpu.modelfiles.models import read_model_info
    from pipeinfer_cpu.modelfiles.registry import resolve_model

    calibrations = [None if p is None else load_calibration(p) for p in (request.calibration, request.draft_calibration)]
    model, draft, pair_info, label = request.model, request.draft, None, ""
    if request.agreement is not None:
        from pipeinfer_cpu.app.benchpair import batched_source, build_bench_pair, check_request

        check_request(3.4, request.agreement)
        pair_dir = request.pair_dir or request.out_dir / "pair"
        pair_dir.mkdir(parents=True, exist_ok=True)
        pair = build_bench_pair(3.4, request.agreement, pair_dir, source=batched_source(pair_dir),
                                progress=lambda text: print(text, file=sys.stderr, flush=True))
        model, draft = pair.target, pair.draft
        pair_info = {"agreement_requested": pair.agreement_requested, "agreement_measured": pair.agreement_measured,
                     "cost_ratio": pair.cost_ratio_requested, "target": str(pair.target), "draft": str(pair.draft)}
        label = f"SYNTHETIC a={pair.agreement_measured:.2f}"
    info = read_model_info(resolve_model(model))
    setup = None
    if calibrations[0] is not None:
        if calibrations[0].n_layers != info.n_layer:
            raise UserError(f"{request.calibration} times a model of {calibrations[0].n_layers} layers; the target "
                            f"has {info.n_layer}")
        acceptance = request.acceptance if request.acceptance is not None else (
            pair_info["agreement_measured"] if pair_info else 0.0)
        setup = PredictSetup(calibrations[0], info.n_embd, info.n_vocab, acceptance,
                             draft_token_cost(calibrations[1]) if calibrations[1] else 0.0)
    head = _report_head(request, info.path.name, pair_info, label, setup)
    report = run_sweep(request.grid, request.config, model, draft, request.repeats, setup, head, request.out_dir)
    return write_sweep_report(report, request.out_dir)


def _report_head(request: SweepRequest, target: str, pair: dict | None, label: str, setup: PredictSetup | None) -> dict:
    from pipeinfer_cpu.app.bench import machine_description

    config = request.config
    what = (f"SYNTHETIC bench pair (agreement {pair['agreement_measured']:.2f} measured, cost ratio "
            f"{pair['cost_ratio']})" if pair else f"{target}" + (f" + draft {request.draft.name}" if request.draft else ""))
    title = (f"pipeinfer-cpu netlab sweep, {what}, {config.stages} target stages, {config.n_tokens} tokens x "
             f"{len(config.prompts)} prompts, {config.wire_dtype} wire, median of {request.repeats}")
    how = (f"Each point: `--link bw=B,delay=D` on every pair of ranks (emulated in the transport), "
           f"{request.repeats} repeat(s), median; min-max: the repeats' range of decode tok/s.")
    if setup is not None:
        how += (f" PREDICTED: plan/predict.py with {request.calibration} (target) and "
                f"{request.draft_calibration or '-'} (draft: {setup.draft_token_s * 1e3:.2f} ms per drafted token), "
                f"acceptance {setup.acceptance:.2f}, every hop and the draft's link as the point's; "
                "error = (predicted - measured) / measured.")
    return {"title": title, "machine": machine_description(), "how": how, "pair": pair, "pair_label": label,
            "target": target, "n_tokens": config.n_tokens, "prompts": list(config.prompts), "repeats": request.repeats,
            "stages": config.stages, "threads": config.threads, "wire_dtype": config.wire_dtype,
            "calibration": str(request.calibration) if request.calibration else None,
            "draft_calibration": str(request.draft_calibration) if request.draft_calibration else None,
            "draft_token_ms": setup.draft_token_s * 1e3 if setup else None,
            "acceptance_for_prediction": setup.acceptance if setup else None, "sweep_command": request.command_line}
