"""Mid-training checkpoints with masks attached: a resumed run is bit-identical to an uninterrupted one."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.io.checkpoint import save_compressed, save_dense
from prunekit.models.loading import load
from prunekit.training import RigL, load_training_checkpoint, save_training_checkpoint
from prunekit.training.loop import make_optimizer, train_classifier
from tests.training._helpers import tiny_cnn


class Stop(Exception):
    pass


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(192, 1, 16, 16, generator=generator), torch.randint(0, 10, (192,), generator=generator)


def _setup(seed):
    model = tiny_cnn(seed)
    opt = make_optimizer(model, lr=0.05)
    sparsifier = RigL(model, 0.8, end_step=20, update_interval=2, optimizer=opt, seed=5)
    return model, opt, sparsifier


def test_resumed_run_is_bit_identical(tmp_path):
    x, y = _data()
    model, opt, sparsifier = _setup(0)
    train_classifier(model, x, y, epochs=4, batch_size=32, optimizer=opt, on_step=lambda info: sparsifier.step())
    assert sparsifier.steps == 24

    model2, opt2, sparsifier2 = _setup(0)

    def stop_after_two(epoch):
        if epoch == 1:
            save_training_checkpoint(tmp_path / "mid.pt", model2, sparsifier2, opt2, extra={"epoch": 2})
            raise Stop

    with pytest.raises(Stop):
        train_classifier(model2, x, y, epochs=4, batch_size=32, optimizer=opt2,
                         on_step=lambda info: sparsifier2.step(), on_epoch=stop_after_two)
    with pytest.raises(PrunekitError, match="already exists"):
        save_training_checkpoint(tmp_path / "mid.pt", model2, sparsifier2, opt2)

    model3, opt3, sparsifier3 = _setup(7)  # another initialisation and random mask: all must come from the file
    extra = load_training_checkpoint(tmp_path / "mid.pt", model3, sparsifier3, opt3)
    assert extra == {"epoch": 2} and sparsifier3.steps == 12
    train_classifier(model3, x, y, epochs=4, batch_size=32, optimizer=opt3, on_step=lambda info: sparsifier3.step(),
                     start_epoch=2)
    for (key, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), key
    assert [r["step"] for r in sparsifier3.history] == [r["step"] for r in sparsifier.history]


def test_checkpoint_masks_attach_to_a_bare_model_and_bad_files_are_refused(tmp_path):
    model, opt, sparsifier = _setup(0)
    save_training_checkpoint(tmp_path / "c.pt", model, sparsifier)
    bare = tiny_cnn(3)
    load_training_checkpoint(tmp_path / "c.pt", bare)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(bare(x), model(x))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PrunekitError, match="not a readable training checkpoint"):
        load_training_checkpoint(tmp_path / "junk.pt", tiny_cnn())
    with pytest.raises(PrunekitError, match="no such training checkpoint"):
        load_training_checkpoint(tmp_path / "missing.pt", tiny_cnn())
    with pytest.raises(PrunekitError, match="holds no optimizer state"):
        load_training_checkpoint(tmp_path / "c.pt", tiny_cnn(), optimizer=make_optimizer(tiny_cnn()))
    torch.save({"format": "prunekit-training-checkpoint", "model": {}, "sparsifier": {"masks": {"fc9": torch.ones(1)}}},
               tmp_path / "other.pt")
    with pytest.raises(PrunekitError, match="fc9"):
        load_training_checkpoint(tmp_path / "other.pt", tiny_cnn())


def test_finished_model_saves_with_masks_squashed_and_reloads_exactly(tmp_path):
    model, _, sparsifier = _setup(0)
    # a model still carrying its masks saves plain weights (masks baked in) in both formats
    save_dense(model, tmp_path / "dense")
    save_compressed(model, tmp_path / "compressed")
    expected = {l.name: l.weight.detach().clone() for l in sparsifier.layers}
    for folder in ("dense", "compressed"):
        restored = load(tmp_path / folder, model=tiny_cnn(9))
        for name, weight in expected.items():
            assert torch.equal(restored.get_submodule(name).weight, weight)
