"""A tiny random Llama with a real BPE tokenizer, for tests and smoke runs.

The model has random weights and a 2-layer Llama architecture. The tokenizer is a
byte-level BPE trained in a fraction of a second on a built-in English text, and
being byte-level it encodes any string. With `chat_tokens=True` the tokenizer carries the
ChatML tokens `<|im_start|>`, `<|im_end|>` and `<|pad|>` and the ChatML chat
template, like a model after `lmforge convert --add-tokens chatml`.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE_PATH = Path(__file__).resolve().parents[3] / "chat_templates" / "chatml.jinja"

# Fallback when the package is installed without the repository's chat_templates/.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "<|im_start|>assistant\n"
    "{% endif -%}\n"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A language model predicts the next token.
You are a helpful assistant, who always provides explanation. Think step by step.
Question: What is the capital of France? Answer: The capital of France is Paris.
Write a short summary of the following text. Translate the sentence into German.
Lena has 24 apples. She gives a third of them to her brother and eats 2 herself.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\
system user assistant response question options premise hypothesis sentiment positive negative
"""


def build_tiny_tokenizer(chat_tokens: bool = True, vocab_size: int = 384):
    """Train and return a byte-level BPE `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>"]
    if chat_tokens:
        special += ["<|im_start|>", "<|im_end|>", "<|pad|>"]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>" if chat_tokens else "<|endoftext|>",
        pad_token="<|pad|>" if chat_tokens else None,
        additional_special_tokens=special[1:] if chat_tokens else None,
    )
    if chat_tokens:
        template_text = CHATML_TEMPLATE_PATH.read_text() if CHATML_TEMPLATE_PATH.exists() else CHATML_TEMPLATE
        fast.chat_template = template_text
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    chat_tokens: bool = True,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """Save a tiny random Llama model directory in Hugging Face layout and return its path.

    With the default `initializer_range` the random model's next-token distribution
    is close to uniform. A larger value such as 0.5 gives peaked logits, like a
    trained model's.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(chat_tokens=chat_tokens)
    eos_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if chat_tokens else []
    eos_ids.append(tokenizer.convert_tokens_to_ids("<|endoftext|>"))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
