"""``python -m her2_monai register``: align an IHC image to its H&E neighbour (ITK is imported only when it runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["register"]


def register(
    he: str | None = None,
    ihc: str | None = None,
    output: str | None = None,
    transform: str = "affine",
    bspline: bool = False,
    channel: str = "tissue",
    max_side: int = 256,
    method: str = "ncc",
    pyramid_max_side: int = 1024,
    he_landmarks: str | None = None,
    ihc_landmarks: str | None = None,
) -> None:
    """Register an IHC image to its H&E (consecutive sections) and write the aligned IHC at full resolution.

    Writes into OUTPUT: ihc_registered.png, he.png, checkerboard.png (before | after) and registration.json
    (transform parameters, NCC and NMI before and after, and the verdict: registered, uncertain or failed, with the
    reasons). With landmark files (corresponding points placed on both sections), it also prints their target
    registration error (TRE) before and after, and writes it under ``landmarks``.

    Args:
        he: H&E image file (the fixed reference).
        ihc: IHC image file (moved onto the H&E grid).
        output: output folder (created if needed).
        transform: rigid, similarity or affine (default; the affine stage is kept only when it improves the fit).
        bspline: add a B-spline (deformable) refinement.
        channel: registration channel: tissue, od, hematoxylin or grey.
        max_side: longer side (px) of the resolution the transform is computed at.
        method: ncc (default: band-passed NCC, rotation x scale search, both-way check) or itk (the earlier method).
        pyramid_max_side: ncc method: refine again at finer levels up to this side (px; at most the image's side);
            none at or below the max_side value.
        he_landmarks: optional landmark CSV of the H&E (ImageJ / ANHIR layout ``,X,Y``; pixel x = column, y = row).
        ihc_landmarks: the IHC's landmark CSV, row i the same place as row i of ``he_landmarks``.
    """
    for flag, value in (("he", he), ("ihc", ihc), ("output", output)):
        if value is None or isinstance(value, bool):
            raise ValueError(f"--{flag} is required and needs a path")
    from her2_monai.registration.folder import register_files, write_pair_outputs
    from her2_monai.registration.pairwise import PairRegistration
    from her2_monai.utils import as_bool

    points = None
    if (he_landmarks is None) != (ihc_landmarks is None):
        raise ValueError("--he_landmarks and --ihc_landmarks go together: give both landmark files or neither")
    if he_landmarks is not None:
        from her2_monai.registration.landmarks import read_landmark_pair

        points = read_landmark_pair(str(he_landmarks), str(ihc_landmarks))

    registration = PairRegistration(
        transform=str(transform),
        bspline=as_bool(bspline, "--bspline"),
        channel=str(channel),
        max_side=int(max_side),
        method=str(method),
        pyramid_max_side=int(pyramid_max_side),
    )
    fixed, aligned, result = register_files(str(he), str(ihc), registration)
    if points is not None:
        from her2_monai.registration.landmarks import landmark_errors, landmark_summary

        before = np.linalg.norm(points[0] - points[1], axis=1)
        result.details["landmarks"] = {
            "files": {"he": str(he_landmarks), "ihc": str(ihc_landmarks)},
            **landmark_summary(landmark_errors(result, *points), before, fixed.shape),
        }
    from her2_monai.data.image_reader import read_rgb

    paths = write_pair_outputs(Path(output), fixed, read_rgb(ihc), aligned, result)
    q = result.quality
    print(
        f"{result.status}: {result.transform}{' + bspline' if registration.bspline else ''}, "
        f"angle {result.angle_deg:.2f} deg, "
        f"translation ({result.matrix[0, 2]:.1f}, {result.matrix[1, 2]:.1f}) px; "
        f"NCC {q['ncc_before']:.3f} -> {q['ncc_after']:.3f}, NMI {q['nmi_before']:.4f} -> {q['nmi_after']:.4f}; "
        f"written to {Path(paths['json']).parent}"
    )
    verdict = f"verdict: {result.verdict}"
    if result.verdict_reasons:
        verdict += " (" + "; ".join(result.verdict_reasons) + "): check checkerboard.png before using this pair"
    print(verdict)
    if points is not None:
        marks = result.details["landmarks"]
        print(
            f"landmarks: {marks['points']} points, TRE median {marks['median_px']:.2f} px, "
            f"max {marks['max_px']:.2f} px (median {marks['median_before_px']:.2f} px before registration)"
        )
