"""The version of jaxcascade: one place, read by setup.cfg and recorded in every model and output."""

__version__ = "0.1.0"
