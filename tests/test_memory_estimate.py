"""The memory estimate of a model swap: the GGUF header reader on the real model files, KV sizing, fitting."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.llamacpp import LlamaCppSettings
from backends.memory_estimate import (
    MB,
    GGUFHeaderError,
    MemoryEstimate,
    available_bytes,
    check_fits,
    estimate,
    model_shape,
    read_metadata,
)
from backends.model_files import ModelFileError

POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


def policy_backend(name: str, **changes: Any) -> LlamaCppSettings:
    """A default-policy backend as one sequence (what a plain Llama loads), unless `changes` say otherwise."""
    entry = yaml.safe_load(POLICY.read_text())["backends"][name]
    return LlamaCppSettings.model_validate({**entry, "parallel": 1, **changes})


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A policy backend's estimate next to what llama.cpp reports after really loading it."""

    estimate: MemoryEstimate
    n_layer: int
    n_vocab: int
    metadata: dict[str, str]
    kv_buffer_mib: float  # from llama.cpp's own load log


@pytest.fixture(scope="module", params=["smol", "gemma"])
def loaded(request: pytest.FixtureRequest) -> Loaded:
    import llama_cpp

    settings = policy_backend(request.param, n_ctx=512, logprobs=False)
    guess = estimate(settings, request.param)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # verbose: llama-cpp-python prints llama.cpp's log to sys.stderr
        llama = llama_cpp.Llama(model_path=str(guess.path), n_ctx=settings.n_ctx, n_threads=2, verbose=True)
    try:
        kv_mib = sum(float(size) for size in re.findall(r"KV buffer size\s*=\s*([\d.]+) MiB", log.getvalue()))
        return Loaded(
            guess, int(llama_cpp.llama_model_n_layer(llama.model)), llama.n_vocab(), dict(llama.metadata), kv_mib
        )
    finally:
        llama.close()


def test_header_matches_what_llama_cpp_loads(loaded: Loaded) -> None:
    shape = loaded.estimate.shape
    arch = loaded.metadata["general.architecture"]
    assert shape.architecture == arch
    assert (shape.n_layer, shape.n_vocab) == (loaded.n_layer, loaded.n_vocab)
    assert str(shape.n_head) == loaded.metadata[f"{arch}.attention.head_count"]
    header = read_metadata(loaded.estimate.path)
    # llama.cpp's metadata map holds the scalar keys as text; every one the reader kept must agree with it.
    compared = 0
    for key, text in loaded.metadata.items():
        value = header.get(key)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            assert str(value) == text, key
            compared += 1
    assert compared >= 8


def test_kv_estimate_is_the_buffer_llama_cpp_allocates(loaded: Loaded) -> None:
    assert loaded.kv_buffer_mib > 0
    assert loaded.estimate.kv_cache_bytes / 2**20 == pytest.approx(loaded.kv_buffer_mib, abs=0.01)


def test_kv_bytes_grow_linearly_with_n_ctx() -> None:
    sizes = {n_ctx: estimate(policy_backend("smol", n_ctx=n_ctx)).kv_cache_bytes for n_ctx in (1024, 2048, 8192)}
    assert sizes[2048] == 2 * sizes[1024]
    assert sizes[8192] == 8 * sizes[1024]
    shape = estimate(policy_backend("smol")).shape
    assert sizes[1024] == 1024 * shape.n_layer * (shape.n_embd_k_gqa + shape.n_embd_v_gqa) * 2  # f16, no SWA
    # llama.cpp rounds n_ctx up to 256: 1000 costs what 1024 does.
    assert estimate(policy_backend("smol", n_ctx=1000)).kv_cache_bytes == sizes[1024]


def test_logprobs_keep_every_position_logits() -> None:
    with_logprobs = estimate(policy_backend("smol", logprobs=True))
    without = estimate(policy_backend("smol", logprobs=False))
    assert without.logits_bytes == 0
    assert with_logprobs.logits_bytes == (2048 + 2 * 512) * with_logprobs.shape.n_vocab * 4
    assert with_logprobs.total_bytes - without.total_bytes == with_logprobs.logits_bytes


def gguf_prefix(*, version: int = 3, tensors: int = 0, pairs: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, pairs)


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 not a model", "is not a GGUF file (starts with b'PK\\x03\\x04', expected b'GGUF')"),
        (
            gguf_prefix(version=1),
            "GGUF version 1 is not supported (2 or 3; a big-endian file reads as huge) (at byte 8",
        ),
        (gguf_prefix(tensors=2**40), "tensor count 1099511627776 is beyond any real model's (limit 1000000)"),
        (gguf_prefix(pairs=10**9), "metadata count 1000000000 is beyond any real model's (limit 100000)"),
        (gguf_prefix() + struct.pack("<Q", 2**20), "string length 1048576 is beyond any real model's (limit 65535)"),
        (gguf_prefix() + gguf_string(b"general.name") + struct.pack("<I", 42), "unknown value type 42"),
        (
            gguf_prefix() + gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 10**9),
            "array length 1000000000 is beyond any real model's (limit 16000000)",
        ),
        (gguf_prefix() + gguf_string(b"general.name") + struct.pack("<IQ", 8, 500) + b"short", "header truncated"),
    ],
    ids=["not-gguf", "version", "tensors", "pairs", "key-length", "value-type", "array-length", "truncated"],
)
def test_bad_files_are_refused_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as raised:
        read_metadata(path)
    assert str(raised.value).startswith(str(path))
    assert message in str(raised.value)


def test_a_real_file_cut_short_is_truncated_not_misread(tmp_path: Path) -> None:
    source = estimate(policy_backend("smol")).path
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source.read_bytes()[:100_000])  # inside the token list
    with pytest.raises(GGUFHeaderError, match=r"cut\.gguf: header truncated"):
        model_shape(cut)


def test_a_header_without_layer_counts_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    arch = gguf_string(b"general.architecture") + struct.pack("<I", 8) + gguf_string(b"llama")
    path.write_bytes(gguf_prefix(pairs=1) + arch)
    with pytest.raises(GGUFHeaderError, match=r"metadata 'llama.block_count' is None, expected a positive integer"):
        model_shape(path)


def meminfo_total(path: Path = Path("/proc/meminfo")) -> int:
    line = next(line for line in path.read_text().splitlines() if line.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


def test_available_bytes_is_what_this_machine_has() -> None:
    available = available_bytes()
    assert 0 < available <= meminfo_total()


def test_a_cgroup_limit_lower_than_the_machine_wins(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemAvailable:   6000000 kB\n")
    cgroups = tmp_path / "cgroup"
    (cgroups / "tiergate").mkdir(parents=True)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/tiergate\n")
    assert available_bytes(meminfo, proc, cgroups) == 6_000_000 * 1024  # no limit files: MemAvailable
    (cgroups / "tiergate" / "memory.max").write_text("max\n")
    (cgroups / "tiergate" / "memory.current").write_text("1000\n")
    assert available_bytes(meminfo, proc, cgroups) == 6_000_000 * 1024  # "max": no limit
    (cgroups / "tiergate" / "memory.max").write_text(f"{2 * 1024**3}\n")
    (cgroups / "tiergate" / "memory.current").write_text(f"{512 * 1024**2}\n")
    assert available_bytes(meminfo, proc, cgroups) == 2 * 1024**3 - 512 * 1024**2
    (cgroups / "memory.max").write_text(f"{1024**3}\n")  # a tighter parent limit applies too
    (cgroups / "memory.current").write_text(f"{768 * 1024**2}\n")
    assert available_bytes(meminfo, proc, cgroups) == 256 * 1024**2


def test_a_cgroup_v1_memory_limit_counts_too(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemAvailable:   6000000 kB\n")
    group = tmp_path / "cgroup" / "memory" / "jobs" / "one"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{3 * 1024**3}\n")
    (group / "memory.usage_in_bytes").write_text(f"{1024**3}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/jobs/one\n1:cpu:/\n")
    assert available_bytes(meminfo, proc, tmp_path / "cgroup") == 2 * 1024**3


def sized(name: str, weights: int, kv: int, logits: int, overhead: int, n_ctx: int = 8192) -> MemoryEstimate:
    real = estimate(policy_backend("gemma"))
    return dataclasses.replace(
        real, name=name, n_ctx=n_ctx, weights_bytes=weights, kv_cache_bytes=kv, logits_bytes=logits,
        overhead_bytes=overhead,
    )  # fmt: skip


def test_check_fits_says_nothing_when_it_fits() -> None:
    gemma = estimate(policy_backend("gemma"), "gemma")
    assert check_fits([gemma], gemma.total_bytes, headroom_fraction=0) is None
    assert check_fits([gemma], 2 * gemma.total_bytes, headroom_fraction=0.5) is None
    assert check_fits([], 0, headroom_fraction=0.1) is None


def test_check_fits_explains_a_refusal() -> None:
    gemma = sized("gemma", 253 * MB, 240 * MB, 0, 20 * MB)
    assert check_fits([gemma], 300 * MB, headroom_fraction=0) == (
        "loading 'gemma' next to the running models needs about 513 MB "
        "(model file 253 MB + KV cache 240 MB for n_ctx 8192 + 20 MB buffers); 300 MB is available"
    )
    # 570 MB less 10% is exactly the 513 MB needed; 569 MB is not enough once the headroom is kept.
    assert check_fits([gemma], 570 * MB, headroom_fraction=0.1) is None
    assert check_fits([gemma], 569 * MB, headroom_fraction=0.1) == (
        "loading 'gemma' next to the running models needs about 513 MB "
        "(model file 253 MB + KV cache 240 MB for n_ctx 8192 + 20 MB buffers); 569 MB is available "
        "and 10% of it is kept as headroom"
    )


def test_check_fits_names_every_backend_being_built() -> None:
    smol = sized("smol", 100 * MB, 50 * MB, 500 * MB, 70 * MB, n_ctx=2048)
    gemma = sized("gemma", 253 * MB, 240 * MB, 0, 20 * MB)
    assert check_fits([smol, gemma], 1000 * MB, headroom_fraction=0) == (
        "loading 'smol', 'gemma' next to the running models needs about 1233 MB "
        "(smol: model file 100 MB + KV cache 50 MB for n_ctx 2048 + logprobs buffer 500 MB + 70 MB buffers; "
        "gemma: model file 253 MB + KV cache 240 MB for n_ctx 8192 + 20 MB buffers); 1000 MB is available"
    )


def test_parallel_sequences_each_get_n_ctx_cells() -> None:
    one = estimate(policy_backend("smol", n_ctx=1024, logprobs=False))
    four = estimate(policy_backend("smol", n_ctx=1024, logprobs=False, parallel=4))
    # The batch context's four streams of 1024 cells and the 256-cell self-test context: what llama.cpp logged
    # for them (90.00 MiB + 5.62 MiB, llama-cpp-python 0.3.36).
    assert four.kv_cache_bytes == 4 * one.kv_cache_bytes + one.kv_cache_bytes // 4
    assert four.kv_cache_bytes / 2**20 == pytest.approx(95.625)
    assert "KV cache 100 MB for n_ctx 1024 x 4 sequences" in four.describe()
    # logprobs: read from each sampled row, not an n_ctx x vocab buffer
    with_logprobs = estimate(policy_backend("smol", n_ctx=1024, logprobs=True, parallel=4))
    assert with_logprobs.logits_bytes == 5 * with_logprobs.shape.n_vocab * 4
