"""The trainer's own run config: the recipe a training or evaluation run executes, as a typed model.

A run config's ``recipe`` is this model's ``model_dump()``; the harness builds it from a spec's recipe
(``repro.harness.spec.Recipe`` extends it with what only the planner reads: ``lr_by_arch``, ``teachers``), and the trainer
reads it back with ``TrainRecipe.model_validate``. Every default lives here once, so a stored config and a freshly
planned one validate alike; this module imports nothing from the spec layer.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator


class Strict(BaseModel):
    """Unknown keys are refused: a typo is an error naming the key, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    name: str  # a reader registered in repro.data.DATASETS (or a folder pipeline's dataset)
    root: Optional[str] = None  # default: $REPRO_DATA or ./data
    download: bool = True
    synthetic: Optional[dict[str, Any]] = None  # generator args: smoke data written in the real file layout
    train_subset: Optional[PositiveInt] = None  # first N training images (smoke only)
    test_subset: Optional[PositiveInt] = None


class Normalization(Strict):
    mean: list[float]
    std: list[PositiveFloat]


class OptimizerConfig(Strict):
    name: str = "sgd"
    lr: PositiveFloat
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False
    eps: PositiveFloat = 1e-8
    lr_scale_base_batch: Optional[PositiveInt] = None  # DeiT: lr * global_batch / 512


class ScheduleConfig(Strict):
    name: str = "multistep"
    milestones: list[PositiveInt] = []  # epochs after which lr *= gamma (epochs counted from 1)
    gamma: PositiveFloat = 0.1
    warmup_epochs: int = Field(0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(0.0, ge=0)

    def problem_within(self, epochs: int) -> Optional[str]:
        """Why this schedule does not fit in ``epochs`` epochs (None when it does)."""
        # (Milestones past the end are harmless no-ops, e.g. a short pretraining recipe under a tier's schedule.)
        if self.warmup_epochs > epochs:
            return f"schedule.warmup_epochs = {self.warmup_epochs}: must be at most the {epochs} epochs"
        return None


class TrainRecipe(Strict):
    """What one run trains (or evaluates) with: data, augmentation pipeline, optimisation, numerics."""

    data: DataConfig
    pipeline: str = "cifar_crop_flip"  # a registered data pipeline (augmentation + batching)
    pipeline_args: dict[str, Any] = {}
    normalization: Normalization
    epochs: PositiveInt
    batch_size: PositiveInt  # GLOBAL batch: fixed by the paper, independent of the device count
    eval_batch_size: PositiveInt = 256
    optimizer: OptimizerConfig
    schedule: ScheduleConfig = ScheduleConfig()
    model_args: dict[str, Any] = {}  # extra create_model kwargs (drop_path_rate, img_size, ...)
    metric: Literal["best", "last"] = "best"
    # Fast path and numerics: recorded in every run and stamped on the tables when they deviate from the paper.
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    flush_denormal: bool = True
    compile: bool = False
    teacher_cache: bool = False
    teacher_cache_dtype: Literal["float16", "float32"] = "float16"  # float16: ~1.6 GB for CIFAR-100's 162 views
    # The cache also holds the teacher's last (pooled) feature, so the terms that read only it (CRD, ITRD, RKD, PKT,
    # CC) use the cache too. Sized for small data: CIFAR-100 with a 512-wide feature would be ~10 GB.
    teacher_cache_features: bool = False
    # strict: a kernel without a deterministic implementation is an error; warn: it runs and is recorded as a
    # deviation; off: any algorithm (cuDNN autotuning). ``true`` (the earlier spelling) means warn.
    deterministic: Literal["strict", "warn", "off"] = "warn"
    # TF32 matmuls/convolutions on Ampere+ GPUs; off = true fp32, what the papers' pre-Ampere GPUs computed.
    tf32: bool = False
    clip_grad_norm: Optional[PositiveFloat] = None
    # Smoke tier only: re-estimate BatchNorm statistics from this many training batches before each evaluation
    # (repro.train.precise_bn); a few dozen steps leave the running averages far behind the weights.
    precise_bn_batches: Optional[PositiveInt] = None
    # False: evaluate (and re-estimate BatchNorm) after the last epoch only. Evaluation never changes training
    # (eval mode, no gradients, the views come from per-epoch generators), so the last epoch's numbers are the same;
    # "best" is then the last. For tiers of a few steps, where an evaluation costs a sixth of an epoch.
    eval_every_epoch: bool = True

    @field_validator("deterministic", mode="before")
    @classmethod
    def _legacy_determinism(cls, value: Any) -> Any:
        from repro.core.numerics import LEGACY_DETERMINISM

        return LEGACY_DETERMINISM.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _schedule_fits(self) -> "TrainRecipe":
        problem = self.schedule.problem_within(self.epochs)
        if problem:
            raise ValueError(problem)
        return self
