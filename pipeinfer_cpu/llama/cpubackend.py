"""Which variant of llama.cpp's CPU backend this process runs, and why.

The install builds llama.cpp once with every x86-64 variant of its CPU backend as a loadable module
(`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`, the way llama.cpp's own releases ship), so the same
installed files run on every node of a mixed cluster, each with the best kernels its CPU offers.

ggml on its own loads the variant with the highest score among those whose instructions `cpuid`
reports, but its check does not ask the operating system (a FIXME in ggml-cpu's cpu-feats.cpp): on
a VM that reports AMX, the AMX variant dies with SIGILL at its first `tilezero`. So a candidate is
trusted only after a short-lived subprocess has loaded it and decoded a batch with it; candidates
are tried best first and each verdict is cached per CPU and per installed file.

Everything here but `probe_variant` and `VerdictCache` is pure; llama/runtime.py does the loading, llama/probe.py the probing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_write_text

# ggml's feature names -> the /proc/cpuinfo flags ggml-cpu's x86 score function checks for each.
FEATURE_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",), "AVX": ("avx",), "F16C": ("f16c",), "FMA": ("fma",), "AVX2": ("avx2",),
    "BMI2": ("bmi2",), "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",), "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",), "AMX_INT8": ("amx_int8",),
}

# The bit each feature adds to a variant's score in ggml_backend_cpu_x86_score (base score 1).
SCORE_BITS: dict[str, int] = {"FMA": 0, "F16C": 1, "SSE42": 2, "BMI2": 3, "AVX": 4, "AVX2": 5, "AVX_VNNI": 6,
                              "AVX512": 7, "AVX512_VBMI": 8, "AVX512_BF16": 9, "AVX512_VNNI": 10, "AMX_INT8": 11}

# ggml/src/CMakeLists.txt of the pinned llama.cpp: the x86 variants GGML_CPU_ALL_VARIANTS builds.
_BASE = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
_512 = _BASE + ("AVX512",)
VARIANT_FEATURES: dict[str, tuple[str, ...]] = {
    "x64": (), "sse42": ("SSE42",), "sandybridge": ("SSE42", "AVX"), "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": _BASE,
    "skylakex": _512,
    "cannonlake": _512 + ("AVX512_VBMI",),
    "cascadelake": _512 + ("AVX512_VNNI",),
    "icelake": _512 + ("AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": _512 + ("AVX512_VNNI", "AVX512_BF16"),
    "zen4": _512 + ("AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    "alderlake": _BASE + ("AVX_VNNI",),
    "sapphirerapids": _512 + ("AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8"),
}

# What every node needs: the variants below Haswell are built by llama.cpp but never chosen here
# (decoding a quantised model without AVX2 is several times slower, and a pipeline runs at the
# pace of its slowest stage).
REQUIRED = _BASE
LOWEST = "haswell"
VARIANT_PREFIX = "libggml-cpu-"
PROBE_TIMEOUT_S = 30.0
VARIANT_ENV = "PIPEINFER_CPU_VARIANT"  # the default of --cpu-variant
CPU_FLAGS_ENV = "PIPEINFER_CPU_FLAGS"  # replaces /proc/cpuinfo's flags: simulates another CPU


class NoUsableVariant(UserError):
    """No variant of the CPU backend can run on this machine; the message says what is missing."""


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    machine: str = "x86_64"  # platform.machine()

    @property
    def key(self) -> str:
        """Identifies the CPU (and the flags it reports) in the verdict cache."""
        text = self.model + "|" + " ".join(sorted(self.flags))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path

    @property
    def features(self) -> tuple[str, ...]:
        return VARIANT_FEATURES[self.name]

    @property
    def score(self) -> int:
        return variant_score(self.features)


@dataclass(frozen=True)
class BackendReport:
    """What one process runs: reported by every rank at start-up (`--verbose`, `--stats-json`)."""

    cpu: str
    variant: str  # a variant name, or "built-in" for a llama.cpp built without dynamic backends
    features: tuple[str, ...]  # what the loaded backend says it uses (ggml_backend_get_features)
    rejected: tuple[str, ...] = ()  # better variants that failed their probe, with the reason
    forced: bool = False

    def summary(self) -> str:
        why = "forced" if self.forced else "auto"
        skipped = f"; skipped {', '.join(self.rejected)}" if self.rejected else ""
        return f"{self.cpu}: CPU backend {self.variant} ({why}{skipped}); features {' '.join(self.features)}"

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "variant": self.variant, "features": list(self.features),
                "rejected": list(self.rejected), "forced": self.forced}

    @staticmethod
    def from_json(data: dict) -> "BackendReport":
        return BackendReport(data["cpu"], data["variant"], tuple(data["features"]), tuple(data["rejected"]),
                             bool(data["forced"]))


# -- pure decisions ---------------------------------------------------------------------------------

def variant_score(features: Iterable[str]) -> int:
    """ggml's score for a variant built with `features` on a CPU that has them all."""
    return 1 + sum(1 << SCORE_BITS[f] for f in features if f in SCORE_BITS)


def missing_features(features: Iterable[str], cpu: CpuInfo) -> tuple[str, ...]:
    return tuple(f for f in features if not all(flag in cpu.flags for flag in FEATURE_FLAGS[f]))


def variant_dirs(lib_dir: Path) -> tuple[Path, ...]:
    """Where an install puts the variants: beside libllama, or in the install prefix's bin/
    (site-packages/bin: where ggml installs them in a llama-cpp-python wheel, the Makefile's build)."""
    return lib_dir, lib_dir.parent.parent / "bin"


def installed_variants(lib_dir: Path) -> tuple[Variant, ...]:
    """The known variants present as `libggml-cpu-NAME.so` where llama-cpp-python installs them."""
    found: dict[str, Variant] = {}
    for folder in variant_dirs(lib_dir):
        for path in sorted(folder.glob(f"{VARIANT_PREFIX}*.so")):
            name = path.name[len(VARIANT_PREFIX):-len(".so")]
            if name in VARIANT_FEATURES and name not in found:
                found[name] = Variant(name, path)
    return tuple(sorted(found.values(), key=lambda v: v.name))


def ranked_candidates(variants: Iterable[Variant], cpu: CpuInfo) -> list[Variant]:
    """The variants this CPU can run (AVX2 or better), best (highest ggml score) first."""
    runnable = [v for v in variants if set(REQUIRED) <= set(v.features) and not missing_features(v.features, cpu)]
    return sorted(runnable, key=lambda v: v.score, reverse=True)


def choose_variant(variants: tuple[Variant, ...], cpu: CpuInfo, forced: str | None,
                   verdict: Callable[[Variant], str | None]) -> tuple[Variant, tuple[str, ...]]:
    """The variant to load and the better ones rejected on the way ("name (reason)").

    `verdict(v)` is None when `v` passed its probe, else why it failed. Raises NoUsableVariant.
    """
    if cpu.machine not in X86_64:
        # Only x86-64 nodes have been verified to split bit-exactly; other CPUs' kernels may sum rows
        # differently, so a mixed cluster could silently compute another model.
        raise NoUsableVariant(f"this node is {cpu.machine}, not x86-64: pipeinfer-cpu's stages are verified on "
                              "x86-64 CPUs only so far")
    if forced:
        return _forced_variant(variants, cpu, forced, verdict), ()
    missing = missing_features(REQUIRED, cpu)
    if missing:
        raise NoUsableVariant(f"this CPU ({cpu.model}) lacks {', '.join(missing)}; pipeinfer-cpu needs an "
                              f"x86-64 CPU with {', '.join(REQUIRED)} (Intel Haswell, AMD Excavator or newer)")
    rejected = []
    for variant in ranked_candidates(variants, cpu):
        reason = verdict(variant)
        if reason is None:
            return variant, tuple(rejected)
        rejected.append(f"{variant.name} ({reason})")
    if not rejected:
        raise NoUsableVariant(f"no variant of llama.cpp's CPU backend is installed for this CPU ({cpu.model}); "
                              "reinstall with the README's command (it builds all of them)")
    raise NoUsableVariant(f"every CPU backend variant for this CPU ({cpu.model}) failed its test run: "
                          f"{', '.join(rejected)}")


def _forced_variant(variants, cpu, name, verdict) -> Variant:
    chosen = next((v for v in variants if v.name == name), None)
    if chosen is None:
        names = ", ".join(v.name for v in variants) or "none"
        raise NoUsableVariant(f"CPU backend variant {name!r} is not installed (installed: {names})")
    missing = missing_features(chosen.features, cpu)
    if missing:
        raise NoUsableVariant(f"CPU backend variant {name} needs {', '.join(missing)}, which this CPU "
                              f"({cpu.model}) lacks")
    reason = verdict(chosen)
    if reason is not None:
        raise NoUsableVariant(f"CPU backend variant {name} failed its test run on this CPU ({cpu.model}): {reason}")
    return chosen


# -- the machine ---------------------------------------------------------------------------------

def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This CPU's model name and flags (PIPEINFER_CPU_FLAGS, if set, replaces the flags)."""
    model, flags = "unknown CPU", frozenset()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
            model = " ".join(value.split())
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        flags = frozenset(override.replace(",", " ").split())
    return CpuInfo(model, flags, platform.machine())


X86_64 = ("x86_64", "AMD64", "amd64")
KILLED = "killed by"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"{KILLED} {signal.Signals(-returncode).name}"
        except ValueError:
            return f"{KILLED} signal {-returncode}"
    return f"exit code {returncode}"


def probe_variant(variant: Variant) -> str | None:
    """Load `variant` in a fresh process and decode a batch with it: None if that worked, else why not."""
    command = [sys.executable, "-m", "pipeinfer_cpu.llama.probe", str(variant.path)]
    env = {k: v for k, v in os.environ.items() if k != VARIANT_ENV}  # the probe loads just this one
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        return f"{KILLED} its {PROBE_TIMEOUT_S:.0f} s time limit"
    if done.returncode == 0:
        return None
    if done.returncode > 0:  # the probe said why in its last line
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:]
        return last[0] if last else describe_exit(done.returncode)
    return describe_exit(done.returncode)


class VerdictCache:
    """Probe verdicts per (CPU, installed variant file), in one JSON file; a lock file serialises the
    ranks of one host that start together, so each variant is probed once per machine."""

    def __init__(self, cache_dir: Path, cpu: CpuInfo) -> None:
        self.path = cache_dir / "cpu-variants.json"
        self.cpu = cpu

    def _key(self, variant: Variant) -> str:
        stat = variant.path.stat()
        return f"{self.cpu.key}:{variant.path}:{stat.st_size}:{stat.st_mtime_ns}"

    def verdict_with(self, probe: Callable[[Variant], str | None]) -> Callable[[Variant], str | None]:
        def verdict(variant: Variant) -> str | None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                known = self._read()
                key = self._key(variant)
                if key in known:
                    return None if known[key] == "ok" else known[key]
                reason = probe(variant)
                if reason is None or reason.startswith(KILLED):  # a crash says something about this CPU;
                    known[key] = reason or "ok"                  # an error may not: probe again next time
                    self._write(known)
            return reason
        return verdict

    def _read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self, known: dict[str, str]) -> None:
        atomic_write_text(self.path, json.dumps(known, indent=1))


def select(lib_dir: Path, cache_dir: Path, forced: str | None) -> tuple[Variant, tuple[str, ...], CpuInfo]:
    """The variant this process should load (probing untried candidates, with cached verdicts)."""
    cpu = read_cpu()
    verdict = VerdictCache(cache_dir, cpu).verdict_with(probe_variant)
    variant, rejected = choose_variant(installed_variants(lib_dir), cpu, forced, verdict)
    return variant, rejected, cpu
