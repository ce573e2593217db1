"""The app's interactive overlay: a small HTML page (shown in an iframe) with the overlay as drawn, its colour bar,
and a read-out under the cursor of the map's raw value and the scan's grey level at the model pixel there.

The page draws the overlay on a canvas from the scan's grey levels and the map as drawn (float32) on the picture's grid,
through the colour map's lookup table, and applies the page's threshold slider in the browser (no rerun); the read-out
reads the map on the model's grid (each cell one value the method computed, never an interpolated one). The bytes come
by URL and do not change with the view; no chart library. No Streamlit here (`tabs` serves it).
"""
from __future__ import annotations

import base64
import html
import json
from typing import Any, Mapping, Optional

import numpy as np

#: the read-out grid is at most this many cells a side (a larger model grid is read out every k-th pixel)
MAX_HOVER_SIDE = 256
PICTURE_HEIGHT = 300  # CSS pixels: the largest height the picture is shown at (it fits the column's width too)
FRAME_HEIGHT = PICTURE_HEIGHT + 44  # with the colour bar
#: the page's threshold slider (Streamlit's widget with key "threshold"), which every overlay page reads
THRESHOLD_SLIDER = '.st-key-threshold input[type="range"]'

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
body{margin:0;font:12px sans-serif;color:#31333f;background:transparent}
#wrap{position:relative;display:inline-block;line-height:0}
#picture{image-rendering:pixelated;cursor:crosshair;display:block}
#readout{position:absolute;display:none;pointer-events:none;background:rgba(20,20,20,.85);color:#fff;padding:3px 6px;
border-radius:3px;font:12px monospace;line-height:1.3;white-space:nowrap;z-index:2}
#bar{height:10px;margin-top:6px;background:linear-gradient(to right,__GRADIENT__)}
#ticks{display:flex;justify-content:space-between;color:#555}
</style></head><body>
<div id="wrap"><canvas id="picture" role="img" aria-label="__TITLE__" width="__W__" height="__H__"></canvas><div id="readout"></div></div>
<div id="barbox"><div id="bar"></div><div id="ticks"><span>__VMIN__</span><span>__LABEL__</span><span>__VMAX__</span></div></div>
<script>
const W=__W__, H=__H__, w=__GW__, h=__GH__, maxH=__MAXH__, KEY=__KEY__;
const LUT=Uint8Array.from(atob("__LUT__"),c=>c.charCodeAt(0)), VMIN=__VMINF__, VMAX=__VMAXF__, ALPHA=__ALPHA__,
MODE="__MODE__", TOP=Math.max(Math.abs(VMIN),Math.abs(VMAX)), SLIDER=__SLIDER__;
let values=null, grey=null, plane=null, scan=null, region=null, sorted=null, drawnAt=null;
const img=document.getElementById("picture"), out=document.getElementById("readout"), ctx=img.getContext("2d");
Promise.all(["__VALUES__","__GREY__","__PLANE__","__SCAN__","__REGION__"].map(u=>fetch(u).then(r=>r.arrayBuffer())))
.then(([v,g,p,s,o])=>{values=new Float32Array(v);grey=new Uint8Array(g);plane=new Float32Array(p);scan=new Uint8Array(s);
region=new Uint8Array(o);draw(level());watch();img.dataset.ready="1";});
// the threshold is the page's Streamlit slider (one control for every overlay and the exports): read in the browser
function slider(){try{return window.parent.document.querySelector(SLIDER);}catch(e){return null;}}
function level(){const s=slider();const v=s?parseFloat(s.value):NaN;return isNaN(v)?0:v;}
function cutoff(q){if(q<=0)return 0;if(MODE!=="quantile")return Math.fround(q*TOP);
if(!sorted){sorted=Float32Array.from(plane,Math.abs).sort();}
const x=q*(sorted.length-1), lo=Math.floor(x), hi=Math.min(lo+1,sorted.length-1), t=x-lo, a=sorted[lo], b=sorted[hi];
return Math.fround(t>=0.5?b-(b-a)*(1-t):a+(b-a)*t);}
function draw(q){const cut=cutoff(q), n=W*H, span=VMAX>VMIN?VMAX-VMIN:1, div=VMIN<0&&0<VMAX, keep=new Uint8Array(n);
const im=ctx.createImageData(W,H), d=im.data;
for(let k=0;k<n;k++){const m=Math.abs(plane[k]);keep[k]=q<=0||(m>=cut&&(MODE!=="quantile"||m>0))?1:0;
let a=keep[k]?plane[k]:0;let t=(a-VMIN)/span;t=t!==t?0:(t<0?0:(t>1?1:t));
const i=Math.floor(t*255+0.5)*3, mg=div?Math.abs(2*t-1):t, wt=ALPHA*(div?mg:Math.sqrt(mg)), g=scan[k]*(1-wt), o=4*k;
d[o]=Math.min(255,g+wt*LUT[i]+0.5);d[o+1]=Math.min(255,g+wt*LUT[i+1]+0.5);d[o+2]=Math.min(255,g+wt*LUT[i+2]+0.5);d[o+3]=255;}
if(q>0)edge(keep,[0,220,255],d);if(region.length===n)edge(region,[0,255,120],d);
ctx.putImageData(im,0,0);const t0=performance.timeOrigin+performance.now();
img.dataset.drawn=KEY+":"+q;requestAnimationFrame(()=>{drawnAt={level:q,start:t0,frame:performance.timeOrigin+performance.now()};
window.medlensDrawn=drawnAt;});}
function edge(m,c,d){for(let i=0;i<H;i++)for(let j=0;j<W;j++){const k=i*W+j;if(!m[k])continue;
if(i===0||j===0||i===H-1||j===W-1||!m[k-1]||!m[k+1]||!m[k-W]||!m[k+W]){d[4*k]=c[0];d[4*k+1]=c[1];d[4*k+2]=c[2];}}}
let shown=null;
function watch(){shown=level();let doc=null;try{doc=window.parent.document;}catch(e){return;}
new MutationObserver(()=>{const q=level();if(q!==shown){shown=q;draw(q);}}).observe(doc.body,
{subtree:true,attributes:true,attributeFilter:["value","aria-valuetext"]});
doc.addEventListener("input",()=>{const q=level();if(q!==shown){shown=q;draw(q);}},true);}
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


def canvas_bytes(image: np.ndarray, plane: np.ndarray, region: Optional[np.ndarray]) -> tuple[bytes, bytes, bytes]:
    """What the page draws its canvas from (computed once per panel): the scan's grey levels (uint8), the map as drawn
    (little-endian float32) and the region's mask (uint8; empty when none), all on the picture's grid."""
    mask = b"" if region is None else np.ascontiguousarray(region, dtype=bool).astype(np.uint8).tobytes()
    return grey_levels(image).tobytes(), np.ascontiguousarray(plane, dtype="<f4").tobytes(), mask


def overlay_page(urls: Mapping[str, str], shape: tuple[int, int], grid: tuple[int, int],
                 scale: tuple[str, float, float], drawing: tuple[float, str], title: str, colour_label: str = "",
                 max_height: int = PICTURE_HEIGHT) -> str:
    """The HTML page of one overlay: it draws the overlay on a canvas (as `medlens.app.views.overlay_rgb` does) with
    the threshold read from the page's Streamlit slider, so a threshold move redraws in the browser, no rerun.

    Args:
        urls: where the page reads its bytes (served by the app, or data URLs): "scan", "plane", "region" from
            `canvas_bytes` (on the picture's grid, `shape` = (H, W)); "values", "grey" from `readout_bytes` (the
            read-out, on its grid of `grid` = (rows, columns)).
        shape: the picture's (H, W) in pixels.
        grid: the read-out's (rows, columns).
        scale: (colour map, vmin, vmax) the overlay is coloured with: its lookup table and colour bar.
        drawing: (opacity, threshold mode "quantile" or "value").
        title: the picture's text alternative.
        colour_label: the colour bar's caption (how the map is drawn).
        max_height: the largest height, in CSS pixels, the picture is shown at.

    Returns:
        A small HTML page that does not depend on the threshold: a threshold move leaves it (and its iframe) as it is.
    """
    from medlens.io.render import _lut

    cmap, vmin, vmax = scale
    lut = np.clip(_lut(cmap), 0, 255).astype(np.uint8).tobytes()
    key = f"{cmap}:{vmin:.6g}:{vmax:.6g}:{drawing[0]:.3f}:{drawing[1]}"
    parts = {"__W__": str(int(shape[1])), "__H__": str(int(shape[0])), "__MAXH__": str(int(max_height)),
             "__TITLE__": html.escape(title), "__LABEL__": html.escape(colour_label), "__VMINF__": repr(float(vmin)),
             "__VMAXF__": repr(float(vmax)), "__VMIN__": f"{vmin:.3g}", "__VMAX__": f"{vmax:.3g}",
             "__GRADIENT__": colour_stops(cmap), "__GW__": str(int(grid[1])), "__GH__": str(int(grid[0])),
             "__LUT__": base64.b64encode(lut).decode("ascii"), "__ALPHA__": repr(float(drawing[0])),
             "__MODE__": "value" if drawing[1] == "value" else "quantile", "__SLIDER__": json.dumps(THRESHOLD_SLIDER),
             "__KEY__": json.dumps(key).replace("<", "\\u003c")}
    parts.update({f"__{name.upper()}__": urls[name] for name in ("values", "grey", "plane", "scan", "region")})
    page = _PAGE
    for name, value in parts.items():
        page = page.replace(name, value)
    return page
