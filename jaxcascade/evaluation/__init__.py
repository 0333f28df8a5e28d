"""Scoring and showing results: voxel- and lesion-level metrics (`metrics`) and figures (`plots`).

May import `jaxcascade.data` and below.
"""
