"""One pruning run of one tool in a fresh process (so peak RSS belongs to that run alone).

Runs under prunekit's environment or under llm-compressor's own virtual environment, so it
imports nothing from prunekit unless ``--tool prunekit``. It loads the model, prunes it on the
given calibration windows, times only the pruning call, and saves the pruned weights for the
runner, which evaluates every tool with the same perplexity code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prune_with_prunekit(model, args, calibration):
    import prunekit

    allocation = {"name": args.allocation}
    if args.allocation == "owl":
        allocation.update(threshold_m=args.owl_m, **{"lambda": args.owl_lambda})
    result = prunekit.prune(model, args.method, None if args.pattern else args.sparsity, pattern=args.pattern,
                            allocation=allocation, calibration=calibration, sequential=args.sequential)
    return result.achieved_sparsity


def prune_with_llmcompressor(model, args, calibration):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    settings = dict(sparsity=args.sparsity, mask_structure=args.pattern or "0:0", targets=["Linear"],
                    ignore=["re:.*lm_head"])
    if args.allocation == "owl":
        settings.update(sparsity_profile="owl", owl_m=args.owl_m, owl_lmbda=args.owl_lambda)
    elif args.allocation != "uniform":
        raise ValueError(f"llm-compressor has no '{args.allocation}' allocation")
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method](**settings)
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": [[1] * calibration.shape[1]] * calibration.shape[0]})
    oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1], shuffle_calibration_samples=False)
    return None


def _peak_rss() -> int:
    """VmHWM of this process: ru_maxrss would include the runner's peak (inherited across fork/exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tool", choices=["prunekit", "llmcompressor"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True, help="a .pt file with a 'calibration' LongTensor")
    parser.add_argument("--method", required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default=None)
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--sequential", default="layer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", required=True, help="where to write the pruned state dict (safetensors)")
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calibration = torch.load(args.windows, weights_only=True)["calibration"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    record = {"tool": args.tool, "method": args.method}
    started = time.perf_counter()
    try:
        if args.tool == "prunekit":
            prune_with_prunekit(model, args, calibration)
        else:
            prune_with_llmcompressor(model, args, calibration)
    except Exception as exc:  # the runner reports a tool's failure as a row, not a crash
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        record["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
        print(json.dumps(record))
        return 0
    record["prune_seconds"] = time.perf_counter() - started
    record["peak_rss_bytes"] = _peak_rss()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, args.save)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
