import pytest
import torch

from prunekit.models import fashion_mnist
from prunekit.models.vision import MLP, SmallCNN
from prunekit.models.vit import ViT

needs_fashion = pytest.mark.skipif(not fashion_mnist.available(), reason="dataset-fashion-mnist is not installed")


@needs_fashion
def test_fashion_mnist_shapes_and_normalisation():
    train = fashion_mnist.load_fashion_mnist("train")
    test = fashion_mnist.load_fashion_mnist("test", limit=100)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 100
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert abs(float(train.images.mean())) < 0.01 and abs(float(train.images.std()) - 1) < 0.01


def test_fashion_mnist_missing_is_a_clear_error(monkeypatch, tmp_path):
    from prunekit.errors import PrunekitError

    monkeypatch.setenv("PRUNEKIT_FASHION_MNIST", str(tmp_path))
    with pytest.raises(PrunekitError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist("train")


@pytest.mark.parametrize("model", [SmallCNN(), MLP(), ViT(dim=48, depth=2, num_heads=3)])
def test_vision_models_classify_fashion_mnist_shaped_input(model):
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_vit_attention_matches_explicit_softmax():
    vit = ViT(dim=48, depth=1, num_heads=3).eval()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 50, 48)
    q, k, v = attn.split_heads(x)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    torch.testing.assert_close(attn(x), attn.merge_heads(weights @ v), rtol=1e-4, atol=1e-5)
