"""Megatron's document-aware rows (model.data.eod_mask_loss, reset_position_ids, reset_attention_mask): the masks
equal Megatron's get_ltor_masks_and_position_ids, and with both resets a document packed after another gets the
hidden states it has alone."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.gpt_dataset import DocumentMasks
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

EOD = 0


def megatron_reference(tokens: np.ndarray):
    """Megatron's loop, written out: masks of the inputs tokens[:-1]."""
    data = tokens[:-1]
    T = len(data)
    loss_mask = np.ones(T, dtype=np.int64)
    loss_mask[data == EOD] = 0
    position_ids = np.arange(T)
    attention = np.tril(np.ones((T, T), dtype=bool))
    prev = 0
    for i in np.flatnonzero(data == EOD):
        attention[i + 1:, :i + 1] = False
        position_ids[i + 1:] -= i + 1 - prev
        prev = i + 1
    return loss_mask, position_ids, attention


def test_masks_equal_megatrons():
    rng = np.random.default_rng(0)
    for _ in range(50):
        tokens = rng.integers(0, 4, size=rng.integers(2, 40))  # many end-of-document tokens (id 0)
        row = DocumentMasks([tokens], EOD, True, True, True)[0]
        loss_mask, positions, attention = megatron_reference(tokens)
        np.testing.assert_array_equal(row["loss_mask"][1:], loss_mask)
        np.testing.assert_array_equal(row["positions"][:-1], positions)
        seg = row["segment_ids"][:-1]
        ours = (seg[:, None] == seg[None, :]) & np.tril(np.ones((len(seg), len(seg)), dtype=bool))
        np.testing.assert_array_equal(ours, attention)
    plain = DocumentMasks([np.array([3, 0, 4])], EOD, eod_mask_loss=True)[0]
    assert set(plain) == {"tokens", "loss_mask"}  # only what is asked for


def test_a_packed_document_sees_only_itself():
    cfg = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, max_position_embeddings=64, normalization="rmsnorm", activation="swiglu",
                      bias=False, position_embedding_type="rope")
    model = Transformer(cfg)
    model.init_weights(seed=1)
    first, second = [5, 6, 7, 8, EOD], [9, 10, 11, 12, 13, 14]
    row = DocumentMasks([np.array(first + second + [1])], EOD, reset_position_ids=True, reset_attention_mask=True)[0]
    t = {k: torch.from_numpy(v)[None, :-1] for k, v in row.items()}
    with torch.no_grad():
        packed = model.hidden_states(t["tokens"], positions=t["positions"], segment_ids=t["segment_ids"])
        alone = model.hidden_states(torch.tensor([second]))
        unmasked = model.hidden_states(t["tokens"])
    torch.testing.assert_close(packed[0, len(first):], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[0, len(first):], alone[0], atol=1e-3)  # without the flags it differs
