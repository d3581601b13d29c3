"""Registration of consecutive H&E / IHC sections with ITK (rigid or affine, optional B-spline).

ITK itself is imported only when a registration runs, so importing this package stays cheap.
"""

from __future__ import annotations

from her2_monai.registration.channels import (
    CHANNELS,
    mutual_information,
    normalized_cross_correlation,
    registration_channel,
)
from her2_monai.registration.folder import checkerboard, register_files, register_folder
from her2_monai.registration.pairwise import (
    TRANSFORMS,
    PairRegistration,
    RegistrationResult,
    RegistrationWarning,
    euler_matrix,
    warp_rgb,
)

__all__ = [
    "CHANNELS",
    "TRANSFORMS",
    "PairRegistration",
    "RegistrationResult",
    "RegistrationWarning",
    "checkerboard",
    "euler_matrix",
    "mutual_information",
    "normalized_cross_correlation",
    "register_files",
    "register_folder",
    "registration_channel",
    "warp_rgb",
]
