"""One axial slice of each phantom contrast with the lesion contour (the figure in the README).

Run:
    pip install -e ".[nilearn]"
    python experiments/phantom_figure.py [--out experiments/measured/phantom_contrasts.png]
Draws subject 0 of seed 0 at 1 mm from both generators: the MNI152-based one
(T1, FLAIR, T2, PD) and the procedural one (T1, FLAIR).
"""

import argparse
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")  # a script: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402

from jaxcascade import phantom  # noqa: E402
from jaxcascade.phantom import mni as phantom_mni
from jaxcascade.runtime.outputs import atomic_path  # noqa: E402



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "measured" / "phantom_contrasts.png"))
    args = parser.parse_args(argv)
    rows = [("MNI152 phantom", phantom_mni.make_subject(0, "full", phantom_mni.CONTRASTS), phantom_mni.CONTRASTS),
            ("procedural phantom", phantom.make_subject(0, "full"), ("T1", "FLAIR"))]
    figure, axes = plt.subplots(2, 4, figsize=(13, 7))
    for row, (title, subject, contrasts) in enumerate(rows):
        lesion = subject["lesion"] > 0
        z = int(np.argmax(lesion.sum(axis=(0, 1))))  # the most lesioned axial slice
        for column in range(4):
            axis = axes[row, column]
            axis.axis("off")
            if column >= len(contrasts):
                continue
            axis.imshow(np.rot90(subject[contrasts[column]][:, :, z]), cmap="gray")
            axis.contour(np.rot90(lesion[:, :, z]), levels=[0.5], colors="red", linewidths=0.8)
            axis.set_title(f"{title}: {contrasts[column]} (z={z})", fontsize=9)
    figure.suptitle("phantom contrasts at 1 mm, lesion contour in red")
    with atomic_path(args.out) as tmp:
        figure.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
