"""What sparse-training methods declare: their needs, and the settings they derive from a run."""

import pytest

from prunekit.errors import PrunekitError
from prunekit.training import SPARSIFIERS, SparseTrainingMethod, TrainingRun
from prunekit.training.method import TRAINING_NEEDS
from prunekit.training.vision_job import PROVIDES

# 4 epochs of 100 steps on 28×28 images
RUN = TrainingRun(total_steps=400, steps_per_epoch=100, epochs=4, input_shape=(1, 28, 28))


def test_every_method_declares_needs_from_the_vocabulary():
    declared = {name: SPARSIFIERS.get(name).needs for name in SPARSIFIERS.names()}
    assert all(needs <= set(TRAINING_NEEDS) for needs in declared.values())
    assert declared["rigl"] == declared["granet"] == {"schedule", "gradients"}
    assert declared["snip"] == declared["grasp"] == {"data", "loss"}
    assert declared["lottery"] == {"schedule", "rounds"}
    assert declared["magnitude"] == {"trained_model"}
    assert declared["synflow"] == {"input_shape"}
    assert declared["fixed"] == {"mask"}
    # every method but fixed (which keeps a mask a fresh model does not have) runs in the vision job
    assert [name for name, needs in declared.items() if not needs <= PROVIDES] == ["fixed"]
    assert SPARSIFIERS.get("random").refusal(frozenset(), "any pipeline") is None
    assert SPARSIFIERS.get("fixed").refusal(PROVIDES, "this job") == (
        "fixed needs a model that already carries its mask (its zeros, or masks given to it), "
        "which this job cannot provide")


def test_a_need_outside_the_vocabulary_is_refused_when_the_method_is_written():
    with pytest.raises(TypeError, match="needs 'gradient', which is not one of"):
        class Misspelt(SparseTrainingMethod):
            needs = frozenset({"gradient"})


@pytest.mark.parametrize("name, expected", [
    # from 10 % to 75 % of the run, about 20 pruning steps
    ("gmp", {"start_step": 40, "end_step": 300, "frequency": 13}),
    ("channel_gmp", {"start_step": 40, "end_step": 300, "frequency": 13}),
    ("granet", {"start_step": 40, "end_step": 300, "frequency": 13}),
    # every min(100, steps / 40) steps until 75 %
    ("rigl", {"end_step": 300, "update_interval": 10}),
    ("set", {"end_step": 300, "update_interval": 10}),
    # a round is the whole run; 4 epochs a round rewind to the first epoch
    ("lottery", {"steps_per_round": 400, "rewind_step": 100}),
    ("synflow", {"input_shape": (1, 28, 28)}),
    ("snip", {}),
    ("magnitude", {}),
])
def test_settings_derived_from_the_run(name, expected):
    assert SPARSIFIERS.get(name).settings_for(RUN, {}) == expected
    SPARSIFIERS.build(name, **expected)  # what a method derives is valid for it


def test_given_settings_win_over_derived_ones():
    gmp = SPARSIFIERS.get("gmp")
    assert gmp.settings_for(RUN, {"frequency": 7}) == {"start_step": 40, "end_step": 300, "frequency": 7}
    short = TrainingRun(total_steps=3, steps_per_epoch=3, epochs=1, input_shape=(4,))
    assert gmp.settings_for(short, {}) == {"start_step": 0, "end_step": 2, "frequency": 1}  # at least one step apart
    assert SPARSIFIERS.get("rigl").settings_for(short, {})["update_interval"] == 1


def test_lottery_rewind_point_in_epochs():
    lottery = SPARSIFIERS.get("lottery")
    three_epochs = TrainingRun(total_steps=300, steps_per_epoch=100, epochs=3, input_shape=(4,))
    assert lottery.settings_for(three_epochs, {})["rewind_step"] == 0  # a short round rewinds to initialisation
    assert lottery.settings_for(RUN, {"rewind_epoch": 2}) == {"steps_per_round": 400, "rewind_step": 200}
    with pytest.raises(PrunekitError, match="rewind_epoch"):
        lottery.settings_for(RUN, {"rewind_epoch": "two"})


def test_describe_holds_every_setting_and_what_the_run_made_of_them():
    from tests.training._helpers import tiny_cnn

    ticket = SPARSIFIERS.build({"lottery": {"steps_per_round": 10, "rounds": 2}}).create(tiny_cnn(), 0.75)
    described = ticket.describe()
    assert {key: described[key] for key in ("name", "sparsity", "steps_per_round", "rewind_step", "per_round",
                                            "rounds", "schedule")} == {
        "name": "lottery", "sparsity": 0.75, "steps_per_round": 10, "rewind_step": 0, "per_round": None,
        "rounds": 2, "schedule": None}
    assert described["round_sparsities"] == pytest.approx([0.5, 0.75])
    assert described["distribution"]["name"] == "global"  # the method's default
