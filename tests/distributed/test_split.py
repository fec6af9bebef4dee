"""Stage splitting and pipeline options, in one process (no torch.distributed)."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models.split import layers_per_stage, split_llama
from lmforge.train.backends.pipeline import PipelineBackend, stage_to_rank_map

from .driver import collate, synthetic_rows


def test_layers_balanced_by_count():
    assert layers_per_stage(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert layers_per_stage(4, 4) == [range(i, i + 1) for i in range(4)]


def test_too_few_layers_rejected():
    with pytest.raises(LmforgeError, match="cannot split a model with 2 decoder layers into 4 pipeline stages"):
        layers_per_stage(2, 4)


def test_zbv_places_stages_in_v():
    placement = stage_to_rank_map("ZBVZeroBubble", 4)
    for rank in range(4):
        assert sorted(stage for stage, owner in placement.items() if owner == rank) == [rank, 7 - rank]


def test_other_schedules_placement():
    assert stage_to_rank_map("1F1B", 2) == {0: 0, 1: 1}
    assert stage_to_rank_map("GPipe", 3) == {0: 0, 1: 1, 2: 2}
    assert stage_to_rank_map("Interleaved1F1B", 2) == {0: 0, 1: 1, 2: 0, 3: 1}


def test_unknown_schedule_rejected():
    with pytest.raises(LmforgeError, match="unknown pipeline schedule 'Zigzag'"):
        PipelineBackend({"schedule": "Zigzag"})


def test_unknown_option_rejected():
    with pytest.raises(LmforgeError, match="unknown backend_options for backend 'pipeline': microbatches"):
        PipelineBackend({"microbatches": 4})


def test_uneven_microbatches_rejected():
    backend = PipelineBackend({"schedule": "1F1B", "n_microbatches": 4})
    backend.n_microbatches = 4
    batch = collate(synthetic_rows(6, 16, 300))

    with pytest.raises(LmforgeError, match="a batch of 6 rows does not split into backend_options.n_microbatches=4"):
        backend._stage_inputs(batch, train=True)


def test_stage_chain_matches_full_model(tiny_llama4_dir):
    from transformers import AutoModelForCausalLM

    from lmforge.train.loss import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama4_dir, dtype=torch.float32)
    batch = collate(synthetic_rows(3, 32, model.config.vocab_size))
    expected, _ = CausalLMLoss(model, chunk_size=0)(batch)

    stages = split_llama(model, [0, 1, 2, 3], 4)
    assert [len(stage.model.layers) for stage in stages] == [1, 1, 1, 1]
    assert stages[3].lm_head.weight is stages[0].model.embed_tokens.weight
    hidden = batch["input_ids"]
    for stage in stages:
        hidden = stage(hidden, position_ids=batch["position_ids"], labels=batch["labels"])

    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=0)
