"""Sweeps, reports and the ``prunekit tokens`` command, end to end on small models."""

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.models import fashion_mnist
from prunekit.tokens.evaluation import (ImageClassification, ImageProtocol, SweepSettings, quality_at_speedup,
                                        run_sweep, sweep_markdown)
from prunekit.tokens.vision import load_vit, save_vit

from tests.tokens.conftest import hf_vit, prunekit_vit

needs_fashion = pytest.mark.skipif(not fashion_mnist.available(), reason="dataset-fashion-mnist is not installed")
QUICK = ["--batch-sizes", "1,2", "--warmup", "0", "--repeats", "1"]


@pytest.fixture()
def image_task():
    generator = torch.Generator().manual_seed(0)
    return ImageClassification(torch.randn(40, 1, 28, 28, generator=generator),
                               torch.randint(0, 10, (40,), generator=generator), ImageProtocol(limit=40))


def test_a_sweep_measures_every_method_and_rate_against_the_unpatched_model(image_task):
    model = prunekit_vit()
    settings = SweepSettings(methods=["tome", "fastv"], rates=[0.0, 0.4], batch_sizes=[1, 8], warmup=0, repeats=1)
    result = run_sweep(model, image_task, settings)
    base = result["baseline"]
    assert base["quality"]["images"] == 40 and set(base["throughput"]) == {"1", "8"}
    assert [(p["method"], p["rate"]) for p in result["points"]] == [("tome", 0.0), ("tome", 0.4), ("fastv", 0.0),
                                                                   ("fastv", 0.4)]
    for point in result["points"]:
        if point["rate"] == 0.0:
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


def test_quality_at_a_speedup_interpolates_between_measured_rates():
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
    code = main(["tokens", "eval", str(model_dir), "--methods", "tome,random", "--rates", "0,0.3",
                 "--method-arg", "tome.proportional=false", "--samples", "32", *QUICK, "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["quality_vs_throughput.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"name": str(model_dir), "family": "encoder"}
    assert report["points"][0]["patch"]["method"] == {"name": "tome", "rate": 0.0, "r": None, "proportional": False}
    assert report["points"][0]["quality"] == report["baseline"]["quality"]
    assert report["points"][1]["flops_ratio"] < 0.8 and report["points"][3]["flops_ratio"] < 0.9
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert main(["tokens", "eval", str(model_dir), "--rates", "0.1", "--samples", "8", *QUICK, "--out", str(out)]) == 2


@pytest.mark.parametrize("arguments,message", [
    (["--rates", "0.2,1.0"], "would remove every token"),
    (["--methods", "tome", "--rates", "0.7"], "at most 50%"),
    (["--methods", "tomme"], "unknown token method 'tomme'"),
    (["--methods", "tome,evit", "--method-arg", "r=3"], "name the method"),
    (["--methods", "tome", "--method-arg", "evit.fuse=false"], "not among --methods"),
    (["--rates", "a,b"], "comma-separated numbers"),
    (["--layers", "9"], "layer 9 does not exist"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, arguments, message):
    model_dir, out = tmp_path / "vit", tmp_path / "out"
    save_vit(prunekit_vit(), model_dir)
    assert main(["tokens", "eval", str(model_dir), *arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists()


def test_cli_names_what_it_cannot_load(tmp_path, capsys):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # a config, no weights
    assert main(["tokens", "eval", str(tmp_path / "gpt"), "--out", str(tmp_path / "out")]) == 2
    assert f"could not load model from {tmp_path / 'gpt'}" in capsys.readouterr().err
    assert main(["tokens", "eval", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["tokens", "methods"]) == 0
