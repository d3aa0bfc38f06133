"""The end-to-end run's model: a tiny Qwen3-MoE that SGLang serves and verl trains, with a tokenizer.

Why not a preset as is:

* SGLang 0.5.17's fallback rotary path needs ``head_dim`` 64 or 128 (the tiny presets use 16);
* verl's agent loop renders chat messages with the checkpoint's tokenizer, and
  ``skip_tokenizer_init=False`` (see ``trainer_bridge.verl.sglang_compat``) makes SGLang
  load it too, so the checkpoint ships one; nothing can be downloaded;
* the weights are unit-scale (``recipes.demo_model.unit_scale_``) so outputs depend on
  which experts a token visits, and rollout/trainer routing flips show in the logprobs.

The tokenizer is byte-level (every byte one token, no merges) with ChatML's
``<|im_start|>``/``<|im_end|>``: verl picks its Qwen token builder for ``qwen3_moe``,
which needs ``<|im_end|>`` and a one-token ``"\\n"``. The vocabulary is padded with
reserved tokens up to the model's ``vocab_size`` so every id the model can sample decodes.

Usage: ``python3 bench/verl_e2e/model.py --out DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rollout.atomic import atomic_dir  # noqa: E402

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
BYTE_TOKENS = 256
VOCAB_SIZE = 320  # 256 bytes + ChatML specials + reserved, a multiple of 64
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODEL_CONFIG = dict(
    model_type="qwen3_moe", num_hidden_layers=4, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=VOCAB_SIZE, max_position_embeddings=2048,
    rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Byte-level tokenizer with ChatML specials, as a transformers fast tokenizer (files only, nothing fetched)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    if len(byte_chars) != BYTE_TOKENS:
        raise ValueError(f"byte-level alphabet has {len(byte_chars)} symbols, expected {BYTE_TOKENS}")
    reserved = vocab_size - BYTE_TOKENS - len(SPECIAL_TOKENS)
    if reserved < 0:
        raise ValueError(f"vocab_size {vocab_size} is below {BYTE_TOKENS + len(SPECIAL_TOKENS)} (bytes + specials)")
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS, *(f"<|reserved_{i}|>" for i in range(reserved))]
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=IM_END, bos_token=None, unk_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer


def make_model(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write config, unit-scale bf16 weights, generation config and tokenizer to ``out``, atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes.demo_model import unit_scale_

    tokenizer = build_tokenizer()
    kwargs = dict(MODEL_CONFIG)
    config = AutoConfig.for_model(
        kwargs.pop("model_type"),
        **kwargs,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    unit_scale_(model, seed)
    model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from rollout.moe_spec import MoESpec

    path = make_model(args.out, args.seed)
    spec, config = MoESpec.from_pretrained(path), json.loads((path / "config.json").read_text())
    print(f"wrote {path}: {spec.num_hidden_layers} layers, {spec.num_experts} experts top-{spec.top_k}, "
          f"head_dim {config['head_dim']}, vocab {config['vocab_size']}")


if __name__ == "__main__":
    main()
