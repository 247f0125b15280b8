"""On-policy objectives: completions sampled from the policy (``generate``), scored by reward
functions (``rewards``), laid out as rollout batches (``batch``), one round per optimizer step
or per ``Sampling.reuse`` steps (``engine``)."""
