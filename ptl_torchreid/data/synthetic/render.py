"""Cameras and rendering: each camera's domain (scene panorama, illumination, colour cast, blur, resolution,
noise, framing, perspective, preferred view, clutter and occluders) drawn from the style preset, and
:func:`render_image`, which draws one bounding-box crop of an identity seen by a camera."""
import colorsys
import dataclasses
import zlib
from typing import Optional

import cv2
import numpy as np

from .draw import Painter, bgr, circle, rect, round_rect
from .params import STREAM_CAMERA, STYLES
from .people import draw_blob_person, draw_person, random_clothes

__all__ = ["VIEWS", "make_cameras", "render_image"]

_SUPERSAMPLE = 2  # draw at twice the stored size, then area-downsample: cheap anti-aliasing


def _noise_field(rng, h, w, cell, amp):
    small = rng.normal(0.0, 1.0, (h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)[..., None] * amp


def _scene_colour(rng, rgb, spread=18.0):
    return np.clip(bgr(*rgb) + rng.uniform(-spread, spread, 3), 0, 255).astype(np.float32)


def _make_scene(rng, kind, h, w, horizon):
    """A camera's fixed background panorama; each image crops a window of it."""
    img = np.empty((h, w, 3), np.uint8)
    pt = Painter(img)
    hz = int(horizon)
    if kind == "indoor":
        wall = _scene_colour(
            rng, [(225, 215, 195), (200, 205, 210), (230, 225, 215), (190, 200, 180)][int(rng.integers(4))]
        )
        floor = _scene_colour(rng, [(150, 130, 110), (170, 170, 165), (120, 100, 80)][int(rng.integers(3))])
        img[:hz], img[hz:] = wall, floor
        x = rng.uniform(0, 40)
        while x < w:
            kind_obj = rng.integers(3)
            ow = rng.uniform(0.15, 0.4) * h
            if kind_obj == 0:  # door
                pt.fill(rect(x, hz - 0.55 * h, x + 0.5 * ow, hz), wall * rng.uniform(0.4, 0.7))
            elif kind_obj == 1:  # poster
                pt.fill(rect(x, hz - 0.5 * h, x + 0.6 * ow, hz - 0.2 * h), random_clothes(rng)[0])
            x += ow + rng.uniform(0.1, 0.5) * h
        for i in range(1, 12):  # floor tiles receding to the horizon
            y = hz + (h - hz) * (i / 11.0) ** 1.6
            pt.fill(rect(0, y - 0.6, w, y + 0.6), floor * 0.8)
        for x in np.arange(rng.uniform(0, 30), w, 30.0):
            pt.fill(
                np.array(
                    [[x - 0.6, hz], [x + 0.6, hz], [x + (x - w / 2) * 0.2 + 0.9, h], [x + (x - w / 2) * 0.2 - 0.9, h]]
                ),
                floor * 0.8,
            )
    elif kind == "street":
        facade = _scene_colour(
            rng, [(170, 90, 70), (160, 160, 160), (200, 180, 150), (120, 110, 100)][int(rng.integers(4))]
        )
        ground = _scene_colour(rng, (110, 110, 112), 10)
        img[:hz], img[hz:] = facade, ground
        win = _scene_colour(rng, [(60, 80, 110), (40, 45, 55), (120, 150, 170)][int(rng.integers(3))], 10)
        step = rng.uniform(0.18, 0.28) * h
        for x in np.arange(rng.uniform(0, step), w, step):
            for y in np.arange(0.04 * h, hz - 0.15 * h, step * 1.2):
                pt.fill(rect(x, y, x + 0.55 * step, y + 0.7 * step), win)
        if rng.random() < 0.7:  # shop front band
            pt.fill(rect(0, hz - 0.14 * h, w, hz - 0.04 * h), random_clothes(rng)[0] * 0.9)
        pt.fill(rect(0, hz, w, hz + 0.03 * h), ground * 1.3)  # kerb
    elif kind == "park":
        sky = _scene_colour(rng, (170, 200, 230), 15)
        grass = _scene_colour(rng, [(80, 130, 60), (100, 140, 70), (120, 130, 70)][int(rng.integers(3))])
        sky_y = int(hz * rng.uniform(0.3, 0.6))
        img[:sky_y], img[sky_y:hz], img[hz:] = sky, grass * 0.7, grass
        for x in np.arange(rng.uniform(0, 40), w, rng.uniform(40, 90)):
            r = rng.uniform(0.12, 0.22) * h
            pt.fill(rect(x - 0.02 * h, sky_y, x + 0.02 * h, hz), bgr(90, 60, 40))
            pt.fill(
                [
                    circle(
                        (x + rng.uniform(-r, r) * 0.5, sky_y - rng.uniform(0, r) * 0.3 + dy), r * rng.uniform(0.6, 1.0)
                    )
                    for dy in (0, 0.3 * r, -0.3 * r)
                ],
                grass * rng.uniform(0.45, 0.7),
            )
        pt.fill(rect(0, hz + 0.25 * (h - hz), w, hz + 0.55 * (h - hz)), _scene_colour(rng, (200, 185, 150), 15))
    elif kind == "station":
        wall = _scene_colour(rng, [(80, 80, 90), (110, 100, 90), (60, 70, 80)][int(rng.integers(3))])
        floor = _scene_colour(rng, (150, 150, 145), 15)
        img[:hz], img[hz:] = wall, floor
        for x in np.arange(rng.uniform(0, 60), w, rng.uniform(60, 110)):
            pt.fill(rect(x, 0, x + 0.12 * h, hz), wall * 1.6)
            pt.fill(rect(x - 0.1 * h, 0.05 * h, x + 0.25 * h, 0.09 * h), bgr(250, 250, 230))
        pt.fill(rect(0, hz + 0.15 * (h - hz), w, hz + 0.22 * (h - hz)), bgr(230, 200, 40))
    else:
        raise ValueError(kind)
    texture = _noise_field(rng, h, w, 16, 7.0) + _noise_field(rng, h, w, 3, 3.0)
    return np.clip(img + texture + 0.5, 0, 255).astype(np.uint8)


def _make_panorama(rng, main_scene, scenes, h, wc, horizon):
    """A camera's fixed background: a strip of scene segments (mostly its main scene type); every image crops a
    window of it, so the backgrounds of one camera vary but stay recognisably its own."""
    width = 16 * wc
    strip = np.empty((h, width, 3), np.uint8)
    x = 0
    while x < width:
        seg = int(rng.uniform(1.2, 3.0) * wc)
        kind = main_scene if rng.random() < 0.6 else scenes[int(rng.integers(len(scenes)))]
        part = _make_scene(rng, kind, h, seg, horizon + rng.uniform(-0.04, 0.04) * h)
        strip[:, x : x + seg] = part[:, : width - x]
        x += seg
    return strip


@dataclasses.dataclass
class _Camera:
    index: int
    scene: str
    panorama: np.ndarray
    shade: np.ndarray
    gain: float
    contrast: float
    gamma: float
    cast: np.ndarray
    cast_hue: float
    saturation: float
    blur: float
    lowres: float
    noise: float
    jpeg: int
    scale: float
    perspective: float
    warp: Optional[tuple]
    offset: float
    flip: float
    views: np.ndarray
    occlusion: float
    clutter: tuple
    light_jitter: float

    def describe(self):
        """JSON-friendly summary for the manifest."""
        return dict(
            camid=self.index + 1,
            scene=self.scene,
            gain=round(self.gain, 3),
            contrast=round(self.contrast, 3),
            gamma=round(self.gamma, 3),
            cast_bgr=[round(float(c), 3) for c in self.cast],
            saturation=round(self.saturation, 3),
            blur=round(self.blur, 3),
            lowres=round(self.lowres, 3),
            noise=round(self.noise, 3),
            jpeg_quality=self.jpeg,
            person_scale=round(self.scale, 3),
            perspective=round(self.perspective, 3),
            offset=round(self.offset, 3),
            view_probs=dict(zip(("front", "back", "side"), [round(float(v), 3) for v in self.views])),
            occlusion=round(self.occlusion, 3),
        )


def make_cameras(params):
    style = STYLES[params.style]
    n = params.num_cameras
    hc, wc = params.height * _SUPERSAMPLE, params.width * _SUPERSAMPLE
    style_key = zlib.crc32(params.style.encode())
    layout = np.random.default_rng(np.random.SeedSequence([params.seed, STREAM_CAMERA, style_key, n]))
    # stratify brightness and colour cast so that the cameras of one dataset are clearly different
    gain_q = (layout.permutation(n) + layout.uniform(0.2, 0.8, n)) / n
    hue_q = (layout.permutation(n) + layout.uniform(0.2, 0.8, n)) / n
    hue_base = layout.uniform(0, 360)
    scenes = list(style["scenes"])
    cams = []
    for c in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, STREAM_CAMERA, style_key, n, c]))

        def u(key):
            lo, hi = style[key]
            return float(rng.uniform(lo, hi)) if hi > lo else float(lo)

        lo, hi = style["gain"]
        gain = float(lo + gain_q[c] * (hi - lo))
        if style["cast_hue"] is None:
            hue = (hue_base + 360.0 * hue_q[c]) % 360.0
        else:
            hue = style["cast_hue"][0] + hue_q[c] * (style["cast_hue"][1] - style["cast_hue"][0])
        rgb = np.array(colorsys.hsv_to_rgb(hue / 360.0, 1.0, 1.0))
        strength = u("cast")
        cast = (1.0 + 2.0 * strength * (rgb - rgb.mean()))[::-1].astype(np.float32)  # BGR gains, mean ~1
        scene = scenes[(c + int(layout.integers(len(scenes)))) % len(scenes)]
        horizon = hc * rng.uniform(0.45, 0.7)
        panorama = _make_panorama(rng, scene, scenes, hc, wc, horizon)
        shade_strength, shade_angle = u("shade"), rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0 : params.height, 0 : params.width].astype(np.float32)
        ramp = (xx / params.width - 0.5) * np.cos(shade_angle) + (yy / params.height - 0.5) * np.sin(shade_angle)
        shade = ((1.0 + shade_strength * ramp) / 255.0)[..., None].astype(np.float32)
        views = rng.dirichlet([style["view_concentration"]] * 3)
        perspective = u("perspective")
        cams.append(
            _Camera(
                index=c,
                scene=scene,
                panorama=panorama,
                shade=shade,
                gain=gain,
                contrast=u("contrast"),
                gamma=u("gamma"),
                cast=cast,
                cast_hue=hue,
                saturation=u("saturation"),
                blur=u("blur"),
                lowres=u("lowres"),
                noise=u("noise"),
                jpeg=int(round(u("jpeg"))),
                scale=u("scale"),
                perspective=perspective,
                warp=_perspective_maps(perspective, hc, wc),
                offset=u("offset"),
                flip=float(rng.uniform(0.15, 0.85)),
                views=views,
                occlusion=u("occlusion"),
                clutter=tuple(style["clutter"]),
                light_jitter=float(style["light_jitter"]),
            )
        )
    return cams


_OCCLUDERS = {
    "indoor": ("person", "pillar", "counter"),
    "street": ("car", "pole", "person", "railing"),
    "park": ("bush", "person", "railing", "pole"),
    "station": ("pillar", "person", "railing"),
}


def _draw_clutter(pt, rng, cam, hc, wc):
    for _ in range(int(rng.integers(cam.clutter[0], cam.clutter[1] + 1))):
        kind = rng.integers(4)
        x = rng.uniform(0, wc)
        if kind == 0:  # distant passer-by
            P = hc * rng.uniform(0.3, 0.55)
            draw_blob_person(pt, rng, x, hc * rng.uniform(0.55, 0.8), P)
        elif kind == 1:  # sign
            y = hc * rng.uniform(0.05, 0.4)
            s = wc * rng.uniform(0.15, 0.35)
            pt.fill(rect(x, y, x + s, y + 0.6 * s), random_clothes(rng)[0])
        elif kind == 2:  # bin / box on the floor
            s = wc * rng.uniform(0.15, 0.3)
            y = hc * rng.uniform(0.75, 0.95)
            pt.fill(round_rect(x, y - 1.4 * s, x + s, y, 0.1 * s), random_clothes(rng)[1] * 0.8)
        else:  # lamp post in the distance
            pt.fill(rect(x, hc * 0.05, x + wc * 0.03, hc * rng.uniform(0.6, 0.8)), bgr(70, 70, 75))


def _draw_occluder(pt, rng, cam, hc, wc, foot_y, P):
    kind = _OCCLUDERS[cam.scene][int(rng.integers(len(_OCCLUDERS[cam.scene])))]
    if kind in ("pole", "pillar"):
        w = wc * (rng.uniform(0.07, 0.13) if kind == "pole" else rng.uniform(0.18, 0.3))
        x = rng.uniform(0.1, 0.9) * wc
        col = bgr(90, 95, 100) if kind == "pole" else cam.panorama[0, 0].astype(np.float32) * 1.3
        pt.fill(rect(x - w / 2, 0, x + w / 2, hc), np.clip(col, 0, 255))
        pt.fill(rect(x - w / 2, 0, x - w / 4, hc), np.clip(col * 1.25, 0, 255))
    elif kind in ("car", "counter", "bush"):
        top = foot_y - P * rng.uniform(0.18, 0.4)
        if kind == "bush":
            col = bgr(60, 110, 50) * rng.uniform(0.7, 1.1)
            pt.fill(
                [
                    circle((x, top + 0.12 * P + rng.uniform(0, 0.08) * P), 0.12 * P * rng.uniform(0.8, 1.3))
                    for x in np.linspace(-0.1 * wc, 1.1 * wc, 6)
                ]
                + [rect(0, top + 0.1 * P, wc, hc)],
                col,
            )
        else:
            col = random_clothes(rng)[0] if kind == "car" else _scene_colour(rng, (140, 110, 80), 30)
            pt.fill(round_rect(-0.2 * wc, top, 1.2 * wc, hc + 10, 0.06 * P if kind == "car" else 1), col)
            if kind == "car":
                pt.fill(rect(-0.2 * wc, top + 0.03 * P, 1.2 * wc, top + 0.06 * P), col * 1.3)
    elif kind == "railing":
        y = foot_y - P * rng.uniform(0.25, 0.45)
        col = bgr(60, 60, 65) * rng.uniform(0.7, 1.5)
        pt.fill(
            [rect(0, y, wc, y + 0.025 * P), rect(0, y + 0.12 * P, wc, y + 0.14 * P)]
            + [rect(x, y, x + 0.02 * P, hc) for x in np.arange(rng.uniform(0, 0.2) * wc, wc, 0.35 * wc)],
            col,
        )
    else:  # a passer-by in front, at one edge
        side = rng.choice([-1.0, 1.0])
        x = wc * (0.5 + side * rng.uniform(0.5, 0.7))
        draw_blob_person(pt, rng, x, foot_y + rng.uniform(0.0, 0.08) * P, P * rng.uniform(1.0, 1.15))


def _perspective_maps(k, h, w):
    """Remap tables that stretch a trapezoid onto the frame: k > 0 magnifies the top (camera looking down),
    k < 0 the bottom. Fixed per camera, so computed once."""
    if abs(k) < 1e-4:
        return None
    d = abs(k) * w
    src = (
        np.float32([[d, 0], [w - d, 0], [w, h], [0, h]]) if k > 0 else np.float32([[0, 0], [w, 0], [w - d, h], [d, h]])
    )
    dst = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    inv = cv2.getPerspectiveTransform(dst, src)  # output pixel -> source pixel
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([xx, yy, np.ones_like(xx)], -1) @ inv.T
    map_x = (pts[..., 0] / pts[..., 2]).astype(np.float32)
    map_y = (pts[..., 1] / pts[..., 2]).astype(np.float32)
    return cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)


_LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)


def _photometric(img, cam, rng, height, width):
    # colour operations after the area downsample: they are (nearly) linear, and it is 4x fewer pixels
    x = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) * cam.shade
    gray = (x @ _LUMA_BGR)[..., None]
    x = gray + cam.saturation * (x - gray)
    m = float(x.mean())
    x = m + cam.contrast * (x - m)
    gain = cam.gain * (1.0 + cam.light_jitter * float(rng.uniform(-1, 1)))
    x = cv2.pow(np.clip(x * (gain * cam.cast), 0.0, 1.0), cam.gamma)
    if cam.blur > 0.05:
        x = cv2.GaussianBlur(x, (0, 0), cam.blur)
    if cam.lowres > 1.05:
        small = (max(int(round(width / cam.lowres)), 4), max(int(round(height / cam.lowres)), 8))
        x = cv2.resize(
            cv2.resize(x, small, interpolation=cv2.INTER_AREA), (width, height), interpolation=cv2.INTER_LINEAR
        )
    if cam.noise > 0:
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(cam.noise / 255.0)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


VIEWS = ("front", "back", "side")


def render_image(ident, cam, track, rng, params):
    """One bounding-box crop of ``ident`` seen by ``cam``; ``track`` holds what stays fixed within a tracklet."""
    hc, wc = params.height * _SUPERSAMPLE, params.width * _SUPERSAMPLE
    x0 = int(rng.integers(0, cam.panorama.shape[1] - wc + 1))
    canvas = cam.panorama[:, x0 : x0 + wc].copy()
    pt = Painter(canvas)
    _draw_clutter(pt, rng, cam, hc, wc)
    P = cam.scale * hc * rng.uniform(0.95, 1.04)
    foot_y = hc - (hc - P) * rng.uniform(0.3, 0.65)
    cx = wc * (0.5 + cam.offset + track["dx"] + rng.normal(0, 0.025))
    view = track["view"] if rng.random() < 0.85 else VIEWS[int(rng.integers(3))]
    pose = dict(
        stride=rng.uniform(0.0, 0.14 if view == "side" else 0.08),
        swing=rng.uniform(-0.08, 0.08),
        lean=rng.normal(0, 0.008),
    )
    draw_person(Painter(canvas, mirror_x=cx if track["mirror"] else None), ident, view, pose, cx, foot_y, P)
    if rng.random() < cam.occlusion:
        _draw_occluder(pt, rng, cam, hc, wc, foot_y, P)
    if cam.warp is not None:
        canvas = cv2.remap(canvas, cam.warp[0], cam.warp[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return _photometric(canvas, cam, rng, params.height, params.width)


