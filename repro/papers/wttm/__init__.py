"""The wttm paper: its specs (specs/*.yaml) and figure definitions (figures.py)."""
