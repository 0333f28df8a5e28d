"""Scoring and showing results: voxel- and lesion-level metrics (`metrics`), lesion change between two visits
(`change`) and figures (`plots`).

May import `jaxcascade.data` and below.
"""
