"""Files: atomic writes (pipeinfer_cpu.files, with compress's one-line errors) and checkpoints that
know their architecture and, when pruned, the channel counts needed to rebuild their shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compress.errors import CheckpointError, CompressError
from compress.models import build_model
from compress.prune import build_space, prune_to_counts
from pipeinfer_cpu import files

FORMAT = "compress-checkpoint-v1"
AGENT_FORMAT = "compress-agent-v1"


def check_writable(path: str | Path) -> None:
    """Fail now, not after minutes of work, if `path` cannot be written: one CompressError. Folders
    created for the probe are removed again."""
    path = Path(path)
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    try:
        files.temporary_beside(path).unlink()
    except OSError as err:
        raise CompressError(f"cannot write {path}: {err.strerror or err}") from err
    for folder in missing:
        folder.rmdir()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """pipeinfer_cpu.files.atomic_write, with a folder that cannot be written reported as one
    CompressError (checked first) rather than an OSError's traceback."""
    check_writable(path)
    return files.atomic_write(path, write)


def write_json(path: str | Path, obj: Any) -> Path:
    def _write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
    return atomic_write(path, _write)


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CompressError(f"cannot read {path}: {err}") from err


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, kept: dict[str, int] | None = None,
                    meta: dict[str, Any] | None = None, half: bool = True) -> Path:
    """Save weights (fp16 by default, to stay small) with the architecture and pruned counts."""
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, "arch": arch, "kept": kept, "meta": meta or {}, "state_dict": state}
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


def save_agent(path: str | Path, snapshot: dict[str, Any], arch: str, method: str, target: float,
               channel_multiple: int) -> Path:
    """A searched policy network (`PPOAgent.snapshot`) with the architecture it was searched on."""
    blob = {"format": AGENT_FORMAT, "arch": arch, "method": method, "target": target,
            "channel_multiple": channel_multiple, **snapshot}
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


def _load(path: str | Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{what} not found: {path}") from err
    except Exception as err:  # torch raises pickle/zip/runtime errors for damaged files
        raise CheckpointError(f"cannot read {what} {path}: {type(err).__name__}") from err


def load_agent(path: str | Path) -> dict[str, Any]:
    blob = _load(path, "agent file")
    if not isinstance(blob, dict) or blob.get("format") != AGENT_FORMAT:
        raise CheckpointError(f"{path} is not a searched agent (search_<method>.agent.pt)")
    return blob


def load_checkpoint(path: str | Path, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (possibly pruned) model of a checkpoint; `arch`, when given, must match."""
    blob = _load(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a compress checkpoint")
    if arch is not None and blob["arch"] != arch:
        raise CheckpointError(f"checkpoint {path} is for {blob['arch']}, not {arch}")
    model = build_model(blob["arch"]).eval()
    if blob.get("kept"):
        model = prune_to_counts(model, build_space(model), blob["kept"], use_order=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit {blob['arch']}: {first}") from err
    return model.eval(), {"arch": blob["arch"], "kept": blob.get("kept"), "meta": blob.get("meta", {})}
