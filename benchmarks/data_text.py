"""Perplexity filtering of Wikipedia paragraphs with SmolLM2-135M: throughput and what gets kept.

The paragraphs (at least 200 characters, split on blank lines) of the first articles of the
pinned gensim Wikipedia excerpt are written to a plain-text file, one paragraph per blank-line
separated block, and scored by ``prunekit data score FILE -s perplexity --text-unit paragraph``
(streamed, batches of 8, at most 512 tokens per paragraph). Throughput is measured three ways,
each as its own command holding the CPU lock:

    flock /tmp/prunekit-cpu.lock python benchmarks/data_text.py run --threads 2          # 1 process x 2 threads
    flock /tmp/prunekit-cpu.lock python benchmarks/data_text.py run --threads 1          # 1 process x 1 thread
    flock /tmp/prunekit-cpu.lock python benchmarks/data_text.py run --threads 1 --procs 2  # torchrun, 2 x 1 thread
    python benchmarks/data_text.py report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results"
RAW = ROOT / "raw" / "data_text"
PARAGRAPHS = 400
MIN_CHARS = 200


def paragraphs_file() -> Path:
    from prunekit.core.text import wiki_articles

    path = RAW / "wiki_paragraphs.txt"
    if not path.exists():
        chosen = [p.strip() for article in wiki_articles() for p in article.split("\n\n") if len(p.strip()) >= MIN_CHARS]
        RAW.mkdir(parents=True, exist_ok=True)
        # a paragraph's own single newlines are kept; blank lines separate the examples
        path.write_text("\n\n".join(chosen[:PARAGRAPHS]) + "\n")
    return path


def phase_run(threads: int, procs: int) -> None:
    data = paragraphs_file()
    out = RAW / f"scores_p{procs}_t{threads}"
    args = ["data", "score", str(data), "-s", "perplexity", "--text-unit", "paragraph", "--threads", str(threads),
            "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   "-m", "prunekit", *args]
    else:
        command = [sys.executable, "-m", "prunekit", *args]
    # load the model once beforehand so the timed run reads the cached fp32 copy, as every later run does
    from prunekit.models.assets import smollm2_path

    smollm2_path()
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - started
    meta = json.loads((out / "scores.json").read_text())
    result = {"processes": procs, "threads": threads, "wall_seconds_including_startup": wall,
              "scoring_seconds": meta["timings"]["perplexity_seconds"], "rows": meta["data"]["rows"]}
    (RAW / f"run_p{procs}_t{threads}.json").write_text(json.dumps(result, indent=2))
    print(result)


def phase_report() -> None:
    from prunekit.data import ScoreTable, open_data, select
    from prunekit.evaluate.report import environment, markdown_table, write_json
    from prunekit.models.assets import smollm2_path
    from prunekit.models.loading import load_tokenizer

    runs = [json.loads(p.read_text()) for p in sorted(RAW.glob("run_p*_t*.json"))]
    if not runs:
        sys.exit("no runs yet")
    data = paragraphs_file()
    texts = [row["text"] for row in open_data(data, text_unit="paragraph").rows()]
    tokenizer = load_tokenizer(smollm2_path())
    tokens = sum(min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), 511) + 1 for t in texts)
    rows = []
    for run in sorted(runs, key=lambda r: (r["processes"], -r["threads"])):
        seconds = run["scoring_seconds"]
        rows.append([f"{run['processes']} × {run['threads']}", run["rows"], f"{seconds:.1f}",
                     f"{run['rows'] / seconds:.2f}", f"{tokens / seconds:.0f}", f"{run['wall_seconds_including_startup']:.1f}"])
    reference = RAW / "scores_p1_t2"
    table = ScoreTable.read(reference if reference.exists() else next(RAW.glob("scores_p*")))
    values = table.scores["perplexity"]
    identical = []
    for folder in sorted(RAW.glob("scores_p*")):
        other = ScoreTable.read(folder).scores["perplexity"]
        identical.append([folder.name, f"{np.max(np.abs(other - values) / values):.2e}"])
    quantiles = {q: float(np.quantile(values, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}
    lengths = np.array([len(t) for t in texts])
    from scipy.stats import spearmanr

    rho = float(spearmanr(values, lengths).statistic)

    def sample(indices) -> list[list]:
        return [[int(i), f"{values[i]:.1f}", texts[i][:110].replace("\n", " ").replace("|", "/") + "…"] for i in indices]

    order = np.argsort(values)
    keep = {name: select(table, "perplexity", keep=0.5, strategy=name, seed=0) for name in ("easiest", "middle", "hardest")}
    kept_rows = [[name, f"{np.median(values[s.indices]):.1f}", f"{values[s.indices].min():.1f} – {values[s.indices].max():.1f}",
                  f"{lengths[s.indices].mean():.0f}"] for name, s in keep.items()]
    markdown = [
        "# Perplexity filtering of Wikipedia paragraphs (SmolLM2-135M)", "",
        f"Data: the first {len(texts)} paragraphs of at least {MIN_CHARS} characters of the gensim Wikipedia excerpt "
        f"({tokens} SmolLM2 tokens including one document-start token each; paragraphs truncated at 512 tokens), read "
        "from a .txt file in paragraph mode (streamed). Reference model SmolLM2-135M-Instruct fp32, batches of 8 "
        "right-padded paragraphs, perplexity = exp(mean next-token loss of the paragraph). CPU lock held, model loading "
        "included in the scoring time (≈1 s from the cached fp32 copy).", "",
        "Throughput:", "",
        markdown_table(["processes × threads", "paragraphs", "scoring s", "paragraphs/s", "tokens/s", "wall s (with start-up)"], rows), "",
        "Largest relative difference to the 1 × 2 run (thread counts change float summation order):", "",
        markdown_table(["run", "max |Δ|/ppl"], identical), "",
        "Perplexity distribution: " + ", ".join(f"q{int(q * 100)} {v:.1f}" for q, v in quantiles.items())
        + f"; Spearman correlation with paragraph length {rho:+.2f}.", "",
        "Keeping 50 %:", "",
        markdown_table(["strategy", "median ppl kept", "range kept", "mean characters"], kept_rows), "",
        "Lowest perplexity (kept first by `easiest`):", "", markdown_table(["row", "ppl", "paragraph"], sample(order[:4])), "",
        "Highest perplexity (dropped first by `easiest`, kept by `hardest`):", "",
        markdown_table(["row", "ppl", "paragraph"], sample(order[::-1][:4])), ""]
    ROOT.mkdir(parents=True, exist_ok=True)
    write_json(ROOT / "data_text.json", {"runs": runs, "tokens": tokens, "paragraphs": len(texts), "quantiles": quantiles,
                                         "length_spearman": rho, "environment": environment()})
    (ROOT / "data_text.md").write_text("\n".join(markdown))
    print("\n".join(markdown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    run = sub.add_parser("run")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--procs", type=int, default=1)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.phase == "run":
        phase_run(args.threads, args.procs)
    else:
        phase_report()


if __name__ == "__main__":
    main()
