"""A tiny randomly initialised Llama with a small byte-level BPE tokenizer that
knows the chat markers: fast enough for every test, same code paths as SmolLM2."""

import json
from pathlib import Path

TINY_NAME = "tiny-llama"
SEED_FILE = Path(__file__).resolve().parent.parent / "finetuning" / "seed" / "examples.jsonl"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus():
    from finetuning.prompts import product_prompt

    for line in SEED_FILE.read_text().splitlines()[:60]:
        row = json.loads(line)
        yield product_prompt(row["attributes"]) + row["description"]


def tiny_checkpoint_build(directory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return Path(directory)
