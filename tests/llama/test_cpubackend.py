"""Choosing llama.cpp's CPU backend variant: pure decisions, and ggml's own score as the oracle."""

import ctypes
import json
import subprocess

import pytest

from pipeinfer_cpu.llama import cpubackend as C
from pipeinfer_cpu.llama.cpubackend import CpuInfo, NoUsableVariant, Variant

AVX2 = frozenset("sse4_2 avx f16c fma avx2 bmi2".split())
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni",
                 "avx512_bf16"}
AMX = AVX512 | {"amx_tile", "amx_int8", "avx_vnni"}


def variants(tmp_path, names=tuple(C.VARIANT_FEATURES)):
    return tuple(Variant(name, tmp_path / f"libggml-cpu-{name}.so") for name in names)


def always(ok_names=None):
    return lambda v: None if ok_names is None or v.name in ok_names else "killed by SIGILL"


def test_the_best_runnable_variant_wins_and_sub_avx2_variants_never_do(tmp_path):
    every = variants(tmp_path)
    assert [v.name for v in C.ranked_candidates(every, CpuInfo("old", AVX2))] == ["haswell"]
    assert C.choose_variant(every, CpuInfo("sapphire", AMX), None, always())[0].name == "sapphirerapids"
    ranked = [v.name for v in C.ranked_candidates(every, CpuInfo("zen4", AVX512))]
    assert ranked[0] == "zen4" and ranked[-1] == "haswell" and "sapphirerapids" not in ranked


def test_a_variant_that_fails_its_probe_is_skipped_and_named(tmp_path):
    variant, rejected = C.choose_variant(variants(tmp_path), CpuInfo("vm", AMX), None, always({"zen4", "haswell"}))
    assert variant.name == "zen4" and rejected == ("sapphirerapids (killed by SIGILL)",)


def test_a_cpu_without_avx2_is_one_line_naming_what_it_lacks(tmp_path):
    with pytest.raises(NoUsableVariant, match=r"lacks AVX2, BMI2; pipeinfer-cpu needs"):
        C.choose_variant(variants(tmp_path), CpuInfo("old", frozenset("sse4_2 avx f16c fma".split())), None,
                         always())


def test_when_every_candidate_fails_or_none_is_installed(tmp_path):
    with pytest.raises(NoUsableVariant, match="failed its test run: haswell"):
        C.choose_variant(variants(tmp_path), CpuInfo("cpu", AVX2), None, always(set()))
    with pytest.raises(NoUsableVariant, match="no variant .* is installed"):
        C.choose_variant(variants(tmp_path, ("x64", "sse42")), CpuInfo("cpu", AVX2), None, always())


def test_forced_variants(tmp_path):
    every = variants(tmp_path)
    assert C.choose_variant(every, CpuInfo("zen4", AVX512), "haswell", always())[0].name == "haswell"
    with pytest.raises(NoUsableVariant, match="needs AVX512.*which this CPU"):
        C.choose_variant(every, CpuInfo("old", AVX2), "skylakex", always())
    with pytest.raises(NoUsableVariant, match="'pentium' is not installed"):
        C.choose_variant(every, CpuInfo("old", AVX2), "pentium", always())
    with pytest.raises(NoUsableVariant, match="failed its test run"):
        C.choose_variant(every, CpuInfo("old", AVX2), "haswell", always(set()))


def test_cpuinfo_and_the_flags_override(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some  CPU\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\n")
    monkeypatch.delenv(C.CPU_FLAGS_ENV, raising=False)
    assert C.read_cpu(cpuinfo) == CpuInfo("Some CPU", frozenset({"fpu", "avx2", "fma"}))
    monkeypatch.setenv(C.CPU_FLAGS_ENV, "sse4_2,avx")
    assert C.read_cpu(cpuinfo).flags == {"sse4_2", "avx"}


def test_verdicts_are_probed_once_per_cpu_and_file(tmp_path):
    lib = tmp_path / "libggml-cpu-haswell.so"
    lib.write_bytes(b"x")
    probed = []
    cache = C.VerdictCache(tmp_path / "cache", CpuInfo("cpu", AVX2))
    verdict = cache.verdict_with(lambda v: probed.append(v.name) or "killed by SIGILL")
    assert verdict(Variant("haswell", lib)) == verdict(Variant("haswell", lib)) == "killed by SIGILL"
    assert probed == ["haswell"]
    other_cpu = C.VerdictCache(tmp_path / "cache", CpuInfo("cpu", AMX)).verdict_with(lambda v: probed.append(1))
    assert other_cpu(Variant("haswell", lib)) is None and len(probed) == 2


def test_our_scores_and_verdicts_match_ggml_on_the_installed_variants():
    """llama.cpp as the oracle: each installed variant's own ggml_backend_score() on this CPU."""
    from pipeinfer_cpu.llama.runtime import LIB_DIR

    installed = C.installed_variants(LIB_DIR)
    if not installed:
        pytest.skip("this llama.cpp was built without dynamic CPU backends")
    cpu = C.read_cpu()
    for variant in installed:
        ggml_score = ctypes.CDLL(str(variant.path)).ggml_backend_score()
        runnable = not C.missing_features(variant.features, cpu)
        assert ggml_score == (variant.score if runnable else 0), variant.name


def test_a_variant_that_dies_with_sigill_is_skipped_for_the_next_best(tmp_path, monkeypatch):
    """What an AMX VM does to the sapphirerapids variant, played by a variant that traps on load."""
    from pipeinfer_cpu.llama.runtime import LIB_DIR

    haswell = next((v for v in C.installed_variants(LIB_DIR) if v.name == "haswell"), None)
    if haswell is None:
        pytest.skip("this llama.cpp was built without dynamic CPU backends")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libggml-cpu-haswell.so").symlink_to(haswell.path)
    source = tmp_path / "trap.c"
    source.write_text("int ggml_backend_score(void) { return 4095; }\n"
                      "void *ggml_backend_init(void) { __builtin_trap(); return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(lib / "libggml-cpu-sapphirerapids.so")],
                   check=True)
    monkeypatch.setenv(C.CPU_FLAGS_ENV, " ".join(AMX))
    for _ in range(2):  # the second time from the cache
        variant, rejected, _ = C.select(lib, tmp_path / "cache", None)
        assert variant.name == "haswell" and rejected == ("sapphirerapids (killed by SIGILL)",)
    assert len(json.loads((tmp_path / "cache" / "cpu-variants.json").read_text())) == 2


def test_a_node_that_is_not_x86_64_is_refused_in_one_line(tmp_path):
    with pytest.raises(C.NoUsableVariant, match="this node is aarch64, not x86-64"):
        C.choose_variant(variants(tmp_path), CpuInfo("Neoverse-N1", frozenset(), "aarch64"), None, always())
