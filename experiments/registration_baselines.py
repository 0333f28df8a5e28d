"""ANTsPy (antspyx) against jaxcascade.registration.rigid on patient01's five pairs: residual and seconds.

ANTsPy is not a dependency of the project (its wheel pins numpy<2.4 and scipy<1.16, and is 90 MB); to
rerun, install it beside the environment and put it on the path:

    pip install --no-deps --target /tmp/ants antspyx statsmodels patsy webcolors
    PYTHONPATH=/tmp/ants:. python -m experiments.registration_baselines [OUT.json]

Both run on one thread (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 for ANTs, `threads=1` for ours), one
after the other in this process, on the same images; the residual is the one of
experiments/clinical_preprocessing.py (|ours(x) - database(x)| over the brain mask's voxels).
Writes experiments/measured/clinical_preprocessing/ants_baseline.json (default).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np  # noqa: E402

from experiments.clinical_preprocessing import PATIENT, load_patient, residual  # noqa: E402
from jaxcascade.registration import itk_bridge, rigid  # noqa: E402

OUT = Path(__file__).resolve().parent / "measured" / "clinical_preprocessing" / "ants_baseline.json"
ANTS_TRANSFORMS = ("QuickRigid", "Rigid", "Affine")


def ants_register(ants, fixed_path: Path, moving_path: Path, kind: str) -> np.ndarray:
    """ANTsPy's fixed -> moving world map (RAS), read back from the transform file it writes."""
    sitk = itk_bridge.simpleitk()
    fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    with tempfile.TemporaryDirectory() as folder:
        result = ants.registration(fixed, moving, type_of_transform=kind, random_seed=1,
                                   outprefix=os.path.join(folder, "ants_"))
        return itk_bridge.transform_to_ras(sitk.ReadTransform(result["fwdtransforms"][0]))


def main(out: Path = OUT) -> dict:
    import ants

    patient = load_patient()
    rows = []
    for pair in patient["pairs"]:
        fixed, moving = patient["images"][pair["fixed"]], patient["images"][pair["moving"]]
        row = {"fixed": pair["fixed"], "moving": pair["moving"]}
        start = time.perf_counter()
        ours = rigid.register(fixed, moving)
        row["jaxcascade_rigid"] = {**residual(ours, pair), "seconds": time.perf_counter() - start}
        for kind in ANTS_TRANSFORMS:
            start = time.perf_counter()
            theirs = ants_register(ants, PATIENT / f"{pair['fixed']}.nii.gz", PATIENT / f"{pair['moving']}.nii.gz", kind)
            row[f"ants_{kind}"] = {**residual(theirs, pair), "seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"ants_version": ants.__version__, "threads": 1, "pairs": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
