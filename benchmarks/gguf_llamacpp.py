"""SmolLM2-135M dense and structurally shrunk, exported to GGUF by `prunekit export` and run in llama.cpp:
do the greedy continuations match transformers' on the same float32 weights, and how many tokens per
second does a CPU user get?

    flock /tmp/prunekit-cpu.lock python benchmarks/gguf_llamacpp.py [--work DIR] [--repeats 5]

Not in CI: llama-cpp-python builds llama.cpp from source (~10 min). Build it once in its own venv:

    python -m venv /work/venvs/llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" /work/venvs/llamacpp/bin/pip install llama-cpp-python

This script imports `llama_cpp` from that venv's site-packages (`--llamacpp-venv`): the package is
Python over ctypes, and its dependencies are those of this environment.

Models: the dense SmolLM2-135M and `prunekit shrink --ratio 0.2` / `--ratio 0.4` with every pruning
setting at its default (Fisher importance, global allocation of MLP neurons and KV groups; the shrink's
own measurements switched off), written once under --work. Each is exported with `prunekit export --type f32`.

Protocol, printed into the results: 8 prompts are the first 32 tokens of the first 8 consecutive
128-token windows of the wiki test split (`prunekit.core.text`); transformers (float32, plain
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`: a shrunk directory loads through
the model code saved beside it, checked equal to `prunekit.load` on one window) and llama.cpp
continue each greedily by 32 tokens from the same token ids, and the continuations are compared
token by token. Speed: prompt processing = one 128-token window
evaluated from an empty cache; generation = 32 tokens decoded one at a time after a 32-token prompt,
each the argmax of the last logits. At 1 and 2 threads (`n_threads` = `n_threads_batch`), the three
models are loaded together and timed in alternation (`prunekit.evaluate.measure.time_alternating`:
ABBA order, 1 warm-up round, `--repeats` timed rounds); tokens/s = tokens / median seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, WINDOW = 8, 32, 32, 128
RATIOS = (0.2, 0.4)
SHRINK_MEASURING = ["--no-eval", "--no-peak-memory", "--batch-sizes", "1", "--runs", "1"]


def run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "prunekit", *args], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path) -> dict[str, Path]:
    """Model directory of each variant, shrunk and exported once (kept under ``work``)."""
    from prunekit.models.assets import smollm2_path

    models = {"dense": Path(smollm2_path())}
    for ratio in RATIOS:
        out = work / f"shrunk-{ratio:.0%}"
        if not (out / "report.json").exists():
            # Every pruning setting at its default; measuring (perplexity, timings, memory) is left to this script.
            run(["shrink", "--ratio", str(ratio), *SHRINK_MEASURING, "--out", str(out), "--overwrite"])
        models[f"shrunk {ratio:.0%}"] = out
    return models


def export(name: str, model_dir: Path, work: Path) -> Path:
    out = work / f"gguf-{name.replace(' ', '-').replace('%', '')}"
    if not (out / "model.gguf").exists():
        run(["export", str(model_dir), "--to", "gguf", "--type", "f32", "--out", str(out), "--overwrite"])
    return out


def prompts_and_windows(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    from prunekit.core.text import TextProtocol, test_windows

    windows = test_windows(tokenizer, TextProtocol(test_windows=PROMPTS, seq_len=WINDOW))
    return [w[:PROMPT_TOKENS].tolist() for w in windows], [w.tolist() for w in windows]


def transformers_greedy(model_dir: Path, prompts: list[list[int]], window: list[int]) -> tuple[list[list[int]], bool]:
    """Greedy continuations by plain transformers (a shrunk directory through the model code saved beside it),
    and whether its logits on one window equal those of the model ``prunekit.load`` rebuilds."""
    from transformers import AutoModelForCausalLM

    import prunekit

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        ids = torch.tensor([window])
        same = torch.equal(model(input_ids=ids).logits, prunekit.load(model_dir, dtype=torch.float32)(input_ids=ids).logits)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                       do_sample=False, pad_token_id=model.config.eos_token_id)
            outputs.append(generated[0, len(prompt):].tolist())
    return outputs, same


class LlamaCpp:
    """One GGUF loaded in llama.cpp with a fixed thread count, evaluated from token ids."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         seed=0, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def prompt(self, tokens: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(tokens)

    def last_logits(self) -> np.ndarray:
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def decode(self, count: int) -> list[int]:
        tokens = []
        for _ in range(count):
            token = int(np.argmax(self.last_logits()))
            tokens.append(token)
            self.llm.eval([token])
        return tokens

    def greedy(self, prompt: list[int], count: int) -> list[int]:
        self.prompt(prompt)
        return self.decode(count)

    def close(self) -> None:
        self.llm.close()


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-gguf-bench"))
    parser.add_argument("--llamacpp-venv", type=Path, default=Path("/work/venvs/llamacpp"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    sys.path += glob.glob(str(args.llamacpp_venv / "lib" / "python*" / "site-packages"))
    import llama_cpp
    from transformers import AutoTokenizer

    from prunekit.evaluate.measure import time_alternating
    from prunekit.evaluate.report import environment, markdown_table, write_json

    args.work.mkdir(parents=True, exist_ok=True)
    models = prepare(args.work)
    ggufs = {name: export(name, path, args.work) for name, path in models.items()}
    tokenizer = AutoTokenizer.from_pretrained(models["dense"])
    prompts, windows = prompts_and_windows(tokenizer)
    texts = [tokenizer.decode(p) for p in prompts]

    results: dict = {"protocol": __doc__.split("Protocol, printed into the results: ")[1].strip(),
                     "llama_cpp_python": llama_cpp.__version__, "environment": environment(), "models": {}}
    for name, gguf_dir in ggufs.items():
        exported = json.loads((gguf_dir / "report.json").read_text())["gguf"]
        shrink_report = models[name] / "report.json"
        expected, same_as_prunekit = transformers_greedy(models[name], prompts, windows[0])
        engine = LlamaCpp(gguf_dir / "model.gguf", threads=2)
        got = [engine.greedy(p, NEW_TOKENS) for p in prompts]
        tokenized = [engine.tokenize(t) == tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        engine.close()
        differences = [first_difference(a, b) for a, b in zip(got, expected)]
        entry = {"gguf_bytes": exported["bytes"], "architecture": exported["architecture"],
                 "feed_forward_length": exported["feed_forward_length"], "head_count": exported["head_count"],
                 "head_count_kv": exported["head_count_kv"],
                 "transformers_equals_prunekit_load": same_as_prunekit,
                 "greedy_matches": sum(d is None for d in differences), "first_differences": differences,
                 "tokenizer_matches": sum(tokenized), "llamacpp": got, "transformers": expected}
        if shrink_report.exists():
            report = json.loads(shrink_report.read_text())
            entry["shrink"] = {"parameters": report.get("parameters"), "quality": report.get("quality")}
        results["models"][name] = entry
        print(f"{name}: {entry['architecture']}, greedy {entry['greedy_matches']}/{PROMPTS} identical, "
              f"tokenizer {entry['tokenizer_matches']}/{PROMPTS}", flush=True)

    speed: dict = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        engines = {name: LlamaCpp(gguf_dir / "model.gguf", threads) for name, gguf_dir in ggufs.items()}
        window = windows[0]
        prompt_times = time_alternating({n: (lambda e=e: e.prompt(window)) for n, e in engines.items()},
                                        args.repeats, warmup=1)
        decode_times = time_alternating({n: (lambda e=e: e.decode(NEW_TOKENS)) for n, e in engines.items()},
                                        args.repeats, warmup=1,
                                        before={n: (lambda e=e: e.prompt(window[:PROMPT_TOKENS]))
                                                for n, e in engines.items()})
        for name, engine in engines.items():
            prompt_s, decode_s = statistics.median(prompt_times[name]), statistics.median(decode_times[name])
            speed.setdefault(name, {})[threads] = {
                "prompt_tokens_per_s": WINDOW / prompt_s, "generation_tokens_per_s": NEW_TOKENS / decode_s,
                "prompt_seconds": prompt_times[name], "generation_seconds": decode_times[name]}
            engine.close()
        print(f"threads {threads}: " + ", ".join(f"{n} {speed[n][threads]['prompt_tokens_per_s']:.0f}/"
                                                  f"{speed[n][threads]['generation_tokens_per_s']:.1f} tok/s"
                                                  for n in engines), flush=True)
    for name in results["models"]:
        results["models"][name]["speed"] = speed[name]

    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "gguf_llamacpp.json", results)
    dense = speed["dense"]
    rows = []
    for name, entry in results["models"].items():
        row = [name, entry["architecture"], f"{entry['gguf_bytes'] / 2**20:.0f} MiB",
               f"{entry['greedy_matches']}/{PROMPTS}"]
        for threads in sorted(speed[name]):
            s, d = speed[name][threads], dense[threads]
            row.append(f"{s['prompt_tokens_per_s']:.0f} ({s['prompt_tokens_per_s'] / d['prompt_tokens_per_s']:.2f}×)")
            row.append(f"{s['generation_tokens_per_s']:.1f} "
                       f"({s['generation_tokens_per_s'] / d['generation_tokens_per_s']:.2f}×)")
        rows.append(row)
    headers = ["model", "llama.cpp arch", "GGUF f32", "greedy = transformers"]
    for threads in sorted(dense):
        headers += [f"prompt tok/s, {threads} thr", f"generation tok/s, {threads} thr"]
    text = "\n".join(["# SmolLM2-135M in llama.cpp: dense and shrunk (GGUF f32)", "",
                      results["protocol"], "", f"llama-cpp-python {llama_cpp.__version__}; "
                      f"{time.strftime('%Y-%m-%d')}.", "", markdown_table(headers, rows), ""])
    (RESULTS / "gguf_llamacpp.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
