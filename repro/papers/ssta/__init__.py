"""The ssta paper: its specs (specs/*.yaml) and figure definitions (figures.py)."""
