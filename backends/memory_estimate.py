"""What a llamacpp backend will hold in memory, read from its GGUF header and settings, and whether it fits."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backends.model_files import ModelFileError, check_gguf, resolve

if TYPE_CHECKING:  # only read here; importing the backend would pull its decoding stack into the reload path
    from backends.llamacpp import LlamaCppSettings

MB = 1_000_000
SELF_TEST_N_CTX = 256  # parallel > 1: the context the constrained self-test runs in (backends/llamacpp.py)

# Bounds on what a header may claim, so that a corrupt or hostile file is refused instead of read for minutes:
# the largest real vocabularies have ~260k tokens (Gemma 3) and merges lists ~500k entries.
MAX_KV_PAIRS = 100_000
MAX_TENSORS = 1_000_000
MAX_ARRAY_ITEMS = 16_000_000
MAX_KEY_BYTES = 65_535  # the GGUF spec's own limit for keys
MAX_STRING_BYTES = 64 * 1024 * 1024  # chat templates are kilobytes; this is far above any real one
MAX_HEADER_BYTES = 256 * 1024 * 1024  # the metadata part only; tensor data is never read

F16_BYTES = 2  # llama.cpp's default KV cache type; LlamaCppSettings exposes no type_k/type_v to change it
F32_BYTES = 4
KV_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256 (llama-context.cpp, GGML_PAD(n_ctx, 256))

# What llama.cpp and llama-cpp-python hold besides weights, KV cache and logprobs logits, calibrated with
# bench/model_memory.py (RSS increase after a prompt filling the context; llama-cpp-python 0.3.36, CPU, 2 cores):
#   measured - weights - KV - logits:  SmolLM2 ~150 MB at n_ctx 2048, ~270 MB at 8192 (logprobs on);
#                                      Gemma 3 ~108 MB at n_ctx 2048, ~220 MB at 8192.
# Three parts explain it. Attention scratch: without flash attention (llama-cpp-python's default, kept by
# tiergate) a batch's scores are f32 n_head x n_ubatch x n_ctx; Gemma's growth with n_ctx needs two such
# matrices (scores and their softmax), SmolLM2's one: two are counted, so SmolLM2 is overestimated by ~7%.
# The vocabulary's tables (token texts, maps): Gemma's 262k tokens cost ~65 MB more than SmolLM2's 49k.
# And a small constant. llama.cpp's "compute buffer" (514 MiB for Gemma) is mostly the logits of a whole
# batch, malloc'd but never touched unless logprobs are on, so it is not counted.
OVERHEAD_BYTES = 16 * MB
VOCAB_BYTES_PER_TOKEN = 320
ATTENTION_SCRATCH_COPIES = 2


class GGUFHeaderError(ModelFileError):
    """The GGUF header is truncated, corrupt or claims sizes no real model has."""


# GGUF value types (gguf.md): fixed-size scalars by struct code; 8 = string, 9 = array.
_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

Value = int | float | bool | str | list[int] | list[float] | list[bool] | None


@dataclass(frozen=True)
class ArraySummary:
    """An array value kept as its length only (token lists are large and the estimate needs only their count)."""

    length: int


class _Reader:
    """Reads a mapped file by offset: only the header's pages are ever faulted in, never the tensor data."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0
        self.end = min(len(data), MAX_HEADER_BYTES)

    def fail(self, what: str) -> GGUFHeaderError:
        return GGUFHeaderError(f"{self.path}: {what} (at byte {self.pos} of {len(self.data)})")

    def skip(self, count: int) -> None:
        if self.pos + count > self.end:
            raise self.fail(f"header truncated or larger than {MAX_HEADER_BYTES // MB} MB: needs {count} more bytes")
        self.pos += count

    def take(self, count: int) -> bytes:
        start = self.pos
        self.skip(count)
        return self.data[start : self.pos]

    def scalar(self, code: str) -> int | float | bool:
        start = self.pos
        self.skip(struct.calcsize(code))
        value: int | float | bool = struct.unpack_from("<" + code, self.data, start)[0]
        return value

    def count(self, limit: int, what: str) -> int:
        value = int(self.scalar("Q"))
        if value > limit:
            raise self.fail(f"{what} {value} is beyond any real model's (limit {limit})")
        return value

    def string(self, limit: int = MAX_STRING_BYTES) -> str:
        length = self.count(limit, "string length")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.fail("a string is not UTF-8") from error

    def skip_strings(self, count: int) -> None:
        """Step over `count` strings: a vocabulary has 50k-260k, so this loop is kept tight (no per-string call)."""
        length_at = struct.Struct("<Q").unpack_from
        pos, end, data = self.pos, self.end, self.data
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + length_at(data, pos)[0]
            if pos > end:
                break
        else:
            self.pos = pos
            return
        self.pos = min(pos, end)
        raise self.fail("header truncated: a string list runs past the end")

    def value(self, kind: int) -> Value | ArraySummary:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise self.fail(f"unknown value type {kind}")
        item_kind = int(self.scalar("I"))
        length = self.count(MAX_ARRAY_ITEMS, "array length")
        # Small numeric arrays are kept: some architectures give head counts per layer as an array.
        if item_kind in _SCALARS and length <= 4096:
            code = _SCALARS[item_kind]
            items = struct.unpack(f"<{length}{code}", self.take(length * struct.calcsize(code)))
            return list(items)
        if item_kind in _SCALARS:
            self.skip(length * struct.calcsize(_SCALARS[item_kind]))
        elif item_kind == _STRING:
            self.skip_strings(length)
        else:
            raise self.fail(f"array of value type {item_kind} is not read")  # nested arrays: no model uses them
        return ArraySummary(length)


def read_metadata(path: Path) -> dict[str, Value | ArraySummary]:
    """The key-value metadata of a GGUF file (version 2 or 3), without reading tensor infos or data."""
    check_gguf(path)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = _Reader(data, path)
        reader.take(4)
        version = int(reader.scalar("I"))
        if version not in (2, 3):
            raise reader.fail(f"GGUF version {version} is not supported (2 or 3; a big-endian file reads as huge)")
        reader.count(MAX_TENSORS, "tensor count")
        pairs = reader.count(MAX_KV_PAIRS, "metadata count")
        metadata: dict[str, Value | ArraySummary] = {}
        for _ in range(pairs):
            key = reader.string(MAX_KEY_BYTES)
            metadata[key] = reader.value(int(reader.scalar("I")))
    return metadata


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache and logits sizes depend on, from the GGUF header."""

    architecture: str
    n_layer: int
    n_head: int
    n_embd_k_gqa: int  # key width per layer and token: key_length x head_count_kv (the widest layer's)
    n_embd_v_gqa: int
    kv_elements_per_token: int  # summed over layers, which may differ (per-layer head counts, SWA key lengths)
    n_vocab: int


def _integer(metadata: dict[str, Value | ArraySummary], key: str, path: Path, default: int | None = None) -> int:
    value = metadata.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFHeaderError(f"{path}: metadata '{key}' is {value!r}, expected a positive integer")
    return value


def model_shape(path: Path) -> ModelShape:
    metadata = read_metadata(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFHeaderError(f"{path}: metadata has no 'general.architecture'")
    n_layer = _integer(metadata, f"{arch}.block_count", path)
    n_embd = _integer(metadata, f"{arch}.embedding_length", path)
    n_head = _integer(metadata, f"{arch}.attention.head_count", path)
    head_dim = n_embd // n_head  # llama.cpp's default when key_length/value_length are absent
    key_length = _integer(metadata, f"{arch}.attention.key_length", path, default=head_dim)
    value_length = _integer(metadata, f"{arch}.attention.value_length", path, default=head_dim)
    key_swa = _integer(metadata, f"{arch}.attention.key_length_swa", path, default=key_length)
    value_swa = _integer(metadata, f"{arch}.attention.value_length_swa", path, default=value_length)
    heads_kv = _per_layer(metadata, f"{arch}.attention.head_count_kv", n_layer, path, default=n_head)
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    swa = [bool(flag) for flag in pattern] if isinstance(pattern, list) and len(pattern) == n_layer else []
    elements = 0
    for layer, heads in enumerate(heads_kv):
        sliding = bool(swa) and swa[layer]
        elements += heads * ((key_swa + value_swa) if sliding else (key_length + value_length))
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, ArraySummary) else _integer(metadata, f"{arch}.vocab_size", path)
    widest = max(heads_kv)
    return ModelShape(arch, n_layer, n_head, key_length * widest, value_length * widest, elements, n_vocab)


def _per_layer(
    metadata: dict[str, Value | ArraySummary], key: str, n_layer: int, path: Path, default: int
) -> list[int]:
    """A count given once for all layers or as one entry per layer (Gemma 4, OpenELM)."""
    value = metadata.get(key)
    if isinstance(value, list):
        if len(value) != n_layer or not all(isinstance(item, int) and item >= 0 for item in value):
            raise GGUFHeaderError(f"{path}: metadata '{key}' has {len(value)} entries for {n_layer} layers")
        return [int(item) for item in value]
    return [_integer(metadata, key, path, default=default)] * n_layer


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one llamacpp backend holds once loaded and after a full-context prompt, and what they come from."""

    name: str
    path: Path
    file_bytes: int
    n_ctx: int  # per sequence, as llama.cpp allocates it (rounded up to 256)
    shape: ModelShape
    weights_bytes: int
    kv_cache_bytes: int
    logits_bytes: int
    overhead_bytes: int
    parallel: int = 1

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.logits_bytes + self.overhead_bytes

    def describe(self) -> str:
        sequences = f" x {self.parallel} sequences" if self.parallel > 1 else ""
        kv = f"KV cache {_mb(self.kv_cache_bytes)} for n_ctx {self.n_ctx}{sequences}"
        parts = [f"model file {_mb(self.weights_bytes)}", kv]
        if self.logits_bytes:
            parts.append(f"logprobs buffer {_mb(self.logits_bytes)}")
        parts.append(f"{_mb(self.overhead_bytes)} buffers")
        return " + ".join(parts)


def estimate(settings: LlamaCppSettings, name: str = "") -> MemoryEstimate:
    """Resolve the weights as the backend will and size what loading them needs, without loading them."""
    path = resolve(settings.model.source())
    shape = model_shape(path)
    file_bytes = path.stat().st_size
    n_ctx = -(-settings.n_ctx // KV_PAD) * KV_PAD
    n_ubatch = min(settings.n_batch, n_ctx)
    # swa_full: llama.cpp's default, kept by llama-cpp-python, sizes sliding-window layers for all of n_ctx too.
    kv = n_ctx * shape.kv_elements_per_token * F16_BYTES
    # logprobs: llama-cpp-python keeps every position's logits (n_ctx x vocab f32), llama.cpp a batch's in its
    # output buffer and another in the compute graph's last tensor.
    logits = (n_ctx + 2 * n_ubatch) * shape.n_vocab * F32_BYTES if settings.logprobs else 0
    if settings.parallel > 1:
        # The batch context (backends/llamacpp_batch.py): one KV stream of n_ctx per sequence, plus the small
        # context the constrained self-test runs in. Logprobs are read from each sampled row, so no n_ctx x vocab
        # buffer; only the rows a step asks for (one per sequence) are ever written.
        self_test = -(-min(settings.n_ctx, SELF_TEST_N_CTX) // KV_PAD) * KV_PAD
        kv = (n_ctx * settings.parallel + self_test) * shape.kv_elements_per_token * F16_BYTES
        logits = (settings.parallel + 1) * shape.n_vocab * F32_BYTES if settings.logprobs else 0
    attention = ATTENTION_SCRATCH_COPIES * shape.n_head * n_ubatch * n_ctx * F32_BYTES
    vocabulary = VOCAB_BYTES_PER_TOKEN * shape.n_vocab
    return MemoryEstimate(
        name=name,
        path=path,
        file_bytes=file_bytes,
        n_ctx=n_ctx,
        shape=shape,
        weights_bytes=file_bytes,  # mmap'd: every page is read by the first generation and stays resident
        kv_cache_bytes=kv,
        logits_bytes=logits,
        overhead_bytes=OVERHEAD_BYTES + vocabulary + attention,
        parallel=settings.parallel,
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) reads as None


def _cgroup_room(proc_cgroup: Path, cgroup_root: Path) -> int | None:
    """Room left under the memory limits of this process's cgroup and its ancestors (v2, or v1's memory)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    room: int | None = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, relative = fields
        if controllers == "":
            base, limit_file, usage_file = cgroup_root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = cgroup_root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        folder = base / relative.lstrip("/")
        # Every ancestor's limit applies; inside a container the namespace root may be the only one readable.
        while True:
            limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is not None and usage is not None:
                room = limit - usage if room is None else min(room, limit - usage)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return room


def available_bytes(
    meminfo: Path = Path("/proc/meminfo"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> int:
    """What the machine can still give this process: MemAvailable, or the cgroup's room when that is lower."""
    available: int | None = None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if available is None:
        raise OSError(f"{meminfo} has no MemAvailable line")
    room = _cgroup_room(proc_cgroup, cgroup_root)
    return max(0, available if room is None else min(available, room))


def _mb(count: int) -> str:
    return f"{round(count / MB)} MB"


def check_fits(needed: Sequence[MemoryEstimate], available: int, headroom_fraction: float = 0.1) -> str | None:
    """None when the backends being built fit in `available` less a headroom share; else why they do not."""
    total = sum(item.total_bytes for item in needed)
    usable = int(available * (1 - headroom_fraction))
    if total <= usable:
        return None
    names = ", ".join(f"'{item.name}'" for item in needed)
    detail = "; ".join(item.describe() if len(needed) == 1 else f"{item.name}: {item.describe()}" for item in needed)
    kept = f" and {round(headroom_fraction * 100)}% of it is kept as headroom" if headroom_fraction else ""
    needs = f"loading {names} next to the running models needs about {_mb(total)} ({detail})"
    return f"{needs}; {_mb(available)} is available{kept}"


def refusal(backends: Sequence[tuple[str, LlamaCppSettings]]) -> str | None:
    """Why loading these backends beside the running models would not fit (None: it fits). A model file that
    cannot be read is left out: loading it fails with the file's own error."""
    needed: list[MemoryEstimate] = []
    for name, settings in backends:
        try:
            needed.append(estimate(settings, name))
        except ModelFileError:
            continue
    return check_fits(needed, available_bytes()) if needed else None
