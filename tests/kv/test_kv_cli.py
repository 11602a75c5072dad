"""``prunekit kv eval`` end to end on a tiny model, its report, its recipe round trip and the CLI contract."""

import json

import pytest
import yaml

from prunekit.cli import main

QUICK = ["--prompt-tokens", "96", "--continuation-tokens", "8", "--windows", "1", "--depths", "0,1",
         "--decode-tokens", "3", "--repeats", "1", "--warmup", "0", "--method-arg", "snapkv.window_size=8"]


def _line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow  # tens of seconds: the wiki articles tokenized, every point prefilled and timed
def test_kv_eval_writes_the_report_the_plot_and_a_recipe_that_repeats_it(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["kv", "eval", str(tiny_model_dir), "--methods", "snapkv,knorm", "--ratios", "0.5,0.75",
                 "--allocation", "uniform", "--question", "agnostic", *QUICK, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "quality_vs_cache.png").stat().st_size > 0
    assert report["question"] == "agnostic" and report["allocation"] == "uniform"
    assert [(p["method"], p["ratio"]) for p in report["points"]] == [("snapkv", 0.5), ("snapkv", 0.75),
                                                                     ("knorm", 0.5), ("knorm", 0.75)]
    for point in report["points"]:
        # every key head of every block keeps floor(96 · (1 - ratio)) of the 96 prompt entries
        kept = int(96 * (1 - point["ratio"]))
        assert point["cache_bytes"] * 96 == point["full_cache_bytes"] * kept
        assert point["cache_entry_bytes"] == point["cache_bytes"]
        assert point["perplexity"] > 1 and 0 <= point["needle_exact_match"] <= 1
        assert point["decode_tokens_per_second"] > 0 and point["prefill_seconds"] > 0
    markdown = (out / "report.md").read_text()
    assert "## Protocol" in markdown and "question-agnostic" in markdown and "prefix of 96 tokens" in markdown
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["methods"][0] == {"name": "snapkv", "window_size": 8, "kernel_size": 5}
    again = tmp_path / "again"
    assert main(["kv", "eval", "--recipe", str(out / "recipe.yaml"), "--methods", "knorm", "--ratios", "0.5",
                 "--out", str(again)]) == 0
    repeated = json.loads((again / "report.json").read_text())
    assert repeated["points"][0]["perplexity"] == report["points"][2]["perplexity"]  # deterministic


@pytest.mark.slow
def test_kv_eval_with_a_decoding_budget_and_sparsity_counts_bytes_honestly(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["kv", "eval", str(tiny_model_dir), "--methods", "knorm", "--ratios", "0.5", "--decode-budget", "40",
                 "--decode-every", "2", "--zero-ratio", "0.5", *QUICK[:-2], "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    point = report["points"][0]
    # 48 of 96 kept after the prompt; two decoding passes, then compressed back to the budget of 40
    assert point["cache_bytes"] * 96 == point["full_cache_bytes"] * 48
    assert point["cache_bytes_after_decoding"] * 96 == point["full_cache_bytes"] * 40
    # half of every vector zeroed: a bitmap (1/32 of float32 bytes) and half the values, while all bytes stay held
    assert point["sparse_format_bytes"] == point["cache_bytes"] // 32 + point["cache_bytes"] // 2
    markdown = (out / "report.md").read_text()
    assert "Decoding budget: 40 entries per key head" in markdown and "bitmap plus nonzero values" in markdown


@pytest.mark.parametrize("args,message", [
    (["--ratios", "1"], "error: ratio 1 is outside [0, 1)"),
    (["--methods", "snapkv", "--prompt-tokens", "64"], "error: snapkv reads the prompt's last 64 tokens"),
    (["--methods", "h2o"], "error: unknown kv method 'h2o'"),
    (["--allocation", "greedy"], "error: settings: allocation: Input should be 'uniform', 'adaptive' or 'pyramid'"),
    (["--threads", "0"], "error: --threads must be a positive integer, got 0"),
    (["--depths", "1.5"], "error: settings: depths: needle depths are fractions of the haystack"),
])
def test_bad_options_are_one_line_errors(args, message, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["kv", "eval", str(tiny_model_dir), *args, "--out", str(out)]) == 2
    assert _line(capsys).startswith(message)
    assert not out.exists()


def test_a_model_whose_attention_cannot_be_read_is_refused_before_measuring(tmp_path, capsys, tokenizer):
    from tests.models.tiny_models import tiny_causal_lm

    path = tmp_path / "bloom"
    tiny_causal_lm("bloom").save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert main(["kv", "eval", str(path), "--methods", "knorm", "--attn-implementation", "eager", *QUICK[:-2], "--out", str(tmp_path / "out")]) == 2
    assert "computes its attention scores in its own code" in _line(capsys)


def test_ctrl_c_says_that_nothing_was_written(monkeypatch, tiny_model_dir, tmp_path, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("prunekit.models.loading.load_model", interrupt)
    out = tmp_path / "out"
    assert main(["kv", "eval", str(tiny_model_dir), "--out", str(out)]) == 130
    assert _line(capsys) == f"interrupted; nothing was written to {out}"
    assert not out.exists()
