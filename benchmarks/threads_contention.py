"""`prunekit prune --method sparsegpt --threads N` on a tiny model, alone and beside a competing CPU-bound
process, before and after a change, in alternation.

    flock /tmp/prunekit-cpu.lock python benchmarks/threads_contention.py --before <git revision> [--repeats 3]

"before" runs the source tree of the given git revision (`git archive`), "after" the working tree, each as
its own `python -m prunekit` process (an OpenMP runtime reads its settings once, at start-up). Every
round runs each (variant, threads, alone/contended) once, the order reversed every other round. The
competitor is one `while True: pass` process, started before a contended run and killed after it.

The ideal share: alone, N threads get min(N, cores) cores; beside C busy single-thread processes a fair
scheduler gives them min(N, cores × N / (N + C)). The ideal contended time is the alone time scaled by
that ratio; the figure reported is the measured contended time over the ideal (goal ≤ 1.5). Times are the
report's `prune_seconds` (start-up and loading excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def tiny_model(directory: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunekit.models.assets import smollm2_path

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(directory)


def prune_seconds(source: Path, model: Path, out: Path, threads: int, contended: int) -> float:
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=str(source), HF_HUB_OFFLINE="1", PRUNEKIT_QUIET="1")
    competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(contended)]
    try:
        subprocess.run([sys.executable, "-m", "prunekit", "prune", str(model), "--method", "sparsegpt",
                        "--threads", str(threads), "--no-eval", "--no-compressed", "--out", str(out),
                        "--overwrite"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        for competitor in competitors:
            competitor.kill()
            competitor.wait()
    return json.loads((out / "report.json").read_text())["timing"]["prune_seconds"]


def ideal_factor(threads: int, competitors: int, cores: int) -> float:
    alone = min(threads, cores)
    shared = min(threads, cores * threads / (threads + competitors))
    return alone / shared


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="git revision of the code before the change")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from prunekit.evaluate.measure import machine_load
    from prunekit.evaluate.report import environment, markdown_table

    cores = len(os.sched_getaffinity(0))
    revision = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=HERE.parent, check=True,
                              capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="threads-contention-") as scratch:
        root = Path(scratch)
        old = root / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "src"], cwd=HERE.parent, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        sources = {"before": old / "src", "after": HERE.parent / "src"}
        model = root / "tiny"
        tiny_model(model)
        cases = [(variant, threads, contended) for variant in sources for threads in args.threads
                 for contended in (0, 1)]
        times: dict[tuple, list[float]] = {case: [] for case in cases}
        loads = [machine_load()]
        for case in cases:  # warm-up round: page cache, compiled bytecode
            prune_seconds(sources[case[0]], model, root / "out", case[1], 0)
        for index in range(args.repeats):
            for case in (cases if index % 2 == 0 else reversed(cases)):
                times[case].append(prune_seconds(sources[case[0]], model, root / "out", case[1], case[2]))
            loads.append(machine_load())
    rows, summary = [], {}
    for variant in sources:
        for threads in args.threads:
            alone = statistics.median(times[(variant, threads, 0)])
            busy = statistics.median(times[(variant, threads, 1)])
            factor = ideal_factor(threads, 1, cores)
            summary[f"{variant} threads={threads}"] = {
                "alone_seconds": times[(variant, threads, 0)], "contended_seconds": times[(variant, threads, 1)],
                "ideal_factor": factor, "slowdown_vs_alone": busy / alone,
                "slowdown_vs_ideal_share": busy / (alone * factor)}
            rows.append([variant, threads, f"{alone:.2f}", f"{busy:.2f}", f"{busy / alone:.2f}", f"{factor:.2f}",
                         f"{busy / (alone * factor):.2f}"])
    result = {"job": "prune --method sparsegpt (tiny Llama: 4 blocks, hidden 128; 32 × 512 calibration tokens)",
              "cores": cores, "before_revision": revision, "repeats": args.repeats, "competitor": "1 × while True",
              "runs": summary, "load_average": loads, "environment": environment()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads_contention.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "threads_contention.md").write_text(
        f"# `--threads` beside a competing CPU-bound process ({cores} cores)\n\n{result['job']}; medians of "
        f"{args.repeats} runs, alternating (ABBA) across all cases; before = {revision}.\n\n"
        + markdown_table(["code", "threads", "alone s", "contended s", "slowdown", "ideal", "vs ideal share"], rows)
        + f"\n\nLoad average across the rounds: {', '.join(f'{x:.2f}' for x in loads if x is not None)}.\n")
    print((RESULTS / "threads_contention.md").read_text())


if __name__ == "__main__":
    main()
