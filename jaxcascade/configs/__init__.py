"""Config files shipped with the package (`default.py`, `demo.py`, `robust.py`)."""
