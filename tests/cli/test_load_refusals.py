"""Issue 16, items 2 and 3, through every command that loads a model: weights that do not match their
config, and an encoder given where a causal LM is needed, are refused in one line with exit code 2
before any work (both used to exit 0 with random weights)."""

import json

import pytest

from prunekit.cli import main

TINY = ["--calib-samples", "2", "--test-windows", "2", "--seq-len", "64"]


@pytest.fixture()
def short_weights_dir(tmp_path, tokenizer):
    """A config that says 4 layers beside safetensors that hold 2."""
    from tests.conftest import tiny_llama

    path = tmp_path / "short"
    tiny_llama(layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    return path


@pytest.fixture()
def bert_dir(tmp_path, tokenizer):
    """A BERT encoder sharing SmolLM2's vocabulary, so that the text protocol tokenizes for it."""
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def texts(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"A short document number {i} about nothing much."}) + "\n"
                            for i in range(4)))
    return path


def _commands(model: str, texts: str, out: str) -> dict[str, list[str]]:
    return {
        "prune": ["prune", model, "--method", "magnitude", *TINY, "--out", out],
        "sweep": ["sweep", model, "--method", "magnitude", "--ratios", "0.5", *TINY, "--out", out],
        "eval": ["eval", model, "--test-windows", "2", "--seq-len", "64"],
        "shrink": ["shrink", model, "--ratio", "0.2", *TINY, "--out", out],
        "shrink-graph": ["shrink-graph", model],
        "train recover": ["train", "recover", model, "--prune", "magnitude", "--steps", "1", "--train-windows", "2",
                          "--train-seq-len", "32", "--test-windows", "2", "--out", out],
        "data score perplexity": ["data", "score", texts, "--score", "perplexity", "--score-arg",
                                  f"perplexity.model={model}", "--out", out],
    }


def _one_line_exit_2(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return " ".join(lines[0].split())


@pytest.mark.parametrize("command", ["prune", "sweep", "eval", "shrink", "shrink-graph", "train recover",
                                     "data score perplexity"])
def test_weights_missing_from_the_checkpoint_are_refused(command, short_weights_dir, texts, tmp_path, capsys):
    out = tmp_path / "out"
    line = _one_line_exit_2(_commands(str(short_weights_dir), str(texts), str(out))[command], capsys)
    assert "does not match its config: it lacks tensors the model needs (model.layers.2." in line, line
    assert not out.exists()


@pytest.mark.parametrize("command", ["prune", "sweep", "eval", "train recover", "data score perplexity"])
def test_an_encoder_is_refused_where_a_causal_lm_is_needed(command, bert_dir, texts, tmp_path, capsys):
    out = tmp_path / "out"
    line = _one_line_exit_2(_commands(str(bert_dir), str(texts), str(out))[command], capsys)
    assert "is an encoder (BertModel): its checkpoint has no causal-LM head" in line, line
    assert "`prunekit shrink` and `prunekit tokens eval` take encoders" in line, line
    assert not out.exists()


def test_the_streamed_prune_refuses_an_encoder_too(bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    line = _one_line_exit_2(["prune", str(bert_dir), "--stream", "--method", "magnitude", "--no-eval",
                             "--out", str(out)], capsys)
    assert "`prunekit shrink` and `prunekit tokens eval` take encoders" in line, line
