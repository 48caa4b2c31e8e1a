"""Shared fixtures: tiny models and tasks, small enough that the whole suite runs in minutes."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from poslens.cli import main
from poslens.tasks import Addition
from poslens.variants import train, variant_config

# Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads slow them down 10-100×.
torch.set_num_threads(1)

TINY_SIZES = {"d_model": 32, "d_head": 8, "d_mlp": 64}


@pytest.fixture(scope="session")
def tiny_sizes() -> dict[str, int]:
    """The width of every tiny test model."""
    return dict(TINY_SIZES)


@pytest.fixture(scope="session")
def tiny():
    """`tiny(name, **overrides)`: a 2-block config of that variant for the addition task."""

    def make(name: str, **overrides):
        return variant_config(name, task=Addition(), **{**TINY_SIZES, "n_layers": 2, **overrides})

    return make


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*argv)`: `poslens ARGV...` in process, returning (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture(scope="session")
def addition() -> Addition:
    return Addition()


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, addition, tiny):
    """Briefly trained tiny models (weights far from their initialisation) for invariance checks."""
    runs = {}
    for name, layers in (("nope-bidirectional", 2), ("nope-causal", 1), ("nope-causal", 2), ("learned-causal", 2)):
        out = tmp_path_factory.mktemp(f"{name}-{layers}")
        train(tiny(name, n_layers=layers), addition, out_dir=out, steps=60, batch_size=64, lr=1e-2,
              warmup_steps=5, eval_every=60, quiet=True)
        runs[(name, layers)] = out
    return runs


# Tiny Hugging Face models for the TransformerBridge tests: built locally, never downloaded. -------------------------

HF_WORDS = ["<unk>", "<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(92)]  # 96 tokens: d_vocab != d_model
HF_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 64, "vocab_size": len(HF_WORDS), "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 3}
HF_KINDS = ("gpt2", "neox-parallel", "neox-sequential", "llama", "smollm3")


@pytest.fixture(scope="session")
def word_tokenizer():
    """`word_tokenizer(**kwargs)`: a WordLevel tokenizer over `HF_WORDS` (whitespace-split words `w0`..`w91`),
    built in memory; `kwargs` go to `PreTrainedTokenizerFast` (e.g. `name_or_path`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def make(**kwargs):
        backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(HF_WORDS)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>", unk_token="<unk>", **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_hf():
    """`tiny_hf(kind, seed=1)`: a random 2-layer, d_model-32 Hugging Face causal LM in eval mode, its config
    built in code (so without `architectures`): `gpt2` (learned PE), `neox-parallel` / `neox-sequential`
    (rotary; Pythia's parallel residual or not), `llama` (rotary, grouped-query), `smollm3` (rotary in
    layer 0, none in layer 1)."""
    import transformers

    def make(kind: str, seed: int = 1):
        configs = {
            "gpt2": lambda: transformers.GPT2Config(
                n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=len(HF_WORDS), bos_token_id=1,
                eos_token_id=2),
            "neox-parallel": lambda: transformers.GPTNeoXConfig(**HF_SIZES, use_parallel_residual=True),
            "neox-sequential": lambda: transformers.GPTNeoXConfig(**HF_SIZES, use_parallel_residual=False),
            "llama": lambda: transformers.LlamaConfig(**HF_SIZES, num_key_value_heads=2),
            "smollm3": lambda: transformers.SmolLM3Config(**HF_SIZES, num_key_value_heads=2, no_rope_layers=[1, 0]),
        }
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(configs[kind]()).eval()

    return make


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails at once, loudly (and the hub client is in offline mode)."""
    import socket

    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to reach the network")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
