"""``python -m prunekit.tools.support [--out docs/models.md]``: the support matrix, measured.

Builds a tiny random model of every architecture in the coverage list from transformers' own
configs, runs each dimension's check on it (``prunekit.tools.support.<dimension>.check``) and
writes the architecture × dimension table: yes (verified end to end) or the one-line refusal.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRUNEKIT_QUIET", "1")

DIMENSIONS = ("weights", "structure", "lowrank", "tokens", "kv")
CAUSAL_ONLY = ("weights", "lowrank", "kv")


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m prunekit.tools.support")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--only", nargs="*", default=None, help="architectures to check (default: all)")
    args = parser.parse_args(argv)
    from prunekit.tools.support.tiny import DECODERS, ENCODERS, tiny_causal_lm, tiny_encoder

    torch.set_num_threads(1)
    checks = {name: importlib.import_module(f"prunekit.tools.support.{name}").check for name in DIMENSIONS}
    windows = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    started = time.perf_counter()
    for kind, names, factory in (("decoder", DECODERS, tiny_causal_lm), ("encoder", ENCODERS, tiny_encoder)):
        for model_type in names:
            if args.only and model_type not in args.only:
                continue
            cells = []
            for dimension, check in checks.items():
                if kind == "encoder" and dimension in CAUSAL_ONLY:
                    cells.append("– (causal language models only)")
                    continue
                result = check(lambda: factory(model_type), windows)
                cells.append(result.cell())
            rows.append((model_type, kind, *cells))
            print(f"{model_type:14s} " + " | ".join(cells), flush=True)
    from prunekit.tools.support.structure import check_classifier
    from prunekit.tools.support.tiny import CLASSIFIERS, classifier_batch, tiny_classifier

    images, labels = classifier_batch()
    classifier_rows = []
    for shape in CLASSIFIERS:
        if args.only and shape not in args.only:
            continue
        cell = check_classifier(lambda: tiny_classifier(shape), images, labels).cell()
        classifier_rows.append((shape, cell))
        print(f"{shape:54s} {cell}", flush=True)
    rows_and_cells = [cell for row in rows for cell in row] + [cell for row in classifier_rows for cell in row]
    text = _markdown(rows, classifier_rows, time.perf_counter() - started)
    if args.out is not None:
        args.out.write_text(text)
    return 0 if all("broken" not in cell for cell in rows_and_cells) else 1


def _markdown(rows, classifier_rows, seconds: float) -> str:
    import transformers

    from prunekit.evaluate.report import markdown_table

    decoders = [row for row in rows if row[1] == "decoder"]
    working = {dimension: sum(row[2 + i].startswith("yes") for row in decoders)
               for i, dimension in enumerate(DIMENSIONS)}
    lines = [
        "# Which models prunekit prunes",
        "",
        "Measured by `python -m prunekit.tools.support --out docs/models.md` (the coverage tests in",
        "tests/models, tests/structure, tests/tokens and tests/kv run the same checks). Every architecture is a tiny",
        f"random model built from transformers {transformers.__version__}'s own config (2 blocks, width 64); no",
        "family file is needed for any of them: prunekit finds the blocks, attention, MLP and experts from the",
        "model's structure. A cell says **yes** only when the dimension ran end to end and what it promises",
        "held:",
        "",
        "- **weights**: Wanda 50 % and SparseGPT 2:4 on every linear layer of the blocks (experts of a mixture",
        "  calibrated on the tokens routed to them; convolutions and state-space parameters of hybrid blocks stay",
        "  dense); every layer holds the N:M pattern exactly or the sparsity to within one weight per row; the",
        "  outputs are finite; `save_pretrained` → `from_pretrained` and the compressed copy → `prunekit.load`",
        "  give bit-identical logits;",
        "- **structure**: 20 % of the parameters removed as whole channels and heads; the forward works, the",
        "  parameter count is the planned one, and save → load gives identical outputs;",
        "- **lowrank**: `prunekit shrink --method svd-llm` and `--method slicegpt` at 20 % of the parameters: finite",
        "  outputs, the parameters removed (within one rank or slicing unit of a 64-wide model), `prunekit.load`",
        "  gives identical outputs; SliceGPT's rotation without slicing leaves the outputs unchanged (to 1e-3);",
        "  the cell names a method that refuses;",
        "- **tokens**: a pruning method at prefill; tokens are really removed, protected ones kept, generation",
        "  continues after the pruned prompt, and removing the patch restores identical outputs;",
        "- **kv**: the prompt's key/value cache compressed at prefill (TOVA): at ratio 0 `generate` is the",
        "  unpatched one bit for bit; at 0.5 every attention layer's cache holds half the prompt's entries and the",
        "  continuation equals the unpatched model's from the full cache gathered at the kept positions; removing",
        "  the patch restores identical outputs.",
        "",
        "Otherwise the cell gives the one-line reason prunekit refuses with. "
        + ", ".join(f"{dimension}: {count} of {len(decoders)} decoders" for dimension, count in working.items())
        + f". Checked in {seconds:.0f} s.",
        "",
        markdown_table(["architecture", "kind", *DIMENSIONS], rows),
        "",
        "## Plain `nn.Module` classifiers",
        "",
        "No config and no family file: the structural tracer follows the forward pass. Each CNN (1-channel",
        "16×16 images, 10 classes, random weights) loses 20 % of its parameters as whole channels with",
        "`prune_structure`'s defaults, calibrated on 16 random images; the check is the one above (finite",
        "outputs, the planned parameter count, equal to the original with the removed channels zeroed, and",
        "identical after `save_structured` → `prunekit.load(path, model=<unpruned skeleton>)`). The removed",
        "share lands above 20 % where a channel count rounds to a multiple of 8.",
        "",
        markdown_table(["shape", "structure"], classifier_rows),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
