"""People: an identity's appearance drawn from its seed (clothing colours and patterns, garments, proportions,
hair, accessories), the pedestrian drawn from it in a view and pose, and plain passers-by."""
import cv2
import numpy as np

from .draw import bgr, circle, ellipse, limb, rect, round_rect
from .params import STREAM_IDENTITY

__all__ = ["make_identity", "draw_person", "draw_blob_person", "random_clothes"]

_CLOTH = {
    "black": bgr(30, 30, 32),
    "white": bgr(235, 235, 230),
    "grey": bgr(128, 128, 130),
    "charcoal": bgr(70, 70, 74),
    "navy": bgr(25, 40, 90),
    "blue": bgr(40, 100, 200),
    "lightblue": bgr(140, 185, 230),
    "red": bgr(200, 35, 40),
    "maroon": bgr(120, 30, 45),
    "green": bgr(50, 140, 60),
    "olive": bgr(110, 110, 50),
    "yellow": bgr(230, 205, 50),
    "orange": bgr(240, 130, 30),
    "pink": bgr(240, 150, 180),
    "purple": bgr(110, 50, 130),
    "brown": bgr(120, 70, 40),
    "beige": bgr(215, 190, 150),
    "teal": bgr(20, 130, 130),
}
_CLOTH_NAMES = list(_CLOTH)
_TOP_WEIGHTS = np.array([3, 3, 2, 2, 2, 2, 1.5, 2, 1, 1.5, 1, 1, 1, 1, 1, 1, 1.5, 1], np.float64)
_BOTTOM_NAMES = ["black", "navy", "blue", "charcoal", "grey", "beige", "brown", "olive", "white", "red", "lightblue"]
_BOTTOM_WEIGHTS = np.array([4, 3, 3, 2, 2, 2, 1.5, 1, 0.8, 0.6, 1.2], np.float64)
_SKIN = [
    bgr(255, 224, 196),
    bgr(241, 194, 160),
    bgr(224, 172, 130),
    bgr(198, 134, 90),
    bgr(141, 85, 54),
    bgr(95, 60, 40),
]
_HAIR = [
    bgr(20, 16, 14),
    bgr(60, 40, 25),
    bgr(110, 75, 40),
    bgr(200, 165, 100),
    bgr(150, 150, 150),
    bgr(150, 60, 30),
]
_TOP_PATTERNS = ["solid", "hstripes", "vstripes", "checks", "plaid", "dots", "block", "diagonal"]
_TOP_PATTERN_WEIGHTS = np.array([4, 2, 1, 1, 1, 1, 1.5, 1], np.float64)


def _pick(rng, names, weights=None):
    p = None if weights is None else weights / weights.sum()
    return names[int(rng.choice(len(names), p=p))]


def _jitter_colour(rng, bgr, hue=8.0, sat=0.15, val=0.15):
    """Moves a colour a little in HSV so that two 'blue' shirts are not identical."""
    px = np.clip(bgr, 0, 255).astype(np.uint8).reshape(1, 1, 3)
    h, s, v = cv2.cvtColor(px, cv2.COLOR_BGR2HSV_FULL)[0, 0].astype(np.float32)
    h = (h + rng.uniform(-hue, hue) * 256 / 360) % 256
    s = np.clip(s * rng.uniform(1 - sat, 1 + sat), 0, 255)
    v = np.clip(v * rng.uniform(1 - val, 1 + val), 0, 255)
    hsv = np.array([[[h, s, v]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR_FULL)[0, 0].astype(np.float32)


def _cloth(rng, names=None, weights=None, exclude=None):
    names = names or _CLOTH_NAMES
    weights = weights if weights is not None else (_TOP_WEIGHTS if names is _CLOTH_NAMES else None)
    while True:
        name = _pick(rng, names, weights)
        if name != exclude:
            return name, _jitter_colour(rng, _CLOTH[name])


def _pattern_params(rng, kind):
    return dict(
        kind=kind,
        period=float(rng.uniform(0.04, 0.075) if kind in ("hstripes", "vstripes") else rng.uniform(0.05, 0.09)),
        duty=float(rng.uniform(0.3, 0.6)),
        phase=float(rng.uniform(0, 1)),
        split=float(rng.uniform(0.35, 0.6)),
        slope=float(rng.choice([-1, 1]) * rng.uniform(0.4, 1.2)),
        radius=float(rng.uniform(0.18, 0.32)),
    )


def make_identity(seed, pid):
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_IDENTITY, pid]))
    ident = {}
    top_name, ident["top"] = _cloth(rng)
    ident["top_pattern"] = _pattern_params(rng, _pick(rng, _TOP_PATTERNS, _TOP_PATTERN_WEIGHTS))
    _, ident["top2"] = _cloth(rng, exclude=top_name)
    ident["sleeves"] = _pick(rng, ["long", "short", "none"], np.array([5, 4, 1.0]))
    ident["bottom_kind"] = _pick(rng, ["trousers", "shorts", "skirt"], np.array([6, 2, 1.5]))
    bottom_name, ident["bottom"] = _cloth(rng, _BOTTOM_NAMES, _BOTTOM_WEIGHTS)
    bottom_pattern = "solid" if rng.random() < 0.8 else _pick(rng, ["hstripes", "vstripes", "checks", "plaid"])
    ident["bottom_pattern"] = _pattern_params(rng, bottom_pattern)
    _, ident["bottom2"] = _cloth(rng, exclude=bottom_name)
    ident["shoes"] = _jitter_colour(
        rng, _CLOTH[_pick(rng, ["black", "white", "brown", "grey", "red", "blue"], np.array([4, 3, 2, 1.5, 0.5, 0.5]))]
    )
    ident["skin"] = _jitter_colour(rng, _SKIN[int(rng.integers(len(_SKIN)))], hue=3, sat=0.08, val=0.06)
    ident["hair"] = _jitter_colour(rng, _HAIR[int(rng.integers(len(_HAIR)))], hue=4, sat=0.1, val=0.15)
    ident["hair_style"] = _pick(rng, ["short", "long", "bald", "bun"], np.array([5, 3, 0.7, 1.0]))
    # body proportions, in units of the person's height
    ident["head"] = float(rng.uniform(0.058, 0.074))
    ident["torso"] = float(rng.uniform(0.26, 0.33))
    ident["shoulder"] = float(rng.uniform(0.095, 0.14))
    ident["hip"] = float(rng.uniform(0.72, 1.0))
    ident["build"] = float(rng.uniform(0.032, 0.05))
    ident["arm"] = float(rng.uniform(0.026, 0.038))
    # accessories
    ident["hat"] = (_pick(rng, ["cap", "beanie"]), _cloth(rng)[1]) if rng.random() < 0.22 else None
    ident["backpack"] = (
        (
            _cloth(rng, ["black", "grey", "navy", "red", "green", "blue", "brown", "orange"])[1],
            float(rng.uniform(0.85, 1.15)),
        )
        if rng.random() < 0.3
        else None
    )
    ident["shoulder_bag"] = (
        (_cloth(rng, ["black", "brown", "beige", "white", "red", "grey"])[1], int(rng.choice([-1, 1])))
        if rng.random() < 0.25
        else None
    )
    ident["handbag"] = (_cloth(rng)[1], int(rng.choice([-1, 1]))) if rng.random() < 0.15 else None
    ident["scarf"] = _cloth(rng)[1] if rng.random() < 0.12 else None
    ident["print"] = (
        (
            _pick(rng, ["circle", "square", "triangle", "band"]),
            _cloth(rng, exclude=top_name)[1],
            float(rng.uniform(0.035, 0.06)),
        )
        if rng.random() < 0.3
        else None
    )
    return ident


# ----------------------------------------------------------------------------------------------------------------
# People
# ----------------------------------------------------------------------------------------------------------------


def draw_person(pt, ident, view, pose, cx, foot_y, P):
    """Draws a stylised pedestrian of height ``P`` standing at (cx, foot_y). Side views face +x."""
    side = view == "side"
    top_y = foot_y - P
    head_r = ident["head"] * P
    head_c = (cx + pose["lean"] * P, top_y + head_r * 1.05)
    neck_y = top_y + 2 * head_r + 0.008 * P
    sh_y = neck_y + 0.022 * P
    hip_y = sh_y + ident["torso"] * P
    sw = ident["shoulder"] * P * (0.55 if side else 1.0)
    ww = sw * ident["hip"] * (1.05 if side else 1.0)
    ucx = cx + pose["lean"] * P * 0.7  # upper-body centre (lean)
    leg_w = ident["build"] * P
    arm_w = ident["arm"] * P
    skin, hair, top, bottom = ident["skin"], ident["hair"], ident["top"], ident["bottom"]
    top_fill = dict(colour=top, colour2=ident["top2"], pattern=ident["top_pattern"], origin=(ucx, sh_y), unit=P)
    bot_fill = dict(
        colour=bottom, colour2=ident["bottom2"], pattern=ident["bottom_pattern"], origin=(cx, hip_y), unit=P
    )
    leg_len = foot_y - hip_y
    knee_t = 0.48
    far = 0.78  # the far limbs of a side view are in shadow

    # legs and feet
    stride = pose["stride"] * P
    if side:
        hips = [(cx, hip_y), (cx, hip_y)]
        feet = [(cx - stride, foot_y - 0.015 * P), (cx + stride, foot_y - 0.015 * P)]
    else:
        spread = 0.45 * ww
        hips = [(cx - spread, hip_y), (cx + spread, hip_y)]
        feet = [(cx - spread - 0.25 * stride, foot_y - 0.015 * P), (cx + spread + 0.25 * stride, foot_y - 0.015 * P)]
    for i, (hp, ft) in enumerate(zip(hips, feet)):
        dim = far if (side and i == 0) else 1.0
        hp, ft = np.array(hp), np.array(ft)
        knee = hp + (ft - hp) * knee_t
        if ident["bottom_kind"] == "trousers":
            pt.fill(limb(hp, ft, leg_w, leg_w * 0.75), **_dim(bot_fill, dim))
        else:
            pt.fill(limb(hp, ft, leg_w * 0.8, leg_w * 0.6), skin * dim)
            if ident["bottom_kind"] == "shorts":
                pt.fill(limb(hp, knee, leg_w * 1.05, leg_w * 0.95), **_dim(bot_fill, dim))
        shoe_dx = 0.02 * P if side else 0.0
        pt.fill(
            ellipse((ft[0] + shoe_dx, ft[1] + 0.006 * P), 0.034 * P if side else 0.027 * P, 0.016 * P),
            ident["shoes"] * dim,
        )
    # hip block / skirt
    if ident["bottom_kind"] == "skirt":
        pt.fill(
            np.array(
                [
                    [cx - ww, hip_y - 0.02 * P],
                    [cx + ww, hip_y - 0.02 * P],
                    [cx + ww * 1.45, hip_y + 0.5 * leg_len],
                    [cx - ww * 1.45, hip_y + 0.5 * leg_len],
                ]
            ),
            **bot_fill,
        )
    else:
        pt.fill(rect(cx - ww, hip_y - 0.02 * P, cx + ww, hip_y + 0.07 * P), **bot_fill)

    # arms: in a side view the far arm goes behind the torso
    swing = pose["swing"] * P
    hand_y = sh_y + 0.36 * P
    if side:
        shoulders = [(ucx, sh_y + 0.02 * P), (ucx, sh_y + 0.02 * P)]
        hands = [(ucx + swing, hand_y), (ucx - swing, hand_y)]
    else:
        shoulders = [(ucx - sw * 0.92, sh_y + 0.02 * P), (ucx + sw * 0.92, sh_y + 0.02 * P)]
        hands = [(ucx - sw - 0.025 * P - 0.3 * abs(swing), hand_y), (ucx + sw + 0.025 * P + 0.3 * abs(swing), hand_y)]

    def arm(i, dim):
        s, hnd = np.array(shoulders[i]), np.array(hands[i])
        if ident["sleeves"] == "long":
            pt.fill(limb(s, hnd, arm_w, arm_w * 0.8), **_dim(top_fill, dim))
        else:
            pt.fill(limb(s, hnd, arm_w * 0.85, arm_w * 0.7), skin * dim)
            if ident["sleeves"] == "short":
                pt.fill(limb(s, s + (hnd - s) * 0.42, arm_w * 1.05, arm_w), **_dim(top_fill, dim))
        pt.fill(circle(hnd + (0, 0.012 * P), arm_w * 0.85), skin * dim)
        if ident["handbag"] is not None and (ident["handbag"][1] > 0) == (i == 1):
            bag_c = ident["handbag"][0] * dim
            pt.fill(
                round_rect(hnd[0] - 0.04 * P, hnd[1] + 0.01 * P, hnd[0] + 0.04 * P, hnd[1] + 0.085 * P, 0.01 * P),
                bag_c,
            )

    backpack = ident["backpack"]
    if side:
        if backpack is not None:  # carried on the back, i.e. behind (-x) in a side view facing +x
            bw = 0.09 * P * backpack[1]
            pt.fill(
                round_rect(
                    ucx - sw - bw, sh_y + 0.01 * P, ucx - sw + 0.02 * P, sh_y + 0.24 * P * backpack[1], 0.02 * P
                ),
                backpack[0],
            )
        arm(0, far)
    # neck, torso
    pt.fill(rect(head_c[0] - 0.35 * head_r, neck_y - 0.5 * head_r, head_c[0] + 0.35 * head_r, sh_y + 0.02 * P), skin)
    torso = np.array([[ucx - sw, sh_y], [ucx + sw, sh_y], [cx + ww, hip_y + 0.02 * P], [cx - ww, hip_y + 0.02 * P]])
    pt.fill(
        [
            torso,
            circle((ucx - sw + 0.02 * P, sh_y + 0.02 * P), 0.022 * P),
            circle((ucx + sw - 0.02 * P, sh_y + 0.02 * P), 0.022 * P),
        ],
        **top_fill,
    )
    if view == "front" and ident["print"] is not None:
        shape, colour, size = ident["print"]
        pc = (ucx + 0.02 * P, sh_y + 0.1 * P)
        s = size * P
        if shape == "circle":
            pt.fill(circle(pc, s * 0.6), colour)
        elif shape == "square":
            pt.fill(rect(pc[0] - s * 0.55, pc[1] - s * 0.55, pc[0] + s * 0.55, pc[1] + s * 0.55), colour)
        elif shape == "triangle":
            pt.fill(
                np.array(
                    [[pc[0], pc[1] - s * 0.7], [pc[0] + s * 0.7, pc[1] + s * 0.5], [pc[0] - s * 0.7, pc[1] + s * 0.5]]
                ),
                colour,
            )
        else:
            pt.fill(rect(ucx - sw * 0.95, pc[1] - s * 0.3, ucx + sw * 0.95, pc[1] + s * 0.3), colour)
    if view == "back" and backpack is not None:
        bw = 0.75 * sw * backpack[1]
        y1 = sh_y + 0.2 * P * backpack[1]
        pt.fill(round_rect(ucx - bw, sh_y + 0.015 * P, ucx + bw, y1, 0.03 * P), backpack[0])
        pt.fill(
            round_rect(ucx - bw * 0.7, y1 - 0.07 * P, ucx + bw * 0.7, y1 - 0.01 * P, 0.015 * P), backpack[0] * 0.75
        )
    if view == "front" and backpack is not None:
        for sgn in (-1, 1):
            pt.fill(
                limb(
                    (ucx + sgn * sw * 0.55, sh_y + 0.005 * P),
                    (ucx + sgn * sw * 0.5, sh_y + 0.17 * P),
                    0.011 * P,
                    0.011 * P,
                ),
                backpack[0] * 0.9,
            )
    bag = ident["shoulder_bag"]
    if bag is not None:
        sgn = bag[1] * (-1 if view == "back" else 1)
        if side:
            pt.fill(limb((ucx, sh_y + 0.01 * P), (ucx + 0.01 * P, hip_y), 0.007 * P, 0.007 * P), bag[0] * 0.6)
            pt.fill(round_rect(ucx - 0.045 * P, hip_y - 0.02 * P, ucx + 0.045 * P, hip_y + 0.06 * P, 0.01 * P), bag[0])
        else:
            pt.fill(
                limb(
                    (ucx + sgn * sw * 0.8, sh_y + 0.005 * P),
                    (cx - sgn * ww * 1.05, hip_y - 0.01 * P),
                    0.008 * P,
                    0.008 * P,
                ),
                bag[0] * 0.6,
            )
            bx = cx - sgn * (ww + 0.035 * P)
            pt.fill(round_rect(bx - 0.045 * P, hip_y - 0.03 * P, bx + 0.045 * P, hip_y + 0.05 * P, 0.01 * P), bag[0])
    if ident["scarf"] is not None:
        pt.fill(
            round_rect(
                head_c[0] - 0.75 * head_r, sh_y - 0.022 * P, head_c[0] + 0.75 * head_r, sh_y + 0.02 * P, 0.01 * P
            ),
            ident["scarf"],
        )
        if view == "front":
            pt.fill(
                rect(head_c[0] + 0.1 * head_r, sh_y, head_c[0] + 0.55 * head_r, sh_y + 0.12 * P), ident["scarf"] * 0.92
            )
    if side:
        arm(1, 1.0)
    else:
        arm(0, 1.0)
        arm(1, 1.0)

    # head and hair
    style = ident["hair_style"]
    if style == "long" and view != "side":
        pt.fill(
            round_rect(
                head_c[0] - 1.1 * head_r,
                head_c[1] - 0.3 * head_r,
                head_c[0] + 1.1 * head_r,
                sh_y + (0.1 if view == "back" else 0.05) * P,
                0.4 * head_r,
            ),
            hair,
        )
    if style == "long" and side:
        pt.fill(
            round_rect(
                head_c[0] - 1.05 * head_r,
                head_c[1] - 0.3 * head_r,
                head_c[0] + 0.2 * head_r,
                sh_y + 0.07 * P,
                0.4 * head_r,
            ),
            hair,
        )
    pt.fill(ellipse(head_c, head_r * (1.0 if not side else 1.05), head_r * 1.08), skin)
    if view == "back" and style != "bald":
        pt.fill(ellipse(head_c, head_r * 1.04, head_r * 1.1), hair)
    elif style != "bald":
        if side:
            pt.fill(
                ellipse((head_c[0] - 0.1 * head_r, head_c[1] - 0.1 * head_r), head_r * 1.02, head_r * 1.02, 140, 330),
                hair,
            )
        else:
            pt.fill(ellipse((head_c[0], head_c[1] - 0.15 * head_r), head_r * 1.06, head_r * 0.95, 180, 360), hair)
    if style == "bun":
        pt.fill(circle((head_c[0] - (0.6 * head_r if side else 0), head_c[1] - head_r * 1.05), 0.42 * head_r), hair)
    if ident["hat"] is not None:
        kind, colour = ident["hat"]
        pt.fill(
            ellipse(
                (head_c[0], head_c[1] - 0.25 * head_r),
                head_r * 1.1,
                head_r * (1.0 if kind == "beanie" else 0.85),
                180,
                360,
            ),
            colour,
        )
        if kind == "cap":
            if side:
                pt.fill(
                    ellipse((head_c[0] + 0.9 * head_r, head_c[1] - 0.3 * head_r), 0.75 * head_r, 0.16 * head_r),
                    colour * 0.85,
                )
            elif view == "front":
                pt.fill(ellipse((head_c[0], head_c[1] - 0.25 * head_r), 1.15 * head_r, 0.22 * head_r), colour * 0.85)


def _dim(fill, factor):
    if factor == 1.0:
        return fill
    out = dict(fill)
    out["colour"] = fill["colour"] * factor
    out["colour2"] = None if fill["colour2"] is None else fill["colour2"] * factor
    return out


def random_clothes(rng):
    return _cloth(rng)[1], _cloth(rng, _BOTTOM_NAMES, _BOTTOM_WEIGHTS)[1], _SKIN[int(rng.integers(len(_SKIN)))]


def draw_blob_person(pt, rng, cx, foot_y, P):
    """A plain passer-by: a confuser behind or in front of the target."""
    top, bottom, skin = random_clothes(rng)
    hr = 0.065 * P
    sw, hip_y, sh_y = 0.12 * P, foot_y - 0.48 * P, foot_y - P + 0.16 * P
    pt.fill(
        [
            limb((cx - 0.05 * P, hip_y), (cx - 0.06 * P, foot_y), 0.04 * P, 0.03 * P),
            limb((cx + 0.05 * P, hip_y), (cx + 0.06 * P, foot_y), 0.04 * P, 0.03 * P),
        ],
        bottom,
    )
    pt.fill(
        [
            np.array(
                [[cx - sw, sh_y], [cx + sw, sh_y], [cx + 0.9 * sw, hip_y + 0.03 * P], [cx - 0.9 * sw, hip_y + 0.03 * P]]
            ),
            limb((cx - sw, sh_y + 0.02 * P), (cx - sw - 0.03 * P, sh_y + 0.34 * P), 0.03 * P, 0.025 * P),
            limb((cx + sw, sh_y + 0.02 * P), (cx + sw + 0.03 * P, sh_y + 0.34 * P), 0.03 * P, 0.025 * P),
        ],
        top,
    )
    pt.fill(circle((cx, foot_y - P + hr * 1.05), hr), skin)


