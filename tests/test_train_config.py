"""The trainer's run config (repro.train.config): built by the harness from a spec's recipe, read back by the
trainer, with one set of defaults."""
from __future__ import annotations


def test_the_trainers_recipe_is_the_specs_recipe_without_the_planner_fields():
    # One defaults path: the spec's recipe extends the trainer's, so every field has one default, in one place.
    from repro.harness.spec import Recipe, load_spec
    from repro.train.config import TrainRecipe

    assert set(Recipe.model_fields) - set(TrainRecipe.model_fields) == {"lr_by_arch", "recipe_by_arch", "teachers"}
    assert all(Recipe.model_fields[name].default == field.default for name, field in TrainRecipe.model_fields.items())
    recipe = load_spec("wttm/cifar100-table1").recipe_for("full")
    arch = next(iter(recipe.lr_by_arch))
    run_recipe = recipe.for_training(arch)
    assert type(run_recipe) is TrainRecipe and run_recipe.optimizer.lr == recipe.lr_by_arch[arch]
    assert recipe.for_training("resnet8x4").optimizer.lr == recipe.optimizer.lr
    assert TrainRecipe.model_validate(run_recipe.model_dump()) == run_recipe  # what the trainer reads back


def test_recipe_by_arch_changes_only_that_architectures_runs():
    import pytest

    from pydantic import ValidationError

    from repro.harness.spec import Recipe, load_spec

    spec = load_spec("wttm/cifar100-table3")
    base = spec.recipe_for("full")
    recipe = base.model_copy(update={"recipe_by_arch": {"MobileNetV2": {"epochs": 7, "optimizer": {"momentum": 0.5}}}})
    mobile, other = recipe.for_training("MobileNetV2"), recipe.for_training("vgg8")
    assert (mobile.epochs, mobile.optimizer.momentum) == (7, 0.5)
    assert mobile.optimizer.lr == recipe.lr_by_arch["MobileNetV2"]  # merged after lr_by_arch, key by key
    assert mobile.optimizer.weight_decay == base.optimizer.weight_decay  # the rest of the block kept
    assert other == base.for_training("vgg8")
    bad = {**base.model_dump(), "recipe_by_arch": {"MobileNetV2": {"epochs": 0}}}
    with pytest.raises(ValidationError, match=r"recipe_by_arch\.MobileNetV2: .*epochs"):
        Recipe.model_validate(bad)
