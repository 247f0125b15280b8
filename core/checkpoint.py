"""Writing model directories and run files so a reader never sees half of one.

Everything is written into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .reference import REFERENCE_ADAPTER


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_model_dir(
    accelerator: Any, model: Any, tokenizer: Any, target: Path, state: dict[str, Any] | None = None
) -> None:
    """Save model (safetensors) and tokenizer to ``target`` atomically; every process calls it."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        adapters = {}
        if hasattr(unwrapped, "peft_config"):  # adapter-only, without the frozen reference one
            names = [n for n in unwrapped.peft_config if n != REFERENCE_ADAPTER]
            adapters = {"selected_adapters": names}
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **adapters)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            write_json(tmp / "trainer_state.json", state)
        replace_dir(tmp, target)
    accelerator.wait_for_everyone()


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory into place, replacing ``target`` if it exists."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
