"""Synthetic MS cohorts, so that everything runs without downloading anything: a procedural phantom
(`procedural`, whose generator this package exposes), an MNI152-based one (`mni`), what both share
(`core`), named acquisition settings (`scanners`) and a two-visit phantom with known lesion changes
(`longitudinal`).

May import `jaxcascade.data` and below.
"""

from jaxcascade.phantom.core import subject_name, subject_seed
from jaxcascade.phantom.procedural import SIZES, anatomy, make_subject, write_cohort

__all__ = ["SIZES", "anatomy", "make_subject", "subject_name", "subject_seed", "write_cohort"]
