"""Batches of tokenized examples and the token-level loss both training and evaluation use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


class Tokenized(Protocol):
    """A tokenized example: ids and labels of one length, -100 where no loss is taken."""

    @property
    def input_ids(self) -> list[int]: ...

    @property
    def labels(self) -> list[int]: ...


def collate(
    examples: Sequence[Tokenized], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors; padding gets no attention and no loss."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def count_loss_tokens(examples: Sequence[Tokenized]) -> int:
    """Tokens that carry a loss (each label predicts the next token, so the first never does)."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)


def summed_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over the labelled tokens of a batch.

    A sum, not a mean, so gradient accumulation and evaluation can divide by the token
    count of the whole window and weigh every token the same. The output layer runs only
    on positions that carry a label: prompt and padding positions (most of a chat
    example) never pay for the (tokens x vocab) projection.
    """
    targets = batch["labels"][:, 1:]  # (batch, seq - 1)
    keep = targets != IGNORE_INDEX
    hidden = _final_hidden_states(model, batch)
    if hidden is None:  # a model without a separable decoder: project every position
        logits = model(**_model_inputs(batch)).logits
        selected = logits[:, :-1, :][keep]
    else:
        output_layer = cast(torch.nn.Module, model.get_output_embeddings())
        selected = output_layer(hidden[:, :-1, :][keep])  # (n_labelled, vocab)
    return F.cross_entropy(selected.float(), targets[keep], reduction="sum")


def _final_hidden_states(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is None or getattr(model, "get_output_embeddings", lambda: None)() is None:
        return None
    decoder = get_decoder()
    if decoder is None or decoder is model:
        return None
    out = decoder(**_model_inputs(batch))
    hidden: torch.Tensor = out.last_hidden_state  # (batch, seq, d_model), final norm applied
    return hidden


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments: ids, and the attention mask or the position ids.

    A packed batch (``training.packing``) has position ids and no mask. No cache: none is
    needed for one forward pass, and transformers only reads packed position ids as
    sequence boundaries when there is none.
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    for name in ("attention_mask", "position_ids"):
        if name in batch:
            inputs[name] = batch[name]
    return inputs
