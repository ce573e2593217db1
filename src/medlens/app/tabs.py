"""The result views of the page (predictions with target pickers, overlay grid, ensemble, difference, before/after,
metrics, export, batch): Streamlit layout only; the work is done by `Current` and medlens.app's logic modules.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import streamlit as st

from medlens.app import batch_runs, metrics
from medlens.app.figures import FRAME_HEIGHT, data_url
from medlens.app.inputs import MAX_UPLOAD_MB, UPLOAD_TYPES, read_upload
from medlens.app.session import Current, Panel
from medlens.app.views import COLOUR_MAPS, ViewSettings, agreement, centred_scale, difference, ensemble, overlay_png, scale_for
from medlens.errors import MedlensError
from medlens.io.files import safe_name

VIEWS = ["Overlays", "Ensemble", "Difference", "Before / after", "Metrics", "Export"]


def initial(key: str, value: Any) -> Any:
    """A widget's starting value, or None once the session holds one (Streamlit warns when both are given)."""
    return None if key in st.session_state else value


def targets_key(model: str, digest: str) -> str:
    return f"targets::{model}::{digest}"


def render_predictions(current: Current) -> None:
    """Per model: the prediction table and the 'Explain for' picker (a change computes the new findings' maps)."""
    for key, message in current.errors.items():
        st.error(f"{key}: {message}")
    if not current.models:
        return
    columns = st.columns(len(current.models))
    for column, key in zip(columns, current.models):
        _, _, input_id = current.prepared(key)
        run = current.store.run_of(key, input_id)
        with column:
            st.markdown(f"**{key}**")
            if run.probabilities:
                rows = sorted(run.probabilities.items(), key=lambda kv: -kv[1])
                st.dataframe({"finding": [r[0] for r in rows], "probability": [round(r[1], 4) for r in rows]},
                             hide_index=True, width="stretch")
            else:  # a segmentation model: each class's score over its predicted region (a sum of logits)
                st.dataframe({"region": list(run.scores), "score (sum of logits)": [round(v, 3) for v in run.scores.values()]},
                             hide_index=True, width="stretch")
            labels = current.entry(key).labels
            default = [labels[t] for t in run.default_targets if t < len(labels)]
            st.multiselect("Explain for", labels, default=default, key=targets_key(key, current.loaded.digest),
                           help="Top-1 by default (multi-label models: every finding with p >= 0.5)")
            for note in run.prepared.notes:
                st.caption(note)


def _publish(data: bytes, mimetype: str, name: str) -> str:
    """The URL the app serves `data` at for this session (Streamlit's media files, as its images use; identical bytes
    keep their URL, so the browser fetches a read-out once); a data URL where no server runs (AppTest)."""
    from streamlit import runtime

    if not runtime.exists():
        return data_url(data, mimetype)
    return runtime.get_instance().media_file_mgr.add(data, mimetype, f"medlens-overlay|{name}")


def _frame(page: str) -> None:
    """An overlay's page in an iframe (st.iframe where this Streamlit has it)."""
    if hasattr(st, "iframe"):
        st.iframe(page, height=FRAME_HEIGHT)
    else:
        import streamlit.components.v1 as components

        components.html(page, height=FRAME_HEIGHT)


def _overlays(current: Current) -> None:
    rows: dict[tuple[str, str], list[Panel]] = {}
    for panel in current.panels:
        rows.setdefault((panel.model, panel.target_name), []).append(panel)
    settings = current.settings
    for (model, target), panels in rows.items():
        columns = st.columns(max(len(panels), 3))
        for column, panel in zip(columns, panels):
            with column:  # hover: the map's value and the scan's grey level under the cursor
                st.caption(panel.title)
                _frame(current.page(panel, _publish))
                if panel.predicted_region:
                    st.caption("Outlined in green: the model's predicted mask of this class (the region explained).")
                # the annotated PNG is drawn only when asked for, with the view as it is now
                st.download_button("PNG", functools.partial(_png, current, settings, panel),
                                   file_name=f"{safe_name(model)}_{safe_name(panel.method)}_{safe_name(target)}.png",
                                   mime="image/png", key=f"png::{model}::{panel.method}::{target}")


def _png(current: Current, settings: ViewSettings, panel: Panel) -> bytes:
    return dataclasses.replace(current, settings=settings).png(panel)


def _label(panel: Panel) -> str:
    return f"{panel.model} · {panel.method} · {panel.target_name}"


def _ensemble(current: Current) -> None:
    by_label = {_label(p): p for p in current.panels}
    if len(by_label) < 2:
        st.info("An ensemble needs two or more maps: choose several models or methods and press Explain.")
        return
    first_target = {m: next(p.target for p in current.panels if p.model == m) for m in current.models}
    same_target = {k: p for k, p in by_label.items() if p.target == first_target[p.model]}
    if len(current.models) > 1:  # several models: each one's map of the first method, for its first finding
        default = [k for k, p in same_target.items() if p.method == current.methods[0]]
    else:  # one model: its methods on one finding
        default = list(same_target)
    members = st.multiselect("Members (normalised to their largest |value|, then averaged)", list(by_label),
                             default=default if len(default) > 1 else list(by_label), key="ensemble_members")
    if len(members) < 2:
        st.info("Choose two or more members.")
        return
    columns = st.columns(min(len(members), 6))
    weights = [columns[i % len(columns)].number_input(f"weight: {m}", 0.0, 10.0, 1.0, 0.1, key=f"weight::{m}")
               for i, m in enumerate(members)]
    panels = [by_label[m] for m in members]
    try:
        mean, spread = ensemble([p.raw for p in panels], weights)
    except MedlensError as exc:
        st.error(str(exc))
        return
    score = agreement([p.raw for p in panels])
    a, b, c = st.columns(3)
    a.image(overlay_png(panels[0].display, mean, ["ensemble (weighted mean)"], scale_for([mean], current.settings.cmap),
                        current.settings, panels[0].region), caption="ensemble map", width="stretch")
    b.image(overlay_png(panels[0].display, spread, ["agreement: per-pixel spread (std)"], scale_for([spread]),
                        ViewSettings(opacity=current.settings.opacity), panels[0].region),
            caption="spread across members (bright: they disagree)", width="stretch")
    c.metric("Rank correlation (Spearman, mean over pairs)", f"{score['spearman']:.3f}")
    c.metric("Top-10% overlap (IoU, mean over pairs)", f"{score['top_k_overlap']:.3f}")
    c.caption(f"{score['pairs']} pair(s); 1 = the same ranking / the same top pixels.")


def _show_difference(current: Current, a: tuple[str, Any, Panel], b: tuple[str, Any, Panel]) -> None:
    diff = difference(a[1], b[1])
    cols = st.columns(3)
    for col, (title, amap, ref) in zip(cols[:2], (a, b)):
        col.image(overlay_png(ref.display, amap, [title], scale_for([amap], current.settings.cmap), current.settings,
                              ref.region), caption=title, width="stretch")
    cols[2].image(overlay_png(a[2].display, diff, ["A - B (each normalised)"], centred_scale(diff), current.settings,
                              a[2].region), caption="difference: red = more in A, blue = more in B", width="stretch")


def _difference(current: Current) -> None:
    kind = st.radio("Compare", ["class vs class", "model vs model", "method vs method"], horizontal=True, key="diff_kind")
    try:
        if kind == "class vs class":
            model = st.selectbox("Model", current.models, key="diff_model")
            method = st.selectbox("Method", current.methods, key="diff_method")
            labels = current.entry(model).labels
            if len(labels) < 2:
                st.info("This model has one class only.")
                return
            ca = st.selectbox("Class A", labels, index=0, key="diff_class_a")
            cb = st.selectbox("Class B", labels, index=1, key="diff_class_b")
            ta, tb = labels.index(ca), labels.index(cb)
            maps = current.maps(model, [method], [ta, tb])
            ref = _reference(current, model)
            _show_difference(current, (f"{model} · {method} · {ca}", maps[(method, ta)], ref),
                             (f"{model} · {method} · {cb}", maps[(method, tb)], ref))
        else:
            what, fixed = ("model", "method") if kind == "model vs model" else ("method", "model")
            chosen = _pair(current, what, fixed)
            if chosen is None:
                return
            pick = {fixed: chosen[0]}
            pa = _first(current, **pick, **{what: chosen[1]})
            pb = _first(current, **pick, **{what: chosen[2]}, target=pa.target if what == "method" else None)
            _show_difference(current, (_label(pa), pa.raw, pa), (_label(pb), pb.raw, pb))
    except MedlensError as exc:
        st.error(str(exc))


def _pair(current: Current, what: str, fixed: str) -> Optional[tuple[str, str, str]]:
    """(the fixed model or method, A, B) chosen in the page; None (with a hint) when there are not two to compare."""
    options = current.models if what == "model" else current.methods
    if len(options) < 2:
        st.info(f"Choose two or more {what}s and press Explain to compare {what}s.")
        return None
    held = st.selectbox(fixed.capitalize(), current.methods if fixed == "method" else current.models, key=f"diff_{what}_fixed")
    a = st.selectbox(f"{what.capitalize()} A", options, index=0, key=f"diff_{what}_a")
    b = st.selectbox(f"{what.capitalize()} B", options, index=1, key=f"diff_{what}_b")
    return held, a, b


def _first(current: Current, model: str, method: str, target: Optional[int] = None) -> Panel:
    return [p for p in current.panels if p.model == model and p.method == method and target in (None, p.target)][0]


def _reference(current: Current, model: str) -> Panel:
    return [p for p in current.panels if p.model == model][0]


def _before_after(current: Current) -> None:
    st.caption("Two scans of the same patient (e.g. before and after treatment): the same model, method and target.")
    upload = st.file_uploader("The second scan (after)", type=UPLOAD_TYPES, key="after_upload")
    if upload is None or not current.models:
        return
    model = st.selectbox("Model", current.models, key="ba_model")
    method = st.selectbox("Method", current.methods, key="ba_method")
    try:
        after = read_upload(upload.name, upload.getvalue(), limit_mb=current.config.get("upload_mb", MAX_UPLOAD_MB))
        before_panel = [p for p in current.panels if p.model == model and p.method == method][0]
        maps = current.maps(model, [method], [before_panel.target], loaded=after)
        prepared, region, input_id = current.prepared(model, after)
    except MedlensError as exc:
        st.error(f"The second scan cannot be used: {exc}")
        return
    after_map = maps[(method, before_panel.target)]
    if tuple(after.scan.spatial_shape) != tuple(current.loaded.scan.spatial_shape):
        st.caption(f"The scans differ in size ({current.loaded.scan.spatial_shape} and {after.scan.spatial_shape}); "
                   f"both were resized to the model's input, so the maps are compared on that grid.")
    p_after = current.store.run_of(model, input_id).probabilities
    cols = st.columns(3)
    cols[0].image(current.png(before_panel), caption=f"before: p({before_panel.target_name}) = {before_panel.probability:.3f}",
                  width="stretch")
    after_panel = Panel(model, method, before_panel.target, before_panel.target_name,
                        p_after.get(before_panel.target_name, float("nan")), after_map, prepared.display, region)
    cols[1].image(current.png(after_panel), caption=f"after: p({before_panel.target_name}) = {after_panel.probability:.3f}",
                  width="stretch")
    diff = difference(after_map, before_panel.raw)
    cols[2].image(overlay_png(prepared.display, diff, ["after - before (each normalised)"], centred_scale(diff),
                              current.settings, region), caption="difference: red = more after", width="stretch")


def _metrics(current: Current) -> None:
    st.subheader("This image")
    if st.button("Compute deletion / insertion curves (and region scores)", key="run_metrics"):
        rows, curves = [], {}
        with st.spinner("Perturbing the image step by step..."):
            for key in current.models:
                prepared, region, _ = current.prepared(key)
                maps = {(p.method, p.target): p.raw for p in current.panels if p.model == key}
                try:  # e.g. a segmentation model: its curves are not offered here
                    r, c = metrics.image_metrics(current.entry(key), prepared.tensor, maps, region)
                except MedlensError as exc:
                    st.error(f"{key}: no deletion / insertion curves: {exc}")
                    continue
                rows += r
                prefix = f"{key} " if len(current.models) > 1 else ""
                curves.update({f"{prefix}{k}".replace(" / ", " "): v for k, v in c.items()})
        st.session_state["metrics_result"] = (rows, curves)
    if "metrics_result" in st.session_state:
        rows, curves = st.session_state["metrics_result"]
        st.dataframe(rows, hide_index=True, width="stretch")
        st.caption("Deletion AUC: lower is better; insertion AUC: higher is better (probability of the target, 20 steps).")
        if curves:
            columns = st.columns(2)
            for column, kind in zip(columns, ("deletion", "insertion")):
                chosen = {k[: -len(kind)].strip(): v for k, v in curves.items() if k.endswith(kind)}
                n = len(next(iter(chosen.values())))
                table = {"fraction of pixels": [i / (n - 1) for i in range(n)], **chosen}
                column.caption(f"{kind} curves")
                column.line_chart(table, x="fraction of pixels", y=list(chosen), y_label="probability of the target")
    model = st.selectbox("Randomisation check: model", current.models, key="rand_model")
    method = st.selectbox("Randomisation check: method", current.methods, key="rand_method")
    if st.button("Run the randomisation check", key="run_random"):
        panel = [p for p in current.panels if p.model == model and p.method == method][0]
        prepared, _, _ = current.prepared(model)
        with st.spinner("Randomising the model's weights from the top, layer by layer..."):
            try:
                st.session_state["random_result"] = metrics.randomisation_check(
                    current.entry(model), prepared.tensor, method, panel.target, current.request.get("options"),
                    current.request.get("seed") or 0)
            except MedlensError as exc:
                st.error(f"{model}: the randomisation check cannot run: {exc}")
    if "random_result" in st.session_state:
        res = st.session_state["random_result"]
        verdict = "passes" if res["passes"] else "FAILS"
        st.write(f"**{res['method']} {verdict}** the randomisation check: Spearman similarity to the original map after "
                 f"the cascade = {res['final']:.3f} (must fall below {res['threshold']}).")
        st.line_chart({"spearman": res["spearman"]}, x_label="randomisation step (top layers first)")
    _dataset_metrics(current)


def _dataset_metrics(current: Current) -> None:
    st.subheader("A dataset")
    folder = st.text_input("Open an `evaluate` output folder (on the server)", key="eval_folder")
    if folder:
        try:
            rows, plots, summary = metrics.read_evaluate_folder(folder)
            st.dataframe(rows, hide_index=True, width="stretch")
            for plot in plots:
                st.image(str(plot), caption=plot.name)
        except MedlensError as exc:
            st.error(str(exc))
    with st.expander("Start `medlens evaluate` on a server-side folder"):
        data = st.text_input("Data folder (one sub-folder per class, a box file beside each image)",
                             value=current.config.get("data") or "", key="eval_data")
        out = st.text_input("Output folder (created; nothing is written elsewhere)", key="eval_out")
        limit = st.number_input("Images (a seeded random subset; 0 = all)", 0, 100000, 20, key="eval_limit")
        model = st.selectbox("Model", current.models, key="eval_model")
        if st.button("Start evaluate", key="eval_start"):
            try:
                st.session_state["eval_job"] = metrics.start_evaluate(
                    current.entry(model).source, data, out, current.methods, [], int(limit) or None,
                    current.catalogue.allow_pickle)
            except MedlensError as exc:
                st.error(str(exc))
    if "eval_job" in st.session_state:
        _evaluate_progress()


def _evaluate_progress() -> None:
    job = st.session_state["eval_job"]
    done, total = job.progress()
    st.progress(done / total if total else 0.0, text=f"evaluate: {done}/{total or '?'} images")
    if job.finished:
        ok = job.process.returncode == 0
        (st.success if ok else st.error)(f"evaluate {'finished' if ok else 'failed'}: {job.message()}")
        if ok:
            st.caption(f"Open {job.out} above to see its tables and plots.")
    else:
        st.button("Refresh progress", key="eval_refresh")


def _export(current: Current) -> None:
    st.caption("A ZIP of every overlay as drawn now (model, method, target, probability, colour bar, outlines), "
               "the raw maps (.npz), provenance.json and the equivalent `medlens explain` command line.")
    data = current.export_zip()
    st.session_state["export_zip"] = data
    st.download_button("Download ZIP", data, file_name="medlens-export.zip", mime="application/zip", key="zip")


def _view_settings() -> ViewSettings:
    cols = st.columns([2, 2, 2, 3, 2, 2])
    opacity = cols[0].slider("Opacity", 0.0, 1.0, initial("opacity", 0.75), 0.05, key="opacity")
    cmap = cols[1].selectbox("Colour map", list(COLOUR_MAPS), key="cmap")
    mode = cols[2].radio("Threshold on", ["quantile", "value"], key="threshold_mode", horizontal=True,
                         help="quantile: hide the lowest share of |map|; value: hide below a share of the largest |value|")
    level = cols[3].slider("Threshold", 0.0, 0.99, initial("threshold", 0.0), 0.01, key="threshold")
    shared = cols[4].checkbox("One colour scale for the grid", key="shared_scale")
    signed = cols[5].checkbox("Signed maps", key="signed",
                              help="the raw signed values of every map (default: each method as defined, e.g. "
                                   "Grad-CAM's positive part)")
    return ViewSettings(opacity, cmap, mode, level, shared, signed)


@st.fragment
def render_views(current: Current) -> None:
    """The view controls and the chosen view, as one fragment: moving a view slider reruns only this part of the
    page (and redraws from cached maps), not the whole script."""
    current.settings = _view_settings()
    views = VIEWS + (["Batch"] if batch_runs.available() else [])
    view = st.radio("View", views, horizontal=True, key="view", label_visibility="collapsed")
    {"Overlays": _overlays, "Ensemble": _ensemble, "Difference": _difference, "Before / after": _before_after,
     "Metrics": _metrics, "Export": _export, "Batch": lambda c: batch_runs.render(c.catalogue, c.config)}[view](current)


def maybe_batch_tab(catalogue: Any, config: Mapping[str, Any], standalone: bool = False) -> None:
    """The batch runner on a server-side folder, offered before any upload too (it needs none)."""
    if batch_runs.available():
        with st.expander("Batch: explain a server-side folder"):
            batch_runs.render(catalogue, config)
