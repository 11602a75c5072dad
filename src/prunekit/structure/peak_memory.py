"""Peak inference memory of one model, measured in a fresh process.

The process that loaded, pruned and fine-tuned a model keeps most of the memory it ever used (the
allocator does not hand it back), so its resident size says nothing about the smaller model. Here
the model and one input batch are pickled to a temporary file; a new Python process loads them,
records its resident size with the model loaded (the baseline), resets the kernel's high-water
mark of resident memory (``/proc/self/clear_refs``), runs the forward passes under
``torch.inference_mode`` and reads the high-water mark back. Where the reset is not available
(not Linux) a thread samples the resident size instead, and the result says which was used.

``python -m prunekit.structure.peak_memory PAYLOAD OUT`` is the child's entry point.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError

HIGH_WATER_MARK = "kernel high-water mark (VmHWM) reset after loading"
SAMPLED = "resident size sampled every 5 ms"


@dataclass
class PeakMemory:
    batch: int
    loaded_rss_bytes: int  # the fresh process with the model and the batch loaded, before any forward
    peak_rss_bytes: int  # its highest resident size while the forward passes ran
    method: str
    runs: int

    @property
    def inference_bytes(self) -> int:
        """What running the model adds on top of holding it: activations, workspaces, thread pools."""
        return max(self.peak_rss_bytes - self.loaded_rss_bytes, 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "inference_bytes": self.inference_bytes}


def describe(batch: int, runs: int) -> str:
    return (f"each model is pickled and loaded in a fresh Python process; 'peak' is that process's highest resident "
            f"size (interpreter, libraries, weights and activations) while it runs {runs} forward passes at batch "
            f"{batch}; 'inference' is the peak minus its resident size with the model loaded, before the first pass")


def inference_peak(model: nn.Module, inputs: tuple | dict, batch: int, threads: int | None = None, runs: int = 2,
                   timeout: float = 900.0) -> PeakMemory:
    """Peak resident memory of a fresh process that loads ``model`` and runs it on ``inputs``."""
    with tempfile.TemporaryDirectory(prefix="prunekit-memory-") as tmp:
        payload, out = Path(tmp) / "payload.pt", Path(tmp) / "result.json"
        try:
            torch.save({"model": model, "inputs": inputs, "threads": threads, "runs": runs}, payload)
        except Exception as exc:  # pickling fails on models holding lambdas, open files, ...
            raise PrunekitError(f"cannot measure peak memory: the model does not pickle ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        try:
            done = subprocess.run([sys.executable, "-m", "prunekit.structure.peak_memory", str(payload), str(out)],
                                  capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            raise PrunekitError(f"measuring peak memory in a fresh process took over {timeout:.0f} s") from None
        if done.returncode != 0 or not out.exists():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise PrunekitError("measuring peak memory in a fresh process failed: "
                                + (lines[-1] if lines else f"exit code {done.returncode}"))
        result = json.loads(out.read_text())
    return PeakMemory(batch, result["loaded"], result["peak"], result["method"], runs)


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    # Writing 5 takes the high-water mark down to the current resident size (Linux 4.0 and later).
    return _status("VmHWM") is not None


def _child(payload_path: str, out_path: str) -> None:
    import psutil

    from prunekit.evaluate.resources import Measured

    payload = torch.load(payload_path, weights_only=False)
    model, inputs, runs = payload["model"], payload["inputs"], payload["runs"]
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    model.eval()
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), dict(inputs))
    del payload
    gc.collect()
    loaded = psutil.Process().memory_info().rss
    exact = _reset_high_water_mark()
    with Measured(interval=0.005) as sampled, torch.inference_mode():
        for _ in range(runs):
            model(*args, **kwargs)
    peak = _status("VmHWM") if exact else None
    result = {"loaded": loaded, "peak": peak if peak is not None else sampled.peak_rss,
              "method": HIGH_WATER_MARK if peak is not None else SAMPLED}
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
