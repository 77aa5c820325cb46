"""Latency tables: how long each convolution of a model takes on the deployment CPU at the channel
counts pruning can leave, so a search can bound predicted latency as well as FLOPs.

FLOPs are a poor proxy on a CPU. On the 2-core AVX2 machine of docs/compress.md, a 3x3 conv at
32x32 takes 0.073 ms with 16 -> 16 channels, 0.058 ms with 16 -> 8 (half the FLOPs, 20% less time)
and 0.037 ms with 8 -> 16 (the same FLOPs, half the time): only a measurement knows where pruning
buys time.

The table is measured once per architecture and CPU (`pipeinfer-cpu compress latency-table`, tens
of seconds) and read by `search --latency-table` wherever the search runs (e.g. on a GPU host).
Prediction is the sum of the convolutions' times, each interpolated bilinearly in (input, output)
channels on the measured grid, plus the rest of the unpruned network (pooling, the classifier,
additions, layout conversions: its whole-model time less the convolutions), taken as fixed.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from compress.budget import LatencyFn
from compress.errors import CompressError
from compress.prune import PruneSpace

FORMAT = "compress-latency-table-v1"
MAX_GRID_POINTS = 9  # per channel axis; between grid points the time is interpolated


@dataclass(frozen=True)
class ConvShape:
    """A Conv2d layer of the unpruned model and the input size it sees."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    height: int
    width: int

    @property
    def depthwise(self) -> bool:
        """One filter per channel: pruning keeps in == out == groups."""
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass(frozen=True)
class LayerTimes:
    """Measured milliseconds of one layer shape on a grid of (input, output) channel counts; a
    depthwise layer has one axis (its output grid repeats its input grid)."""

    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]  # ms[i][j] at in_grid[i], out_grid[j]

    def at(self, in_channels: float, out_channels: float) -> float:
        i, fi = _bracket(self.in_grid, in_channels)
        j, fj = _bracket(self.out_grid, out_channels)
        m = self.ms
        top = m[i][j] * (1 - fj) + m[i][j + 1] * fj if fj else m[i][j]
        if not fi:
            return top
        bottom = m[i + 1][j] * (1 - fj) + m[i + 1][j + 1] * fj if fj else m[i + 1][j]
        return top * (1 - fi) + bottom * fi


@dataclass(frozen=True)
class LatencyTable:
    arch: str
    threads: int
    channel_multiple: int
    shapes: dict[str, ConvShape]  # layer name -> unpruned shape
    times: dict[str, LayerTimes]  # layer name -> measured grid
    other_ms: float  # the unpruned model's time outside its convolutions, assumed not to shrink
    machine: dict

    def predict_ms(self, channels: Mapping[str, tuple[int, int]]) -> float:
        """Predicted time of the model with the given (input, output) channels per conv layer;
        absent layers are unpruned."""
        total = self.other_ms
        for name, shape in self.shapes.items():
            cin, cout = channels.get(name, (shape.in_channels, shape.out_channels))
            total += self.times[name].at(cin, cout)
        return total

    def to_json(self) -> dict:
        return {"format": FORMAT, "arch": self.arch, "threads": self.threads,
                "channel_multiple": self.channel_multiple, "other_ms": self.other_ms,
                "machine": self.machine,
                "layers": {name: {"shape": asdict(self.shapes[name]), **_rounded(self.times[name])}
                           for name in self.shapes}}

    @classmethod
    def from_json(cls, data: dict, source: str = "latency table") -> "LatencyTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CompressError(f"{source} is not a latency table ({FORMAT})")
        try:
            layers = data["layers"]
            if not isinstance(layers, dict) or not layers:
                raise ValueError("no layers")
            shapes = {n: ConvShape(**v["shape"]) for n, v in layers.items()}
            times = {n: _layer_times(n, v) for n, v in layers.items()}
            other_ms = float(data["other_ms"])
            if not math.isfinite(other_ms) or other_ms < 0:
                raise ValueError(f"other_ms is {other_ms}")
            return cls(str(data["arch"]), int(data["threads"]), int(data["channel_multiple"]), shapes,
                       times, other_ms, dict(data.get("machine", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CompressError(f"{source} is malformed: {type(err).__name__}: {err}") from err


def _layer_times(name: str, entry: dict) -> LayerTimes:
    """One layer's entry of a table file, checked: increasing whole-number grids, and a finite,
    non-negative time at every grid point."""
    grids = []
    for key in ("in_grid", "out_grid"):
        grid = tuple(entry[key])
        if not grid or any(not isinstance(c, int) or c < 1 for c in grid) or list(grid) != sorted(set(grid)):
            raise ValueError(f"layer {name}: {key} must be increasing channel counts, got {list(grid)[:8]}")
        grids.append(grid)
    ms = tuple(tuple(float(x) for x in row) for row in entry["ms"])
    if len(ms) != len(grids[0]) or any(len(row) != len(grids[1]) for row in ms):
        raise ValueError(f"layer {name}: the times do not fill its channel grid")
    if not all(math.isfinite(x) and x >= 0 for row in ms for x in row):
        raise ValueError(f"layer {name}: times must be finite and >= 0")
    return LayerTimes(grids[0], grids[1], ms)


def _rounded(times: LayerTimes) -> dict:
    """To 0.1 microsecond, far below the timing noise, to keep the file small."""
    return {"in_grid": times.in_grid, "out_grid": times.out_grid,
            "ms": [[round(ms, 4) for ms in row] for row in times.ms]}


def _bracket(grid: tuple[int, ...], value: float) -> tuple[int, float]:
    """Index of the grid point at or below `value` and the fraction towards the next one; values
    outside the grid are clamped to its ends."""
    if value <= grid[0] or len(grid) == 1:
        return 0, 0.0
    if value >= grid[-1]:
        return len(grid) - 1, 0.0
    i = bisect.bisect_right(grid, value) - 1
    return i, (value - grid[i]) / (grid[i + 1] - grid[i])


def channel_grid(full: int, multiple: int, max_points: int = MAX_GRID_POINTS) -> tuple[int, ...]:
    """Channel counts to measure: every count pruning can leave (multiples of `multiple`, and the
    whole layer) when there are few, else `max_points` of them spread evenly."""
    counts = sorted({*range(multiple, full, multiple), full})
    if len(counts) <= max_points:
        return tuple(counts)
    picks = {round(i * (len(counts) - 1) / (max_points - 1)) for i in range(max_points)}
    return tuple(counts[i] for i in sorted(picks))


def conv_shapes(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, ConvShape]:
    """Every Conv2d of `model` with the spatial size of its input, from one forward pass."""
    shapes: dict[str, ConvShape] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(mod: nn.Conv2d, inputs, _out, name: str = name) -> None:
                _, _, h, w = inputs[0].shape
                shapes[name] = ConvShape(mod.in_channels, mod.out_channels, mod.kernel_size[0],
                                         mod.stride[0], _padding(mod), mod.groups, int(h), int(w))
            hooks.append(module.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(torch.zeros(*input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _padding(conv: nn.Conv2d) -> int:
    if isinstance(conv.padding, str):  # "same" with stride 1
        return conv.kernel_size[0] // 2 if conv.padding == "same" else 0
    return int(conv.padding[0])


def pruned_channels(space: PruneSpace, shapes: Mapping[str, ConvShape],
                    keep: Mapping[str, float]) -> dict[str, tuple[int, int]]:
    """(input, output) channels of each conv after pruning to `keep`. A layer loses, on each side,
    the channels dropped by every group that prunes that side (a concatenation's input sums several)."""
    kept = space.kept_channels(dict(keep))
    out: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        cin, cout = shape.in_channels, shape.out_channels
        for gi in space.layer_groups.get(name, ()):
            group = space.groups[gi]
            dropped = group.channels - kept[group.root]
            if name in group.out_layers:
                cout -= dropped
            if name in group.in_layers and not shape.depthwise:
                cin -= dropped
        out[name] = (cout, cout) if shape.depthwise else (cin, cout)
    return out


Timer = Callable[[ConvShape, int, int, int], float]  # (shape, in, out, threads) -> ms


def measure_table(model: nn.Module, arch: str, timer: Timer, whole_timer: Callable[[], float],
                  threads: int = 1, channel_multiple: int = 8, passes: int = 3, machine: dict | None = None,
                  input_shape: tuple[int, ...] = (1, 3, 32, 32), progress: bool = False) -> LatencyTable:
    """Time every conv shape of `model` on its channel grid with `timer` (layers of the same shape
    share one measurement), and the whole unpruned model with `whole_timer`. Everything is timed
    once per sweep and keeps its median over `passes` sweeps, so a burst of background load (or a
    lucky dip) in one sweep does not make the table; then no count is allowed to be cheaper than a
    smaller one (more channels never take less time; noise can say otherwise)."""
    shapes = conv_shapes(model, input_shape)
    if not shapes:
        raise CompressError(f"{arch} has no Conv2d layers to time")
    grids = {s: _grids(s, channel_multiple) for s in dict.fromkeys(shapes.values())}
    points = [(s, cin, cout) for s, (in_grid, out_grid) in grids.items()
              for cin in in_grid for cout in (out_grid if not s.depthwise else (cin,))]
    seen: dict[tuple[ConvShape, int, int], list[float]] = {p: [] for p in points}
    wholes = []
    bar = tqdm(total=passes * len(points), desc="latency table", disable=not progress, leave=False)
    for _ in range(passes):
        wholes.append(whole_timer())
        for point in points:
            seen[point].append(timer(*point, threads))
            bar.update()
    bar.close()
    whole_ms = statistics.median(wholes)
    times = {}
    for s, (in_grid, out_grid) in grids.items():
        rows = [[statistics.median(seen[(s, cin, cin if s.depthwise else cout)]) for cout in out_grid]
                for cin in in_grid]
        times[s] = LayerTimes(in_grid, out_grid, _non_decreasing(rows))
    per_layer = {n: times[s] for n, s in shapes.items()}
    conv_ms = sum(per_layer[n].at(s.in_channels, s.out_channels) for n, s in shapes.items())
    return LatencyTable(arch, threads, channel_multiple, shapes, per_layer, max(0.0, whole_ms - conv_ms),
                        dict(machine or {}))


def _non_decreasing(rows: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    """Running maximum along both channel axes."""
    out = [list(row) for row in rows]
    for i, row in enumerate(out):
        for j in range(len(row)):
            row[j] = max(row[j], row[j - 1] if j else 0.0, out[i - 1][j] if i else 0.0)
    return tuple(tuple(row) for row in out)


def _grids(shape: ConvShape, multiple: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    in_grid = channel_grid(shape.in_channels, multiple)
    return in_grid, (in_grid if shape.depthwise else channel_grid(shape.out_channels, multiple))


def onnxruntime_timer(runs: int = 200) -> Timer:
    """Times one conv with onnxruntime (batch 1); pruned depthwise layers keep groups == channels."""
    from compress.export import conv_latency

    def time_conv(shape: ConvShape, cin: int, cout: int, threads: int) -> float:
        groups = cin if shape.depthwise else shape.groups
        return conv_latency(cin, cout, shape.kernel, shape.stride, shape.padding, groups, shape.height,
                            shape.width, threads=threads, runs=runs)

    return time_conv


def load_table(path: str | Path, layer_shapes: Mapping[str, ConvShape], arch: str,
               channel_multiple: int) -> LatencyTable:
    """Read a table and check it describes this model (same conv layers and shapes) and covers the
    channel counts a search with `channel_multiple` can leave."""
    from compress.store import read_json

    table = LatencyTable.from_json(read_json(path), str(path))
    if table.arch != arch:
        raise CompressError(f"{path} was measured for {table.arch}, not for {arch}")
    if dict(table.shapes) != dict(layer_shapes):
        raise CompressError(f"{path} does not match this {arch} model: its conv layers or their shapes differ")
    if channel_multiple % table.channel_multiple:
        raise CompressError(f"{path} was measured for channel counts in multiples of {table.channel_multiple}; "
                            f"a search with multiples of {channel_multiple} would leave counts it never timed")
    return table


def latency_predictor(table: LatencyTable, space: PruneSpace) -> LatencyFn:
    """keep ratios -> predicted ms."""
    return lambda keep: table.predict_ms(pruned_channels(space, table.shapes, keep))


def load_predictor(path: str | Path, model: nn.Module, space: PruneSpace, arch: str) -> LatencyFn:
    """The latency predictor of the table at `path`, checked against `model` and its pruning space."""
    return latency_predictor(load_table(path, conv_shapes(model), arch, space.channel_multiple), space)


def measure_model(model: nn.Module, arch: str, threads: int = 1, channel_multiple: int = 8, passes: int = 3,
                  progress: bool = False) -> LatencyTable:
    """The latency table of an unpruned model on this CPU with onnxruntime (the whole model is
    exported once to time what lies outside its convolutions)."""
    import tempfile

    from compress.export import benchmark, export_onnx, machine_info

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / f"{arch}.onnx")
        return measure_table(model, arch, onnxruntime_timer(), lambda: benchmark(path, threads).median_ms,
                             threads, channel_multiple, passes, machine_info(), progress=progress)
