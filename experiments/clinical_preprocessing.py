"""Co-registration and brain extraction on raw clinical scans, against the database's own answers.

The data: `../shared/data/ljubljana-ms/longitudinal/patient01` (Lesjak et al. 2016, CC-BY): two
visits as acquired, with the authors' ITK transforms (each T1W/T2W onto its FLAIR, each FLAIR into
the visits' common space) and a brain mask in the common space. Run from the repository root:

    python -m experiments.clinical_preprocessing [OUT.json]   # ~1-2 min on 2 cores

Writes experiments/measured/clinical_preprocessing/patient01.json (default):
  registration: for each pair (study1/2 T1W->FLAIR, T2W->FLAIR, study2 FLAIR->study1 FLAIR) the
    residual against the database's transform, |ours(x) - theirs(x)| in mm over the centres of the
    brain mask's voxels mapped into the fixed image (mean, median, 95th percentile, max), the same for
    the headers' alignment alone (identity), rigid (the default) and affine, and seconds (median of 3
    for rigid, on 1 and 2 threads; 1 run for affine), split into preparing the pyramid and optimising,
    and the same for rigid on the 4 mm level alone (the cheaper setting the tests use).
    "affine" is `kind="affine"`: the rigid levels, then a 12-parameter pass at 2 mm; "affine_from_headers"
    runs the 12-parameter pass at every level from the headers' alignment, with no rigid pass first.
    Each also gives "along_slices_mm": the mean signed difference along the FLAIR's slice axis.
    The study2->study1 FLAIR reference is their two FLAIR->common transforms chained.
  database_transform (per pair): the polar decomposition of the database's 3x3 matrix (principal
    stretches, the stretch along the FLAIR's slice axis, the largest shear term, the rotation) and the
    rigid transform nearest to it over the brain points (least squares), with its residual: the most
    any rigid registration could agree with that affine.
  brain_mutual_information (within-visit pairs): Mattes MI (32 bins, lower is better) on the native
    grids, every FLAIR voxel of the database's brain mask, for the headers, ours and the database's.
  brain: Dice of `extract_brain` on each visit's FLAIR against brainmask_common mapped onto that
    FLAIR (linear, >= 0.5), the affine-mapped template mask before refinement, volumes, seconds
    (median of 3), Dice within the FLAIR slices that the database's mask reaches (it stops above the
    lowest temporal lobes and cerebellum), and `looks_skull_stripped` on every raw scan and on patient26's stripped FLAIR.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxcascade.registration import brain, itk_bridge, rigid, transforms

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ljubljana-ms"
PATIENT = DATA / "longitudinal" / "patient01"
STRIPPED = DATA / "cross-sectional" / "patient26" / "FLAIR.nii.gz"
OUT = Path(__file__).resolve().parent / "measured" / "clinical_preprocessing" / "patient01.json"
REPEATS = 3


def load_patient(patient: Path = PATIENT) -> dict:
    """Images, the database's transforms (RAS fixed -> moving) and brain points, by name."""
    images = {f"study{s}_{q}": nib.load(patient / f"study{s}_{q}.nii.gz") for s in (1, 2) for q in ("FLAIR", "T1W", "T2W")}
    common_to_flair = {s: transforms.read_itk_transform(patient / f"study{s}_FLAIR_to_common_space.txt") for s in (1, 2)}
    brain_common = nib.load(patient / "brainmask_common.nii.gz")
    points_common = transforms.mask_points(brain_common)
    pairs = []
    for s in (1, 2):
        for q in ("T1W", "T2W"):
            pairs.append({"fixed": f"study{s}_FLAIR", "moving": f"study{s}_{q}",
                          "reference": transforms.read_itk_transform(patient / f"study{s}_{q}_intrastudy_to_FLAIR.txt"),
                          "points": transforms.apply(common_to_flair[s], points_common)})
    pairs.append({"fixed": "study1_FLAIR", "moving": "study2_FLAIR",
                  "reference": transforms.chain(transforms.invert(common_to_flair[1]), common_to_flair[2]),
                  "points": transforms.apply(common_to_flair[1], points_common)})
    return {"images": images, "pairs": pairs, "common_to_flair": common_to_flair, "brain_common": brain_common}


def residual(transform: np.ndarray, pair: dict) -> dict:
    distance = transforms.displacement_mm(transform, pair["reference"], pair["points"])
    return {"mean_mm": float(distance.mean()), "median_mm": float(np.median(distance)),
            "p95_mm": float(np.percentile(distance, 95)), "max_mm": float(distance.max())}


def timed(function, repeats: int):
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return result, seconds


def pyramid_seconds(fixed, moving, options: rigid.RegistrationOptions) -> float:
    """What `register` spends before optimising: nibabel -> SimpleITK and the block averages."""
    sitk = itk_bridge.simpleitk()
    start = time.perf_counter()
    fixed_itk, moving_itk = itk_bridge.to_sitk(fixed), itk_bridge.to_sitk(moving)
    for spacing in options.level_spacings_mm:
        rigid._block_average(sitk, fixed_itk, spacing)
        rigid._block_average(sitk, moving_itk, spacing)
    return time.perf_counter() - start


def slice_axis(image) -> np.ndarray:
    """The unit world direction (RAS) of the image's thickest voxel axis: the slices' normal."""
    axis = int(np.argmax(image.header.get_zooms()[:3]))
    return image.affine[:3, axis] / np.linalg.norm(image.affine[:3, axis])


def along_slices_mm(transform: np.ndarray, pair: dict, normal: np.ndarray) -> float:
    difference = transforms.apply(transform, pair["points"]) - transforms.apply(pair["reference"], pair["points"])
    return float(np.mean(difference @ normal))


def nearest_rigid(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The rotation and shift that best match `transform` on `points` (least squares, Kabsch)."""
    mapped = transforms.apply(transform, points)
    points_mean, mapped_mean = points.mean(0), mapped.mean(0)
    u, _, vt = np.linalg.svd((points - points_mean).T @ (mapped - mapped_mean))
    reflection = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    result = np.eye(4)
    result[:3, :3] = vt.T @ reflection @ u.T
    result[:3, 3] = mapped_mean - result[:3, :3] @ points_mean
    return result


def decompose(pair: dict, normal: np.ndarray) -> dict:
    """The database's matrix as rotation x stretch (polar decomposition M = R S), and its nearest rigid."""
    u, stretches, vt = np.linalg.svd(pair["reference"][:3, :3])
    rotation, stretch = u @ vt, vt.T @ np.diag(stretches) @ vt
    rigid_fit = nearest_rigid(pair["reference"], pair["points"])
    return {"principal_stretches": stretches.tolist(), "stretch_along_slices": float(normal @ stretch @ normal),
            "largest_shear": float(np.abs(stretch - np.diag(np.diag(stretch))).max()),
            "rotation_degrees": float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))),
            "nearest_rigid": residual(rigid_fit, pair), "nearest_rigid_ras": rigid_fit.tolist()}


def affine_from_headers(fixed, moving, options: rigid.RegistrationOptions) -> np.ndarray:
    """The 12-parameter pass at every level from the headers' alignment (no rigid pass first)."""
    sitk = itk_bridge.simpleitk()
    fixed_itk, moving_itk = itk_bridge.to_sitk(fixed), itk_bridge.to_sitk(moving)
    centre = fixed_itk.TransformContinuousIndexToPhysicalPoint([(size - 1) / 2 for size in fixed_itk.GetSize()])
    current = np.eye(4)
    for spacing in options.level_spacings_mm:
        current = rigid._one_level(sitk, rigid._block_average(sitk, fixed_itk, spacing),
                                   rigid._block_average(sitk, moving_itk, spacing), None, current, "affine",
                                   centre, options)
    return current


def brain_mutual_information(fixed, moving, transform: np.ndarray, brain_mask) -> float:
    """Mattes MI (32 bins; lower is better) over every voxel of `brain_mask` on the fixed grid."""
    sitk = itk_bridge.simpleitk()
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetMetricFixedMask(itk_bridge.to_sitk(brain_mask, np.uint8))
    method.SetInterpolator(sitk.sitkLinear)
    lps = transforms.ras_to_lps(transform)
    itk_transform = sitk.AffineTransform(3)
    itk_transform.SetMatrix([float(value) for value in lps[:3, :3].ravel()])
    itk_transform.SetTranslation([float(value) for value in lps[:3, 3]])
    method.SetInitialTransform(itk_transform)
    return float(method.MetricEvaluate(itk_bridge.to_sitk(fixed), itk_bridge.to_sitk(moving)))


def brain_on_flair(patient: dict, study: int) -> nib.Nifti1Image:
    """The database's common-space brain mask carried onto that visit's FLAIR (linear, >= 0.5)."""
    flair = patient["images"][f"study{study}_FLAIR"]
    mapped = transforms.resample(patient["brain_common"], flair, transforms.invert(patient["common_to_flair"][study]))
    return nib.Nifti1Image((np.asarray(mapped.dataobj) >= 0.5).astype(np.uint8), flair.affine)


def measure_registration(patient: dict) -> list[dict]:
    rows = []
    rigid_options = rigid.RegistrationOptions()
    affine_options = rigid.RegistrationOptions(kind="affine")
    coarse_options = rigid.RegistrationOptions(level_spacings_mm=(4.0,))
    for pair in patient["pairs"]:
        fixed, moving = patient["images"][pair["fixed"]], patient["images"][pair["moving"]]
        ours, seconds = timed(lambda: rigid.register(fixed, moving, rigid_options), REPEATS)
        again = rigid.register(fixed, moving, rigid_options)
        _, seconds_2threads = timed(lambda: rigid.register(fixed, moving, rigid.RegistrationOptions(threads=2)), REPEATS)
        affine, seconds_affine = timed(lambda: rigid.register(fixed, moving, affine_options), 1)
        coarse, seconds_coarse = timed(lambda: rigid.register(fixed, moving, coarse_options), REPEATS)
        from_headers, seconds_from_headers = timed(lambda: affine_from_headers(fixed, moving, affine_options), 1)
        normal = slice_axis(fixed)
        row = {"fixed": pair["fixed"], "moving": pair["moving"], "brain_points": len(pair["points"]),
               "headers_only": residual(np.eye(4), pair),
               "rigid": {**residual(ours, pair), "seconds_median": statistics.median(seconds), "seconds": seconds,
                         "seconds_2threads_median": statistics.median(seconds_2threads),
                         "pyramid_seconds": pyramid_seconds(fixed, moving, rigid_options),
                         "repeat_max_difference": float(np.abs(ours - again).max()),
                         "along_slices_mm": along_slices_mm(ours, pair, normal), "transform_ras": ours.tolist()},
               "affine": {**residual(affine, pair), "seconds": seconds_affine[0],
                          "along_slices_mm": along_slices_mm(affine, pair, normal),
                          "principal_stretches": np.linalg.svd(affine[:3, :3], compute_uv=False).tolist()},
               "affine_from_headers": {**residual(from_headers, pair), "seconds": seconds_from_headers[0],
                                       "along_slices_mm": along_slices_mm(from_headers, pair, normal),
                                       "principal_stretches": np.linalg.svd(from_headers[:3, :3],
                                                                            compute_uv=False).tolist()},
               "rigid_4mm_only": {**residual(coarse, pair), "seconds_median": statistics.median(seconds_coarse)},
               "database_transform": decompose(pair, normal)}
        if pair["moving"].split("_")[0] == pair["fixed"].split("_")[0]:  # within a visit
            mask = brain_on_flair(patient, int(pair["fixed"][len("study")]))
            row["brain_mutual_information"] = {
                name: brain_mutual_information(fixed, moving, transform, mask) for name, transform in
                (("headers_only", np.eye(4)), ("rigid", ours), ("affine", affine),
                 ("affine_from_headers", from_headers), ("database", pair["reference"]),
                 ("database_nearest_rigid", np.asarray(row["database_transform"]["nearest_rigid_ras"])))}
        rows.append(row)
        print(f"{pair['moving']} -> {pair['fixed']}: rigid mean {row['rigid']['mean_mm']:.2f} max "
              f"{row['rigid']['max_mm']:.2f} mm in {row['rigid']['seconds_median']:.2f} s; affine mean "
              f"{row['affine']['mean_mm']:.2f} max {row['affine']['max_mm']:.2f} mm; affine from headers mean "
              f"{row['affine_from_headers']['mean_mm']:.2f} max {row['affine_from_headers']['max_mm']:.2f} mm; "
              f"headers mean {row['headers_only']['mean_mm']:.2f} mm; database's slice-axis stretch "
              f"{row['database_transform']['stretch_along_slices']:.4f}, nearest rigid "
              f"{row['database_transform']['nearest_rigid']['mean_mm']:.2f} mm", flush=True)
    return rows


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return float(2 * (first & second).sum() / (first.sum() + second.sum()))


def measure_brain(patient: dict) -> dict:
    options = brain.BrainOptions()
    start = time.perf_counter()
    brain.mni_template()
    template_seconds = time.perf_counter() - start
    visits = []
    for s in (1, 2):
        flair = patient["images"][f"study{s}_FLAIR"]
        reference = np.asarray(brain_on_flair(patient, s).dataobj) > 0
        mask, seconds = timed(lambda: brain.extract_brain(flair, options), REPEATS)
        ours = np.asarray(mask.dataobj) > 0
        template, template_mask = brain.mni_template()
        mapped, seconds_mapping = timed(lambda: brain._template_mask_on(flair, template, template_mask, options), 1)
        voxel_ml = abs(np.linalg.det(flair.affine[:3, :3])) / 1000.0
        # The database's mask stops short of the lowest slices (its 5 lowest common-space slices are empty
        # although the common grid covers the whole FLAIR): compare also within the slices it reaches.
        reached = np.zeros_like(reference)
        reached[:, :, np.flatnonzero(reference.any(axis=(0, 1)))] = True
        visits.append({"flair": f"study{s}_FLAIR", "dice": dice(ours, reference),
                       "dice_mapped_template_only": dice(mapped, reference),
                       "dice_within_reference_slices": dice(ours & reached, reference),
                       "ours_outside_reference_slices_ml": float((ours & ~reached).sum() * voxel_ml),
                       "volume_ml": float(ours.sum() * voxel_ml), "reference_volume_ml": float(reference.sum() * voxel_ml),
                       "ours_not_reference_ml": float((ours & ~reference).sum() * voxel_ml),
                       "reference_not_ours_ml": float((reference & ~ours).sum() * voxel_ml),
                       "seconds_median": statistics.median(seconds), "seconds": seconds,
                       "template_registration_and_mapping_seconds": seconds_mapping[0]})
        print(f"brain study{s}_FLAIR: Dice {visits[-1]['dice']:.4f} (template only "
              f"{visits[-1]['dice_mapped_template_only']:.4f}) in {visits[-1]['seconds_median']:.2f} s", flush=True)
    stripped = {name: brain.looks_skull_stripped(image) for name, image in patient["images"].items()}
    stripped["patient26_FLAIR (skull-stripped)"] = brain.looks_skull_stripped(nib.load(STRIPPED))
    return {"visits": visits, "template_load_seconds": template_seconds, "looks_skull_stripped": stripped,
            "options": repr(options)}


def main(out: Path = OUT) -> dict:
    sitk = itk_bridge.simpleitk()
    patient = load_patient()
    result = {"patient": "ljubljana-ms/longitudinal/patient01 (Lesjak et al. 2016, CC-BY)",
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "simpleitk": sitk.Version.VersionString(), "processor": platform.processor()},
              "registration_options": repr(rigid.RegistrationOptions()),
              "registration": measure_registration(patient), "brain": measure_brain(patient)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
