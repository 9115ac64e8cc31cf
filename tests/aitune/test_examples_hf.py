"""The Hugging Face example architectures (the optional ``hf`` extra): built from configs, random
weights, plain tensors out; skipped where ``transformers`` is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from aitune import examples_hf

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (the optional 'hf' extra)")


@needs_transformers
@pytest.mark.parametrize("make, x", [
    (lambda: examples_hf.bert(layers=1, hidden=32, heads=2, vocab=100), torch.randint(0, 100, (2, 8))),
    (lambda: examples_hf.distilbert(layers=1, hidden=32, heads=2, vocab=100), torch.randint(0, 100, (2, 8))),
    (lambda: examples_hf.gpt2(layers=1, hidden=32, heads=2, vocab=100), torch.randint(0, 100, (2, 8))),
    (lambda: examples_hf.vit(layers=1, hidden=32, heads=2, image=16, patch=8), torch.randn(2, 3, 16, 16)),
], ids=["bert", "distilbert", "gpt2", "vit"])
def test_each_builds_from_its_config_and_is_deterministic_by_seed(make, x):
    a, b = make(), make()
    assert not a.training
    with torch.inference_mode():
        out_a, out_b = a(x), b(x)
    assert out_a.last_hidden_state.shape[0] == 2
    torch.testing.assert_close(out_a.last_hidden_state, out_b.last_hidden_state)  # same seed, same weights
    assert getattr(out_a, "past_key_values", None) is None  # no cache: plain tensors out


def test_without_transformers_the_error_says_which_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"\.\[hf\]"):
        examples_hf.bert()
