"""The bottom layer: infrastructure every other package may use and that imports nothing above it."""
