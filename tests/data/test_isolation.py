"""Document isolation on a tiny Llama: each packed document's logits and loss equal its own run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.chat import Document
from lmforge.data.packing import IGNORE_INDEX, PackedCollator, build_row, model_inputs


@pytest.fixture(scope="module")
def documents():
    generator = torch.Generator().manual_seed(0)
    lengths = [(17, 9), (31, 5)]
    rows = []
    for row_lengths in lengths:
        rows.append([Document(torch.randint(5, 300, (n,), generator=generator).tolist(), 1) for n in row_lengths])
    return rows


_MODELS: dict = {}


def load_model(tiny_llama_dir, attn_implementation):
    """Load the tiny Llama once per attention implementation."""
    from transformers import AutoModelForCausalLM

    key = (str(tiny_llama_dir), attn_implementation)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def summed_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["position_ids", "all_ones_mask", "4d", "padding_mask"])
def test_packed_documents_match_alone(tiny_llama_dir, documents, attn_implementation, variant):
    model = load_model(tiny_llama_dir, attn_implementation)
    batch = PackedCollator(pad_token_id=0, max_length=40)([build_row(docs) for docs in documents])
    if variant == "all_ones_mask":
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if variant == "padding_mask":
        # Zeros on the pad tail switch model_inputs to the explicit 4D mask.
        real_lengths = torch.tensor([[sum(len(d.input_ids) for d in docs)] for docs in documents])
        batch["attention_mask"] = (torch.arange(40)[None, :] < real_lengths).long()
    kwargs = model_inputs(batch, attn_implementation=attn_implementation, mask="4d" if variant == "4d" else "auto")
    if variant == "4d":
        expected_dtype = torch.bool if attn_implementation == "sdpa" else torch.float32
        assert kwargs["attention_mask"].dtype == expected_dtype
    with torch.no_grad():
        packed_logits = model(**kwargs).logits
        packed_loss = summed_loss(packed_logits, batch["labels"])

        expected_loss = torch.zeros(())
        for row_index, docs in enumerate(documents):
            start = 0
            for document in docs:
                ids = torch.tensor([document.input_ids])
                alone = model(input_ids=ids).logits[0]
                end = start + len(document.input_ids)
                diff = (packed_logits[row_index, start:end] - alone).abs().max().item()
                assert diff < 1e-4, f"row {row_index} document at {start}: max abs logit diff {diff}"
                labels = torch.tensor(build_row([document])["labels"])
                expected_loss += summed_loss(alone, labels)
                start = end
    assert torch.allclose(packed_loss, expected_loss, rtol=1e-5, atol=1e-4)


def test_all_ones_mask_passed_directly_leaks(tiny_llama_dir, documents):
    """The failure model_inputs prevents: a 2D all-ones mask disables packed-sequence detection."""
    model = load_model(tiny_llama_dir, "sdpa")
    row = build_row(documents[0])
    ids = torch.tensor([row["input_ids"]])
    position_ids = torch.tensor([row["position_ids"]])
    with torch.no_grad():
        leaked = model(input_ids=ids, position_ids=position_ids, attention_mask=torch.ones_like(ids),
                       use_cache=False).logits
        second = documents[0][1]
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
    start = len(documents[0][0].input_ids)
    assert (leaked[0, start:] - alone).abs().max().item() > 1e-3


def test_unpacked_batch_keeps_attention_mask():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 3]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0]]),
    }
    kwargs = model_inputs(batch)
    assert kwargs["attention_mask"] is batch["attention_mask"]
    assert kwargs["use_cache"] is False


def test_flash_inputs_flatten_with_cu_seqlens(documents):
    batch = PackedCollator(pad_token_id=0, max_length=40)([build_row(docs) for docs in documents])
    kwargs = model_inputs(batch, attn_implementation="flash_attention_2")
    assert kwargs["input_ids"].shape == (1, 80)
    assert torch.equal(kwargs["input_ids"][0], batch["input_ids"].reshape(-1))
    # Row 0: documents of 17 and 9 tokens, then 14 pad; row 1: 31 and 5, then 4 pad.
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 17, 26, 40, 71, 76, 80]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == 31
    assert "attention_mask" not in kwargs
