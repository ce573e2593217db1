"""The app's model catalogue: the bundled models, the model files and HuggingFace folders in the folder given with
`--models DIR`, and the `xrv:` models whose weights are on disk; each loaded once per process, on first use, under a lock.

Nothing here loads a model uploaded through the page (there is no such upload); a pickled file loads only when the
person starting the app passed `--allow-pickle`. A model that does not load is an entry with its error, not a crash.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from medlens.core.model_description import describe
import medlens
from medlens.errors import MedlensError, ModelError
from medlens.io import model_dims
from medlens.models.loading import XRV_CACHE, XRV_KNOWN_FILES, bundled_models

MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".pt2", ".safetensors", ".bin")  # what a --models folder is searched for
DEFAULT_2D_MODEL = "brain-tumor-mri"  # the bundled model an upload gets when nothing else is chosen


@dataclass
class ModelEntry:
    """One model the page can offer: a key shown in the picker, where it comes from, and (once loaded) the module."""

    key: str  # what the picker shows and the cache is keyed by: a bundled name, "file:<name>", "hf:<name>", "xrv:<name>"
    source: str  # what `medlens.load_model` is given (and the `medlens explain --model` value)
    kind: str  # "bundled", "file", "huggingface" or "xrv"
    description: str = ""
    model: Optional[nn.Module] = None
    error: Optional[str] = None  # why it did not load (shown in the page; the entry stays listed)
    warnings: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # explain() hooks the model for one call

    @property
    def labels(self) -> list[str]:
        return list(describe(self.model).labels)

    @property
    def dims(self) -> int:
        return model_dims(self.model) if self.model is not None else 2


class ModelCatalogue:
    """Every model the app may use, found when the server starts; models are loaded lazily and kept."""

    def __init__(self, models_dir: Optional[Path] = None, *, allow_pickle: bool = False, xrv_cache: Optional[Path] = None):
        self.allow_pickle = bool(allow_pickle)
        self.entries: dict[str, ModelEntry] = {}
        self.problems: list[str] = []  # what the page says about the folder itself (missing, unreadable)
        self._lock = threading.Lock()
        for name, info in bundled_models().items():
            self.entries[name] = ModelEntry(name, name, "bundled", str(info.get("description", "")))
        if models_dir is not None:
            self._add_folder(Path(models_dir))
        self._add_xrv(Path(xrv_cache).expanduser() if xrv_cache else XRV_CACHE.expanduser())

    def _add_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            self.problems.append(f"--models {folder}: no such folder; only the bundled models are offered.")
            return
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
                key = f"file:{path.name}"
                self.entries[key] = ModelEntry(key, str(path), "file", f"model file {path.name} from {folder}")
            elif path.is_dir() and (path / "config.json").is_file():  # a HuggingFace save_pretrained folder
                key = f"hf:{path.name}"
                self.entries[key] = ModelEntry(key, str(path), "huggingface", f"HuggingFace folder {path.name} from {folder}")

    def _add_xrv(self, cache: Path) -> None:
        for name, file_name in sorted(XRV_KNOWN_FILES.items()):
            if (cache / file_name).is_file():
                key = f"xrv:{name}"
                self.entries[key] = ModelEntry(key, key, "xrv", f"TorchXRayVision {name} (weights found in {cache})")

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> ModelEntry:
        """The entry, loaded (or with its `error` set). Raises ModelError for a key the catalogue does not hold."""
        entry = self.entries.get(key)
        if entry is None:
            raise ModelError(f"no model called {key!r} is offered; choose one of: {', '.join(self.entries)}.")
        with entry.lock:
            if entry.model is None and entry.error is None:
                self._load(entry)
        return entry

    def _load(self, entry: ModelEntry) -> None:
        options: dict[str, Any] = {"allow_pickle": True} if (entry.kind == "file" and self.allow_pickle) else {}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                entry.model = medlens.load_model(entry.source, **options)
            entry.warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        except MedlensError as exc:
            entry.error = str(exc) + (" The app was started without --allow-pickle." if "allow_pickle" in str(exc)
                                      or "allow-pickle" in str(exc) else "")
        except Exception as exc:  # noqa: BLE001 - a model file is outside input: its failure is a message, not a crash
            entry.error = f"{entry.source}: the model could not be loaded ({type(exc).__name__}: {exc})."

    def default_for(self, dims: int, channels: int = 1) -> Optional[str]:
        """The model an upload gets when none is chosen: the bundled brain model for a 2-D (or sliced) scan, else
        the first loadable bundled model of the right dimensionality."""
        bundled = [k for k, e in self.entries.items() if e.kind == "bundled"]
        if DEFAULT_2D_MODEL in bundled and dims in (2, 3):
            return DEFAULT_2D_MODEL
        for key in bundled:
            entry = self.get(key)
            if entry.model is not None and entry.dims == dims:
                return key
        return bundled[0] if bundled else None


_SHARED: dict[tuple[Any, ...], ModelCatalogue] = {}
_SHARED_LOCK = threading.Lock()


def shared_catalogue(models_dir: Optional[str], allow_pickle: bool) -> ModelCatalogue:
    """One catalogue per server process and settings: every session shares the loaded (read-only) models."""
    key = (models_dir, bool(allow_pickle))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = ModelCatalogue(Path(models_dir) if models_dir else None, allow_pickle=allow_pickle)
        return _SHARED[key]
