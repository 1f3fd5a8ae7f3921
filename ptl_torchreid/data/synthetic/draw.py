"""Drawing primitives: polygons for ellipses, limbs and (rounded) rectangles, and :class:`Painter`, which fills
them anti-aliased, in one colour or a two-colour clothing pattern."""
import cv2
import numpy as np

__all__ = ["bgr", "ellipse", "circle", "limb", "rect", "round_rect", "Painter"]


def bgr(r, g, b):
    """An (r, g, b) colour as OpenCV's float BGR triple."""
    return np.array([b, g, r], np.float32)


_TRIG = {}


def ellipse(c, ax, ay, a0=0.0, a1=360.0, n=24):
    key = (a0, a1, n)
    if key not in _TRIG:  # the same few arcs are drawn thousands of times
        t = np.deg2rad(np.linspace(a0, a1, n))
        _TRIG[key] = np.stack([np.cos(t), np.sin(t)], 1)
    return _TRIG[key] * (ax, ay) + (c[0], c[1])


def circle(c, r):
    return ellipse(c, r, r, n=16 if r < 12 else 24)


def _quad(p0, p1, w0, w1):
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
    return np.stack([p0 + n * w0, p1 + n * w1, p1 - n * w1, p0 - n * w0])


def limb(p0, p1, w0, w1):
    return [_quad(p0, p1, w0, w1), circle(p0, w0), circle(p1, w1)]


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def round_rect(x0, y0, x1, y1, r):
    r = max(min(r, (x1 - x0) / 2, (y1 - y0) / 2), 0.5)
    return np.concatenate(
        [
            ellipse((x1 - r, y0 + r), r, r, 270, 360, 7),
            ellipse((x1 - r, y1 - r), r, r, 0, 90, 7),
            ellipse((x0 + r, y1 - r), r, r, 90, 180, 7),
            ellipse((x0 + r, y0 + r), r, r, 180, 270, 7),
        ]
    )


def _pattern_mask(p, u, v):
    """Where the second colour shows, for pattern ``p`` at body coordinates (u, v) in person heights."""
    kind, period = p["kind"], p["period"]
    if kind == "hstripes":
        return ((v / period + p["phase"]) % 1.0) < p["duty"]
    if kind == "vstripes":
        return ((u / period + p["phase"]) % 1.0) < p["duty"]
    if kind == "checks":
        return (np.floor(u / period + p["phase"]) + np.floor(v / period)) % 2 == 0
    if kind == "plaid":
        return (((u / period + p["phase"]) % 1.0) < 0.3) | (((v / period) % 1.0) < 0.3)
    if kind == "dots":
        row = np.floor(v / period)
        fu = (u / period + 0.5 * (row % 2) + p["phase"]) % 1.0 - 0.5
        fv = (v / period) % 1.0 - 0.5
        return fu * fu + fv * fv < p["radius"] ** 2
    if kind == "block":
        return v > p["split"] * 0.3
    if kind == "diagonal":
        return (u * p["slope"] + v) > p["split"] * 0.3
    raise ValueError(kind)


def _flatten(polys):
    if isinstance(polys, np.ndarray):
        return [polys]
    return [p for item in polys for p in _flatten(item)]


class Painter:
    """Anti-aliased polygon fills (solid or patterned) on a uint8 BGR canvas, optionally mirrored about x=mirror_x.

    Several polygons passed together form their union (each is filled by its own call; one fillPoly call with
    overlapping contours would leave even-odd holes).
    """

    def __init__(self, canvas, mirror_x=None):
        self.canvas = canvas
        self.mirror_x = mirror_x

    def fill(self, polys, colour, colour2=None, pattern=None, origin=(0.0, 0.0), unit=1.0):
        polys = _flatten(polys)
        if self.mirror_x is not None:
            polys = [np.stack([2 * self.mirror_x - p[:, 0], p[:, 1]], 1) for p in polys]
        if pattern is None or pattern["kind"] == "solid" or colour2 is None:
            col = tuple(min(max(float(c), 0.0), 255.0) for c in colour)
            for p in polys:
                cv2.fillPoly(self.canvas, [np.round(p * 16).astype(np.int32)], col, lineType=cv2.LINE_AA, shift=4)
            return
        h, w = self.canvas.shape[:2]
        allp = np.concatenate(polys)
        x0, y0 = max(int(np.floor(allp[:, 0].min())) - 1, 0), max(int(np.floor(allp[:, 1].min())) - 1, 0)
        x1, y1 = min(int(np.ceil(allp[:, 0].max())) + 2, w), min(int(np.ceil(allp[:, 1].max())) + 2, h)
        if x1 <= x0 or y1 <= y0:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for p in polys:
            cv2.fillPoly(mask, [np.round((p - (x0, y0)) * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        if self.mirror_x is not None:
            xx = 2 * self.mirror_x - xx  # keep the pattern attached to the body
        sel = _pattern_mask(pattern, (xx - origin[0]) / unit, (yy - origin[1]) / unit)
        col = np.where(sel[..., None], np.asarray(colour2, np.float32), np.asarray(colour, np.float32))
        a = mask.astype(np.float32)[..., None] * (1.0 / 255.0)
        roi = self.canvas[y0:y1, x0:x1]
        roi[:] = np.clip(roi + (col - roi) * a + 0.5, 0, 255).astype(np.uint8)


