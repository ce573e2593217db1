"""One page run's state without Streamlit: the request (models, methods, options, targets, slice), the maps it needs
(from the session's `MapStore`), the panels of the grid, their colour scales and PNGs, and the export ZIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from medlens.app.catalogue import ModelCatalogue, ModelEntry
from medlens.app.export import ExportItem, build_zip, command_lines, overlay_title
from medlens.app.inputs import LoadedInput, prepare_input
from medlens.app.maps import MapStore, method_options
from medlens.app.figures import canvas_bytes, data_url, overlay_page, readout_bytes
from medlens.app.views import ViewSettings, Scale, drawn, overlay_planes, overlay_png, scale_for
from medlens.core.model_description import describe
from medlens.core.registry import get_spec
from medlens.errors import MedlensError
from medlens.io import PreparedInput
from medlens.io.render import display_label
from medlens.io.scan_view import ScanView, scan_view

SLOW_COST_WORDS = ("per ", "n_steps", "n_samples")  # registry cost texts of methods that take many model passes


def method_label(name: str) -> str:
    return f"{name} ({get_spec(name).family})"


def slow_methods(methods: Sequence[str]) -> list[str]:
    return [m for m in methods if any(word in get_spec(m).cost for word in SLOW_COST_WORDS)]


def input_id_for(loaded: LoadedInput, dims: int, axis: str, index: Optional[int]) -> str:
    """The cache identity of an input as one model sees it (a 2-D model on a volume: the slice too)."""
    if loaded.is_volume and dims == 2:
        return f"{loaded.digest}|{axis}|{'middle' if index is None else index}"
    return loaded.digest


@dataclass
class Panel:
    """One cell of the grid: a raw map with what it explains."""

    model: str
    method: str
    target: int
    target_name: str
    probability: float
    raw: np.ndarray
    display: np.ndarray
    region: Optional[np.ndarray]
    view: Optional[ScanView] = None  # where the picture is drawn: the scan's own plane when the preparation inverts
    predicted_region: bool = False  # the outline is the model's own predicted mask (a segmentation model)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # drawn values, kept across view redraws

    @property
    def title(self) -> str:
        what = "the predicted mask outlined" if self.predicted_region else f"p={self.probability:.3f}"
        return f"{self.model} · {self.method} · {self.target_name} ({what})"


@dataclass
class Current:
    """What the page shows in this run, computed from the request through the session's store."""

    catalogue: ModelCatalogue
    store: MapStore
    loaded: LoadedInput
    request: Mapping[str, Any]  # models, methods, options, seed, axis, index, targets (model -> label names)
    settings: ViewSettings
    config: Mapping[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    panels: list[Panel] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # colour scales, kept across view redraws

    @property
    def models(self) -> list[str]:
        return [m for m in self.request["models"] if m not in self.errors]

    @property
    def methods(self) -> list[str]:
        return list(self.request["methods"])

    def input_id(self, key: str) -> str:
        return input_id_for(self.loaded, self.catalogue.get(key).dims, self.request.get("axis", "axial"),
                            self.request.get("index"))

    def prepared(self, key: str, loaded: Optional[LoadedInput] = None) -> tuple[PreparedInput, Optional[np.ndarray], str]:
        """The input prepared for a model (kept in the store), its region on the model's grid, and its cache id."""
        loaded = loaded or self.loaded
        entry = self.catalogue.get(key)
        input_id = input_id_for(loaded, entry.dims, self.request.get("axis", "axial"), self.request.get("index"))
        cached = self.store.inputs.get((key, input_id, loaded.region_id))
        if cached is None:
            cached = prepare_input(entry.model, entry.dims, loaded, self.request.get("axis", "axial"), self.request.get("index"))
            self.store.inputs[(key, input_id, loaded.region_id)] = cached
        return cached[0], cached[1], input_id

    def maps(self, key: str, methods: Sequence[str], targets: Optional[Sequence[int]] = None,
             loaded: Optional[LoadedInput] = None) -> dict[tuple[str, int], np.ndarray]:
        """(method, target) -> raw map of one model, computed only when not in the store."""
        entry = self.catalogue.get(key)
        prepared, region, input_id = self.prepared(key, loaded)
        return self.store.ensure(entry, input_id, prepared, region, methods, self.request.get("options", {}), targets,
                                 self.request.get("seed"))

    def chosen_targets(self, key: str) -> Optional[list[int]]:
        names = (self.request.get("targets") or {}).get(key)
        labels = self.catalogue.get(key).labels
        if not names:
            return None
        return [labels.index(n) for n in names if n in labels] or None

    def compute_all(self) -> None:
        """Every panel of the grid; a model that fails on this input becomes an error message, the others go on."""
        self.panels, self.cache = [], {}
        for key in list(self.request["models"]):
            try:
                entry = self.catalogue.get(key)
                if entry.model is None:  # it did not load: its own message, not "model must be a module"
                    self.errors[key] = entry.error or f"{key}: the model is not loaded."
                    continue
                maps = self.maps(key, self.methods, self.chosen_targets(key))
                prepared, region, input_id = self.prepared(key)
                run = self.store.run_of(key, input_id)
            except MedlensError as exc:
                self.errors[key] = str(exc)
                continue
            views: dict[int, Optional[ScanView]] = {}
            for (method, target), raw in maps.items():
                name = entry.labels[target] if target < len(entry.labels) else str(target)
                # a segmentation model's map explains its predicted mask of the class: that is the outline drawn
                outlined = run.regions.get(target, region)
                if target not in views:
                    views[target] = scan_view(prepared.scan, prepared.tensor.shape[2:], prepared.display, outlined)
                self.panels.append(Panel(key, method, target, name, run.probabilities.get(name, float("nan")), raw,
                                         prepared.display, outlined, views[target], target in run.regions))

    def entry(self, key: str) -> ModelEntry:
        return self.catalogue.get(key)

    def drawn(self, panel: Panel) -> tuple[np.ndarray, str, np.ndarray]:
        """(what the picture draws of the raw map on the model's grid, how, the same on the picture's grid), computed
        once per panel and signed setting: a redraw (threshold, opacity) only blends."""
        key = ("drawn", self.settings.signed)
        if key not in panel.cache:
            values, how = drawn(panel.raw, panel.method, self.settings)
            panel.cache[key] = (values, how, panel.view.maps(values) if panel.view is not None else values)
        return panel.cache[key]

    def scale(self, panel: Panel) -> Scale:
        """One colour scale for the whole grid when asked, else one per model and method (shared by its targets)."""
        shared = self.settings.shared_scale
        key = ("scale", None if shared else (panel.model, panel.method), self.settings.signed, self.settings.cmap)
        if key not in self.cache:  # kept across redraws: a threshold or opacity change keeps every scale
            chosen = [p for p in self.panels if shared or (p.model == panel.model and p.method == panel.method)]
            self.cache[key] = scale_for([self.drawn(p)[0] for p in chosen], self.settings.cmap)
        return self.cache[key]

    def png(self, panel: Panel) -> bytes:
        """The panel's overlay, its method drawn as defined (or signed when the view asks)."""
        lines = overlay_title(panel.model, panel.method, panel.target_name, panel.probability)
        values, how, picture = self.drawn(panel)
        if panel.view is not None:  # at the scan's own resolution (the map taken back through the resize)
            return overlay_png(panel.view.display, picture, lines, self.scale(panel), self.settings, panel.view.region, how)
        return overlay_png(panel.display, values, lines, self.scale(panel), self.settings, panel.region, how)

    def page(self, panel: Panel, publish: Callable[[bytes, str, str], str] = lambda data, mime, _: data_url(data, mime)) -> str:
        """The panel's interactive overlay (an HTML page): the overlay drawn in the browser as `png` draws it (the
        threshold read from the page's slider), the colour bar, and the map's value and the scan's grey level under
        the cursor (at the model pixel there). `publish(bytes, mimetype, name)` gives the URL the page reads bytes
        from (the app serves them; a data URL by default). The page does not depend on the threshold."""
        values, how, picture = self.drawn(panel)
        scale = self.scale(panel)
        if panel.view is not None:
            image, plane, region, k = overlay_planes(panel.view.display, picture, panel.view.region)
        else:
            image, plane, region, k = overlay_planes(panel.display, values, panel.region)
        key = ("page bytes", self.settings.signed)
        if key not in panel.cache:  # the bytes are the same for every redraw (threshold, opacity, colour map)
            grey = np.asarray(panel.display, dtype=np.float32)
            if k is not None:  # a volume: the slice drawn
                values, grey = values[k], (grey[k] if grey.ndim == 3 else grey)
            panel.cache[key] = readout_bytes(values, grey), canvas_bytes(np.asarray(image, np.float32), plane, region)
        (value_bytes, grey_bytes, grid), (scan_bytes, plane_bytes, region_bytes) = panel.cache[key]
        name = f"{panel.model}|{panel.method}|{panel.target}"
        octets = "application/octet-stream"
        urls = {part: publish(data, octets, f"{name}|{part}") for part, data in
                (("values", value_bytes), ("grey", grey_bytes), ("scan", scan_bytes), ("plane", plane_bytes))}
        urls["region"] = publish(region_bytes, octets, name + "|region") if region_bytes else data_url(b"", octets)
        return overlay_page(urls, plane.shape[:2], grid, scale, (self.settings.opacity, self.settings.threshold_mode),
                            panel.title, display_label(how, scale))

    def export_zip(self) -> bytes:
        """The ZIP of every panel as drawn now, the raw maps, provenance and the equivalent command lines."""
        items = [ExportItem(p.model, p.method, p.target_name, p.probability, self.png(p), p.raw) for p in self.panels]
        targets = {m: sorted({p.target_name for p in self.panels if p.model == m}) for m in self.models}
        sources = {m: self.catalogue.get(m).source for m in self.models}
        index = self.request.get("index") if self.loaded.is_volume and self.request.get("axis", "axial") == "axial" else None
        commands = command_lines(self.loaded.name, sources, self.methods,
                                 {k: v for m in self.methods for k, v in method_options(m, self.request.get("options", {})).items()},
                                 targets, self.request.get("seed"), index,
                                 str(self.loaded.region.source) if self.loaded.region is not None else None)
        provenance = {"input": {"name": self.loaded.name, "sha256_with_window": self.loaded.digest,
                                "notes": list(self.loaded.scan.notes)},
                      "view": {"opacity": self.settings.opacity, "colour_map": self.settings.cmap,
                               "threshold_mode": self.settings.threshold_mode, "threshold": self.settings.threshold,
                               "shared_scale": self.settings.shared_scale},
                      "models": {}}
        for key in self.models:
            prepared, _, input_id = self.prepared(key)
            run = self.store.run_of(key, input_id)
            entry = self.catalogue.get(key)
            provenance["models"][key] = {"source": describe(entry.model).provenance() if entry.model is not None else entry.source,
                                         "probabilities": run.probabilities, "preparation_notes": list(prepared.notes),
                                         "explain": run.provenance}
        return build_zip(items, provenance, commands)
