"""Declarative experiment specs: one YAML file per paper table or figure, validated by pydantic.

A spec reads like the paper table: a recipe (with per-tier overrides), the method rows as weighted loss terms,
and the cells (teacher, student, method, hyperparameters, reported value with its provenance). Unknown keys are
refused everywhere, so a typo is an error naming the key, never a silently ignored setting.
"""
# Longer than ~400 lines on purpose: the schema is one pydantic tree whose validators refer to each other; split, a rule would sit apart from the fields it checks.
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import (ConfigDict, Field, PositiveFloat, PositiveInt, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from repro.core.errors import ReproError
from repro.papers import spec_files
from repro.train.config import Strict, TrainRecipe

if TYPE_CHECKING:
    from repro.harness.overrides import Override

TIERS = ("smoke", "proxy", "full")
Tier = Literal["smoke", "proxy", "full"]
SourceKind = Literal["paper", "appendix", "readme", "code", "other-paper", "assumption"]
REPORTED_METRICS = ("top1", "top5")  # what a cell's reported number may measure (a result field per protocol)


class Provenance(Strict):
    """Where a value comes from when it is not the paper's main text."""

    source: SourceKind
    note: str = ""


class Reported(Strict):
    """A reported number and how far to trust it. ``mean: null`` means the paper prints n/a."""

    mean: Optional[float] = None
    std: Optional[float] = None
    n: Optional[PositiveInt] = None
    protocol: Literal["best", "last", "unknown"] = "unknown"
    source: str = ""
    confidence: str = "high"
    status: Literal["reported", "not_transcribed", "not_available"] = "reported"
    # What the number measures; compared with the runs' top-1 or top-5 (repro.harness.compare). mCE and shape bias are
    # measured by `repro eval` over finished runs, not by training runs, so a table cell cannot hold them.
    metric: str = "top1"
    note: str = ""  # a ledger fact about this value (e.g. what the source repository prints): a table footnote

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in REPORTED_METRICS:
            raise ValueError(f"metric {value!r} is not compared from training runs; known: "
                             f"{', '.join(REPORTED_METRICS)} (mCE and shape bias are measured by `repro eval`)")
        return value


class TeacherSource(Strict):
    """Where teachers come from: a CE training run in the same plan (``train``), RepDistiller-format checkpoint
    files with a sha256 lock (``checkpoint``), or the model family's pretrained weights (``pretrained``:
    torchvision/timm; a model's ``checkpoint`` path is then loaded by the family instead, nothing fetched)."""

    source: Literal["train", "checkpoint", "pretrained"] = "train"
    root: Optional[str] = None  # checkpoint folder: <root>/<arch>_vanilla/ckpt_epoch_240.pth
    gate_tolerance: Optional[float] = 0.5  # refuse a teacher this far (points) off its reported accuracy
    seed: int = 0
    epochs: Optional[PositiveInt] = None  # trained teachers: epochs if not the recipe's (smoke tier)
    # Trained teachers: any other recipe values for their CE runs, deep-merged into the tier's recipe (the smoke
    # tier anneals its teachers, whose students keep the constant lr: {schedule: {name: cosine_per_step}}).
    recipe: dict[str, Any] = {}


class Recipe(TrainRecipe):
    """A spec's recipe: the run's own (``repro.train.config.TrainRecipe``) plus what only the planner reads."""

    lr_by_arch: dict[str, PositiveFloat] = {}  # e.g. the official code forces lr 0.01 for MobileNetV2/ShuffleNets
    # Any other recipe values for the runs of one architecture, deep-merged after ``lr_by_arch`` (e.g. a tier's
    # slow learner trains longer: {MobileNetV2: {epochs: 4}}).
    recipe_by_arch: dict[str, dict[str, Any]] = {}
    teachers: TeacherSource = TeacherSource()

    @model_validator(mode="after")
    def _arch_recipes_valid(self) -> "Recipe":
        for arch in self.recipe_by_arch:
            try:
                self.for_training(arch)
            except ValidationError as err:
                raise ValueError(f"recipe_by_arch.{arch}: {format_validation_error(err)}") from None
        return self

    def for_training(self, arch: str) -> TrainRecipe:
        """The recipe a run of ``arch`` trains with: ``lr_by_arch`` and ``recipe_by_arch`` applied, the
        planner-only fields dropped (how teachers are obtained is part of the teacher reference, not of the
        recipe)."""
        fields = self.model_dump(include=set(TrainRecipe.model_fields))
        if arch in self.lr_by_arch:
            fields["optimizer"]["lr"] = self.lr_by_arch[arch]
        fields = deep_merge(fields, self.recipe_by_arch.get(arch, {}))
        return TrainRecipe.model_validate(fields)


class LossSpec(Strict):
    """One weighted loss term; any other key is a constructor parameter of the registered term."""

    model_config = ConfigDict(extra="allow")
    weight: float = 1.0


class MethodDef(Strict):
    """A paper row: a weighted sum of registered loss terms, or a row the suite only reports."""

    role: Literal["student", "teacher"] = "student"  # "teacher": the cell shows the teacher's own accuracy
    losses: dict[str, Union[float, LossSpec]] = {}
    reported_only: Optional[str] = None  # why this row is not run (e.g. "FitNet is not implemented yet")
    recipe: dict[str, Any] = {}  # recipe overrides for this method's runs (e.g. a pretraining schedule)
    # Per-tier overrides applied after ``recipe``: a family with its own schedule (XCiT's 400 epochs) keeps the
    # smoke tier's short one, e.g. {smoke: {epochs: 2}}.
    tier_recipe: dict[Tier, dict[str, Any]] = {}
    note: str = ""

    def recipe_overrides(self, tier: str) -> dict[str, Any]:
        """``recipe`` with this tier's ``tier_recipe`` deep-merged in."""
        return deep_merge(self.recipe, self.tier_recipe.get(tier, {}))  # type: ignore[call-overload]

    def needs_teacher(self) -> bool:
        """Whether a run of this row needs a teacher model: asked of each registered loss term."""
        from repro.methods import get_term

        return self.role == "student" and any(get_term(name).requires_teacher_model() for name in self.losses)


class CellSelector(Strict):
    """Names one cell of a spec by its fields: every field given must match, and exactly one cell may."""

    teacher: Optional[str] = None
    student: Optional[str] = None
    assistant: Optional[str] = None
    method: Optional[str] = None

    def matches(self, cell: "Cell") -> bool:
        return all(getattr(cell, name) == value for name, value in self.model_dump(exclude_none=True).items())

    def describe(self) -> str:
        return ", ".join(f"{name}: {value}" for name, value in self.model_dump(exclude_none=True).items())


class InitFrom(Strict):
    """The run a cell's student starts from: a cell of another spec, planned first at the same tier; the source
    run's id is part of the cell's run config (``init.run``), so a change of the source moves this cell's id."""

    spec: str  # a spec id, or a YAML path (a relative one is read from the folder of the spec that names it)
    cell: CellSelector


class Cell(Strict):
    """One row of the paper table for one teacher/student pair."""

    teacher: Optional[str] = None
    student: str
    method: str
    params: dict[str, dict[str, Any]] = {}  # per-term overrides merged into the method's losses
    reported: Reported = Reported()
    provenance: dict[str, Provenance] = {}  # dotted path (e.g. "params.wttm.weight") -> source
    seeds: Optional[PositiveInt] = None
    assistant: Optional[str] = None  # SSTA: the teaching assistant's model key
    init_from: Optional[InitFrom] = None  # the student starts from another spec's run (fine-tuning)


class Claim(Strict):
    """An ordering the paper claims, checked per teacher/student pair at every tier (the proxy tier's purpose)."""

    better: str  # method label
    worse: str
    note: str = ""


class ModelDef(Strict):
    """A named model used by cells: its arch and how to obtain it (defaults: arch = the key)."""

    arch: Optional[str] = None
    num_classes: Optional[PositiveInt] = None
    args: dict[str, Any] = {}
    checkpoint: Optional[str] = None  # explicit checkpoint file (overrides the teacher source root)
    expected_top1: Optional[float] = None  # for the teacher-accuracy gate
    # A method key: the model is first produced by a run of that method (a label-free TA, or a student
    # pretrained before fine-tuning); students start from its weights (``init``), assistants are that run.
    pretrain: Optional[str] = None


class Floors(Strict):
    """The lowest top-1 (%) a tier's teacher and student cells may show (``repro.harness.floors``): at the smoke
    tier, evidence that every loss trains; a value is our choice, so it says why (``provenance``)."""

    teachers: Optional[float] = Field(None, ge=0, le=100)
    students: Optional[float] = Field(None, ge=0, le=100)
    # Method rows held to no floor, each with the reason (e.g. a hint loss whose weight swamps 20 steps of CE).
    exempt: dict[str, str] = {}
    # Student models (cell keys) held to no floor, with the reason: an architecture that cannot learn in the budget.
    exempt_students: dict[str, str] = {}
    provenance: Provenance


class Spec(Strict):
    base: Optional[str] = None  # a shared spec fragment (recipe, tiers, models) this spec extends
    id: str  # "<paper>/<table>", e.g. "wttm/cifar100-table1"
    paper: str
    title: str
    table: str  # the paper's label, e.g. "Table 1"
    output: str  # tables/<output>.md and .csv; several specs can render into one file as sections
    order: int = 100  # position of this spec's section in its output (then by id)
    description: str = ""
    num_classes: PositiveInt = 100
    # A tier's head width, e.g. {smoke: 10}: the smoke data has 10 classes, and a 100-way head over them leaves
    # the logit methods' softened targets mostly on classes without images.
    tier_num_classes: dict[Tier, PositiveInt] = {}
    recipe: Recipe
    recipe_provenance: dict[str, Provenance] = {}
    tiers: dict[Tier, dict[str, Any]] = {}
    tier_notes: dict[Tier, str] = {}
    seeds: PositiveInt = 1  # default seeds per cell at the full tier (the paper's run count)
    tier_seeds: dict[Tier, PositiveInt] = {}  # a tier's seed count overrides the spec's and the cells'
    # Per-tier loss-term parameters, {tier: {term: {param: value}}}, applied to every cell whose method has the
    # term (after the cell's own params): e.g. a warm-up in epochs scaled like the tier's milestones.
    tier_params: dict[Tier, dict[str, dict[str, Any]]] = {}
    models: dict[str, ModelDef] = {}
    # Per-tier architecture substitutes, e.g. {smoke: {deit_tiny_patch16_224: vit_smoke_tiny}}: the smoke tier
    # of a ViT paper runs tiny ViTs through the same code path; the substitution is stamped on the table.
    tier_models: dict[Tier, dict[str, str]] = {}
    tier_floors: dict[Tier, Floors] = {}  # e.g. {smoke: {teachers: 60, students: 25, provenance: ...}}
    methods: dict[str, MethodDef]
    cells: list[Cell]
    claims: list[Claim] = []
    notes: list[str] = []
    _loaded_as: Optional[tuple[str, tuple[str, ...]]] = PrivateAttr(default=None)  # repro.api: (ref, --set)

    @model_validator(mode="after")
    def _cells_name_known_methods(self) -> "Spec":
        for i, cell in enumerate(self.cells):
            if cell.method not in self.methods:
                raise ValueError(f"cells[{i}]: unknown method {cell.method!r}; the spec defines {sorted(self.methods)}")
            method = self.methods[cell.method]
            if method.reported_only is None and (method.needs_teacher() or method.role == "teacher") and not cell.teacher:
                raise ValueError(f"cells[{i}] ({cell.method}, {cell.student}): this method needs a teacher")
            for term in cell.params:
                if term not in method.losses:
                    raise ValueError(f"cells[{i}]: params for {term!r}, but method {cell.method!r} has no such loss term")
        return self

    # -- derived views --------------------------------------------------------------------------------------
    def recipe_for(self, tier: str) -> Recipe:
        """The recipe with the tier's overrides deep-merged in (validated again: overrides obey the schema)."""
        merged = deep_merge(self.recipe.model_dump(), self.tiers.get(tier, {}))
        try:
            return Recipe.model_validate(merged)
        except ValidationError as err:
            raise ReproError(f"spec {self.id}: tier {tier!r} overrides: {format_validation_error(err)}") from None

    def num_classes_for(self, tier: str) -> int:
        return self.tier_num_classes.get(tier, self.num_classes)  # type: ignore[call-overload]

    def seeds_for(self, tier: str) -> int:
        return self.tier_seeds.get(tier, self.seeds)

    def seeds_for_cell(self, cell: Cell, tier: str) -> int:
        """The tier's seed count if it sets one, else the cell's (a paper cell run a different number of
        times than its table), else the spec's."""
        return self.tier_seeds.get(tier) or cell.seeds or self.seeds

    def model_def(self, key: str) -> ModelDef:
        return self.models.get(key, ModelDef())

    def arch_of(self, key: str, tier: Optional[str] = None) -> str:
        if tier is not None and key in self.tier_models.get(tier, {}):
            return self.tier_models[tier][key]
        return self.model_def(key).arch or key


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_losses(method: MethodDef, cell: Optional[Cell],
                   tier_params: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, dict[str, Any]]:
    """Merge the method's loss terms with the cell's per-term parameters, then the tier's (``Spec.tier_params``),
    into plain dicts."""
    losses: dict[str, dict[str, Any]] = {}
    for name, term in method.losses.items():
        base = {"weight": float(term)} if isinstance(term, (int, float)) else LossSpec.model_validate(term).model_dump()
        override = cell.params.get(name, {}) if cell else {}
        losses[name] = deep_merge(deep_merge(base, override), (tier_params or {}).get(name, {}))
    return losses


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {e['loc'][-1]!r}"
        elif e["type"] in ("literal_error", "enum") and "input" in e:
            msg = f"{msg}, got {e['input']!r}"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def spec_path(spec_ref: str) -> Path:
    """A spec id (``wttm/cifar100-table1``) or a path to a YAML file."""
    candidate = Path(spec_ref)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ReproError(f"spec file {spec_ref!r} does not exist")
        return candidate
    by_id = spec_files().get(spec_ref)
    if by_id is None or by_id.name.startswith("_"):
        known = ", ".join(all_spec_ids()) or "(none)"
        raise ReproError(f"no spec {spec_ref!r} (not a file, not a spec id); known spec ids: {known}")
    return by_id


def spec_display_path(spec_id: str) -> str:
    """Where a spec's file is, as a reader of a table finds it: relative to the checkout when it is inside (a spec
    loaded from a YAML path whose id is no paper's spec: its id as a file name)."""
    found = spec_files().get(spec_id)
    if found is None:
        return f"{spec_id}.yaml"
    path = found.resolve()
    checkout = Path(__file__).resolve().parent.parent.parent
    return path.relative_to(checkout).as_posix() if path.is_relative_to(checkout) else str(path)


def read_spec_data(spec_ref: str) -> tuple[Path, dict[str, Any]]:
    """The spec's data as written, with its ``base:`` fragment merged in (not validated yet)."""
    path = spec_path(spec_ref)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ReproError(f"spec {path}: YAML syntax error: {err}") from None
    except OSError as err:
        raise ReproError(f"spec {path}: cannot read: {err.strerror}") from None
    if raw is None:
        raise ReproError(f"spec {path} is empty")
    if not isinstance(raw, dict):
        raise ReproError(f"spec {path}: expected a mapping at the top level, got {type(raw).__name__}")
    if raw.get("base"):
        raw = deep_merge(_read_base(raw["base"], path), raw)
    return path, raw


def load_spec(spec_ref: str, check_models: bool = True, overrides: Sequence["Override"] = (),
              check_sources: bool = True) -> Spec:
    """Read, merge, override (``--set``: ``repro.harness.overrides``) and validate a spec; the file is never written.
    ``check_sources``: also follow its cells' ``init_from`` chains."""
    from repro.harness.overrides import apply_overrides, describe

    path, raw = read_spec_data(spec_ref)
    if overrides:
        raw, _ = apply_overrides(raw, overrides)
    try:
        return _validated_spec(raw, path, check_models, check_sources)
    except ReproError as err:
        if not overrides:
            raise
        raise ReproError(f"{err} (with --set {describe(overrides)})") from None


def _validated_spec(raw: dict[str, Any], path: Path, check_models: bool, check_sources: bool) -> Spec:
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        raise ReproError(f"spec {path}: {format_validation_error(err)}") from None
    for tier in TIERS:
        spec.recipe_for(tier)  # tier overrides must validate too
    _resolve_init_paths(spec, path)
    if check_models:
        check_model_names(spec)
        check_recipe_names(spec)
        check_loss_terms(spec)
        if check_sources:
            check_init_sources(spec, path)
    return spec


def _resolve_init_paths(spec: Spec, spec_file: Path) -> None:
    """A relative YAML path in ``init_from.spec`` is read from the naming spec's folder, wherever it is planned."""
    for cell in spec.cells:
        ref = cell.init_from
        if ref is not None and Path(ref.spec).suffix in (".yaml", ".yml") and not Path(ref.spec).is_absolute():
            ref.spec = str((spec_file.parent / ref.spec).resolve())


def select_cell(spec: Spec, selector: CellSelector) -> Cell:
    """The one cell of ``spec`` that ``selector`` names (an error listing the candidates otherwise)."""
    found = [cell for cell in spec.cells if selector.matches(cell)]
    if len(found) == 1:
        return found[0]
    names = "; ".join(f"{{{describe_cell(c)}}}" for c in found or spec.cells)
    what = f"no cell of spec {spec.id} matches" if not found else f"{len(found)} cells of spec {spec.id} match"
    raise ReproError(f"{what} {{{selector.describe()}}} ({'its cells' if not found else 'name one'}: {names})")


def describe_cell(cell: Cell) -> str:
    """A cell as messages name it: ``teacher: wrn_40_2, student: wrn_16_2, method: KD`` (the fields it sets)."""
    return ", ".join(f"{k}: {v}" for k in ("teacher", "student", "assistant", "method") if (v := getattr(cell, k)))


def _trained_model(spec: Spec, cell: Cell) -> str:
    """The model key a cell's run produces: the teacher for a teacher row, else the student."""
    return cell.teacher if spec.methods[cell.method].role == "teacher" and cell.teacher else cell.student


def check_init_sources(spec: Spec, spec_file: Path) -> None:
    """Every ``init_from`` names a spec that loads and exactly one of its cells; that cell has a run, which
    produces the same model as this cell's student at every tier; and the chain of sources has no cycle."""
    for i, cell in enumerate(spec.cells):
        if cell.init_from is None:
            continue
        where = f"spec {spec.id}: cells[{i}] ({cell.method}, {cell.student}): init_from"
        method = spec.methods[cell.method]
        if method.reported_only is not None or method.role == "teacher":
            raise ReproError(f"{where}: only a trained student row starts from a run; this row is "
                             f"{'reported only' if method.reported_only is not None else 'a teacher row'}")
        if spec.model_def(cell.student).pretrain:
            raise ReproError(f"{where}: student {cell.student!r} already starts from its pretrain run "
                             f"({spec.model_def(cell.student).pretrain!r}); give one of the two")
        chain = [(spec_file.resolve(), i, spec.id)]
        current, current_cell = spec, cell
        while current_cell.init_from is not None:
            ref = current_cell.init_from
            try:
                source = load_spec(ref.spec, check_sources=False)  # this loop follows the chain itself
                source_cell = select_cell(source, ref.cell)
            except ReproError as err:
                raise ReproError(f"{where}: {err}") from None
            node = (spec_path(ref.spec).resolve(), source.cells.index(source_cell), source.id)
            if node[:2] in [n[:2] for n in chain]:
                loop = " -> ".join(f"{n[2]} cells[{n[1]}]" for n in [*chain, node])
                raise ReproError(f"{where}: cycle of init_from sources: {loop}")
            _check_same_model(where, current, current_cell, source, source_cell)
            chain.append(node)
            current, current_cell = source, source_cell


def _check_same_model(where: str, spec: Spec, cell: Cell, source: Spec, source_cell: Cell) -> None:
    source_method = source.methods[source_cell.method]
    if source_method.reported_only is not None:
        raise ReproError(f"{where}: the source cell {{{describe_cell(source_cell)}}} of spec {source.id} is reported "
                         f"only; it has no run to start from")
    produced = _trained_model(source, source_cell)
    for tier in TIERS:
        mine, theirs = spec.arch_of(cell.student, tier), source.arch_of(produced, tier)
        if mine != theirs:
            raise ReproError(f"{where}: the source cell {{{describe_cell(source_cell)}}} of spec {source.id} trains "
                             f"{theirs!r} at tier {tier!r}, but this cell's student is {mine!r}: its weights "
                             f"do not fit")


def _recipes_to_check(spec: Spec) -> list[tuple[str, Recipe]]:
    """(where, recipe) for the spec's recipe at every tier and under every method's recipe overrides."""
    out = [("recipe", spec.recipe)]  # first, so that a bad base value is named as the recipe's, not a tier's
    for tier in TIERS:
        recipe = spec.recipe_for(tier)
        out.append((f"tier {tier!r}", recipe))
        for name, method in spec.methods.items():
            if method.recipe or method.tier_recipe:
                merged = deep_merge(recipe.model_dump(), method.recipe_overrides(tier))
                try:
                    out.append((f"tier {tier!r}, method {name!r}", Recipe.model_validate(merged)))
                except ValidationError as err:
                    raise ReproError(f"spec {spec.id}: tier {tier!r}, method {name!r} recipe overrides: "
                                     f"{format_validation_error(err)}") from None
    return out


def check_recipe_names(spec: Spec) -> None:
    """Every name a recipe gives (pipeline, optimizer, schedule, dataset) is registered, at every tier."""
    from repro.train.optim import OPTIMIZERS, SCHEDULES
    from repro.data.pipelines import PIPELINES, pipeline_arg_names, pipeline_datasets

    for where, recipe in _recipes_to_check(spec):
        for field, name, registry in (("pipeline", recipe.pipeline, PIPELINES),
                                      ("optimizer.name", recipe.optimizer.name, OPTIMIZERS),
                                      ("schedule.name", recipe.schedule.name, SCHEDULES)):
            if name not in registry:
                raise ReproError(f"spec {spec.id}: {where}: {field} {name!r} is not a registered {registry.kind}; "
                                 f"known: {', '.join(registry.names())}")
        accepted = pipeline_arg_names(recipe.pipeline, recipe.pipeline_args)
        unknown = sorted(set(recipe.pipeline_args) - set(accepted)) if accepted is not None else []
        if unknown:
            raise ReproError(f"spec {spec.id}: {where}: pipeline_args {unknown} are not options of pipeline "
                             f"{recipe.pipeline!r}; known: {', '.join(accepted) or '(none)'}")
        datasets = pipeline_datasets(recipe.pipeline)
        if recipe.data.name not in datasets:
            raise ReproError(f"spec {spec.id}: {where}: data.name {recipe.data.name!r} is not a dataset that "
                             f"pipeline {recipe.pipeline!r} reads; known: {', '.join(datasets)}")


def check_loss_terms(spec: Spec) -> None:
    """Every loss term exists, gets exactly the parameters its constructor takes, and every parameter (given or
    default) lies in the domain the term declares (``LossTerm.domains``), at every tier; the first problem is
    named."""
    from repro.methods import get_term

    # Epoch parameters (warm-ups, early stops) are the paper's: checked against the spec's own (full-tier)
    # schedule, which the smoke and proxy tiers shorten.
    epochs = spec.recipe_for("full").epochs
    pretrain_methods = {m.pretrain for m in spec.models.values() if m.pretrain}
    for i, cell in enumerate(spec.cells):
        method = spec.methods[cell.method]
        if method.reported_only is not None or method.role == "teacher":
            continue
        for tier in TIERS:
            for name, params in resolve_losses(method, cell, spec.tier_params.get(tier)).items():
                _check_term(f"spec {spec.id}: cells[{i}] ({cell.method}, {cell.student}) [{tier}]: loss term "
                            f"{name!r}", name, params, _run_epochs(spec, method, epochs))
    for key in sorted(pretrain_methods & set(spec.methods)):
        method = spec.methods[key]
        for name, params in resolve_losses(method, None).items():
            _check_term(f"spec {spec.id}: method {key!r}: loss term {name!r}", name, params,
                        _run_epochs(spec, method, epochs))
    for terms in spec.tier_params.values():
        for name in terms:
            get_term(name)  # an unknown term name is an error naming the known ones
    for key, mdef in spec.models.items():
        if mdef.pretrain and mdef.pretrain not in spec.methods:
            raise ReproError(f"spec {spec.id}: model {key!r} names unknown pretrain method {mdef.pretrain!r}")


def _run_epochs(spec: Spec, method: MethodDef, epochs: int) -> int:
    override = method.recipe_overrides("full").get("epochs")
    return int(override) if isinstance(override, int) and not isinstance(override, bool) else epochs


def _check_term(where: str, name: str, params: dict[str, Any], epochs: int) -> None:
    import inspect

    from repro.core.domains import FINITE
    from repro.methods import get_term

    term = get_term(name)
    signature = inspect.signature(term.__init__)
    accepted = [p for p in list(signature.parameters.values())[2:]]  # after self, ctx
    given = set(params) - {"weight"}
    if not any(p.kind is p.VAR_KEYWORD for p in accepted):
        names = {p.name for p in accepted}
        unknown = sorted(given - names)
        if unknown:
            raise ReproError(f"{where}: unknown parameter(s) {unknown}; it takes {sorted(names)}")
        missing = sorted(p.name for p in accepted if p.default is p.empty and p.name not in given)
        if missing:
            raise ReproError(f"{where}: missing parameter(s) {missing}")
    defaults = {p.name: p.default for p in accepted if p.default is not p.empty}
    values = {**defaults, **params}
    for param, domain in {"weight": FINITE, **term.domains}.items():
        if param not in values:
            continue
        problem = domain.problem(values[param], epochs)
        if problem:
            source = "" if param in params else " (its default)"
            raise ReproError(f"{where}: {param} = {values[param]!r}{source}: {problem}")


def _read_base(base: str, spec_file: Path) -> dict[str, Any]:
    path = spec_files().get(base)
    if path is None:
        raise ReproError(f"spec {spec_file}: base {base!r} does not exist (a base is <paper>/<name>, the file "
                         f"<paper>/specs/<name>.yaml of a paper folder)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReproError(f"spec base {path}: YAML syntax error: {err}") from None
    if not isinstance(raw, dict):
        raise ReproError(f"spec base {path}: expected a mapping")
    return raw


def check_model_names(spec: Spec) -> None:
    from repro.models import MODELS, model_names

    names = set(model_names())
    keys = {k for c in spec.cells for k in (c.teacher, c.student, c.assistant) if k}
    archs = {spec.arch_of(k) for k in keys} | {a for m in spec.tier_models.values() for a in m.values()}
    for arch in sorted(archs):
        if arch not in names and arch not in MODELS:
            raise ReproError(f"spec {spec.id}: unknown model {arch!r}; known models: {', '.join(sorted(names))}")


def all_spec_ids() -> list[str]:
    """Every runnable spec; files starting with ``_`` are shared bases, not specs."""
    return sorted(spec_id for spec_id, path in spec_files().items() if not path.name.startswith("_"))


def specs_for_output(output: str) -> list[str]:
    """Spec ids that render into ``tables/<output>.md``, in file order (table order)."""
    ranked = []
    for spec_id in all_spec_ids():
        raw = yaml.safe_load(spec_path(spec_id).read_text()) or {}
        if raw.get("output") == output:
            ranked.append((raw.get("order", 100), spec_id))
    if not ranked:
        raise ReproError(f"no spec renders into {output!r}; outputs: {', '.join(all_outputs())}")
    return [spec_id for _, spec_id in sorted(ranked)]


def all_outputs() -> list[str]:
    outs = {(yaml.safe_load(spec_path(s).read_text()) or {}).get("output") for s in all_spec_ids()}
    return sorted(o for o in outs if o)


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()
