"""``TrainConfig.test_flip``: evaluation on the mean logits of each test image and its
mirror image, for both engines; off, the plain logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from bnlab import train as T
from bnlab.cases import case_config

TINY = {"width": 0.125, "epochs": 1, "batch_size": 8, "device": "cpu", "precision": "fp32"}


@pytest.mark.parametrize("case", ["b", "b-manual"])
@pytest.mark.parametrize("flip", [True, False])
def test_evaluate_averages_the_logits_of_the_image_and_its_mirror(case, flip):
    model = T.Model(case_config(case, "quick", test_flip=flip, **TINY), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (6,), generator=g)

    def logits(images):
        if case == "b":
            model.module.eval()
            with torch.no_grad():
                return model.module(images)
        out = model.network.forward(images, training=False)
        model.network.clear()
        return out

    plain, mirrored = logits(x), logits(x.flip(3))
    assert not torch.allclose(plain, mirrored)  # the mirror is another input
    expected = 0.5 * (plain + mirrored) if flip else plain
    loss, correct = model.evaluate(x, y)
    ref_loss = TF.cross_entropy(expected, y, reduction="sum")
    print(f"{case} flip={flip}: loss {loss.item():.6f} vs {ref_loss.item():.6f}")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert correct.item() == (expected.argmax(1) == y).sum().item()


def test_the_quick_preset_flips_at_test_time():
    assert case_config("b", "quick").test_flip is True
    assert T.TrainConfig().test_flip is False
