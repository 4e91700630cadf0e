"""Slice order of a short-axis stack: the converters put the base (near the mitral valve) at slice index 0 and the
apex at the last slice, as the paper's reformatting does, so that slice index / number of slices is a position
from base to apex for every subject.

Rule: the labels of the ED frame decide when they can (anatomy defines the base; some public datasets' headers are
unreliable), else the header's slice direction, else the stored order is kept. When both decide and disagree, one
warning line goes to stderr and the labels win. Reversing a stack flips its slice axis and moves the origin to the
old last slice with the slice direction negated, so every voxel keeps its world position.
"""

import sys
from typing import Optional, Tuple

import numpy as np

BASE_FIRST, APEX_FIRST = "base_first", "apex_first"
# the LV long axis from base to apex points to the patient's left, anterior and inferior: (-1, +1, -1) in RAS+
APEX_DIRECTION_RAS = np.array([-1.0, 1.0, -1.0]) / np.sqrt(3.0)
HEADER_MIN_COSINE = 0.3
# label_position of 2,200 phantom ED frames (sizes 48-160): 0.323-0.385 stored base first, 0.615-0.677 apex first
LABEL_MARGIN = 0.05
_DIRECTION_WORDS = {BASE_FIRST: "from base to apex", APEX_FIRST: "from apex to base"}
_SLICE_0_WORDS = {BASE_FIRST: "the base", APEX_FIRST: "the apex"}


def header_vote(affine: np.ndarray) -> Optional[str]:
    """BASE_FIRST or APEX_FIRST from the slice direction (third column of a nibabel voxel-to-RAS ``affine``), None
    when it is closer than HEADER_MIN_COSINE to perpendicular to the long axis."""
    direction = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    cosine = float(direction @ APEX_DIRECTION_RAS)
    if cosine >= HEADER_MIN_COSINE:
        return BASE_FIRST
    if cosine <= -HEADER_MIN_COSINE:
        return APEX_FIRST
    return None


def label_position(labels: np.ndarray) -> Optional[float]:
    """The area-weighted mean relative position (z - first) / (last - first) of the foreground of ``labels`` (X, Y, Z)
    over its labelled slices first..last (below 0.5 when the larger cross-sections come first); None for fewer than 3
    labelled slices."""
    area = np.count_nonzero(labels.reshape(-1, labels.shape[2]), axis=0)
    labelled = np.flatnonzero(area)
    if len(labelled) < 3:
        return None
    first, last = int(labelled[0]), int(labelled[-1])
    position = (np.arange(first, last + 1) - first) / (last - first)
    return float(np.average(position, weights=area[first : last + 1]))


def label_vote(labels: np.ndarray) -> Optional[str]:
    """BASE_FIRST or APEX_FIRST from ED ``labels`` (X, Y, Z; 1-3 foreground): the base holds the RV and the largest
    LV cross-sections; None when :func:`label_position` is within LABEL_MARGIN of 0.5 or undefined."""
    position = label_position(labels)
    if position is None or abs(position - 0.5) <= LABEL_MARGIN:
        return None
    return BASE_FIRST if position < 0.5 else APEX_FIRST


def stored_order(ed_labels: Optional[np.ndarray], affine: np.ndarray, path: str) -> Optional[str]:
    """The slice order of the stack in file ``path``: the labels' vote if they decide, else the header's, else None;
    warns on stderr when both decide and disagree."""
    by_labels, by_header = label_vote(ed_labels) if ed_labels is not None else None, header_vote(affine)
    if by_labels and by_header and by_labels != by_header:
        print(
            f"warning: {path}: the labels put {_SLICE_0_WORDS[by_labels]} at slice 0 but the header's slice "
            f"direction points {_DIRECTION_WORDS[by_header]}; following the labels",
            file=sys.stderr,
        )
    return by_labels or by_header


def reverse_slice_axis(array: np.ndarray, affine: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z[, T]) with its slice axis Z reversed, and the voxel-to-world ``affine`` that keeps every
    voxel's world position."""
    reversed_affine = affine.copy()
    reversed_affine[:3, 2] = -affine[:3, 2]
    reversed_affine[:3, 3] = affine[:3, 3] + (array.shape[2] - 1) * affine[:3, 2]
    return array[:, :, ::-1], reversed_affine
