"""Recovery settings side by side from one pruned start: SmolLM2-135M, 20 % of the parameters removed as MLP
neurons (Taylor, ranked across layers, floor 30 %, least-squares reconstruction: prunekit's best), then the same
short recovery budget for each setting, each from the same pruned weights.

    flock /tmp/prunekit-cpu.lock python benchmarks/structure_recovery_ab.py distill:1e-4,distill:3e-4,plain:3e-4 150 [START_DIR]

A setting is mode:lr or mode:lr:parts, parts being name fragments joined by '+' of the only parameters
to train (plain:1e-3:mlp.+norm trains the MLPs and norms). START_DIR caches the pruned start between
runs (written by prunekit's structured saver the first time, loaded after).

Prints, per setting, the steps taken, the mean loss of every 10 steps and the perplexity on the first
12 test windows of the pinned wiki protocol (a quick proxy; the full benchmark uses all 40).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import structure_smollm2 as bench  # noqa: E402

from prunekit.core.text import random_windows, source_text, tokenize  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.models.base import adapter_for  # noqa: E402
from prunekit.structure import lm_calibration, lm_example_inputs, prune_structure  # noqa: E402
from prunekit.training.recovery import recover  # noqa: E402
from prunekit.models.loading import load  # noqa: E402
from prunekit.structure.saving import save_structured  # noqa: E402


def _pruned_start(lm, calibration, cache: Path | None) -> None:
    if cache is not None and cache.exists():
        lm.model = load(cache)
        return
    prune_structure(lm.model, 0.2, example_inputs=lm_example_inputs(), importance=bench.BEST,
                    calibration=lm_calibration(calibration), reconstruct=True, granularity="channels",
                    allocation={"name": "global", "round_to": 8, "floor": bench.BEST_FLOOR})
    if cache is not None:
        cache.mkdir(parents=True)
        save_structured(lm.model, cache, adapter=adapter_for(lm.model))


def main(settings: str, seconds: float, cache: Path | None = None) -> None:
    lm, calibration, test = bench._load()
    teacher = copy.deepcopy(lm.model)
    _pruned_start(lm, calibration, cache)
    start = copy.deepcopy(lm.model.state_dict())
    text = tokenize(lm.tokenizer, source_text(bench.PROTOCOL.calibration, "calibration", bench.PROTOCOL))
    train = random_windows(text, bench.RECOVERY_SAMPLES, bench.PROTOCOL.seq_len, bench.PROTOCOL.seed + 1)
    quick = test[:12]
    print(f"pruned: perplexity on 12 windows {perplexity(lm.model, quick).perplexity:.2f}", flush=True)
    for item in settings.split(","):
        mode, lr, *parts = item.split(":")
        train_only = tuple(parts[0].split("+")) if parts else ()
        lm.model.load_state_dict(start)
        result = recover(lm.model, train, teacher=teacher if mode == "distill" else None, objective=mode,
                         seconds=seconds, lr=float(lr), batch_size=1, train_only=train_only)
        print(f"{item}: {result.steps} steps in {result.seconds:.0f} s, losses "
              f"{[round(v, 3) for v in result.losses]}, perplexity on 12 windows "
              f"{perplexity(lm.model, quick).perplexity:.2f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    main(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else None)
