"""The app's interactive overlay: a small self-contained HTML page (shown in an iframe) with the overlay as drawn, its
colour bar, and a read-out under the cursor of the map's raw value and the scan's grey level at the model pixel there.

The picture is one PNG at the picture's grid; the read-out reads the map on its own grid (the model's input grid: each
cell is one value the method computed, never an interpolated one), kept in the page as float32 bytes. A redraw
(threshold, opacity) replaces the page; no chart library is loaded. No Streamlit here; `tabs` shows the page.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

#: the read-out grid is at most this many cells a side (a larger model grid is read out every k-th pixel)
MAX_HOVER_SIDE = 256
PICTURE_HEIGHT = 300  # CSS pixels: the largest height the picture is shown at (it fits the column's width too)
FRAME_HEIGHT = PICTURE_HEIGHT + 44  # with the colour bar

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
body{margin:0;font:12px sans-serif;color:#31333f;background:transparent}
#wrap{position:relative;display:inline-block;line-height:0}
#picture{image-rendering:pixelated;cursor:crosshair;display:block}
#readout{position:absolute;display:none;pointer-events:none;background:rgba(20,20,20,.85);color:#fff;padding:3px 6px;
border-radius:3px;font:12px monospace;line-height:1.3;white-space:nowrap;z-index:2}
#bar{height:10px;margin-top:6px;background:linear-gradient(to right,__GRADIENT__)}
#ticks{display:flex;justify-content:space-between;color:#555}
</style></head><body>
<div id="wrap"><img id="picture" alt="__TITLE__" src="data:image/png;base64,__PNG__"><div id="readout"></div></div>
<div id="barbox"><div id="bar"></div><div id="ticks"><span>__VMIN__</span><span>__LABEL__</span><span>__VMAX__</span></div></div>
<script>
const W=__W__, H=__H__, w=__GW__, h=__GH__, maxH=__MAXH__;
function bytes(b64){const s=atob(b64);const a=new Uint8Array(s.length);for(let i=0;i<s.length;i++)a[i]=s.charCodeAt(i);return a;}
const values=new Float32Array(bytes("__VALUES__").buffer), grey=bytes("__GREY__");
const img=document.getElementById("picture"), out=document.getElementById("readout");
function fit(){const s=Math.min((document.body.clientWidth||W)/W, maxH/H);img.style.width=(W*s)+"px";img.style.height=(H*s)+"px";
document.getElementById("barbox").style.width=(W*s)+"px";}
fit();window.addEventListener("resize",fit);
img.addEventListener("mousemove",e=>{const r=img.getBoundingClientRect();
const j=Math.min(w-1,Math.floor((e.clientX-r.left)/r.width*w)), i=Math.min(h-1,Math.floor((e.clientY-r.top)/r.height*h));
if(i<0||j<0)return;const v=values[i*w+j];
out.textContent="map "+(v===0?"0":v.toPrecision(4))+"  scan grey "+grey[i*w+j]+"/255";
out.style.display="block";const x=e.clientX-r.left+12, y=e.clientY-r.top+12;
out.style.left=Math.min(x,r.width-out.offsetWidth)+"px";out.style.top=(y+out.offsetHeight>r.height?y-out.offsetHeight-24:y)+"px";});
img.addEventListener("mouseleave",()=>{out.style.display="none";});
</script></body></html>"""


def png_base64(rgb: np.ndarray) -> str:
    """uint8 RGB pixels as a base64 PNG (fast compression: it is sent on every redraw)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def grey_levels(grey: np.ndarray) -> np.ndarray:
    """The scan's grey level in [0, 1] as the picture shows it, 0-255."""
    return np.rint(np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def hover_grid(values: np.ndarray, grey: np.ndarray) -> dict[str, Any]:
    """The read-out's arrays: `values` (the map on the model's grid, h x w) and `grey` (the scan's grey level on that
    grid, in [0, 1]; read out 0-255), every k-th cell when the grid is larger than MAX_HOVER_SIDE. Cell (i, j) of
    the read-out covers the picture's pixels [i * H / rows, (i + 1) * H / rows) x [j * W / cols, (j + 1) * W / cols)."""
    values = np.asarray(values, dtype=np.float32)
    k = max(1, -(-max(values.shape) // MAX_HOVER_SIDE))
    return {"values": np.ascontiguousarray(values[::k, ::k], dtype="<f4"), "grey": grey_levels(grey)[::k, ::k].copy(),
            "step": k}


def colour_stops(cmap: str, steps: int = 11) -> str:
    """The CSS gradient stops of a matplotlib colour map (the one the overlay is drawn with)."""
    from matplotlib import colormaps

    colours = colormaps[cmap](np.linspace(0.0, 1.0, steps))[:, :3] * 255.0
    return ",".join(f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in colours)


def readout_parts(values: np.ndarray, grey: np.ndarray) -> dict[str, str]:
    """The parts of the page that stay the same across redraws (computed once per panel): the read-out's bytes."""
    grid = hover_grid(values, grey)
    rows, cols = grid["values"].shape
    return {"__VALUES__": base64.b64encode(grid["values"].tobytes()).decode("ascii"),
            "__GREY__": base64.b64encode(grid["grey"].tobytes()).decode("ascii"), "__GW__": str(cols), "__GH__": str(rows)}


def overlay_page(rgb: np.ndarray, readout: dict[str, str], scale: tuple[str, float, float], title: str,
                 colour_label: str = "", max_height: int = PICTURE_HEIGHT) -> str:
    """The HTML page of one overlay.

    Args:
        rgb: the overlay as drawn (uint8 H x W x 3, the picture's grid).
        readout: `readout_parts` of the map as drawn on the model's grid and the scan's grey level there.
        scale: (colour map, vmin, vmax) the overlay was coloured with: its colour bar.
        title: the picture's text alternative.
        colour_label: the colour bar's caption (how the map is drawn).
        max_height: the largest height, in CSS pixels, the picture is shown at.

    Returns:
        A self-contained HTML page (no network: the picture and the values are inside it).
    """
    cmap, vmin, vmax = scale
    parts = {**readout, "__W__": str(int(rgb.shape[1])), "__H__": str(int(rgb.shape[0])), "__MAXH__": str(int(max_height)),
             "__TITLE__": html.escape(title), "__LABEL__": html.escape(colour_label), "__VMIN__": f"{vmin:.3g}",
             "__VMAX__": f"{vmax:.3g}", "__GRADIENT__": colour_stops(cmap), "__PNG__": png_base64(rgb)}
    page = _PAGE
    for key, value in parts.items():
        page = page.replace(key, value)
    return page

