"""The app's model catalogue: the bundled models, the model files and HuggingFace folders in the folder given with
`--models DIR`, and the `xrv:` models whose weights are on disk; each loaded once per server process, on first use, under
a lock, and lent to explain calls as private copies (`ModelEntry.borrow`) so sessions explaining at once never wait.

Nothing here loads a model uploaded through the page (there is no such upload); a pickled file loads only when the
person starting the app passed `--allow-pickle`. A model that does not load is an entry with its error, not a crash.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from medlens.core.model_description import describe
import medlens
from medlens.errors import MedlensError, ModelError
from medlens.io import model_dims
from medlens.models.loading import XRV_CACHE, XRV_KNOWN_FILES, bundled_models

MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".pt2", ".safetensors", ".bin")  # what a --models folder is searched for
DEFAULT_2D_MODEL = "brain-tumor-mri"  # the bundled model an upload gets when nothing else is chosen
#: at most this many copies of one model explain at once (MEDLENS_APP_REPLICAS); a further call waits for a free one
MAX_REPLICAS = max(1, int(os.environ.get("MEDLENS_APP_REPLICAS") or 4))


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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # held while the model loads
    _idle: list[nn.Module] = field(default_factory=list, repr=False)  # copies no call is using
    _made: int = field(default=0, repr=False)
    _copyable: bool = field(default=True, repr=False)
    _pool: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[nn.Module]:
        """A copy of the loaded model for one explain (or metrics) call, which hooks it for the length of the call.

        `model` itself is never hooked (it is what copies are made from, and what labels and dims are read from);
        a call takes an idle copy, or makes one (up to MAX_REPLICAS), or waits for one. A model that cannot be
        deep-copied (some compiled modules) is lent itself, to one call at a time.
        """
        with self._pool:
            limit = MAX_REPLICAS if self._copyable else 1
            while not self._idle and self._made >= limit:
                self._pool.wait()
            replica = self._idle.pop() if self._idle else None
            if replica is None:
                self._made += 1
        if replica is None:
            try:
                replica = self._copy()
            except BaseException:
                with self._pool:
                    self._made -= 1
                    self._pool.notify()
                raise
        try:
            yield replica
        finally:
            with self._pool:
                self._idle.append(replica)
                self._pool.notify()

    def _copy(self) -> nn.Module:
        return replica_of(self.model) if self._copyable else self.model

    def first_copy(self) -> None:
        """Right after loading: the first copy, which also tells whether this model can be copied at all."""
        try:
            self._idle.append(replica_of(self.model))
            self._made = 1
        except Exception:  # noqa: BLE001 - a module deepcopy refuses: lend the one model, one call at a time
            self._copyable = False

    @property
    def labels(self) -> list[str]:
        return list(describe(self.model).labels)

    @property
    def dims(self) -> int:
        return model_dims(self.model) if self.model is not None else 2


def replica_of(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with the same weights and the same `requires_grad` flags, its parameters leaves (a
    TorchScript module copied with gradients on gets non-leaf parameters, which explain() cannot borrow).

    Raises:
        ModelError: the copy's parameters are not its own leaves.
    """
    with torch.no_grad():
        copied = copy.deepcopy(model)
    pairs = list(zip(copied.parameters(), model.parameters()))
    if len(pairs) != len(list(model.parameters())) or not all(c.is_leaf for c, _ in pairs):
        raise ModelError("this model cannot be copied")
    for c, original in pairs:
        c.requires_grad_(original.requires_grad)
    return copied


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
                entry.first_copy()
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
