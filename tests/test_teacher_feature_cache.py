"""The teacher-output cache with the teacher's last feature (``teacher_cache_features``): the feature terms that
read only ``teacher_feats[-1]`` (CRD, ITRD, RKD, PKT, CC) get the live teacher's losses from it, hits skip the
teacher, and the logits it serves are the logits-only cache's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from repro.core.errors import ReproError
from repro.data import ImageTensorDataset
from repro.data.batch import Batch
from repro.data.loader import TensorLoader, apply_views, normalize, sample_views
from repro.data.teacher_cache import TeacherCache, cached_teacher_fn, fill_cache
from repro.methods import LOSS_TERMS, Distiller, TermContext, get_term
from repro.methods.base import Outputs, forward_model
from repro.train.teacher_cache_open import probe_last_feature
from tests.support import epoch_losses

NUM_IMAGES, NUM_CLASSES = 10, 7
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class FeatureNet(nn.Module):
    """A tiny conv net with the model feature contract of ``repro.models`` (``is_feat``, ``preact``) that counts
    the images it has seen. ``last_preact_differs``: its pre-activation last feature is not the post-activation
    one (a model the cache must not serve pre-activation terms for)."""

    def __init__(self, seed: int, width: int = 6, last_preact_differs: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.embed = nn.Linear(16, width)
        self.fc = nn.Linear(width, NUM_CLASSES)
        self.last_preact_differs = last_preact_differs
        self.images_seen = 0

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        self.images_seen += x.shape[0]
        pre = self.bn(self.conv(x))
        mid = torch.relu(pre)
        hidden = self.embed(nn.functional.adaptive_avg_pool2d(mid, 2).flatten(1))
        last = torch.relu(hidden)
        logits = 3.0 * self.fc(last)
        if not is_feat:
            return logits
        last_out = hidden if (preact and self.last_preact_differs) else last
        return [pre if preact else mid, last_out], logits


@pytest.fixture
def dataset() -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(NUM_IMAGES) % NUM_CLASSES
    return ImageTensorDataset(images=images, labels=labels, num_classes=NUM_CLASSES, name="tiny", fingerprint="d0")


def _open(cache_dir: Path, dtype: str = "float32", feature_width: int = 6) -> TeacherCache:
    return TeacherCache.open(cache_dir, teacher_key="teacher-a", data_fingerprint="d0", normalization=(MEAN, STD),
                             num_images=NUM_IMAGES, num_classes=NUM_CLASSES, dtype=dtype, feature_width=feature_width)


def _context(student: nn.Module, teacher: nn.Module, dataset: ImageTensorDataset) -> TermContext:
    ctx = TermContext(student=student, teacher=teacher, num_classes=NUM_CLASSES, train_labels=dataset.labels,
                      device=torch.device("cpu"), epochs=2)
    probe = torch.zeros(2, 3, 32, 32)
    for model, side in ((student, "student"), (teacher, "teacher")):
        with torch.no_grad():
            _, feats = forward_model(model.eval(), probe, True, False)
        setattr(ctx, f"{side}_feat_dims", [int(f.shape[1]) for f in feats])
        setattr(ctx, f"{side}_feat_shapes", [tuple(f.shape[1:]) for f in feats])
    return ctx


# Two distillers: the feature kinds of one Distiller must agree (CRD/RKD/PKT/CC post-activation, ITRD pre-).
TERM_SETS = {
    "feat": {"kd": (0.9, {"temperature": 4.0}), "crd": (0.8, {"k": 4, "feat_dim": 8}), "rkd": (1.0, {}),
             "pkt": (30.0, {}), "cc": (0.02, {"feat_dim": 8})},
    "preact": {"kd": (0.9, {"temperature": 4.0}), "itrd": (1.0, {"lambda_mutual": 1.0})},
}


def _distiller(teacher: nn.Module, dataset: ImageTensorDataset, kind: str, teacher_fn=None) -> Distiller:
    torch.manual_seed(1)
    student = FeatureNet(seed=1, width=5)
    ctx = _context(student, teacher, dataset)
    terms = {name: (weight, get_term(name)(ctx, **params)) for name, (weight, params) in TERM_SETS[kind].items()}
    return Distiller(student, teacher, terms, teacher_fn=teacher_fn)


@pytest.mark.parametrize("kind", sorted(TERM_SETS))
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float16", 5e-3)])
def test_cached_feature_losses_equal_live_teacher_losses(tmp_path: Path, dataset: ImageTensorDataset, kind: str,
                                                         dtype: str, rtol: float) -> None:
    teacher = FeatureNet(seed=0)
    live = epoch_losses(_distiller(teacher, dataset, kind), dataset, [1, 2, 1], MEAN, STD)
    last = probe_last_feature(teacher, 32, torch.device("cpu"))
    assert (last.width, last.same_in_preact) == (6, True)
    fn = cached_teacher_fn(_open(tmp_path, dtype), teacher, "cpu", num_features=2, serves_preact=True)
    cached = epoch_losses(_distiller(teacher, dataset, kind, fn), dataset, [1, 2, 1], MEAN, STD)
    assert len(live) == len(cached) == 9
    for a, b in zip(live, cached):
        assert a.keys() == b.keys() == set(TERM_SETS[kind])
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=rtol, abs=1e-6), (kind, name, a[name], b[name])
    # Epoch 1 repeated: its views are the same, so the third pass is served entirely from the cache.
    assert fn.hits >= NUM_IMAGES and fn.misses + fn.hits == 3 * NUM_IMAGES


def test_hits_skip_the_teacher_cold_equals_warm_and_other_places_are_none(tmp_path: Path,
                                                                          dataset: ImageTensorDataset) -> None:
    teacher = FeatureNet(seed=0)
    fn = cached_teacher_fn(_open(tmp_path, "float16"), teacher, "cpu", num_features=2)
    loader = TensorLoader(dataset, 4, MEAN, STD, train=True, augment=True, seed=0, device="cpu")
    cold = [fn(batch, True, False) for batch in loader]
    assert teacher.images_seen == NUM_IMAGES and fn.misses == NUM_IMAGES
    warm = [fn(batch, True, False) for batch in loader]
    logits_only = [fn(batch, False, False) for batch in loader]  # a KD run of the same teacher reads the same file
    assert teacher.images_seen == NUM_IMAGES and fn.hits == 2 * NUM_IMAGES
    for (a_logits, a_feats), (b_logits, b_feats), (c_logits, c_feats) in zip(cold, warm, logits_only):
        assert a_feats[0] is None and b_feats[0] is None and c_feats is None
        assert torch.equal(a_logits, b_logits) and torch.equal(a_logits, c_logits)
        assert torch.equal(a_feats[1], b_feats[1]) and a_feats[1].shape == (a_logits.shape[0], 6)
        assert a_logits.is_contiguous() and a_feats[1].is_contiguous()


def test_logits_from_a_feature_cache_equal_the_logits_only_cache(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    """KD-type runs read the feature file under teacher_cache_features: their numbers must not move."""
    teacher = FeatureNet(seed=0)
    loader = TensorLoader(dataset, 4, MEAN, STD, train=True, augment=True, seed=0, device="cpu")
    plain = _open(tmp_path, "float16", feature_width=0)
    with_feature = _open(tmp_path, "float16")
    assert plain.path != with_feature.path
    assert "feature_width" not in json.loads(plain.path.with_suffix(".json").read_text())  # its name is unchanged
    assert json.loads(with_feature.path.with_suffix(".json").read_text())["feature_width"] == 6
    for batch in loader:
        a, _ = cached_teacher_fn(plain, teacher, "cpu")(batch, False, False)
        b, _ = cached_teacher_fn(with_feature, teacher, "cpu", num_features=2)(batch, False, False)
        assert torch.equal(a, b)


def test_requests_the_cache_cannot_serve_are_repro_errors(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    teacher = FeatureNet(seed=0)
    batch = next(iter(TensorLoader(dataset, 4, MEAN, STD, train=True, augment=True, seed=0, device="cpu")))
    with pytest.raises(ReproError, match="logits only"):
        cached_teacher_fn(_open(tmp_path, feature_width=0), teacher, "cpu", num_features=2)(batch, True, False)
    with pytest.raises(ReproError, match="pre-activation"):
        cached_teacher_fn(_open(tmp_path), teacher, "cpu", num_features=2)(batch, True, True)
    with pytest.raises(ReproError, match="feature_width"):
        _open(tmp_path, feature_width=-1)
    with pytest.raises(ValueError, match="do not match"):
        _open(tmp_path).store(torch.tensor([0]), None, torch.zeros(1, NUM_CLASSES))  # logits without the feature


def test_probe_tells_a_differing_preact_and_a_non_vector_last_feature() -> None:
    cpu = torch.device("cpu")
    assert probe_last_feature(FeatureNet(0, last_preact_differs=True), 16, cpu).same_in_preact is False

    class MapLast(FeatureNet):
        def forward(self, x, is_feat=False, preact=False):
            out = super().forward(x, is_feat, preact)
            return ([out[0][0], out[0][0]], out[1]) if is_feat else out

    assert probe_last_feature(MapLast(0), 16, cpu).width == 0


def test_fill_cache_holds_logits_and_last_feature_of_every_view(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    teacher = FeatureNet(seed=4)
    cache = _open(tmp_path)
    assert fill_cache(cache, teacher, dataset, MEAN, STD, "cpu", batch_size=256) == NUM_IMAGES * 162
    views = sample_views(NUM_IMAGES, torch.Generator().manual_seed(8))
    values, hit = cache.lookup(torch.arange(NUM_IMAGES), views)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats, logits = teacher.eval()(normalize(apply_views(dataset.images, views), mean, std), is_feat=True)
    assert hit.all() and torch.allclose(values, torch.cat([logits, feats[-1]], 1), rtol=1e-5, atol=1e-5)


def test_terms_that_declare_the_last_feature_read_nothing_else() -> None:
    """Every term declaring ``reads_teacher_features = "last"`` runs on a real zoo pair with None in every other
    teacher place (a term reading another place would fail here), and the declarations are known values."""
    from repro.models import create_model

    names = sorted(LOSS_TERMS.names())
    assert {get_term(n).reads_teacher_features for n in names} <= {"all", "last"}
    last_readers = [n for n in names if get_term(n).reads_teacher_features == "last"]
    assert {"crd", "itrd", "rkd", "pkt", "cc"} <= set(last_readers)
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    labels = torch.arange(16) % 10
    ctx = TermContext(student=student, teacher=teacher, num_classes=10, train_labels=labels,
                      device=torch.device("cpu"), epochs=2, image_size=16)
    images = torch.randn(4, 3, 16, 16)
    for name in last_readers:
        term = get_term(name)
        preact = term.features == "preact"
        s_feats, s_logits = student(images, is_feat=True, preact=preact)
        with torch.no_grad():
            t_feats, t_logits = teacher.eval()(images, is_feat=True, preact=preact)
        ctx.student_feat_dims, ctx.teacher_feat_dims = [f.shape[1] for f in s_feats], [f.shape[1] for f in t_feats]
        ctx.student_feat_shapes = [tuple(f.shape[1:]) for f in s_feats]
        ctx.teacher_feat_shapes = [tuple(f.shape[1:]) for f in t_feats]
        out = Outputs(logits=s_logits, feats=list(s_feats), teacher_logits=t_logits,
                      teacher_feats=[None] * (len(t_feats) - 1) + [t_feats[-1]])
        batch = Batch(images=images, targets=labels[:4], labels=labels[:4], indices=torch.arange(4), epoch=1)
        loss = get_term(name)(ctx).forward(out, batch)
        assert torch.isfinite(loss), name
