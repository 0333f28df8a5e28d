"""Clinical scans as they come: transforms between scans, co-registration and brain extraction.

Owns the spatial side of raw clinical input: reading and writing ITK text transforms, resampling an
image onto another's grid (`transforms`), rigid/affine registration by mutual information (`rigid`)
and offline brain extraction with the MNI152 template that nilearn ships (`brain`).

Every transform here is a 4x4 affine of world points in millimetres, RAS+ (nibabel's convention),
mapping a point of the FIXED (reference) image to the corresponding point of the MOVING image: the
map that resamples the moving image onto the fixed grid (ITK's direction too, in LPS). Images are
nibabel images; no SimpleITK type crosses this package's boundary.

May import `jaxcascade.data`, `jaxcascade.runtime`, `jaxcascade.config` and `jaxcascade.errors`.
`rigid` and `brain` need the `clinical` extra (SimpleITK, nilearn); `transforms` needs neither.
"""

from jaxcascade.registration.brain import BrainOptions, extract_brain, looks_skull_stripped
from jaxcascade.registration.rigid import RegistrationOptions, register
from jaxcascade.registration.transforms import (chain, invert, read_itk_transform, resample,
                                                write_itk_transform)

__all__ = ["BrainOptions", "RegistrationOptions", "chain", "extract_brain", "invert", "looks_skull_stripped",
           "read_itk_transform", "register", "resample", "write_itk_transform"]
