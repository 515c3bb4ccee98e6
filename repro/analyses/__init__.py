"""Evaluation suites: ``SUITES.get(name)(model, cfg, device) -> dict`` (JSON-ready, with a ``protocol`` record).

``repro eval MODEL --suite clean,imagenet-c,shape-bias,top10`` looks each name up here; no caller branches on it.
A suite is one module of this package: a function decorated with ``@suite(name, data=..., headline=...)``
(every module of the package is imported on the first read of ``SUITES``, so there is no list to edit). ``data``
names the folder it reads (a ``repro.analyses.suite_config.EvalData`` field), ``headline`` its one-number console
summary. The other modules: ``resolve`` (MODEL -> a loaded model), ``suite_config`` (data, options, the ``cfg``
mapping), ``records`` (the JSON record), ``spec_models`` (the models of a spec's runs, for analysis figures).

``cfg`` is a plain mapping. Shared keys may sit at the top level; a section named after the suite overrides them
(unknown keys inside a section are an error):

Shared (``repro.analyses.predict.EvalOptions``)
    ``batch_size`` (64), ``num_workers`` (min(8, CPUs)), ``image_size`` (224: the centre crop), ``resize_size``
    (suite default, see below; ``null`` = crop only), ``mean``/``std`` (ImageNet), ``amp`` (false; bf16 autocast),
    ``label_space`` ("auto": WNID folders read by a 1000-way model use the ImageNet indices, anything else the
    sorted folder order; or force "imagenet"/"folder"), ``progress`` (true: tqdm bars).

``clean``       ``root``: class-per-folder set (ImageNet val as ``<wnid>/*.JPEG``). resize image_size/0.875 -> crop.
                Returns top1, top5 (percent), n_images.
``imagenet-c``  ``root``: ``<root>/<corruption>/<1-5>/<wnid>/*.JPEG``; ``corruptions`` (the 15 benchmark ones),
                ``extra_corruptions`` ([]; any of speckle_noise, gaussian_blur, spatter, saturate, reported apart),
                ``severities`` ([1..5]). Crop only (released JPEGs are 224 px). Returns mce, ce, error,
                mean_error, mean_accuracy, extra_mean_error, complete_benchmark, ... (see ``mce_from_errors``).
``shape-bias``  ``root``: cue-conflict ``<shape>/<shape><i>-<texture><j>.png``; ``aggregation`` ("mean").
                Crop only (stimuli are 224 px). Returns shape_bias, per_class, fraction_shape/texture, counts.
``top10``       ``root``: labelled class-per-folder set; ``other_model`` (the second, already built nn.Module, e.g.
                the SSL TA with its linear probe), ``names`` (["teacher", "ta"]: model first, other second),
                ``rule`` ("largest-difference" or "top-correct", see ``RANK_RULES``), ``k`` (10).
                Returns accuracy per model and ``table`` (tidy rows, see ``top10.TABLE_COLUMNS``).

Example: ``{"batch_size": 128, "imagenet-c": {"root": "/data/ImageNet-C"}, "shape-bias": {"root": "/data/cue"}}``.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from repro.core.registry import Registry

SuiteFn = Callable[[nn.Module, Mapping[str, Any], "torch.device | str"], dict[str, Any]]


@dataclass(frozen=True)
class Suite:
    """A registered suite: called as ``suite(model, cfg, device)``; ``data`` is the EvalData folder it reads."""

    run: SuiteFn
    data: str
    headline: Callable[[dict[str, Any]], str]

    def __call__(self, model: nn.Module, cfg: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
        return self.run(model, cfg, device)


_SUITES: Registry[Suite] = Registry("evaluation suite")  # read as SUITES: the first read imports every suite
_discovered = False


def suite(name: str, *, data: str, headline: Callable[[dict[str, Any]], str]) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator: register ``fn`` as the suite ``name`` (the function itself is returned unchanged)."""

    def add(fn: SuiteFn) -> SuiteFn:
        _SUITES.register(name)(Suite(fn, data, headline))
        return fn

    return add


def run_suites(
    model: nn.Module, names: list[str], cfg: Mapping[str, Any], device: torch.device | str
) -> dict[str, dict[str, Any]]:
    """Run several suites on one model (unknown names fail before any work): ``{suite name: result}``."""
    suites = {name: _suites().get(name) for name in names}
    return {name: suite(model, cfg, device) for name, suite in suites.items()}


def _suites() -> Registry[Suite]:
    """The registry with every module of the package imported (once; a module importing ``SUITES`` while the
    discovery runs gets the registry as filled so far)."""
    global _discovered
    if not _discovered:
        _discovered = True
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
    return _SUITES


def __getattr__(name: str) -> Any:
    # ``SUITES`` is computed on first read (PEP 562), so that importing one analysis module stays cheap.
    if name == "SUITES":
        return _suites()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["SUITES", "Suite", "run_suites", "suite"]
