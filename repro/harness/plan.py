"""Expand spec x tier x seeds into a DAG of runs, each identified by the hash of its resolved config.

A student run depends on its teacher: a CE training run of the teacher in the same plan, or an evaluation run of
a checkpoint file (which is also the teacher-accuracy gate). Identical configs collapse into one run, so a
"Student" row shared by two pairs, or a teacher shared by five tables, is trained once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from repro.core.io import sha256_file
from repro.core.errors import ReproError
from repro.harness.spec import Cell, MethodDef, Recipe, Spec, deep_merge, resolve_losses
from repro.harness.store import run_id_of
from repro.train.config import TrainRecipe

TEACHER_CHECKPOINT_PATH = "{arch}_vanilla/ckpt_epoch_240.pth"  # RepDistiller / mdistiller teacher bundle layout
WEIGHT_ARGS = ("pretrained", "checkpoint", "checkpoint_key")  # model arguments that load weights, not shape them


@dataclass
class PlannedRun:
    run_id: str
    config: dict[str, Any]
    label: str
    deps: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # the --set overrides that made this config (result.json)


@dataclass
class CellRuns:
    cell: Cell
    method: MethodDef
    run_ids: list[str]  # one per seed; empty for reported-only rows


@dataclass
class Plan:
    spec: Spec
    tier: str
    runs: dict[str, PlannedRun]  # insertion order is a topological order (dependencies first)
    cells: list[CellRuns]
    overrides: list[str] = field(default_factory=list)  # --set overrides that reached this spec
    inert_overrides: list[str] = field(default_factory=list)  # of those, the ones that changed no run at this tier

    def ordered(self) -> list[PlannedRun]:
        return list(self.runs.values())


def merged_plan(name: str, plans: list[Plan]) -> Plan:
    """The runs of several plans at one tier (an output's specs) as one DAG named ``name``, so that every run starts
    once its own dependencies are done instead of each spec waiting for the last run of the one before; a run
    shared by two specs is one run. For running only: the cells stay each plan's (reports compare per plan)."""
    runs: dict[str, PlannedRun] = {}
    for plan in plans:
        for run_id, run in plan.runs.items():  # each plan's order is topological, so the union's is too
            runs.setdefault(run_id, run)
    inert = [text for text in plans[0].inert_overrides if all(text in p.inert_overrides for p in plans)]
    overrides = list(dict.fromkeys(text for p in plans for text in p.overrides))
    return Plan(spec=plans[0].spec.model_copy(update={"id": name}), tier=plans[0].tier, runs=runs,
                cells=[cell for p in plans for cell in p.cells], overrides=overrides, inert_overrides=inert)


def teachers_root(recipe: Recipe) -> Path:
    """The one teacher root (absolute) the planner and ``repro teachers fetch`` share: the recipe's
    ``teachers.root``, else ``$REPRO_TEACHERS``, else ``teachers/cifar100``."""
    from repro.models.teachers import teachers_root as resolve_root

    return resolve_root(recipe.teachers.root)


def checkpoint_identity(arch: str, root: Path, explicit: Optional[str] = None) -> dict[str, Any]:
    """A teacher checkpoint as a run config records it.

    ``file``: the name that identifies it (``<arch>_vanilla/ckpt_epoch_240.pth`` inside the teacher root, or a
    spec's own ``checkpoint`` as written); ``path`` and ``lock``: where it and the teacher root's lock are on this
    machine, absolute and resolved (kept out of the run id: ``repro.harness.store.NON_IDENTITY_PATHS``); ``sha256``: the
    file's hash when it is present, else the locked one once known, else None (the run id then changes when the
    hash becomes known: different weights, different run).
    """
    from repro.models.teachers import locked_sha256, user_lock_path

    file = explicit or TEACHER_CHECKPOINT_PATH.format(arch=arch)
    path = (Path(explicit) if explicit else root / file).expanduser().resolve()
    lock = user_lock_path(root)
    if path.is_file():
        sha256: Optional[str] = sha256_file(path)
    else:
        sha256 = None if explicit else locked_sha256(arch, lock)
    return {"file": file, "path": str(path), "lock": str(lock), "sha256": sha256}


class Planner:
    def __init__(self, spec: Spec, tier: str, seeds: Optional[int] = None, teacher_gate: bool = True,
                 teacher_source: Optional[str] = None) -> None:
        self.teacher_gate = teacher_gate
        self.teacher_source = teacher_source
        self.spec = spec
        self.tier = tier
        self.seeds_override = seeds
        self.recipe = spec.recipe_for(tier)
        if teacher_source is not None:  # --teachers: e.g. students of the full tier from teachers trained here
            self.recipe.teachers.source = teacher_source  # type: ignore[assignment]
        self.runs: dict[str, PlannedRun] = {}
        self.source_specs: dict[str, Spec] = {}  # specs named by init_from, loaded once per plan

    # -- public ---------------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        cells = [self._plan_cell(cell) for cell in self.spec.cells]
        return Plan(self.spec, self.tier, self.runs, cells)

    # -- cells ----------------------------------------------------------------------------------------------
    def _plan_cell(self, cell: Cell) -> CellRuns:
        method = self.spec.methods[cell.method]
        if method.reported_only is not None:
            return CellRuns(cell, method, [])
        if method.role == "teacher":
            return CellRuns(cell, method, [self._teacher_run(cell.teacher)])
        n_seeds = self.seeds_override or self.spec.seeds_for_cell(cell, self.tier)
        losses = resolve_losses(method, cell, self.spec.tier_params.get(self.tier))
        teacher_id = self._teacher_run(cell.teacher) if method.needs_teacher() else None
        assistants = {"ta": self._assistant_run(cell.assistant)} if cell.assistant else {}
        pretrain_id = self._pretrain_run(cell.student)
        sources = self._source_runs(cell) if cell.init_from else []
        ids = []
        for seed in range(n_seeds):
            config = self._train_config(cell.student, losses, seed, teacher_id, assistants, method)
            # Seed i of a fine-tuning row starts from seed i of its source (cycling when the source has fewer).
            init_id = sources[seed % len(sources)] if sources else pretrain_id
            if init_id:
                config["init"] = {"run": init_id}
            label = f"{cell.student} <- {cell.teacher}  {cell.method}  seed {seed}" if teacher_id else \
                f"{cell.student}  {cell.method}  seed {seed}"
            if sources:
                # The source run's weights replace the model family's own: the config must not claim them too.
                config["model"]["args"] = {k: v for k, v in config["model"]["args"].items() if k not in WEIGHT_ARGS}
                label += f"  (from {cell.init_from.spec}: {init_id})"
            deps = [d for d in [teacher_id, init_id, *assistants.values()] if d]
            ids.append(self._add(config, label, deps))
        return CellRuns(cell, method, ids)

    def _source_runs(self, cell: Cell) -> list[str]:
        """The runs of the cell an ``init_from`` names (one per seed), planned by its own spec at this tier into
        this plan's DAG, before the runs that start from them (validated when the spec loaded)."""
        from repro.harness.spec import load_spec, select_cell

        assert cell.init_from is not None
        ref = cell.init_from.spec
        if ref not in self.source_specs:
            self.source_specs[ref] = load_spec(ref)
        source = self.source_specs[ref]
        planner = Planner(source, self.tier, self.seeds_override, self.teacher_gate, self.teacher_source)
        planner.runs = self.runs  # one DAG: runs shared with this plan collapse, insertion order stays topological
        planner.source_specs = self.source_specs
        return planner._plan_cell(select_cell(source, cell.init_from.cell)).run_ids

    # -- runs -----------------------------------------------------------------------------------------------
    def _add(self, config: dict[str, Any], label: str, deps: list[str]) -> str:
        run_id = run_id_of(config)
        if run_id not in self.runs:
            self.runs[run_id] = PlannedRun(run_id, config, label, deps)
        return run_id

    def _recipe_for_arch(self, arch: str) -> dict[str, Any]:
        return self.recipe.for_training(arch).model_dump()  # the run config's recipe: what the trainer reads

    def _model(self, key: str) -> dict[str, Any]:
        mdef = self.spec.model_def(key)
        args = deep_merge(self.recipe.model_args, mdef.args)
        return {"arch": self.spec.arch_of(key, self.tier),
                "num_classes": mdef.num_classes or self.spec.num_classes_for(self.tier),
                "args": args}

    def _train_config(self, key: str, losses: dict[str, dict[str, Any]], seed: int,
                      teacher_id: Optional[str], assistants: dict[str, str],
                      method: Optional[MethodDef] = None) -> dict[str, Any]:
        model = self._model(key)
        recipe = self._recipe_for_arch(model["arch"])
        if method is not None and (method.recipe or method.tier_recipe):
            recipe = deep_merge(recipe, method.recipe_overrides(self.tier))
            self._validated(recipe, f"method recipe overrides for {key}")  # method overrides obey the schema too
        return {
            "kind": "train",
            "tier": self.tier,
            "seed": seed,
            "model": model,
            "teacher": {"run": teacher_id} if teacher_id else None,
            "assistants": {name: {"run": rid} for name, rid in assistants.items()},
            "losses": losses,
            "recipe": recipe,
        }

    def _validated(self, recipe: dict[str, Any], what: str) -> None:
        from pydantic import ValidationError

        from repro.harness.spec import format_validation_error

        try:
            TrainRecipe.model_validate(recipe)
        except ValidationError as err:
            raise ReproError(f"spec {self.spec.id} [tier {self.tier}]: {what}: {format_validation_error(err)}") from None

    def _teacher_run(self, key: Optional[str]) -> str:
        assert key is not None
        source = self.recipe.teachers
        mdef = self.spec.model_def(key)
        if source.source == "train" and not mdef.checkpoint:
            config = self._train_config(key, {"ce": {"weight": 1.0}}, source.seed, None, {})
            if source.epochs:
                config["recipe"]["epochs"] = source.epochs
                self._validated(config["recipe"], f"teachers.epochs {source.epochs} for teacher {key}")
            if source.recipe:
                config["recipe"] = deep_merge(config["recipe"], source.recipe)
                self._validated(config["recipe"], f"teachers.recipe for teacher {key}")
            init_id = self._pretrain_run(key)
            if init_id:
                config["init"] = {"run": init_id}
            return self._add(config, f"{key}  teacher (CE)  seed {source.seed}", [init_id] if init_id else [])
        model = self._model(key)
        arch = model["arch"]
        checkpoint = None
        if source.source == "pretrained":
            model["args"] = {**model["args"], **({"checkpoint": mdef.checkpoint} if mdef.checkpoint else {"pretrained": True})}
        else:
            checkpoint = checkpoint_identity(arch, teachers_root(self.recipe), mdef.checkpoint)
        config = {
            "kind": "eval",
            "tier": self.tier,
            "model": model,
            "checkpoint": checkpoint,
            "expected_top1": mdef.expected_top1 if mdef.expected_top1 is not None else self._reported_teacher_top1(key),
            "gate_tolerance": source.gate_tolerance if self.teacher_gate else None,
            "recipe": self._recipe_for_arch(arch),
        }
        return self._add(config, f"{key}  teacher checkpoint (evaluate + gate)", [])

    def _assistant_run(self, key: str) -> str:
        # A TA's `pretrain` run stands in for its published weights only where the tier trains its own models.
        if self.recipe.teachers.source == "train":
            return self._pretrain_run(key) or self._teacher_run(key)
        return self._teacher_run(key)

    def _pretrain_run(self, key: str) -> Optional[str]:
        """The run that first produces model ``key`` when its ModelDef names a ``pretrain`` method."""
        mdef = self.spec.model_def(key)
        if not mdef.pretrain:
            return None
        if mdef.pretrain not in self.spec.methods:
            raise ReproError(f"spec {self.spec.id}: model {key!r} names unknown pretrain method {mdef.pretrain!r}")
        method = self.spec.methods[mdef.pretrain]
        losses = resolve_losses(method, None, self.spec.tier_params.get(self.tier))
        config = self._train_config(key, losses, 0, None, {}, method)
        return self._add(config, f"{key}  pretraining ({mdef.pretrain})", [])

    def _reported_teacher_top1(self, key: str) -> Optional[float]:
        for cell in self.spec.cells:
            if cell.teacher == key and self.spec.methods[cell.method].role == "teacher":
                return cell.reported.mean
        return None


def make_plan(spec: Spec, tier: str, seeds: Optional[int] = None, teacher_gate: bool = True,
              teacher_source: Optional[str] = None) -> Plan:
    if seeds is not None and seeds < 1:
        raise ReproError(f"--seeds must be at least 1, got {seeds}")
    return Planner(spec, tier, seeds, teacher_gate, teacher_source).plan()


def plan_spec(spec_ref: str, tier: str, seeds: Optional[int] = None, teacher_gate: bool = True,
              teacher_source: Optional[str] = None, overrides: Sequence[str] = (),
              unmatched_cells_ok: bool = False) -> Plan:
    """Load a spec (with its ``--set`` overrides, ``repro.harness.overrides``) and plan it: what the CLI and
    ``repro.api`` call.

    Each run an override changed records the overrides it needs (``PlannedRun.overrides``): those without which
    the plan no longer contains that run (leave one out), so ``cells[0]...`` is not recorded on cell 1's runs.
    """
    from repro.harness.overrides import apply_overrides, parse_override
    from repro.harness.spec import load_spec, read_spec_data

    def planned(chosen: Sequence[Any]) -> Plan:
        return make_plan(load_spec(spec_ref, overrides=chosen), tier, seeds, teacher_gate, teacher_source)

    parsed = [parse_override(text) for text in overrides]
    reaching = apply_overrides(read_spec_data(spec_ref)[1], parsed, unmatched_cells_ok)[1] if parsed else []
    plan = planned(reaching)
    if not reaching:
        return plan
    base = set(planned([]).runs)
    without = {o.text: set(planned([x for x in reaching if x is not o]).runs) if len(reaching) > 1 else base
               for o in reaching}
    used: set[str] = set()
    for run in plan.ordered():
        if run.run_id in base:
            continue
        run.overrides = [o.text for o in reaching if run.run_id not in without[o.text]] or [o.text for o in reaching]
        used.update(run.overrides)
    plan.overrides = [o.text for o in reaching]
    plan.inert_overrides = [o.text for o in reaching if o.text not in used]
    return plan
