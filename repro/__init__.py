"""repro: a paper-reproduction benchmark suite for knowledge distillation.

Data flows one way: spec (YAML) -> plan (runs) -> train/evaluate -> run store -> compare -> render.
"""

__version__ = "0.1.0"
