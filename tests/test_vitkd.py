"""ViTKD (repro.losses.vitkd, term ``vitkd``) against float64 computations written from the paper, and the
official masking (per-sample shuffle, keep, append mask tokens, unshuffle) written out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repro.core.errors import ReproError
from repro.losses.vitkd import TokenGenerator, random_token_mask, vitkd_generation_loss, vitkd_mimic_loss
from repro.data.batch import Batch
from repro.methods import Outputs, TermContext, get_term
from repro.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mimic_and_generation_losses_are_summed_squared_errors_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 4, 5, generator=gen) for _ in range(2)]
    t = [torch.randn(3, 4, 5, generator=gen) for _ in range(2)]
    expected = sum((a - b) ** 2 for x, y in zip(s, t) for a, b in zip(x.flatten().tolist(), y.flatten().tolist())) / 3
    assert vitkd_mimic_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([[True, False, True, False]] * 3)
    expected = sum((s[0][b, n, d].item() - t[0][b, n, d].item()) ** 2
                   for b in range(3) for n in (0, 2) for d in range(5)) / 3
    assert vitkd_generation_loss(s[0], t[0], mask).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("length,ratio", [(16, 0.5), (16, 0.75), (9, 0.5), (196, 0.5)])
def test_mask_matches_the_official_shuffle(length: int, ratio: float) -> None:
    mask = random_token_mask(4, length, ratio, torch.device("cpu"), torch.Generator().manual_seed(1))
    # The official random_masking with the same noise: argsort, keep the first int(L (1 - ratio)), unshuffle.
    noise = torch.rand(4, length, generator=torch.Generator().manual_seed(1))
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    official = torch.ones(4, length)
    official[:, :keep] = 0
    official = torch.gather(official, 1, ids_restore)
    assert torch.equal(mask, official.bool())
    assert (mask.sum(1) == length - keep).all()


def test_generator_inserts_the_mask_token_as_the_official_gather_does() -> None:
    torch.manual_seed(0)
    dim, length = 6, 16
    head = TokenGenerator(dim).double()
    with torch.no_grad():
        head.mask_token.normal_()
    x = torch.randn(2, length, dim, dtype=torch.float64)
    noise = torch.rand(2, length, generator=torch.Generator().manual_seed(3))
    mask = random_token_mask(2, length, 0.5, torch.device("cpu"), torch.Generator().manual_seed(3))
    # Official: x_keep = gather(x, ids_keep); cat mask tokens; gather with ids_restore; to a 4x4 grid; the convs.
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = length // 2
    x_keep = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    x_full = torch.cat([x_keep, head.mask_token.expand(2, length - keep, dim)], dim=1)
    x_full = torch.gather(x_full, 1, ids_restore[..., None].expand(-1, -1, dim))
    conv1, conv2 = head.generation[0], head.generation[2]
    grid = x_full.reshape(2, 4, 4, dim).permute(0, 3, 1, 2)
    expected = conv2(F.relu(conv1(grid))).flatten(2).transpose(1, 2)
    torch.testing.assert_close(head(x, mask), expected)
    with pytest.raises(ReproError, match="square"):
        head(torch.zeros(1, 15, dim, dtype=torch.float64), torch.zeros(1, 15, dtype=torch.bool))


def _vit_pair(student_name: str = "vit_smoke_tiny", teacher_name: str = "vit_smoke_small"):
    torch.manual_seed(0)
    return create_model(student_name, num_classes=5), create_model(teacher_name, num_classes=5)


def _ctx(student, teacher) -> TermContext:
    probe = torch.zeros(2, 3, 32, 32)
    dims = [[int(f.shape[1]) for f in m(probe, is_feat=True)[0]] for m in (student, teacher)]
    return TermContext(student=student, teacher=teacher, num_classes=5, train_labels=torch.arange(5),
                       device=torch.device("cpu"), epochs=2, student_feat_dims=dims[0], teacher_feat_dims=dims[1])


def test_term_value_is_alpha_mimic_plus_beta_over_ratio_generation() -> None:
    student, teacher = _vit_pair()
    term = get_term("vitkd")(_ctx(student, teacher), alpha=0.3, beta=0.02, mask_ratio=0.5)
    x = torch.randn(2, 3, 32, 32)
    feats, logits = student(x, is_feat=True)
    with torch.no_grad():
        t_feats, t_logits = teacher(x, is_feat=True)
    batch = Batch(images=x, targets=torch.zeros(2, dtype=torch.long), labels=torch.zeros(2, dtype=torch.long),
                  indices=torch.arange(2), epoch=1)
    torch.manual_seed(7)
    value = term(Outputs(logits=logits, feats=feats, teacher_logits=t_logits, teacher_feats=t_feats), batch)
    # Independently, in float64: blocks 1 and 2 (prefix token dropped) through the two linear maps, the last
    # (normalised) tokens through the third, the same mask (the same global RNG state), the generator's convs.
    d = lambda t: t.detach().double()  # noqa: E731
    lin = lambda layer, x: x @ d(layer.weight).T + d(layer.bias)  # noqa: E731
    mimic = sum(((lin(term.align_shallow[i], d(feats[i][:, 1:])) - d(t_feats[i][:, 1:])) ** 2).sum()
                for i in range(2)) / 2
    torch.manual_seed(7)
    mask = random_token_mask(2, 64, 0.5, torch.device("cpu"))
    last = lin(term.align_last, d(feats[-2][:, 1:]))
    last = torch.where(mask[..., None], d(term.generator.mask_token).expand(2, 64, -1), last)
    conv1, conv2 = term.generator.generation[0], term.generator.generation[2]
    grid = last.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    grid = F.conv2d(F.relu(F.conv2d(grid, d(conv1.weight), d(conv1.bias), padding=1)), d(conv2.weight),
                    d(conv2.bias), padding=1)
    generated = grid.flatten(2).transpose(1, 2)
    generation = (((generated - d(t_feats[-2][:, 1:])) ** 2) * mask[..., None]).sum() / 2
    expected = 0.3 * mimic + 0.02 / 0.5 * generation
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
    assert math.isfinite(value.item())


def test_term_refuses_a_cnn_and_too_many_shallow_blocks() -> None:
    student, teacher = _vit_pair()
    with pytest.raises(ReproError, match="shallow_blocks"):
        get_term("vitkd")(_ctx(student, teacher), shallow_blocks=4)  # depth 4: blocks 1-3 only
    cnn = create_model("resnet8", num_classes=5)
    ctx = _ctx(student, teacher)
    ctx.teacher = cnn
    with pytest.raises(ReproError, match="needs a ViT teacher"):
        get_term("vitkd")(ctx)


def test_same_width_uses_no_linear_maps() -> None:
    student, teacher = _vit_pair("vit_smoke_tiny", "vit_smoke_tiny")
    term = get_term("vitkd")(_ctx(student, teacher))
    assert all(isinstance(m, torch.nn.Identity) for m in [*term.align_shallow, term.align_last])
