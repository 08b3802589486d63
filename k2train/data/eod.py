"""Finding a tokenizer's end-of-document token, for every tokenizer kind: the `eos_token` that
tokenizer_config.json beside it names, else the first of the usual names present in its vocab."""

from __future__ import annotations

import json
from pathlib import Path

from k2train.data.errors import DataError

# The end-of-document token is looked up under these names when tokenizer_config.json beside the
# tokenizer.json does not name one (GPT-2/Qwen/Kimi, Llama 2, Llama 3, others).
EOD_TOKEN_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|im_end|>")


def configured_eos(config_path: Path) -> str | None:
    """The `eos_token` of an HF tokenizer_config.json, if the file exists and names one."""
    if not config_path.is_file():
        return None
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{config_path} is not a readable JSON object: {exc}.") from exc
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
