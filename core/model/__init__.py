"""The model: loading (``loading``), token log-probs (``logprobs``), dropout and eval mode
(``dropout``) and whether it scores packed batches (``probe``)."""
