"""One tool's side of the kv-cache benchmark, in its own process: prunekit (this environment) or KVPress (its own
virtual environment, transformers < 5.3), so it imports prunekit only for ``--tool prunekit``.

``--mode quality``: for every prompt, method and ratio, the prompt is prefilled with the compression on; the
kept positions of every block and key head are recorded (KVPress does not expose them: its compressed keys are
matched, exactly, to the full cache's keys), then the continuation's mean loss is computed through the
compressed cache with explicit position ids (the same code for both tools). ``--mode timing``: many timed
prefills of the first prompt in this one process: ``--warmup`` untimed rounds, then ``--repeats`` timed rounds,
each round a full-cache prefill (no compression) followed by one prefill of every (method, ratio) cell, the cells
in forward order on even rounds and backward on odd ones; every sample is kept, so each cell has ``--repeats``
samples and its own full-cache reference from the same process (the driver alternates the tools' processes).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

KVPRESS_NAMES = {"snapkv": "SnapKVPress", "knorm": "KnormPress", "streaming_llm": "StreamingLLMPress",
                 "tova": "TOVAPress", "expected_attention": "ExpectedAttentionPress"}


def compressor(tool: str, model, method: str, ratio: float):
    """A context manager that compresses the prompt's cache, and a function giving the kept positions after it."""
    if tool == "prunekit":
        import prunekit.kv

        patch = prunekit.kv.apply(model, method, ratio=ratio)
        patch.remove()

        class Context:
            def __enter__(self):
                patch.install()

            def __exit__(self, *exc):
                patch.remove()

        return Context(), lambda cache, full: {i: p[0] for i, p in patch.kept_positions().items()}
    import kvpress

    press = getattr(kvpress, KVPRESS_NAMES[method])(compression_ratio=ratio)
    return press(model), match_positions


def match_positions(cache, full) -> dict[int, torch.Tensor]:
    """Prompt position of every kept key: its exact twin among the full cache's keys."""
    kept = {}
    for index, (layer, reference) in enumerate(zip(cache.layers, full)):
        distances = torch.cdist(layer.keys[0].float(), reference[0].float(), compute_mode="donot_use_mm_for_euclid_dist")  # (heads, kept, prompt)
        best = distances.min(dim=-1)
        if float(best.values.max()) > 0:
            raise RuntimeError(f"block {index}: a kept key matches no key of the full cache exactly")
        kept[index] = best.indices.sort(dim=-1).values
    return kept


def prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits


def continuation_loss(model, cache, last, continuation, start: int) -> float:
    positions = torch.arange(start, start + continuation.shape[1] - 1)[None]
    with torch.inference_mode():
        logits = model(continuation[:, :-1], past_key_values=cache, position_ids=positions).logits
    logits = torch.cat([last[:, None], logits], dim=1).float()
    return float(torch.nn.functional.cross_entropy(logits[0], continuation[0]))


def timed_prefill(model, prefix, context=None) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of one prefill (inside ``context`` when given: entering and leaving it
    are not timed)."""
    if context is None:
        begin, cpu = time.perf_counter(), time.process_time()
        prefill(model, prefix)
        return time.perf_counter() - begin, time.process_time() - cpu
    with context:
        begin, cpu = time.perf_counter(), time.process_time()
        prefill(model, prefix)
        seconds = time.perf_counter() - begin, time.process_time() - cpu
    return seconds


def load_average() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def timing(tool: str, model, prefix, methods: list[str], ratios: list[float], warmup: int, repeats: int,
           results: dict) -> None:
    """``warmup`` untimed rounds then ``repeats`` timed ones; a round: the full cache, then every cell (forward on
    even rounds, backward on odd). Every sample is recorded, in the order taken."""
    cells = [(method, ratio) for method in methods for ratio in ratios]
    # a fresh context per prefill (KVPress's press(model) is a one-shot context manager)
    contexts = {cell: (lambda cell=cell: compressor(tool, model, *cell)[0]) for cell in cells}
    results["full_seconds"], results["full_cpu_seconds"] = [], []
    results["points"] = {f"{method}@{ratio}": [] for method, ratio in cells}
    results["points_cpu"] = {f"{method}@{ratio}": [] for method, ratio in cells}
    results["order"] = []
    results["load_before"] = load_average()
    for round_number in range(warmup + repeats):
        keep = round_number >= warmup
        seconds, cpu = timed_prefill(model, prefix)
        if keep:
            results["full_seconds"].append(seconds)
            results["full_cpu_seconds"].append(cpu)
            results["order"].append("full")
        for method, ratio in cells if round_number % 2 == 0 else cells[::-1]:
            seconds, cpu = timed_prefill(model, prefix, contexts[(method, ratio)]())
            if keep:
                results["points"][f"{method}@{ratio}"].append(seconds)
                results["points_cpu"][f"{method}@{ratio}"].append(cpu)
                results["order"].append(f"{method}@{ratio}")
    results["load_after"] = load_average()
    results["warmup"], results["repeats"] = warmup, repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tool", choices=["prunekit", "kvpress"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="torch file: a list of (prefix, continuation) id tensors")
    parser.add_argument("--methods", required=True)
    parser.add_argument("--ratios", required=True)
    parser.add_argument("--mode", choices=["quality", "timing"], required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="timing: untimed rounds first")
    parser.add_argument("--repeats", type=int, default=5, help="timing: timed rounds (samples per cell)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = torch.load(args.prompts, weights_only=True)
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    results: dict = {"tool": args.tool, "mode": args.mode, "points": {}}
    if args.mode == "timing":
        timing(args.tool, model, prompts[0][0], methods, ratios, args.warmup, args.repeats, results)
        torch.save(results, args.out)
        return
    results["full_losses"] = []
    for number, (prefix, continuation) in enumerate(prompts):
        full, last = prefill(model, prefix)
        results["full_losses"].append(continuation_loss(model, full, last, continuation, prefix.shape[1]))
        full_keys = [layer.keys[..., :prefix.shape[1], :].clone() for layer in full.layers]
        for method in methods:
            for ratio in ratios:
                context, kept_positions = compressor(args.tool, model, method, ratio)
                with context:
                    cache, last = prefill(model, prefix)
                kept = kept_positions(cache, full_keys)
                loss = continuation_loss(model, cache, last, continuation, prefix.shape[1])
                results["points"][f"{number}:{method}@{ratio}"] = {"positions": kept, "loss": loss}
    torch.save(results, args.out)


if __name__ == "__main__":
    main()
