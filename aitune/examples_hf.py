"""Real Hugging Face architectures built from a config, with random weights (nothing is downloaded).

For trying the tuner on the models users bring, and for ``benchmarks/decisions.py``. Needs the
optional ``transformers`` package (the ``hf`` extra: ``pip install -e '.[hf]'``); it is imported only when one of
these is called. The sizes default to small members of each family so that a 2-core machine tunes
them in minutes; pass the base sizes (e.g. ``layers=12, hidden=768``) for the real thing.

Each takes ``seed`` (the weights) and returns the model in eval mode, its outputs plain tensors in
a ``ModelOutput`` (no key/value cache).
"""

from __future__ import annotations

from typing import Any

import torch


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # an optional extra: say how to get it
        raise ImportError("these example models need the optional 'transformers' package: "
                          "pip install -e '.[hf]' (or pip install transformers)") from exc
    return transformers


def _made(model_class: Any, config: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config.return_dict = True
    model = model_class(config)
    return model.eval()


def bert(layers: int = 4, hidden: int = 256, heads: int = 4, vocab: int = 30522, seed: int = 0) -> torch.nn.Module:
    """BERT (``BertModel``); input: ``input_ids`` [seq] int64."""
    t = _transformers()
    config = t.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=4 * hidden, max_position_embeddings=512)
    return _made(t.BertModel, config, seed)


def distilbert(layers: int = 3, hidden: int = 256, heads: int = 4, vocab: int = 30522, seed: int = 0) -> torch.nn.Module:
    """DistilBERT (``DistilBertModel``); input: ``input_ids`` [seq] int64."""
    t = _transformers()
    config = t.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden)
    return _made(t.DistilBertModel, config, seed)


def gpt2(layers: int = 4, hidden: int = 256, heads: int = 4, vocab: int = 50257, seed: int = 0) -> torch.nn.Module:
    """GPT-2 (``GPT2Model``, no key/value cache); input: ``input_ids`` [seq] int64."""
    t = _transformers()
    config = t.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                          use_cache=False)
    return _made(t.GPT2Model, config, seed)


def vit(layers: int = 4, hidden: int = 192, heads: int = 3, image: int = 64, patch: int = 8, seed: int = 0) -> torch.nn.Module:
    """ViT (``ViTModel``); input: ``pixel_values`` [3, image, image] float32."""
    t = _transformers()
    config = t.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, image_size=image, patch_size=patch)
    return _made(t.ViTModel, config, seed)
