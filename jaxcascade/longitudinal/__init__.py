"""Two visits of one patient: both aligned and segmented on one grid, their lesions matched (new, enlarging, ...).

`visits.py` aligns (co-registration, brain mask, working grid, intensity matching); `pipeline.py` segments
both visits and classifies the change (`evaluation.change`). May import every stage below the API.
"""
