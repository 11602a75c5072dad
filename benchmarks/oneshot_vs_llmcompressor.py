"""Side-by-side benchmark of prunekit's one-shot pruning against llm-compressor on SmolLM2-135M.

Both tools get the same 32 calibration windows × 512 tokens (the pinned wiki protocol, seed 0),
2 threads, fp32; each run is a fresh process; every pruned model is evaluated by the same code on
the same 40 test windows. Writes benchmarks/results/oneshot_smollm2.{json,md}.

    flock /tmp/prunekit-cpu.lock python benchmarks/oneshot_vs_llmcompressor.py \
        --llmcompressor-python /path/to/venv-with-llmcompressor/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from prunekit.core.text import TextProtocol, calibration_windows, test_windows  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.evaluate.report import environment, markdown_table, write_json  # noqa: E402
from prunekit.models.loading import load_model  # noqa: E402

HERE = Path(__file__).resolve().parent
# (label, method, sparsity, pattern, allocation)
ROWS = [
    ("magnitude 50 %", "magnitude", 0.5, None, "uniform"),
    ("Wanda 50 %", "wanda", 0.5, None, "uniform"),
    ("SparseGPT 50 %", "sparsegpt", 0.5, None, "uniform"),
    ("Wanda 2:4", "wanda", 0.5, "2:4", "uniform"),
    ("SparseGPT 2:4", "sparsegpt", 0.5, "2:4", "uniform"),
    ("Wanda 70 % uniform", "wanda", 0.7, None, "uniform"),
    ("SparseGPT 70 % uniform", "sparsegpt", 0.7, None, "uniform"),
    ("Wanda 70 % OWL", "wanda", 0.7, None, "owl"),
    ("SparseGPT 70 % OWL", "sparsegpt", 0.7, None, "owl"),
]


def run_worker(python: str, tool: str, row, model_dir: Path, windows: Path, save: Path, threads: int,
               sequential: str) -> dict:
    _, method, sparsity, pattern, allocation = row
    command = [python, str(HERE / "oneshot_worker.py"), "--tool", tool, "--model", str(model_dir), "--windows",
               str(windows), "--method", method, "--sparsity", str(sparsity), "--allocation", allocation,
               "--threads", str(threads), "--save", str(save), "--sequential", sequential]
    if pattern:
        command += ["--pattern", pattern]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(HERE.parent / "src") if tool == "prunekit" else "")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"worker exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def evaluate(model, save: Path, windows: torch.Tensor) -> tuple[float, float]:
    state = load_file(str(save))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    linear = [v for k, v in state.items() if k.startswith("model.layers.") and v.dim() == 2]
    zeros = sum(int((v == 0).sum()) for v in linear)
    return perplexity(model, windows).perplexity, zeros / sum(v.numel() for v in linear)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmcompressor-python", default=None, help="python of a venv with llmcompressor")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (1-based) or 'all'")
    parser.add_argument("--sequential", default="layer", help="prunekit's calibration order: layer or block")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    protocol = TextProtocol(calibration_samples=32, test_windows=40, seq_len=512, seed=0)
    lm = load_model()
    model_dir = lm.path
    calibration = calibration_windows(lm.tokenizer, protocol)
    test = test_windows(lm.tokenizer, protocol)
    rows = ROWS if args.rows == "all" else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    pristine = {k: v.clone() for k, v in lm.model.state_dict().items()}
    results = {"protocol": protocol.describe(), "threads": args.threads, "dtype": "float32",
               "prunekit_sequential": args.sequential, "environment": environment(), "rows": []}
    results["dense_perplexity"] = perplexity(lm.model, test).perplexity
    print(f"dense: {results['dense_perplexity']:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        windows = Path(tmp) / "windows.pt"
        torch.save({"calibration": calibration}, windows)
        for row in rows:
            entry = {"row": row[0]}
            tools = [("prunekit", sys.executable)]
            if args.llmcompressor_python and row[1] != "magnitude":
                tools.append(("llmcompressor", args.llmcompressor_python))
            for tool, python in tools:
                save = Path(tmp) / f"{tool}.safetensors"
                record = run_worker(python, tool, row, model_dir, windows, save, args.threads, args.sequential)
                if "error" not in record:
                    lm.model.load_state_dict(pristine)
                    record["perplexity"], record["achieved_sparsity"] = evaluate(lm.model, save, test)
                    save.unlink()
                entry[tool] = record
                print(row[0], tool, {k: v for k, v in record.items() if k != "traceback_tail"}, flush=True)
            results["rows"].append(entry)
    name = f"oneshot_smollm2{args.tag}"
    write_json(HERE / "results" / f"{name}.json", results)
    (HERE / "results" / f"{name}.md").write_text(to_markdown(results))
    print(to_markdown(results))


def _fmt(record: dict | None, key: str, scale: float = 1.0, digits: int = 2):
    if not record:
        return "–"
    if "error" in record:
        return "fails"
    value = record.get(key)
    return "–" if value is None else f"{value / scale:.{digits}f}"


def to_markdown(results: dict) -> str:
    table = []
    for entry in results["rows"]:
        ours, theirs = entry.get("prunekit"), entry.get("llmcompressor")
        ratio_ppl = ratio_time = "–"
        if ours and theirs and "error" not in ours and "error" not in theirs:
            ratio_ppl = f"{ours['perplexity'] / theirs['perplexity']:.3f}"
            ratio_time = f"{ours['prune_seconds'] / theirs['prune_seconds']:.2f}"
        table.append((entry["row"], _fmt(ours, "perplexity"), _fmt(theirs, "perplexity"), ratio_ppl,
                      _fmt(ours, "prune_seconds", digits=1), _fmt(theirs, "prune_seconds", digits=1), ratio_time,
                      _fmt(ours, "peak_rss_bytes", 2**20, 0), _fmt(theirs, "peak_rss_bytes", 2**20, 0)))
    errors = [f"- llm-compressor, {e['row']}: `{e['llmcompressor']['error']}`" for e in results["rows"]
              if e.get("llmcompressor", {}).get("error")]
    protocol = results["protocol"]
    return "\n".join([
        "| SmolLM2-135M | prunekit ppl | llm-compressor ppl | ppl ratio | prunekit prune s | llm-compressor prune s "
        "| time ratio | prunekit peak RSS MiB | llm-compressor peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | {results['dense_perplexity']:.2f} | {results['dense_perplexity']:.2f} | – | – | – | – | – | – |",
        *markdown_table(["", "", "", "", "", "", "", "", ""], table).splitlines()[2:],
        "",
        f"Protocol: {protocol['calibration_windows']}; test: {protocol['test_protocol']}; "
        f"{results['threads']} threads, fp32, each run in a fresh process; prunekit calibration order: "
        f"{results['prunekit_sequential']}.",
        *(["", "Failures:", *errors] if errors else []),
    ]) + "\n"


if __name__ == "__main__":
    main()
