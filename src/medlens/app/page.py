"""The Streamlit page of `medlens app`: lays out the input, model, method and view controls and the result tabs.
Holds no science and no file handling: it calls medlens.app's modules (catalogue, inputs, maps, views, ...).

Run by `medlens app` (`streamlit run` on this file); the settings come from MEDLENS_APP_* environment variables.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import streamlit as st

from medlens.app import inputs as app_inputs
from medlens.app import tabs
from medlens.app.catalogue import ModelCatalogue, shared_catalogue
from medlens.app.maps import MapStore
from medlens.app.session import Current, method_label, slow_methods
from medlens.app.views import ViewSettings
from medlens.core.registry import all_specs
from medlens.errors import MedlensError

BANNER = ("**For research and teaching only: not a medical device, not for diagnosis.** Explanations show what a "
          "model used, not where disease is. Uploads stay in this browser session and are never stored on the server.")


def _config() -> dict[str, Any]:
    return {"models": os.environ.get("MEDLENS_APP_MODELS") or None, "data": os.environ.get("MEDLENS_APP_DATA") or None,
            "allow_pickle": os.environ.get("MEDLENS_APP_ALLOW_PICKLE", "") == "1",
            "upload_mb": float(os.environ.get("MEDLENS_APP_MAX_UPLOAD_MB") or app_inputs.MAX_UPLOAD_MB)}


def _read_input(config: dict[str, Any]) -> tuple[Optional[app_inputs.LoadedInput], Optional[str]]:
    """The chosen input (upload or sample), read once per (bytes, window) and kept in the session."""
    st.sidebar.header("1. Scan")
    samples = list(app_inputs.SAMPLES) + list(app_inputs.figshare_samples(config["data"]))
    source = st.sidebar.radio("Input", ["Upload a scan", "Sample scan"], key="source", horizontal=True)
    cache: dict[Any, Any] = st.session_state.setdefault("read_cache", {})
    loaded, default_model = None, None
    try:
        if source == "Upload a scan":
            upload = st.sidebar.file_uploader("PNG, JPEG, TIFF (8/16-bit), DICOM or NIfTI", type=app_inputs.UPLOAD_TYPES,
                                              key="upload")
            if upload is None:
                return None, None
            data = upload.getvalue()
            window = app_inputs.WINDOW_PRESETS[st.session_state.get("window", "from the file")]
            key = (app_inputs.digest_of(data), upload.name, repr(window))
            if key not in cache:
                cache.clear()
                cache[key] = app_inputs.read_upload(upload.name, data, window=window, limit_mb=config["upload_mb"])
            loaded = cache[key]
            if loaded.is_dicom:
                st.sidebar.selectbox("DICOM window", list(app_inputs.WINDOW_PRESETS), key="window")
        else:
            which = st.sidebar.selectbox("Sample", samples, key="sample")
            if which not in cache:
                cache.clear()
                figshare = app_inputs.figshare_samples(config["data"])
                cache[which] = (app_inputs.read_server_file(figshare[which]) if which in figshare
                                else app_inputs.load_sample(which))
            loaded = cache[which]
            default_model = "brain-tumor-mri" if which.startswith("figshare") else "phantom-lesion"
        region_file = st.sidebar.file_uploader("Region (optional): YOLO box .txt, mask PNG or NIfTI mask",
                                               type=app_inputs.REGION_TYPES, key="region_upload")
        if region_file is not None:  # a copy: the cached scan keeps no region once the file is removed
            data = region_file.getvalue()
            loaded = dataclasses.replace(loaded, region=app_inputs.read_region_upload(region_file.name, data),
                                         region_id=app_inputs.digest_of(data))
    except MedlensError as exc:
        st.error(f"This file cannot be used: {exc}")
        return None, None
    return loaded, default_model


def _choose_models(catalogue: ModelCatalogue, loaded: app_inputs.LoadedInput, default_model: Optional[str]) -> list[str]:
    st.sidebar.header("2. Models")
    for problem in catalogue.problems:
        st.sidebar.warning(problem)
    default = default_model or catalogue.default_for(3 if loaded.is_volume else 2)
    keys = catalogue.keys()
    chosen = st.sidebar.multiselect("Models", keys, default=tabs.initial(f"models::{default}", [default] if default in keys else keys[:1]),
                                    key=f"models::{default}", help="Bundled models, files from --models, xrv: weights on disk")
    usable = []
    for key in chosen:
        entry = catalogue.get(key)
        if entry.error:
            st.error(f"Model {key} cannot be used: {entry.error}")
        else:
            usable.append(key)
    return usable


def _choose_methods() -> tuple[list[str], dict[str, Any], Optional[int]]:
    st.sidebar.header("3. Methods")
    specs = all_specs()
    methods = st.sidebar.multiselect("Methods (by family)", sorted(specs, key=lambda n: (specs[n].family, n)),
                                     default=tabs.initial("methods", ["gradcam"]), format_func=method_label, key="methods")
    for name in methods:
        st.sidebar.caption(f"{name}: {specs[name].cost}")
    slow = slow_methods(methods)
    if slow:
        st.sidebar.warning(f"Slow on a CPU (many model passes): {', '.join(slow)}. Expect seconds to minutes.")
    options: dict[str, Any] = {}
    seed: Optional[int] = None
    with st.sidebar.expander("Method options"):
        if "lrp" in methods:
            options["composite"] = st.selectbox("LRP composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon",
                                                                  "epsilon_alpha2_beta1", "depth"], key="opt_composite")
        if "integratedgradients" in methods:
            options["n_steps"] = st.number_input("Integrated gradients: steps", 4, 512, 50, key="opt_n_steps")
        if "smoothgrad" in methods:
            options["n_samples"] = st.number_input("SmoothGrad: samples", 2, 256, 25, key="opt_n_samples")
        if "rise" in methods:
            options["n_masks"] = st.number_input("RISE: masks", 100, 8000, 2000, step=100, key="opt_n_masks")
        if {"lime", "kernelshap"} & set(methods):
            options["num_samples"] = st.number_input("LIME / KernelSHAP: samples", 50, 8000, 1000, step=50,
                                                     key="opt_num_samples")
        if any(specs[m].stochastic for m in methods):
            seed = int(st.number_input("Seed (stochastic methods)", 0, 2**31 - 1, 0, key="opt_seed"))
    return methods, options, seed


def _slice_controls(loaded: app_inputs.LoadedInput, catalogue: ModelCatalogue, models: list[str]) -> tuple[str, Optional[int]]:
    if not loaded.is_volume or not any(catalogue.get(k).dims == 2 for k in models):
        return "axial", None
    st.sidebar.header("Slice (2-D models on a volume)")
    axis = st.sidebar.selectbox("Axis", list(app_inputs.AXES), key="slice_axis")
    n = app_inputs.axis_length(loaded.scan, axis)
    index = st.sidebar.slider("Slice", 0, n - 1, app_inputs.default_slice(loaded, axis), key=f"slice_index::{axis}::{loaded.digest}")
    st.sidebar.caption("A 3-D model takes the whole volume; a 2-D model gets this slice.")
    return axis, int(index)


KEPT_WIDGETS = ("models::", "methods", "slice_axis", "opacity", "cmap", "threshold", "shared_scale", "view", "window",
                "sample", "source")


def _keep_choices() -> None:
    """Streamlit forgets a widget's value after a run that did not draw it (e.g. while a new upload arrives); writing
    the values back keeps the person's choices of models, methods and view across uploads."""
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(KEPT_WIDGETS):
            st.session_state[key] = st.session_state[key]


def main() -> None:
    st.set_page_config(page_title="medlens", layout="wide")
    _keep_choices()
    st.title("medlens: what did the model look at?")
    st.info(BANNER)
    config = _config()
    catalogue = shared_catalogue(config["models"], config["allow_pickle"])
    store: MapStore = st.session_state.setdefault("store", MapStore())
    loaded, default_model = _read_input(config)
    if loaded is None:
        st.write("Upload a scan or pick a sample in the sidebar, then press **Explain**.")
        tabs.maybe_batch_tab(catalogue, config, standalone=True)
        return
    for note in loaded.scan.notes:
        st.caption(f"Reading: {note}")
    models = _choose_models(catalogue, loaded, default_model)
    methods, options, seed = _choose_methods()
    axis, index = _slice_controls(loaded, catalogue, models)
    if st.sidebar.button("Explain", type="primary", key="explain", width="stretch"):
        if not models or not methods:
            st.error("Choose at least one model and one method, then press Explain again.")
        else:
            st.session_state["request"] = {"input": loaded.digest, "models": models, "methods": methods,
                                           "options": options, "seed": seed}
    request = st.session_state.get("request")
    if not request or request["input"] != loaded.digest:
        st.write("Choose models and methods in the sidebar and press **Explain**.")
        tabs.maybe_batch_tab(catalogue, config, standalone=True)
        return
    targets = {m: st.session_state.get(tabs.targets_key(m, loaded.digest)) for m in request["models"]}
    current = Current(catalogue, store, loaded, {**request, "axis": axis, "index": index, "targets": targets},
                      ViewSettings(), config)
    current.compute_all()
    tabs.render_predictions(current)
    tabs.render_views(current)


main()
