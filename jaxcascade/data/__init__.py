"""Data in: NIfTI images, BIDS datasets and subject folders, resampling, normalisation, bias fields, patches,
intensity matching between visits.

Arrays and images in, arrays and images out; nothing here knows a network. May import
`jaxcascade.runtime`, `jaxcascade.config` and `jaxcascade.errors` only.
"""
