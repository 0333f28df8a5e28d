"""The paper's evaluation protocol as resumable experiments; run with experiments/launch.py."""
