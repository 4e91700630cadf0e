"""Reading one source frame by frame as nnU-Net's reader returns images, with the integrity checks that SimpleITK
skips (truncated files, NaN or infinite voxels, constant frames)."""

from typing import Optional

import numpy as np

from nnunet_ssp.errors import SSPError, first_line
from nnunet_ssp.io import check_finite, check_intensities
from pretraining.data.sources import CineSource


def read_frames(source: CineSource, plans_manager):
    """Yields (data (C, Z, Y, X) float32, properties) per frame, as nnU-Net's reader would return them.

    3D files go through the plans' own reader. A 4D cine is split into frames whose properties are those SimpleITKIO
    produces for a 3D image of the same geometry (spacing reversed to (z, y, x)), and whose voxels are SimpleITK's.
    The file is decompressed once: when SimpleITK would return the stored values unchanged (a 4D scalar NIfTI without
    intensity scaling, the usual cine), the voxels nibabel read for the integrity check are used and SimpleITK reads
    the header only; otherwise SimpleITK reads the image."""
    import SimpleITK as sitk

    voxels = None
    for path in source.paths:
        voxels = _check_file(path, keep=source.ndim == 4)
    reader_class = plans_manager.image_reader_writer_class
    if source.ndim == 4 and reader_class.__name__ != "SimpleITKIO":
        import warnings

        warnings.warn(
            f"{source.paths[0]}: 4D cines are read with SimpleITK (as SimpleITKIO reads 3D images), but "
            f"the plans use {reader_class.__name__}; check that cine frames and imagesTr volumes match",
            stacklevel=2,
        )
    if source.ndim == 3:
        try:
            data, props = reader_class().read_images(list(source.paths))
        except Exception as e:  # the readers raise RuntimeError, OSError, nibabel errors ...
            raise SSPError(f"{source.paths[0]}: cannot read image ({first_line(e)})") from None
        yield data, props
        return
    path = source.paths[0]
    try:
        if voxels is not None:
            image = sitk.ImageFileReader()
            image.SetFileName(path)
            image.ReadImageInformation()
            if image.GetDimension() != 4:
                raise SSPError(f"{path}: expected a 4D cine, SimpleITK reads a {image.GetDimension()}D image")
            array = voxels.transpose(3, 2, 1, 0)  # nibabel's (X, Y, Z, T) -> SimpleITK's (T, Z, Y, X)
        else:
            image = sitk.ReadImage(path)
            array = sitk.GetArrayFromImage(image)  # (T, Z, Y, X)
    except RuntimeError as e:
        raise SSPError(f"{path}: cannot read image ({first_line(e)})") from None
    del voxels
    if array.ndim != 4:
        raise SSPError(f"{path}: expected a 4D cine, read an array of shape {array.shape}")
    spacing, origin, d = image.GetSpacing()[:3], image.GetOrigin()[:3], image.GetDirection()
    direction = (d[0], d[1], d[2], d[4], d[5], d[6], d[8], d[9], d[10])
    for t in range(array.shape[0]):
        props = {
            "sitk_stuff": {"spacing": tuple(spacing), "origin": tuple(origin), "direction": direction},
            "spacing": list(np.abs(list(spacing)[::-1])),
        }
        # C order whatever the source's layout: nnU-Net's normalization sums in memory order
        yield np.ascontiguousarray(array[t][None], dtype=np.float32), props


def _check_file(path: str, keep: bool = False) -> Optional[np.ndarray]:
    """SimpleITK (in nnU-Net's reader too) reads a truncated NIfTI without complaint, the missing voxels as zeros, and
    NaN or infinite voxels as zeros: the file is read with nibabel first, which does neither. With ``keep``, returns
    nibabel's voxels (X, Y, Z, T) when they are what SimpleITK would read (see ``_same_as_simpleitk``), else None."""
    if not path.endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        image = nib.load(path)
        voxels = np.asanyarray(image.dataobj)
    except Exception as e:  # nibabel, gzip and zlib raise many types for short or corrupt files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SSPError(f"{path}: truncated or corrupt image file ({reason})") from None
    check_finite(voxels, path)
    return voxels if keep and _same_as_simpleitk(image, voxels) else None


def _same_as_simpleitk(image, voxels: np.ndarray) -> bool:
    """Whether SimpleITK reads the same voxel values as nibabel did: a 4D scalar NIfTI of a plain integer or float
    type stored without intensity scaling (scl_slope 0, 1 or NaN and scl_inter 0 or NaN, which both libraries take
    as no scaling), so both return the stored values, in the file's order."""
    try:
        header = image.header
        slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
        dims = [int(n) for n in header["dim"]]
        stored = header.get_data_dtype()
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    return (
        voxels.ndim == 4
        and dims[0] == 4
        and voxels.dtype.kind in "iuf"
        and voxels.dtype == stored
        and (slope in (0.0, 1.0) or np.isnan(slope))
        and (inter == 0.0 or np.isnan(inter))
    )


def check_frame(source: CineSource, t: int, data: np.ndarray) -> None:
    """Every channel of frame ``t`` must have finite voxels that are not all equal."""
    for c in range(data.shape[0]):
        path = source.paths[min(c, len(source.paths) - 1)]  # one file per channel, or one file
        check_intensities(data[c], f"{path} frame {t}" if source.ndim == 4 else path)
