"""The app's interactive overlay: a small HTML page (shown in an iframe) with the overlay as drawn, its colour bar,
and a read-out under the cursor of the map's raw value and the scan's grey level at the model pixel there.

The picture is one PNG at the picture's grid; the read-out reads the map on its own grid (the model's input grid: each
cell is one value the method computed, never an interpolated one) from float32 bytes. Both come by URL, so a redraw
(threshold, opacity) sends a new page of a few kB and one PNG; no chart library. No Streamlit here (`tabs` serves it).
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
<div id="wrap"><img id="picture" alt="__TITLE__" src="__PNG__"><div id="readout"></div></div>
<div id="barbox"><div id="bar"></div><div id="ticks"><span>__VMIN__</span><span>__LABEL__</span><span>__VMAX__</span></div></div>
<script>
const W=__W__, H=__H__, w=__GW__, h=__GH__, maxH=__MAXH__;
let values=null, grey=null;
Promise.all(["__VALUES__","__GREY__"].map(u=>fetch(u).then(r=>r.arrayBuffer()))).then(([v,g])=>{
values=new Float32Array(v);grey=new Uint8Array(g);document.getElementById("picture").dataset.ready="1";});
const img=document.getElementById("picture"), out=document.getElementById("readout");
function fit(){const s=Math.min((document.body.clientWidth||W)/W, maxH/H);img.style.width=(W*s)+"px";img.style.height=(H*s)+"px";
document.getElementById("barbox").style.width=(W*s)+"px";}
fit();window.addEventListener("resize",fit);
img.addEventListener("mousemove",e=>{const r=img.getBoundingClientRect();
const j=Math.min(w-1,Math.floor((e.clientX-r.left)/r.width*w)), i=Math.min(h-1,Math.floor((e.clientY-r.top)/r.height*h));
if(i<0||j<0||!values)return;const v=values[i*w+j];
out.textContent="map "+(v===0?"0":v.toPrecision(4))+"  scan grey "+grey[i*w+j]+"/255";
out.style.display="block";const x=e.clientX-r.left+12, y=e.clientY-r.top+12;
out.style.left=Math.min(x,r.width-out.offsetWidth)+"px";out.style.top=(y+out.offsetHeight>r.height?y-out.offsetHeight-24:y)+"px";});
img.addEventListener("mouseleave",()=>{out.style.display="none";});
</script></body></html>"""


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 RGB pixels as a PNG (fast compression: it is made on every redraw)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


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


def readout_bytes(values: np.ndarray, grey: np.ndarray) -> tuple[bytes, bytes, tuple[int, int]]:
    """The read-out's bytes (computed once per panel): the map as drawn on the model's grid as little-endian float32,
    the scan's grey levels as uint8, and their (rows, columns)."""
    grid = hover_grid(values, grey)
    return grid["values"].tobytes(), grid["grey"].tobytes(), tuple(grid["values"].shape)


def data_url(data: bytes, mimetype: str) -> str:
    """A data URL of `data` (where the page cannot serve the bytes from a URL of its own)."""
    return f"data:{mimetype};base64," + base64.b64encode(data).decode("ascii")


def overlay_page(picture: str, values: str, grey: str, shape: tuple[int, int], grid: tuple[int, int],
                 scale: tuple[str, float, float], title: str, colour_label: str = "",
                 max_height: int = PICTURE_HEIGHT) -> str:
    """The HTML page of one overlay; the picture and the read-out's bytes are URLs (served by the app, or data URLs).

    Args:
        picture: URL of the overlay as drawn (a PNG on the picture's grid, `shape` = (H, W)).
        values: URL of the read-out's float32 map values (`readout_bytes`), `grid` = (rows, columns).
        grey: URL of the read-out's uint8 grey levels, on the same grid.
        shape: the picture's (H, W) in pixels.
        grid: the read-out's (rows, columns).
        scale: (colour map, vmin, vmax) the overlay was coloured with: its colour bar.
        title: the picture's text alternative.
        colour_label: the colour bar's caption (how the map is drawn).
        max_height: the largest height, in CSS pixels, the picture is shown at.

    Returns:
        A small HTML page: a redraw changes only the picture's URL, the read-out's URLs stay (and stay cached).
    """
    cmap, vmin, vmax = scale
    parts = {"__W__": str(int(shape[1])), "__H__": str(int(shape[0])), "__MAXH__": str(int(max_height)),
             "__TITLE__": html.escape(title), "__LABEL__": html.escape(colour_label), "__VMIN__": f"{vmin:.3g}",
             "__VMAX__": f"{vmax:.3g}", "__GRADIENT__": colour_stops(cmap), "__GW__": str(int(grid[1])),
             "__GH__": str(int(grid[0])), "__PNG__": picture, "__VALUES__": values, "__GREY__": grey}
    page = _PAGE
    for key, value in parts.items():
        page = page.replace(key, value)
    return page
