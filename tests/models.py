"""Tiny random models of the architectures we support, built from configs (ms each)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 128


def tiny_llama(layers: int = 4, seed: int = 0, tie: bool = True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_mistral(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2)
    return MistralForCausalLM(cfg).eval()


def tiny_opt(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=128)
    return OPTForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral, "opt": tiny_opt, "gpt2": tiny_gpt2}


def fresh_copy(model):
    """The same weights in a new instance (what a user reloads the base model as)."""
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def token_batches(n: int = 4, batch: int = 4, seq: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def char_tokenizer():
    """A character-level fast tokenizer built offline (printable ASCII and newline, ids < VOCAB), for tests
    that need text in and out of the tiny models: every character is one token, no special token is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<unk>", "<s>", "</s>", "\n"] + [chr(i) for i in range(32, 127)]
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
