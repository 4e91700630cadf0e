"""Anatomy of the cine phantom: one subject's heart and chest, drawn as partial-volume tissue maps on the
short-axis grid, and the hard label masks at that grid.

Coordinates are millimetres. In-plane: x to the image right (the patient's left), y down the image (posterior),
origin at the image centre. Through-plane: z along the long axis from the most basal slice (z = 0, slice index 0)
towards the apex, as in M&Ms after reformatting. Angles are atan2(y, x) in image coordinates: 0 points to the
lateral LV wall, pi to the septum and the RV, -pi/2 anterior.

The heart is a truncated ellipsoid: LV cavity inside a myocardial wall, an RV crescent wrapped around the septal
side, that contracts over the cycle with a smooth periodic curve (ED at phase 0, ES at about 35%). Radial
contraction follows the subject's target EF, the base descends towards the fixed apex (longitudinal shortening)
and the wall thickens so that the myocardial area of each material level is conserved.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np
from scipy import ndimage

from nnunet_ssp.raw_layout import LV_BLOODPOOL, LV_MYOCARDIUM, RV_BLOODPOOL

BACKGROUND = 0
PHENOTYPES = ("normal", "dilated", "hypertrophic")
PHENOTYPE_PROBABILITIES = (0.5, 0.25, 0.25)
FOV_RANGE_MM = (220.0, 280.0)  # square field of view; pixel spacing = FOV / size
MIN_SIZE = 48
MAX_SIZE = 512
SUBSLICES = (-1.0 / 3.0, 0.0, 1.0 / 3.0)  # through-plane sample offsets (fractions of the slice thickness)
_TABLE = 1024  # samples of the angular shape functions over [-pi, pi)

# ranges drawn per phenotype: mid-cavity ED radius, wall thickness (mm), LV EF, ED long axis (mm),
# RV crescent width (mm), RV EF, apical wall as a fraction of the wall, regional contraction heterogeneity
_PHENOTYPE_RANGES = {
    "normal": dict(
        r_endo=(22.0, 27.0),
        wall=(7.5, 10.5),
        ef=(0.55, 0.70),
        length=(82.0, 100.0),
        rv_width=(17.0, 25.0),
        rv_ef=(0.50, 0.65),
        apex_wall=(0.8, 1.1),
        hetero=0.05,
    ),
    "dilated": dict(
        r_endo=(29.0, 35.0),
        wall=(6.5, 8.5),
        ef=(0.20, 0.40),
        length=(95.0, 112.0),
        rv_width=(20.0, 30.0),
        rv_ef=(0.30, 0.50),
        apex_wall=(0.8, 1.0),
        hetero=0.12,
    ),
    "hypertrophic": dict(
        r_endo=(20.0, 24.0),
        wall=(13.0, 19.0),
        ef=(0.68, 0.83),
        length=(82.0, 96.0),
        rv_width=(15.0, 21.0),
        rv_ef=(0.55, 0.70),
        apex_wall=(0.6, 0.85),
        hetero=0.05,
    ),
}


@dataclass
class Anatomy:
    """Everything drawn for one subject's geometry and timing (lengths in mm, angles in radians)."""

    phenotype: str
    size: int
    spacing_xy: float
    thickness: float
    num_slices: int
    num_frames: int
    ed_frame: int
    es_frame: int
    frame_interval_ms: float
    curve: Tuple[float, float, float, float]  # phase of ES, early-filling level, diastasis level, atrial kick
    center: Tuple[float, float]  # LV centre at slice 0
    tilt: Tuple[float, float]  # LV centre drift from base to apex
    rotation: float
    r_endo: float
    wall: float
    u_base: float  # material level of the mitral valve plane (z at ED)
    u_eq: float  # level below which the LV tapers towards the apex
    u_apex: float  # epicardial apex
    u_apex_endo: float  # cavity apex
    r_atrium: float
    target_ef: float
    l_es: float  # long-axis length at ES / ED
    a_es: float  # cavity cross-section area at ES / ED (same material level)
    rv_width: float
    rv_u_base: float
    rv_u_eq: float
    rv_u_end: float
    rv_target_ef: float
    rv_k_es: float  # RV crescent width at ES / ED
    rv_wall: float
    theta_rv: float
    papillary_radius: float
    papillary_theta: Tuple[float, float]
    papillary_levels: Tuple[float, float]
    has_lvot: bool
    theta_lvot: float
    tables: Dict[str, np.ndarray] = field(repr=False)  # angular shape functions sampled on _TABLE points

    @property
    def slice_positions(self) -> np.ndarray:
        return np.arange(self.num_slices) * self.thickness

    @property
    def length(self) -> float:
        return self.u_apex - self.u_base

    @property
    def extent(self) -> float:
        """Radius (mm) around the LV centre that holds the heart at every phase."""
        return 1.2 * (self.r_endo + self.wall) + 1.35 * self.rv_width + self.rv_wall + 10.0

    def phases(self) -> np.ndarray:
        return np.mod((np.arange(self.num_frames) - self.ed_frame) / self.num_frames, 1.0)

    def contraction(self) -> np.ndarray:
        """Contraction state per frame: 0 at ED, 1 at ES."""
        return contraction_curve(self.phases(), *self.curve)


def contraction_curve(phase, phi_es: float, early: float, diastasis: float, kick: float) -> np.ndarray:
    """Periodic, C1-smooth contraction over the cycle from half-cosine segments: 0 at ED (phase 0) rising to 1
    at ES (phi_es), rapid early filling down to ``early``, slow diastasis to ``diastasis``, atrial kick to 0."""
    phase = np.mod(np.asarray(phase, dtype=np.float64), 1.0)
    knots = (0.0, phi_es, phi_es + 0.2, kick, 1.0)
    levels = (0.0, 1.0, early, diastasis, 0.0)
    out = np.zeros_like(phase)
    for i in range(4):
        inside = (phase >= knots[i]) & (phase < knots[i + 1])
        s = (phase[inside] - knots[i]) / (knots[i + 1] - knots[i])
        out[inside] = levels[i] + (levels[i + 1] - levels[i]) * 0.5 * (1.0 - np.cos(np.pi * s))
    return out


def _fourier_table(rng, orders, amplitude_range, theta) -> np.ndarray:
    out = np.zeros_like(theta)
    for k in orders:
        out += rng.uniform(*amplitude_range) * np.cos(k * (theta - rng.uniform(-np.pi, np.pi)))
    return out


def sample_anatomy(rng: np.random.Generator, size: int, phenotype: str) -> Anatomy:
    """Draws one subject's geometry, timing and cardiac function."""
    p = _PHENOTYPE_RANGES[phenotype]
    u = rng.uniform
    spacing_xy = round(u(*FOV_RANGE_MM) / size * 64.0) / 64.0  # exact in float32 and in the CSV
    num_frames = int(rng.integers(15, 31))
    rr_ms = u(660.0, 1100.0)  # heart rate 55-90 bpm
    ed_frame = int(rng.random() < 0.25)
    es_offset = int(round(u(0.32, 0.38) * num_frames))
    curve = (es_offset / num_frames, u(0.15, 0.3), u(0.08, 0.14), u(0.78, 0.88))

    r_endo, wall, ef = u(*p["r_endo"]), u(*p["wall"]), u(*p["ef"])
    length_target = u(*p["length"])
    # slice thickness and count such that the stack runs from just below the mitral plane to the apex
    base_gap = u(1.0, 8.0)
    lo, hi = max(6.0, (length_target - base_gap) / 11.5), min(10.0, (length_target - base_gap) / 7.5)
    thickness = float(np.clip(round(u(lo, max(lo, hi)) * 2.0) / 2.0, 6.0, 10.0))
    num_slices = int(np.clip(round((length_target - base_gap - 3.0) / thickness) + 1, 8, 12))
    u_base = -base_gap
    u_apex = (num_slices - 1) * thickness + u(1.5, 5.0)  # the apex-most slice cuts the apical cap
    length = u_apex - u_base
    u_eq = u_base + u(0.15, 0.3) * length
    u_apex_endo = u_apex - max(u(*p["apex_wall"]) * wall, 6.0)

    l_es = 1.0 - u(0.05, 0.1) * min(1.0, ef / 0.6)
    a_es = (1.0 - ef) / l_es
    rv_width = u(*p["rv_width"])
    rv_ef = u(*p["rv_ef"])
    rv_k_es = ((1.0 - rv_ef) / l_es) ** (1.0 / 1.15)
    rotation = u(-0.35, 0.35)
    theta_rv = np.pi + u(-0.1, 0.3) + rotation

    theta = np.linspace(-np.pi, np.pi, _TABLE, endpoint=False)
    shape = _fourier_table(rng, (2,), (0.0, 0.06), theta) + _fourier_table(rng, (3, 4), (0.0, 0.02), theta)
    m_epi = 1.0 + shape + _fourier_table(rng, (5, 6), (0.0, 0.008), theta)
    trabeculae = _fourier_table(rng, range(7, 17), (0.0, 0.7), theta) / r_endo  # about 1 mm ripple
    m_endo = 1.0 + shape + trabeculae
    hetero = _fourier_table(rng, (1, 2, 3), (0.0, p["hetero"]), theta)
    # RV crescent: width profile around the septal side, asymmetric, pointed insertion points
    half_width = u(1.4, 1.8)
    d = np.angle(np.exp(1j * (theta - theta_rv)))
    s = np.clip(np.abs(d) / half_width, 0.0, 1.0)
    w_rv = np.cos(0.5 * np.pi * s) ** u(0.45, 0.7) * (1.0 + u(-0.15, 0.25) * np.sin(d))
    w_rv[np.abs(d) >= half_width] = 0.0
    rv_taper = np.clip(w_rv / 0.25, 0.0, 1.0)
    fat = u(1.0, 5.0) * np.clip(0.45 + _fourier_table(rng, (1, 2, 3, 4), (0.1, 0.35), theta), 0.0, 1.0)
    fat += 2.5 * rv_taper * (1.0 - rv_taper)  # fat in the grooves at the RV insertions
    theta_lvot = theta_rv + 0.75 * half_width  # anterior-septal, towards the aortic root
    lvot = (np.abs(np.angle(np.exp(1j * (theta - theta_lvot)))) < u(0.25, 0.4)).astype(np.float64)
    tables = dict(m_endo=m_endo, m_epi=m_epi, hetero=hetero, w_rv=w_rv, rv_taper=rv_taper, fat=fat, lvot=lvot)

    fov = spacing_xy * size
    return Anatomy(
        phenotype=phenotype,
        size=size,
        spacing_xy=spacing_xy,
        thickness=thickness,
        num_slices=num_slices,
        num_frames=num_frames,
        ed_frame=ed_frame,
        es_frame=ed_frame + es_offset,
        frame_interval_ms=round(rr_ms / num_frames, 1),
        curve=curve,
        center=(u(-0.04, 0.07) * fov, u(-0.09, 0.02) * fov),
        tilt=tuple(u(-6.0, 6.0, size=2)),
        rotation=rotation,
        r_endo=r_endo,
        wall=wall,
        u_base=u_base,
        u_eq=u_eq,
        u_apex=u_apex,
        u_apex_endo=u_apex_endo,
        r_atrium=u(0.75, 0.9) * r_endo,
        target_ef=ef,
        l_es=l_es,
        a_es=a_es,
        rv_width=rv_width,
        rv_u_base=u_base - u(2.0, 8.0),
        rv_u_eq=u_base + u(0.2, 0.3) * length,
        rv_u_end=u_base + u(0.7, 0.82) * length,
        rv_target_ef=rv_ef,
        rv_k_es=rv_k_es,
        rv_wall=u(2.5, 4.0),
        theta_rv=theta_rv,
        papillary_radius=u(3.0, 4.5) * (1.25 if phenotype == "hypertrophic" else 1.0),
        papillary_theta=(-0.65 + rotation + u(-0.2, 0.2), 1.15 + rotation + u(-0.2, 0.2)),
        papillary_levels=(u_base + u(0.25, 0.35) * length, u_base + u(0.7, 0.8) * length),
        has_lvot=bool(rng.random() < 0.6),
        theta_lvot=theta_lvot,
        tables=tables,
    )


def _taper(level, start, end):
    """1 up to ``start``, an ellipsoidal taper to 0 at ``end``, 0 beyond."""
    s = np.clip((level - start) / (end - start), 0.0, None)
    return np.sqrt(np.clip(1.0 - s * s, 0.0, None))


def heart_state(anat: Anatomy, z: float, contraction: np.ndarray) -> Dict[str, np.ndarray]:
    """Radii and flags of the heart at through-plane position ``z`` for each frame (arrays over frames)."""
    c = contraction
    lengthening = 1.0 - (1.0 - anat.l_es) * c
    level = anat.u_apex - (anat.u_apex - z) / lengthening  # material level that the plane cuts
    basal = 1.0 - 0.06 * np.clip((anat.u_eq - level) / (anat.u_eq - anat.u_base), 0.0, 1.0)
    r_endo_ed = anat.r_endo * basal * _taper(level, anat.u_eq, anat.u_apex_endo)
    r_epi_ed = (anat.r_endo + anat.wall) * basal * _taper(level, anat.u_eq, anat.u_apex)
    myo_area = r_epi_ed**2 - r_endo_ed**2  # / pi; conserved per material level
    r_endo = r_endo_ed * np.sqrt(1.0 - (1.0 - anat.a_es) * c)
    r_epi = np.sqrt(r_endo**2 + myo_area / lengthening)
    lv_on = level >= anat.u_base
    r_endo = np.where(lv_on, r_endo, anat.r_atrium)  # above the valve plane: left atrium, thin wall
    r_epi = np.where(lv_on, r_epi, anat.r_atrium + 2.0)
    rv_on = level >= anat.rv_u_base
    width = anat.rv_width * _taper(level, anat.rv_u_eq, anat.rv_u_end) * (1.0 - (1.0 - anat.rv_k_es) * c)
    width = np.where(level >= anat.u_base, width, 0.85 * anat.rv_width)  # right atrium / outflow above
    p0, p1 = anat.papillary_levels
    pm = np.sin(np.pi * np.clip((level - p0) / (p1 - p0), 0.0, 1.0)) ** 0.5
    pm_radius = np.where(lv_on, anat.papillary_radius * pm * (1.0 - (1.0 - anat.a_es) * c) ** -0.25, 0.0)
    return dict(c=c, r_endo=r_endo, r_epi=r_epi, lv_on=lv_on, rv_on=rv_on, rv_width=width, pm_radius=pm_radius)


def slice_center(anat: Anatomy, z: float) -> Tuple[float, float]:
    f = z / anat.length
    return anat.center[0] + anat.tilt[0] * f, anat.center[1] + anat.tilt[1] * f


def grid_mm(size: int, spacing: float) -> np.ndarray:
    return (np.arange(size) - (size - 1) / 2.0) * spacing


def _occupancy(inside_margin, inv_pixel):
    """Partial-volume fraction from the signed distance to a boundary (mm, positive inside): a one-pixel ramp,
    which is the area fraction of a pixel cut by a straight edge through it (the analytic 'supersampling')."""
    out = inside_margin * inv_pixel
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def render_heart(anat: Anatomy, background: np.ndarray, tissue: Dict[str, float]):
    """Pastes the beating heart into ``background`` (Z, Y, X) for every frame.

    Returns the noiseless image (T, Z, Y, X) float32 and the labels (T, Z, Y, X) uint8. The image averages
    the heart at SUBSLICES through the slice thickness (through-plane partial volume) and uses edge-occupancy
    ramps in plane; the labels are the hard masks at the slice centre (pixel centre inside the boundary).
    """
    T, Z = anat.num_frames, anat.num_slices
    size, pix = anat.size, anat.spacing_xy
    inv_pix = 1.0 / pix
    image = np.repeat(background[None], T, axis=0)
    labels = np.zeros((T, Z, size, size), dtype=np.uint8)
    contraction = anat.contraction()
    c3 = contraction[:, None, None]
    axis = grid_mm(size, pix)
    reach = anat.extent
    theta_grid = np.linspace(-np.pi, np.pi, _TABLE, endpoint=False)
    i_blood, i_rv_blood, i_myo, i_fat = tissue["blood"], tissue["rv_blood"], tissue["myocardium"], tissue["fat"]
    for zi, zc in enumerate(anat.slice_positions):
        cx, cy = slice_center(anat, zc)
        x0, x1 = np.searchsorted(axis, [cx - reach, cx + reach])
        y0, y1 = np.searchsorted(axis, [cy - reach, cy + reach])
        dx = (axis[x0:x1] - cx)[None, :]
        dy = (axis[y0:y1] - cy)[:, None]
        rho = np.hypot(dx, dy)
        theta = np.arctan2(dy, dx)
        tab = {k: np.interp(theta, theta_grid, v, period=2 * np.pi) for k, v in anat.tables.items()}
        gap = (tab["lvot"] > 0.5) if (zi == 0 and anat.has_lvot) else None
        bg = background[zi, y0:y1, x0:x1][None]
        accum = np.zeros((T, y1 - y0, x1 - x0), dtype=np.float64)
        for offset in SUBSLICES:
            st = heart_state(anat, zc + offset * anat.thickness, contraction)
            r_epi = st["r_epi"][:, None, None]
            b_epi = r_epi * tab["m_epi"]
            b_endo = st["r_endo"][:, None, None] * (tab["m_endo"] + c3 * tab["hetero"])
            np.minimum(b_endo, b_epi - 1.5 * pix, out=b_endo)  # wall at least 1.5 px: LV stays enclosed
            width = st["rv_width"][:, None, None]
            b_rvo = b_epi + width * tab["w_rv"]
            b_rvw = b_rvo + anat.rv_wall * tab["rv_taper"] * np.clip(width / 3.0, 0.0, 1.0)
            b_fat = b_rvw + tab["fat"]
            if offset == 0.0:
                lv = rho < b_endo
                ep = rho < b_epi
                if gap is not None:
                    ep &= ~gap
                lv &= st["lv_on"][:, None, None]
                rv = (rho < b_rvo) & ~(rho < b_epi) & st["rv_on"][:, None, None]
                lab = np.where(
                    lv,
                    LV_BLOODPOOL,
                    np.where(ep & st["lv_on"][:, None, None], LV_MYOCARDIUM, np.where(rv, RV_BLOODPOOL, BACKGROUND)),
                )
                labels[:, zi, y0:y1, x0:x1] = lab.astype(np.uint8)
            if gap is not None:  # LV outflow: blood through the ring
                b_endo = np.where(gap & st["lv_on"][:, None, None], b_epi + 0.5 * pix, b_endo)
            o_fat = _occupancy(b_fat - rho, inv_pix)
            o_rvw = _occupancy(b_rvw - rho, inv_pix)
            o_rvo = _occupancy(b_rvo - rho, inv_pix)
            o_epi = _occupancy(b_epi - rho, inv_pix)
            o_endo = _occupancy(b_endo - rho, inv_pix)
            img = bg + o_fat * (i_fat - bg)
            img += o_rvw * (i_myo - i_fat)
            img += o_rvo * (i_rv_blood - i_myo)
            img += o_epi * (i_myo - i_rv_blood)
            img += o_endo * (i_blood - i_myo)
            if np.any(st["pm_radius"] > 0):  # papillary muscles in the LV cavity
                for k, th in enumerate(anat.papillary_theta):
                    dist = 0.66 * st["r_endo"]
                    px = (dist * math.cos(th))[:, None, None]
                    py = (dist * math.sin(th))[:, None, None]
                    radius = st["pm_radius"][:, None, None] * (1.0 if k == 0 else 0.85)
                    o_pm = _occupancy(radius - np.hypot(dx - px, dy - py), inv_pix)
                    o_pm *= radius > 0
                    np.minimum(o_pm, o_endo, out=o_pm)
                    img -= o_pm * (i_blood - i_myo)
            accum += img
        accum /= len(SUBSLICES)
        image[:, zi, y0:y1, x0:x1] = accum
    return image, labels


def _smooth_field(rng, shape_mm, size, cell_mm=25.0):
    """Smooth random field N(0,1)-ish on the (size, size) grid with structures of about ``cell_mm``."""
    n = max(3, int(round(shape_mm / cell_mm)))
    coarse = rng.standard_normal((n, n))
    fine = ndimage.zoom(coarse, size / n, order=3, mode="mirror", grid_mode=True)
    return fine[:size, :size] / max(float(fine.std()), 1e-6)


def _ellipse_margin(x, y, cx, cy, a, b, angle=0.0):
    """Signed radial distance (mm, positive inside) to an ellipse with semi-axes a, b."""
    dx, dy = x - cx, y - cy
    c, s = math.cos(angle), math.sin(angle)
    e = np.hypot((dx * c + dy * s) / a, (-dx * s + dy * c) / b)
    rho = np.hypot(dx, dy)
    return rho / np.maximum(e, 1e-9) - rho


def render_background(anat: Anatomy, rng: np.random.Generator, tissue: Dict[str, float]) -> np.ndarray:
    """Static chest around the heart for each slice (Z, Y, X) float32: body outline with subcutaneous fat and
    chest-wall muscle with ribs, lungs with vessels, posterior mediastinum, spine with paraspinal muscles,
    descending aorta, liver and stomach (rising into the apical slices), and the aortic root and pulmonary trunk
    next to the basal slices. The heart is pasted over it (render_heart)."""
    u = rng.uniform
    size, pix = anat.size, anat.spacing_xy
    inv_pix = 1.0 / pix
    fov = size * pix
    axis = grid_mm(size, pix)
    x, y = axis[None, :], axis[:, None]
    hx, hy = anat.center
    r_heart = anat.r_endo + anat.wall

    def paint(img, margin, value, weight=1.0):
        o = _occupancy(margin, inv_pix)
        if weight is not None and (not np.isscalar(weight) or weight != 1.0):
            o *= weight
        img += o * (value - img)
        return o

    # thoracic cavity: its anterior wall just in front of the heart (the RV lies behind the sternum)
    body_angle = u(-0.12, 0.12)
    cav_dy = u(12.0, 28.0)
    cav_x, cav_y = hx - u(10.0, 30.0), hy + cav_dy
    cav_b = cav_dy + r_heart + u(14.0, 26.0)
    cav_a = u(125.0, 155.0)
    muscle_t, fat_t = u(10.0, 16.0), u(5.0, 16.0)
    post_t = u(28.0, 40.0)  # paraspinal muscles make the back wall thicker
    body_y = cav_y + 0.5 * (post_t - muscle_t)
    body_a = cav_a + muscle_t + fat_t
    body_b = cav_b + 0.5 * (post_t + muscle_t) + fat_t
    spine_r = u(13.0, 17.0)
    spine_x, spine_y = cav_x + u(-6.0, 6.0), cav_y + cav_b - 0.6 * spine_r
    aorta_r = u(9.0, 12.0)
    aorta_x, aorta_y = spine_x + u(18.0, 26.0), spine_y - spine_r - u(2.0, 8.0)

    base = np.zeros((size, size), dtype=np.float64)
    paint(base, _ellipse_margin(x, y, cav_x, body_y, body_a, body_b, body_angle), tissue["fat"])
    paint(base, _ellipse_margin(x, y, cav_x, body_y, body_a - fat_t, body_b - fat_t, body_angle), tissue["muscle"])
    # ribs: dark oval cross-sections in the chest wall
    for k in range(int(rng.integers(6, 11))):
        phi = u(-math.pi, 0.3) if k % 2 else u(-math.pi - 0.3, -math.pi * 0.55)
        rx = cav_x + (cav_a + 0.5 * muscle_t) * math.cos(phi)
        ry = cav_y + (cav_b + 0.5 * muscle_t) * math.sin(phi)
        paint(base, _ellipse_margin(x, y, rx, ry, u(4.0, 7.0), u(2.5, 4.0), phi + math.pi / 2), tissue["bone"])
    cavity = paint(base, _ellipse_margin(x, y, cav_x, cav_y, cav_a, cav_b, body_angle), tissue["lung"])
    lung = cavity.copy()
    # posterior mediastinum, paraspinal muscles, spine, descending aorta
    mid_x, mid_y = 0.5 * (hx + spine_x), 0.5 * (hy + spine_y)
    o = paint(
        base,
        _ellipse_margin(
            x,
            y,
            mid_x - 4.0,
            mid_y,
            u(18.0, 26.0),
            0.5 * math.hypot(hx - spine_x, hy - spine_y) + 5.0,
            math.atan2(spine_y - hy, spine_x - hx) - math.pi / 2,
        ),
        tissue["mediastinum"],
    )
    lung *= 1.0 - o
    o = paint(base, _ellipse_margin(x, y, spine_x, spine_y + spine_r, 3.2 * spine_r, 1.6 * spine_r), tissue["muscle"])
    lung *= 1.0 - o
    paint(base, _ellipse_margin(x, y, spine_x, spine_y, spine_r, 0.95 * spine_r), tissue["bone"])
    paint(base, _ellipse_margin(x, y, spine_x, spine_y, spine_r - 2.0, 0.95 * spine_r - 2.0), tissue["marrow"])
    paint(base, _ellipse_margin(x, y, spine_x, spine_y + spine_r + 7.0, 6.0, 5.0), tissue["csf"])
    o = paint(base, _ellipse_margin(x, y, aorta_x, aorta_y, aorta_r, aorta_r), 0.9 * tissue["blood"])
    lung *= 1.0 - o
    # a fat pad in front of the heart, in the cardiophrenic angle
    o = paint(
        base,
        _ellipse_margin(
            x,
            y,
            hx + (r_heart + 6.0) * math.cos(anat.theta_rv - 1.2),
            hy + (r_heart + 6.0) * math.sin(anat.theta_rv - 1.2),
            u(12.0, 22.0),
            u(6.0, 10.0),
            anat.theta_rv - 1.2 + math.pi / 2,
        ),
        tissue["fat"],
    )
    lung *= 1.0 - o
    base *= 1.0 + 0.06 * _smooth_field(rng, fov, size, 40.0) + 0.05 * _smooth_field(rng, fov, size, 12.0)

    liver_dx, liver_dy = u(-95.0, -70.0), u(55.0, 75.0)
    liver_a, liver_b, liver_angle = u(75.0, 95.0), u(45.0, 60.0), u(-0.7, -0.3)
    stomach_dx, stomach_dy, stomach_r = u(30.0, 60.0), u(55.0, 80.0), u(18.0, 30.0)
    r_ao, r_pa = u(11.0, 15.0), u(10.0, 13.0)
    theta_pa = anat.theta_rv + u(0.3, 0.6)
    organ_texture = 1.0 + 0.05 * _smooth_field(rng, fov, size, 15.0)
    out = np.empty((anat.num_slices, size, size), dtype=np.float32)
    for zi, zc in enumerate(anat.slice_positions):
        img = base.copy()
        frac = float(np.clip(zc / anat.length, 0.0, 1.0))  # 0 at the base, about 1 at the apex
        scx, scy = slice_center(anat, zc)
        # liver and stomach below the diaphragm: away from the base, close under the heart at the apex
        lx, ly = hx + liver_dx - 15.0 * (1.0 - frac), hy + liver_dy + 40.0 * (1.0 - frac)
        o = _occupancy(_ellipse_margin(x, y, lx, ly, liver_a, liver_b, liver_angle), inv_pix) * cavity
        img += o * (tissue["liver"] * organ_texture - img)
        lung_here = lung * (1.0 - o)
        sx, sy = hx + stomach_dx, hy + stomach_dy + 45.0 * (1.0 - frac)
        o = _occupancy(_ellipse_margin(x, y, sx, sy, stomach_r, 0.8 * stomach_r, 0.3), inv_pix) * cavity
        o *= 1.0 - _occupancy(_ellipse_margin(x, y, lx, ly, liver_a, liver_b, liver_angle), inv_pix)
        img += o * (tissue["stomach"] - img)
        lung_here *= 1.0 - o
        # lung vessels: blurred sparse dots
        dots = np.zeros((size, size))
        n = int(rng.integers(15, 30))
        dots[rng.integers(0, size, n), rng.integers(0, size, n)] = rng.uniform(0.5, 1.0, n)
        sigma = u(1.2, 2.2) / pix
        dots = ndimage.gaussian_filter(dots, sigma) * (2.0 * math.pi * sigma * sigma)
        img += np.clip(dots, 0.0, 1.0) * lung_here * (tissue["lung_vessel"] - tissue["lung"])
        # great vessels next to the base
        weight = float(np.clip(1.2 - zc / anat.thickness, 0.0, 1.0))
        if weight > 0:
            d_ao = r_heart + 0.6 * r_ao
            paint(
                img,
                _ellipse_margin(
                    x, y, scx + d_ao * math.cos(anat.theta_lvot), scy + d_ao * math.sin(anat.theta_lvot), r_ao, r_ao
                ),
                tissue["blood"],
                weight,
            )
            d_pa = r_heart + anat.rv_width + 0.6 * r_pa
            paint(
                img,
                _ellipse_margin(x, y, scx + d_pa * math.cos(theta_pa), scy + d_pa * math.sin(theta_pa), r_pa, r_pa),
                0.95 * tissue["blood"],
                weight,
            )
        out[zi] = img
    return out


def tissue_texture(anat: Anatomy, rng: np.random.Generator, amplitude: float = 0.03) -> np.ndarray:
    """Mild smooth multiplicative inhomogeneity per slice (Z, Y, X) float32, blood and myocardium included."""
    fov = anat.size * anat.spacing_xy
    return np.stack(
        [1.0 + amplitude * _smooth_field(rng, fov, anat.size, 10.0) for _ in range(anat.num_slices)]
    ).astype(np.float32)
