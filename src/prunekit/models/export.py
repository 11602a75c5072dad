"""``prunekit export``: a pruned or shrunk model in the format an engine serves it from (GGUF for llama.cpp)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from prunekit.core.config import RecipeModel
from prunekit.core.job import Job, Outcome
from prunekit.io.formats import CAUSAL_LM
from prunekit.io.gguf_writer import check_exportable, write_gguf
from prunekit.models.loading import load_model

GGUF_FILE = "model.gguf"


class ExportRecipe(RecipeModel):
    """What ``prunekit export`` writes: which model, to which format, in which number type."""

    model: str | None = Field(None, description="model directory (pruned, shrunk or dense) or hub id; None = the "
                                                "embedded SmolLM2-135M")
    to: Literal["gguf"] = Field("gguf", description="the format written")
    type: Literal["f32", "f16", "q8_0"] = Field("f32", description="number type of the matrices (norms and biases "
                                                                   "stay float32)")
    pre_tokenizer: str | None = Field(None, description="llama.cpp's name of the tokenizer's pre-tokenisation; None "
                                                        "= read from the tokenizer's structure")


class ExportJob(Job[ExportRecipe]):
    """Load the model with its tokenizer and write it as one GGUF file, with the widths of every layer."""

    command = "export"
    recipe_type = ExportRecipe

    def run(self) -> Outcome:
        self.loaded = loaded = load_model(self.recipe.model, kind=CAUSAL_LM)
        check_exportable(loaded.model)
        loaded.require_tokenizer()
        return Outcome({"model": {"name": loaded.name, "path": str(loaded.path) if loaded.path else None},
                        "settings": self.recipe.model_dump(mode="json")}, title=f"{loaded.name} → GGUF")

    def write(self, directory: Path, outcome: Outcome) -> None:
        recipe, loaded = self.recipe, self.loaded
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            loaded.tokenizer.save_pretrained(tokenizer_dir)
            summary = write_gguf(loaded.model, tokenizer_dir, directory / GGUF_FILE, recipe.type, name=loaded.name,
                                 pre_tokenizer=recipe.pre_tokenizer)
        outcome.report["gguf"] = {"file": GGUF_FILE, **summary.to_dict()}
        outcome.markdown = export_markdown(outcome.report)
        outcome.summary = [("file", f"{GGUF_FILE} ({summary.bytes / 2**20:,.1f} MiB, {recipe.type})"),
                           ("llama.cpp architecture", summary.architecture),
                           ("feed-forward lengths", _span(summary.to_dict()["feed_forward_length"])),
                           ("query / KV heads", f"{_span(summary.to_dict()['head_count'])} / "
                                                f"{_span(summary.to_dict()['head_count_kv'])}")]


def _span(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else f"{min(values)}..{max(values)} (per layer)"


def export_markdown(report: dict) -> str:
    gguf = report["gguf"]
    per_layer = gguf["architecture"] == "deci"
    lines = [f"# prunekit export: {report['model']['name']} → GGUF", "",
             f"`{gguf['file']}`: {gguf['bytes']:,} bytes, matrices as {report['settings']['type']} "
             f"(tensor types: {', '.join(f'{k} {v}' for k, v in gguf['tensor_types'].items())}), tokenizer "
             f"pre-tokenisation `{gguf['pre_tokenizer']}`.", "",
             f"llama.cpp architecture `{gguf['architecture']}`: "
             + ("the widths differ by layer, so the file uses the architecture llama.cpp builds layer by layer from "
                "the arrays `deci.feed_forward_length`, `deci.attention.head_count(_kv)` (its `llama` builds every "
                "layer with the first value)." if per_layer else "every layer has the same widths."), "",
             f"Feed-forward lengths: {gguf['feed_forward_length']}", "",
             f"Query heads: {gguf['head_count']}; KV heads: {gguf['head_count_kv']}; head size {gguf['head_dim']}.", "",
             "Run it: `llama-cli -m model.gguf` (or `llama_cpp.Llama(model_path=...)`)."]
    return "\n".join(lines) + "\n"


__all__ = ["ExportJob", "ExportRecipe", "GGUF_FILE", "export_markdown"]
