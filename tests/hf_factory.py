"""Hugging Face ``CLIPModel`` folders built with transformers itself, offline (PLIP's layout).

The tokenizer is OpenAI CLIP's BPE, rebuilt from the merges file open_clip ships, converted
by transformers to its fast tokenizer and saved into the folder as ``tokenizer.json``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
import transformers

#: A tiny gelu CLIP (the contract tests' hf_clip).
TINY_VISION = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3,
               "image_size": 32, "patch_size": 8}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
             "max_position_embeddings": 77, "vocab_size": 49408}


def _write_clip_bpe(folder: Path) -> None:
    """OpenAI CLIP's vocab.json / merges.txt from the BPE merges open_clip ships (CLIP's construction)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:48895]  # CLIP keeps 49152 - 256 - 2 merges after the header line
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def clip_tokenizer(folder: Path) -> transformers.CLIPTokenizerFast:
    """transformers' fast CLIP tokenizer, converted from the OpenAI BPE written into ``folder`` (no download)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_clip_bpe(folder)
    return transformers.CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """LayerNorms and biases initialise to 1 / 0, which would hide mistakes in their mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(3.3)


def make_clip_folder(folder: Path, tokenizer: transformers.CLIPTokenizerFast, vision: dict, text: dict, act: str,
                     seed: int, projection: int = 32, formats: tuple[bool, ...] = (True,),
                     mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
    """A CLIPModel folder as transformers writes it (weights, config, tokenizer, preprocessor); returns the model.

    ``formats``: ``True`` writes ``model.safetensors``, ``False`` ``pytorch_model.bin``.
    """
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config={**text, "hidden_act": act},
                                  vision_config={**vision, "hidden_act": act}, projection_dim=projection)
    model = transformers.CLIPModel(cfg).eval()
    _randomise(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for safe in formats:
        model.save_pretrained(folder, safe_serialization=safe)
    tokenizer.save_pretrained(folder)
    if mean is not None and std is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    return model


__all__ = ["TINY_TEXT", "TINY_VISION", "clip_tokenizer", "make_clip_folder"]
