"""The app's interactive overlay: a Plotly figure of an overlay already drawn (RGB, on the picture's grid) that reads
out, under the cursor, the map's raw value and the scan's grey level at the model pixel there.

The picture is one PNG (an image trace); the read-out is a transparent heatmap on the map's own grid (the model's input
grid: each cell is one value the method computed, never an interpolated one), placed over the picture pixels that
model pixel covers. No Streamlit here; `tabs` shows the figure.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Optional, Sequence

import numpy as np

#: the read-out grid is at most this many cells a side (a larger model grid is read out every k-th pixel)
MAX_HOVER_SIDE = 256
HOVER_TEMPLATE = "map %{z:.4g}<br>scan %{customdata:.3f}<extra></extra>"
_CLEAR = [[0.0, "rgba(0,0,0,0)"], [1.0, "rgba(0,0,0,0)"]]


def png_uri(rgb: np.ndarray) -> str:
    """A data URI of uint8 RGB pixels as a PNG (fast compression: it is sent on every redraw)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def colour_scale(cmap: str, steps: int = 11) -> list[list[Any]]:
    """A Plotly colour scale sampled from a matplotlib colour map (the one the overlay is drawn with)."""
    from matplotlib import colormaps

    colours = colormaps[cmap](np.linspace(0.0, 1.0, steps))[:, :3] * 255.0
    return [[i / (steps - 1), f"rgb({r:.0f},{g:.0f},{b:.0f})"] for i, (r, g, b) in enumerate(colours)]


def hover_grid(values: np.ndarray, grey: np.ndarray, picture: Sequence[int]) -> dict[str, Any]:
    """The read-out heatmap's arrays and placement: `values` (the map on the model's grid, h x w) and `grey` (the
    scan's grey level on that grid), every k-th cell when the grid is larger than MAX_HOVER_SIDE, with cell centres
    in the picture's pixel coordinates (picture H x W: model pixel i covers picture pixels [i*s, (i+1)*s))."""
    values = np.asarray(values, dtype=np.float32)
    h, w = values.shape
    k = max(1, -(-max(h, w) // MAX_HOVER_SIDE))
    sy, sx = picture[0] / h, picture[1] / w
    return {"z": np.ascontiguousarray(values[::k, ::k]), "customdata": np.ascontiguousarray(np.asarray(grey, np.float32)[::k, ::k]),
            "x0": (k * sx - 1) / 2, "dx": k * sx, "y0": (k * sy - 1) / 2, "dy": k * sy, "step": k}


def overlay_figure(rgb: np.ndarray, values: np.ndarray, grey: np.ndarray, scale: tuple[str, float, float],
                   title: str, colour_label: str = "", height: int = 340) -> Any:
    """The Plotly figure of one overlay.

    Args:
        rgb: the overlay as drawn (uint8 H x W x 3, the picture's grid).
        values: the map as the picture draws it, on the model's grid (h x w); what the cursor reads.
        grey: the scan's grey level in [0, 1] on the model's grid (h x w).
        scale: (colour map, vmin, vmax) the overlay was coloured with: its colour bar.
        title: the figure's title.
        colour_label: the colour bar's caption (how the map is drawn).
        height: the figure's height in CSS pixels.

    Returns:
        A `plotly.graph_objects.Figure`: the picture, the read-out and the colour bar.
    """
    import plotly.graph_objects as go

    H, W = int(rgb.shape[0]), int(rgb.shape[1])
    grid = hover_grid(values, grey, (H, W))
    cmap, vmin, vmax = scale
    fig = go.Figure()
    fig.add_trace(go.Image(source=png_uri(rgb), x0=0, dx=1, y0=0, dy=1, hoverinfo="skip", name="overlay"))
    rows, cols = grid["z"].shape
    fig.add_trace(go.Heatmap(z=grid["z"], customdata=grid["customdata"], x=grid["x0"] + np.arange(cols) * grid["dx"],
                             y=grid["y0"] + np.arange(rows) * grid["dy"], colorscale=_CLEAR, showscale=False,
                             hovertemplate=HOVER_TEMPLATE, name="map"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False,
                             marker={"colorscale": colour_scale(cmap), "cmin": vmin, "cmax": vmax, "color": [vmin],
                                     "showscale": True, "colorbar": {"title": {"text": colour_label, "side": "right"},
                                                                     "thickness": 12, "len": 0.9}}))
    fig.update_xaxes(visible=False, range=[-0.5, W - 0.5], constrain="domain")
    fig.update_yaxes(visible=False, range=[H - 0.5, -0.5], scaleanchor="x", constrain="domain")
    fig.update_layout(title={"text": title, "font": {"size": 13}, "x": 0.0, "xanchor": "left"}, height=height,
                      margin={"l": 0, "r": 0, "t": 36, "b": 0}, hovermode="closest", dragmode="zoom",
                      plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)")
    return fig


def set_picture(figure: Any, rgb: np.ndarray) -> None:
    """Replace the picture of a figure made by `overlay_figure` (a redraw: the read-out and colour bar stay)."""
    figure.data[0].source = png_uri(rgb)
