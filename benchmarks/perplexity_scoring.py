"""Perplexity data scoring before and after length-sorted batches without projecting padding, timed in
alternation in one process on the 402 Wikipedia paragraphs of `benchmarks/data_text.py`.

    flock /tmp/prunekit-cpu.lock python benchmarks/perplexity_scoring.py --before <git revision> [--threads 2]

"before" is `text_perplexities` as it stands at the given git revision (batches of 8 in file order,
padded to the longest, every position projected through the vocabulary), loaded from `git show`;
"after" is the working tree's (groups of 8 × 16 texts sorted by length, batches of 8, only positions that
predict a real token projected). The paragraphs are cut into the groups the `perplexity` score streams
(128 texts); each group is scored by both, in ABBA order over the groups, so a drift of the shared machine
falls on both alike. Scores: largest relative difference between the two, and against one text at a time
for the first 24 paragraphs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
MODULE = "src/prunekit/data/scores/perplexity.py"


def previous_module(revision: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{revision}:{MODULE}"], cwd=HERE.parent, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("perplexity_before")
    # The module registers its score under the same name; only its function is wanted here.
    exec(compile(source.replace('@SCORES.register("perplexity")', ""), f"{revision}:{MODULE}", "exec"),
         module.__dict__)
    return module


def float64_perplexity(model, tokenizer, text: str, max_tokens: int) -> float:
    """The reference: one text, its logits' loss taken in float64."""
    import torch
    import torch.nn.functional as F

    from prunekit.data.scores.perplexity import start_token

    ids = [start_token(tokenizer)] + tokenizer(text, add_special_tokens=False, truncation=True,
                                                max_length=max_tokens - 1)["input_ids"]
    batch = torch.tensor([ids])
    logits = model(input_ids=batch, use_cache=False).logits[0, :-1]
    return float(torch.exp(F.cross_entropy(logits.double(), batch[0, 1:])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="git revision holding the previous scoring")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paragraphs", type=int, default=None, help="only the first N (a quick check)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from data_text import paragraphs_file

    from prunekit.data import open_data
    from prunekit.data.scores.perplexity import Perplexity, _output_head, _reference_model, text_perplexities
    from prunekit.evaluate.measure import machine_load, time_alternating
    from prunekit.evaluate.report import environment, markdown_table

    revision = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=HERE.parent, check=True,
                              capture_output=True, text=True).stdout.strip()
    before = previous_module(args.before)
    settings = Perplexity()
    loaded = _reference_model(settings.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    head = _output_head(model)
    texts = [row["text"] for row in open_data(paragraphs_file(), text_unit="paragraph").rows()][:args.paragraphs]
    start = 1  # the document-start token each text gets
    tokens = sum(min(len(ids), settings.max_tokens - start) + start
                 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    group = settings.batch_size * settings.sorted_batches
    groups = [texts[i:i + group] for i in range(0, len(texts), group)]
    scores: dict[str, list[np.ndarray]] = {"before": [], "after": []}
    pending = {"before": iter(groups), "after": iter(groups)}

    def score_before():
        chunk = next(pending["before"])
        scores["before"].append(np.concatenate([
            before.text_perplexities(model, tokenizer, chunk[i:i + settings.batch_size], settings.max_tokens)
            for i in range(0, len(chunk), settings.batch_size)]))

    def score_after():
        chunk = next(pending["after"])
        scores["after"].append(text_perplexities(model, tokenizer, chunk, settings.max_tokens, settings.batch_size,
                                                 head))

    load_before = machine_load()
    times = time_alternating({"before": score_before, "after": score_after}, repeats=len(groups))
    load_after = machine_load()
    values = {name: np.concatenate(parts) for name, parts in scores.items()}
    seconds = {name: float(sum(parts)) for name, parts in times.items()}
    relative = float(np.max(np.abs(values["after"] - values["before"]) / values["before"]))
    with torch.inference_mode():
        single = np.concatenate([text_perplexities(model, tokenizer, [t], settings.max_tokens) for t in texts[:24]])
        exact = np.array([float64_perplexity(model, tokenizer, t, settings.max_tokens) for t in texts[:24]])
    single_relative = float(np.max(np.abs(values["after"][:24] - single) / single))
    error = {name: float(np.max(np.abs(values[name][:24] - exact) / exact)) for name in values}
    assert relative < 1e-3 and single_relative < 1e-5, (relative, single_relative)
    assert error["after"] <= error["before"], error
    per_group = [[i, len(g), f"{times['before'][i]:.1f}", f"{times['after'][i]:.1f}",
                  f"{times['before'][i] / times['after'][i]:.2f}"] for i, g in enumerate(groups)]
    result = {"paragraphs": len(texts), "tokens": tokens, "threads": args.threads, "before_revision": revision,
              "group": group, "batch_size": settings.batch_size, "seconds": seconds, "group_seconds": times,
              "tokens_per_second": {name: tokens / s for name, s in seconds.items()},
              "speedup": seconds["before"] / seconds["after"],
              "max_relative_difference_before_after": relative,
              "max_relative_difference_to_one_text_at_a_time": single_relative,
              "max_relative_error_against_float64_first_24": error,
              "load_average": [load_before, load_after], "environment": environment()}
    if args.paragraphs is not None:
        print(json.dumps(result, indent=1))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "perplexity_scoring.json").write_text(json.dumps(result, indent=2) + "\n")
    rate = result["tokens_per_second"]
    (RESULTS / "perplexity_scoring.md").write_text(
        f"# Perplexity scoring of {len(texts)} Wikipedia paragraphs ({tokens} tokens), SmolLM2-135M fp32, "
        f"{args.threads} threads\n\n"
        + markdown_table(["", "seconds", "tokens/s"],
                         [["before (" + revision + ": file order, padded batches of 8, every position projected)",
                           f"{seconds['before']:.1f}", f"{rate['before']:.0f}"],
                          ["after (length-sorted groups of " + str(group) + ", batches of 8, real positions "
                           "projected)", f"{seconds['after']:.1f}", f"{rate['after']:.0f}"]])
        + "\n\nPer group, in ABBA order:\n\n"
        + markdown_table(["group", "texts", "before s", "after s", "ratio"], per_group)
        + f"\n\nSpeed-up {result['speedup']:.2f}×. Largest relative score difference before/after "
          f"{relative:.1e}; after against one text at a time (first 24) {single_relative:.1e}. Against the "
          f"float64 loss of the same logits (first 24): before {error['before']:.1e}, after {error['after']:.1e} "
          "(the previous code took the float32 log-softmax across a transposed [batch, vocabulary, position] "
          "view, which rounds more). "
          f"Load average {load_before} → {load_after}; CPU lock held.\n")
    print(json.dumps({k: result[k] for k in ("seconds", "tokens_per_second", "speedup",
                                               "max_relative_difference_before_after")}, indent=1))


if __name__ == "__main__":
    main()
