"""Head selection: gradient importance finds a head that is decisive by construction; other rules; the cache."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from repro.core.errors import ReproError
from repro.data.batch import Batch
from repro.models import create_model
from repro.methods.head_importance import (
    gradient_head_importance,
    head_mask,
    model_fingerprint,
    pick_heads,
    select_heads,
    select_heads_cached,
)
from tests.support import silence_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(count=2, size=4, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=generator), torch.randint(classes, (size,), generator=generator))
            for _ in range(count)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("vit_smoke_tiny", num_classes=5)


def test_decisive_last_layer_head_is_picked(model):
    silence_heads(model, {0: 0, 1: 1, 2: 2, 3: 1})  # last layer: only head 1 reaches the output
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    selection = select_heads(model, "importance", _batches(), loss="ce")
    assert selection.pairs == [(3, 1)] and (selection.layer, selection.head) == (3, 1)
    last = selection.scores[-1]
    assert last[0] == 0 and last[2] == 0 and last[1] == pytest.approx(1.0)  # per-layer L2 normalisation
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_global_and_per_layer_scopes(model):
    silence_heads(model, {1: 2})  # one head in the whole network carries signal
    scores = gradient_head_importance(model, _batches(), lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    assert scores.shape == (4, 3)
    assert pick_heads(scores, "global") == [(1, 2)]
    per_layer = pick_heads(scores, "per_layer")
    assert len(per_layer) == 4 and per_layer[1] == (1, 2)


def test_label_free_and_probe_losses_find_the_decisive_head():
    torch.manual_seed(1)
    ssl_model = create_model("vit_smoke_tiny", num_classes=0)  # an SSL TA: no classifier
    silence_heads(ssl_model, {0: 0, 1: 0, 2: 0, 3: 2})
    unlabeled = [images for images, _ in _batches()]
    assert select_heads(ssl_model, "importance", unlabeled, loss="feature").pairs == [(3, 2)]
    probe = nn.Linear(96, 5)
    assert select_heads(ssl_model, "importance", _batches(), loss="probe", probe=probe).pairs == [(3, 2)]
    with pytest.raises(ReproError, match="classifier"):
        select_heads(ssl_model, "importance", _batches(), loss="ce")
    with pytest.raises(ReproError, match="probe"):
        select_heads(ssl_model, "importance", _batches(), loss="probe")


def test_batches_of_batch_objects_and_image_limit(model):
    silence_heads(model, {3: 0})
    batches = [Batch(images=x, targets=y, labels=y, indices=torch.arange(4), epoch=1) for x, y in _batches(3)]
    assert select_heads(model, "importance", batches, max_images=5).pairs == [(3, 0)]
    with pytest.raises(ReproError, match="no images"):
        select_heads(model, "importance", [], loss="ce")


def test_head_mask_scales_head_outputs(model):
    model.eval()
    images = _batches(1)[0][0]
    with torch.no_grad():
        reference = model(images)
        with head_mask(model) as mask:
            unchanged = model(images)
            mask[-1, 0] = 0.0
            masked = model(images)
        after = model(images)  # hooks removed on exit
        attn = model.vit.blocks[-1].attn
        attn.proj.weight[:, :attn.head_dim] = 0  # the same as removing head 0's context before proj
        silenced = model(images)
    torch.testing.assert_close(unchanged, reference)
    torch.testing.assert_close(after, reference)
    torch.testing.assert_close(masked, silenced)
    assert not torch.allclose(masked, reference)


def test_entropy_rule_finds_the_uniform_head(model):
    with torch.no_grad():  # zero queries of head 1 in the last layer: uniform attention, maximal entropy
        attn = model.vit.blocks[-1].attn
        attn.qkv.weight[32:64] = 0
        attn.qkv.bias[32:64] = 0
    selection = select_heads(model, "entropy", _batches(), prefer="high")
    assert selection.pairs == [(3, 1)]
    assert selection.scores[-1][1] == pytest.approx(torch.log(torch.tensor(65.0)).item(), rel=1e-4)
    assert select_heads(model, "entropy", _batches(), prefer="low").pairs[0][1] != 1


def test_fixed_all_random_rules(model):
    assert select_heads(model, "fixed", layer=-1, head=2).pairs == [(3, 2)]
    everything = select_heads(model, "all", layer=2)
    assert everything.pairs == [(2, 0), (2, 1), (2, 2)] and everything.heads_of_layer() == [0, 1, 2]
    with pytest.raises(ReproError, match="3 heads"):
        everything.head
    first = select_heads(model, "random", seed=3)
    assert first.pairs == select_heads(model, "random", seed=3).pairs and 0 <= first.head < 3
    with pytest.raises(ReproError, match="out of range"):
        select_heads(model, "fixed", layer=0, head=5)
    with pytest.raises(ReproError, match="unknown head-selection rule"):
        select_heads(model, "oracle")


def test_selection_cache(tmp_path, model):
    silence_heads(model, {3: 2})
    first = select_heads_cached(tmp_path, model, "importance", _batches(), loss="ce", max_images=8)
    files = list(tmp_path.glob("heads-importance-*.json"))
    assert first.pairs == [(3, 2)] and len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["fingerprint"] == model_fingerprint(model) and stored["config"]["loss"] == "ce"
    cached = select_heads_cached(tmp_path, model, "importance", None, loss="ce", max_images=8)  # no images needed
    assert cached.pairs == first.pairs and cached.scores == first.scores
    select_heads_cached(tmp_path, model, "importance", _batches(), loss="ce", max_images=4)
    assert len(list(tmp_path.glob("heads-importance-*.json"))) == 2  # other options, other entry
    with torch.no_grad():
        model.vit.head.bias += 1.0
    with pytest.raises(ReproError, match="needs images"):  # other weights: recomputed, not read
        select_heads_cached(tmp_path, model, "importance", None, loss="ce", max_images=8)


# -- Michel et al.: the mean over examples of |dL(x)/dmask|, not |d(batch-mean loss)/dmask| -------------------------
def _planted_cancelling_model():
    """Last block: heads 0 and 1 have the same context (v = 1 for every token, so the context is 1 whatever the
    attention); head 0 alone writes output channel 0, head 1 alone channel 1, head 2 nothing."""
    torch.manual_seed(0)
    model = create_model("vit_smoke_tiny", num_classes=5)
    attn = model.vit.blocks[-1].attn
    width, dim = attn.num_heads * attn.head_dim, attn.head_dim
    with torch.no_grad():
        attn.qkv.weight[2 * width:] = 0  # v = bias = 1
        attn.qkv.bias[2 * width:] = 1
        attn.proj.weight.zero_()
        attn.proj.bias.zero_()
        attn.proj.weight[0, 0:dim] = 1  # head 0 -> channel 0
        attn.proj.weight[1, dim:2 * dim] = 1  # head 1 -> channel 1
    return model


def _planted_loss():
    """Per example: sign * channel 0 + 0.5 * channel 1 of the last attention's output, sign = +1/-1 by label. Each
    example leans on head 0 twice as hard as on head 1, but in opposite directions for the two labels."""
    def loss(model, images, labels):
        captured = []
        handle = model.vit.blocks[-1].attn.proj.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            model(images)
        finally:
            handle.remove()
        out = captured[0].float().mean(dim=1)  # [B, C], mean over tokens
        sign = 2.0 * labels.float() - 1.0
        return (sign * out[:, 0] + 0.5 * out[:, 1]).mean()

    return loss


def _paired_batches():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    return [(images.repeat_interleave(2, dim=0), torch.tensor([0, 1] * 3))]  # each image once with each label


def test_per_example_importance_finds_the_head_that_batch_gradients_cancel():
    model = _planted_cancelling_model()
    per_example = gradient_head_importance(model, _paired_batches(), _planted_loss(), normalize=False)
    whole_batch = gradient_head_importance(model, _paired_batches(), _planted_loss(), normalize=False,
                                           importance_batch=None)
    dim = model.vit.blocks[-1].attn.head_dim
    assert per_example[-1].tolist() == pytest.approx([dim, dim / 2, 0.0])
    assert whole_batch[-1].tolist() == pytest.approx([0.0, dim / 2, 0.0], abs=1e-4)
    assert pick_heads(per_example) == [(3, 0)] and pick_heads(whole_batch) == [(3, 1)]
    # chunks of two images hold one image with both labels: they cancel as the whole batch does
    pairs = gradient_head_importance(model, _paired_batches(), _planted_loss(), normalize=False, importance_batch=2)
    assert pick_heads(pairs) == [(3, 1)]
    with pytest.raises(ReproError, match="importance_batch"):
        gradient_head_importance(model, _paired_batches(), _planted_loss(), importance_batch=0)


def test_importance_batch_is_in_the_cache_key_and_the_stored_config(tmp_path, model):
    from repro.methods.head_importance import selection_cache_path

    key = "f" * 64
    default = selection_cache_path(tmp_path, key, "importance", loss="ce")
    assert default == selection_cache_path(tmp_path, key, "importance", loss="ce", importance_batch=1)
    assert default != selection_cache_path(tmp_path, key, "importance", loss="ce", importance_batch=8)
    silence_heads(model, {3: 2})
    select_heads_cached(tmp_path, model, "importance", _batches(), loss="ce", importance_batch=2)
    (stored,) = [json.loads(p.read_text()) for p in tmp_path.glob("heads-importance-*.json")]
    assert stored["config"]["importance_batch"] == 2 and stored["selection"]["config"]["importance_batch"] == 2
