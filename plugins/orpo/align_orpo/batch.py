"""The padded ``[chosen; rejected]`` batch for ``nll_on_prompt``: two masks for two jobs.

The core trains the tokens that ``completion_mask`` marks, counts them
(``align.sequence_token_counts``) and returns their log-probs (``align.forward_logps``). With
``nll_on_prompt`` the NLL covers every chosen token after the first, prompt included, while the
odds still use the mean over the completion alone. So in this batch:

- ``completion_mask``: chosen rows mark every real token (the attention mask; position 0 is never
  a target); rejected rows keep their completion mask. The core's log-probs and counts then cover
  exactly the NLL's tokens.
- ``odds_mask``: every row's real completion mask, for the mean log-probs inside the odds.

The batch is padded even when the run asks for padding-free batches: a packed batch shares each
pair's prompt between chosen and rejected and trains the prompt of neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import align

ODDS_MASK = "odds_mask"


def prompt_nll_batch(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """``align.paired_batch`` with the chosen rows' prompts trained, and ``odds_mask``."""
    batch = align.paired_batch(examples, pad_token_id)
    batch[ODDS_MASK] = batch["completion_mask"].clone()
    pairs = len(examples)
    batch["completion_mask"][:pairs] = batch["attention_mask"][:pairs]
    return batch
