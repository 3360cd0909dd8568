"""A stand-in for a real chat model, built locally: a byte-level BPE tokenizer trained here (no BOS; the agent's
closing tags span several tokens; a chat template modelled on Qwen2.5's) and a small Qwen2-architecture model with
random weights, optionally taught the Search-R1 turn format in a few supervised steps so that it searches."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from arborl.components.config import WarmstartConfig
from arborl.components.envs.protocol import SEARCH_R1_TEMPLATE, TAGS
from arborl.components.training.models import row_prompt_ids
from arborl.components.training.warmstart import supervised_train

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def bpe_tokenizer(texts: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (keep the protocol tags out of them, so that a tag stays several
    tokens), with Qwen2.5's special tokens: EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    untagged = SEARCH_R1_TEMPLATE
    for tag in TAGS:
        untagged = untagged.replace(tag, " ")
    core.train_from_iterator([*texts, untagged], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qwen2_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 64, layers: int = 2
                ) -> Qwen2ForCausalLM:
    """A Qwen2-architecture causal LM with random weights (grouped-query attention, q/k/v biases)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def teach_search_format(model, tokenizer, rows: list[dict], steps: int = 100, seed: int = 0) -> None:
    """A few supervised steps on turns `<search> question </search>` then `<answer> truth </answer>`, so that the
    random model emits the tags (spelled across several tokens) and the agent loop searches. `rows`: prompts
    artifact rows (`messages` or `prompt`, `ground_truth`)."""
    rng = random.Random(seed)
    demos = []
    for row in rows:
        ids = row_prompt_ids(tokenizer, row)
        trainable = [False] * len(ids)
        query = " ".join(row["prompt"].split()[-6:])
        for text, learn in ((f"<search> {query} </search>", True), ("\n\n<information>Doc 1(Title: x) y\n"
                                                                     "</information>\n\n", False),
                            (f"<answer> {rng.choice(list(row['ground_truth']))} </answer>", True)):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids, trainable = ids + piece, trainable + [learn] * len(piece)
        ids.append(tokenizer.eos_token_id)
        trainable.append(True)
        demos.append((ids, trainable))
    cfg = WarmstartConfig(steps=steps, batch_size=8, lr=1e-2)
    supervised_train(model, demos, cfg, tokenizer.pad_token_id, seed)
    model.eval()


def save_model_dir(model, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """A Hugging Face model directory (safetensors, tokenizer files with the chat template)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
