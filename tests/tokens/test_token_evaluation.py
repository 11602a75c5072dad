"""Sweeps, reports and the ``prunekit tokens`` command, end to end on small models."""

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.models import fashion_mnist
from prunekit.tokens.evaluation import (ImageClassification, ImageProtocol, SweepSettings, quality_at_speedup,
                                        run_sweep, sweep_markdown)
from prunekit.tokens.job import position_limit
from prunekit.tokens.recipe import TokensEvalRecipe
from prunekit.tokens.vision import load_vit, save_vit

from tests.tokens.conftest import hf_vit, prunekit_vit, tiny_bert, tiny_decoder

needs_fashion = pytest.mark.skipif(not fashion_mnist.available(), reason="dataset-fashion-mnist is not installed")
QUICK = ["--batch-sizes", "1,2", "--warmup", "0", "--repeats", "1"]


@pytest.fixture()
def image_task():
    generator = torch.Generator().manual_seed(0)
    return ImageClassification(torch.randn(40, 1, 28, 28, generator=generator),
                               torch.randint(0, 10, (40,), generator=generator), ImageProtocol(limit=40))


def test_a_sweep_measures_every_method_and_rate_against_the_unpatched_model(image_task):
    model = prunekit_vit()
    settings = SweepSettings(methods=["tome", "fastv"], ratios=[0.0, 0.4], batch_sizes=[1, 8], warmup=0, repeats=1)
    result = run_sweep(model, image_task, settings)
    base = result["baseline"]
    assert base["quality"]["images"] == 40 and set(base["throughput"]) == {"1", "8"}
    assert [(p["method"], p["ratio"]) for p in result["points"]] == [("tome", 0.0), ("tome", 0.4), ("fastv", 0.0),
                                                                   ("fastv", 0.4)]
    for point in result["points"]:
        if point["ratio"] == 0.0:
            assert point["quality"] == base["quality"] and point["flops_ratio"] == 1.0
            assert point["tokens"]["tokens_out"] == 50
        else:
            assert point["flops_ratio"] < 0.9 and point["tokens"]["tokens_out"] < 50
            # the speed-up comes from the point's own alternating timing of patched and unpatched passes
            speed = point["throughput"]["8"]
            assert point["speedup"]["8"] == speed["speedup"] == pytest.approx(
                speed["items_per_second"] / speed["unpatched_items_per_second"])
    markdown = sweep_markdown(result, "test")
    assert "Fashion-MNIST test split, the first 40 images" in markdown and "| tome | 0.4 | 0,1,2,3 |" in markdown


def test_quality_at_a_speedup_interpolates_between_measured_ratios():
    points = [{"method": "m", "speedup": {"32": 1.0}, "quality": {"accuracy": 0.9}},
              {"method": "m", "speedup": {"32": 2.0}, "quality": {"accuracy": 0.7}},
              {"method": "other", "speedup": {"32": 1.2}, "quality": {"accuracy": 0.5}}]
    assert quality_at_speedup(points, "m", "accuracy", 1.5, "32") == pytest.approx(0.8)
    assert quality_at_speedup(points, "m", "accuracy", 2.5, "32") is None


def test_vit_directories_round_trip(tmp_path):
    model = prunekit_vit()
    save_vit(model, tmp_path / "vit")
    loaded = load_vit(tmp_path / "vit")
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(images), model(images))


@needs_fashion
def test_the_cli_evaluates_a_hugging_face_vit_and_writes_its_report(tmp_path):
    model_dir, out = tmp_path / "vit", tmp_path / "out"
    hf_vit().save_pretrained(model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    code = main(["tokens", "eval", str(model_dir), "--methods", "tome,random", "--ratios", "0,0.3",
                 "--method-arg", "tome.proportional=false", "--samples", "32", *QUICK, "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["quality_vs_throughput.png", "recipe.yaml", "report.json",
                                                     "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"name": str(model_dir), "family": "encoder"}
    assert report["points"][0]["patch"]["method"] == {"name": "tome", "ratio": 0.0, "r": None, "proportional": False}
    assert [(p["method"], p["ratio"]) for p in report["points"]] == [("tome", 0.0), ("tome", 0.3), ("random", 0.0),
                                                                    ("random", 0.3)]
    assert report["points"][0]["quality"] == report["baseline"]["quality"]
    assert report["points"][1]["flops_ratio"] < 0.8 and report["points"][3]["flops_ratio"] < 0.9
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert main(["tokens", "eval", str(model_dir), "--ratios", "0.1", "--samples", "8", *QUICK, "--out", str(out)]) == 2
    # the written recipe runs the same sweep again; options given beside it override its keys
    recipe = TokensEvalRecipe.from_yaml(out / "recipe.yaml")
    assert recipe.methods == [{"name": "tome", "r": None, "proportional": False}, {"name": "random"}]
    assert (recipe.ratios, recipe.samples, recipe.batch_sizes) == ([0.0, 0.3], 32, [1, 2])
    again = tmp_path / "again"
    assert main(["tokens", "eval", "--recipe", str(out / "recipe.yaml"), "--method-arg", "tome.r=3",
                 "--ratios", "0.2", "--out", str(again)]) == 0
    rerun = TokensEvalRecipe.from_yaml(again / "recipe.yaml")
    assert rerun.methods[0] == {"name": "tome", "r": 3, "proportional": False} and rerun.ratios == [0.2]
    patched = json.loads((again / "report.json").read_text())["points"][0]["patch"]["method"]
    assert patched == {"name": "tome", "ratio": 0.2, "r": 3, "proportional": False}


def test_recipes_round_trip_and_are_checked_before_any_model_is_loaded(tmp_path, capsys):
    recipe = TokensEvalRecipe.build({"model": "fashion-vit", "methods": ["evit", {"name": "tome", "r": 4}],
                                     "ratios": [0.1, 0.4], "layers": [1, 2]})
    assert recipe.methods == [{"name": "evit", "fuse": True}, {"name": "tome", "r": 4, "proportional": True}]
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert TokensEvalRecipe.from_yaml(path) == recipe
    assert recipe.options() == {"evit": {"fuse": True}, "tome": {"r": 4, "proportional": True}}
    # the name before ``ratios`` is read for a release, with a warning
    path.write_text("model: fashion-vit\nrates: [0.2]\n")
    assert TokensEvalRecipe.from_yaml(path).ratios == [0.2]
    assert "'rates' is deprecated and goes in the next release; use 'ratios'" in capsys.readouterr().err
    for data, message in [({"methods": ["tome"], "ratios": [0.6]}, "at most 50%"),
                          ({"methods": [{"name": "tome", "ratio": 0.2}]}, "leave ratio out"),
                          ({"methods": ["tome", "tome"]}, "methods name tome more than once"),
                          ({"methods": [{"name": "evit", "fuse": "maybe"}]}, "token method evit: fuse"),
                          ({"batch_sizes": [0]}, "batch sizes must be positive")]:
        with pytest.raises(PrunekitError, match=message):
            TokensEvalRecipe.build({"model": "fashion-vit", **data})


@pytest.mark.parametrize("arguments,message", [
    (["--ratios", "0.2,1.0"], "would remove every token"),
    (["--methods", "tome", "--ratios", "0.7"], "at most 50%"),
    (["--methods", "tomme"], "unknown token method 'tomme'"),
    (["--methods", "tome,evit", "--method-arg", "r=3"], "name the method"),
    (["--methods", "tome", "--method-arg", "evit.fuse=false"], "names 'evit', which is not among: tome"),
    (["--method-arg", "tome.ratio=0.2"], "leave ratio out"),
    (["--ratios", "a,b"], "comma-separated numbers"),
    (["--ratios", "0.1", "--rates", "0.2"], "give --ratios or its old name --rates, not both"),
    (["--layers", "9"], "layer 9 does not exist"),
    # the default method (ToMe, at most 0.5) is not checked against ratios given for the methods chosen instead
    (["--methods", "random", "--ratios", "0.7", "--layers", "9"], "layer 9 does not exist"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, arguments, message):
    model_dir, out = tmp_path / "vit", tmp_path / "out"
    save_vit(prunekit_vit(), model_dir)
    assert main(["tokens", "eval", str(model_dir), *arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists()


def test_the_old_option_rates_still_works_with_a_warning(tmp_path, capsys):
    model_dir, out = tmp_path / "vit", tmp_path / "out"
    save_vit(prunekit_vit(), model_dir)
    # a ratio too high for ToMe: refused like --ratios would be, after the warning about the old name
    assert main(["tokens", "eval", str(model_dir), "--rates", "0.7", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "--rates is deprecated and goes in the next release; use --ratios" in error
    assert "tome removes at most 50% of the tokens per layer; give a ratio <= 0.5, got 0.7" in error


def test_a_sequence_beyond_the_models_positions_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["tokens", "eval", str(tiny_model_dir), "--prompt-tokens", "1000", "--continuation-tokens", "100",
                 "--samples", "1", *QUICK, "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    lines = [line for line in error.splitlines() if line.strip()]
    assert lines[-1] == (f"error: --prompt-tokens 1000 + --continuation-tokens 100 = 1100 tokens exceed the 1024 "
                         f"positions of {tiny_model_dir}; give at most 1024 in all")
    assert not out.exists()


def test_the_position_limit_is_read_from_the_model():
    assert position_limit(tiny_decoder()) == 256
    assert position_limit(tiny_bert()) == 128
    assert position_limit(tiny_bert(kind="roberta")) == 128 - 2  # RoBERTa numbers positions from padding + 1
    assert position_limit(prunekit_vit()) is None


def test_cli_names_what_it_cannot_load(tmp_path, capsys):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # a config, no weights
    assert main(["tokens", "eval", str(tmp_path / "gpt"), "--out", str(tmp_path / "out")]) == 2
    assert f"could not load model from {tmp_path / 'gpt'}" in capsys.readouterr().err
    assert main(["tokens", "eval", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["tokens", "methods"]) == 0


def test_an_encoder_with_fewer_positions_than_the_passages_is_refused_in_one_line(tmp_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from prunekit.models.assets import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model_dir, out = tmp_path / "bert", tmp_path / "out"
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert main(["tokens", "eval", str(model_dir), "--samples", "2", *QUICK, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert [line for line in error.splitlines() if line.strip()][-1] == (
        f"error: the passages of the embedding protocol reach 256 tokens, beyond the 128 positions of {model_dir}")
    assert not out.exists()
