"""The hooks an align plugin can implement.

Every hook is prefixed ``align_``. A plugin module implements any subset of them with the
``@align.hookimpl`` decorator, and an implementation may accept any subset of a hook's
arguments, so the core can add arguments without breaking plugins.

Calling order:

1. ``align_register_formats``, ``align_register_objectives``, ``align_register_sections``,
   ``align_register_rewards`` and ``align_register_generators`` once, when plugins load.
2. ``align_prepare_model`` once per run, after the model is loaded (every plugin may take part).
3. ``align_prepare_dataset`` once per data split, after the core has tokenised the records
   (only the plugin that registered the selected objective is asked).
4. ``align_build_batch`` for every micro-batch (only the registering plugin).
   For an on-policy objective (``Objective(sampling=…)``) the batch is of prompts: the core
   samples completions, scores them with the reward functions and builds a rollout batch, and
   ``align_prepare_rollouts`` gets the step's rollout batches once per round of sampling.
5. ``align_loss_counts`` for every micro-batch of an optimizer step, before any forward
   (only the registering plugin).
6. ``align_compute_loss`` for every micro-batch (only the registering plugin).
7. ``align_metrics`` for every micro-batch (every plugin may contribute).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("align")


@hookspec
def align_register_objectives(register):
    """Register objectives: call ``register(align.Objective(...))`` once for each."""


@hookspec
def align_register_formats(register):
    """Register data formats: call ``register(align.DataFormat(...))`` once for each. The
    format then feeds every objective, of any plugin, that trains on its ``shape``."""


@hookspec
def align_register_sections(register):
    """Register a model-preparation plugin's config section: ``register(align.Section(...))``."""


@hookspec
def align_register_rewards(register):
    """Register reward functions: ``register(align.Reward(...))`` once for each; ``--reward
    NAME`` picks them for an on-policy objective."""


@hookspec
def align_register_generators(register):
    """Register generation backends: ``register(align.Generator(...))``; ``--generator NAME``
    picks one (default ``transformers``)."""


@hookspec
def align_prepare_model(model, tokenizer, config, sections):
    """Modify or wrap the loaded model before training; return the new model, or None to keep it.

    ``sections`` maps each registered section name to its validated options.
    """


@hookspec(firstresult=True)
def align_prepare_dataset(objective, examples, options, split, config):
    """Return new tokenised examples for ``split`` ("train" or "eval"), or None.

    ``examples`` is an ``align.Examples``: memory-mapped, read-only views (``examples[i]`` is a
    new dict each time). Add keys with ``examples.derive(add, lengths)``, computed when an
    example is read, or return a list (held in memory). ``config`` is the run's core
    configuration (``seed``, ``max_length``, ``truncation``, …). Runs once per split, so
    per-example choices made here (KTO's mismatched partners) stay fixed for the whole run,
    independent of batching and process count.
    """


@hookspec(firstresult=True)
def align_build_batch(objective, examples, tokenizer, options, config, packed):
    """Turn a list of tokenised examples into a dict of tensors, or None for the core's default.

    ``packed`` is True when the run hands the loss padding-free batches (the objective is
    ``packable`` and ``padding_free`` is on): build them with ``align.packing.pack`` (or
    ``pack_in_order``), or return a padded batch, which ``align.forward_logps`` reads as well.
    The core adds the objective's extra fields (``Objective(fields=…)``) to the batch after.
    """


@hookspec(firstresult=True)
def align_prepare_rollouts(objective, model, batches, options, reference, run):
    """On-policy objectives: every rollout batch of one round of sampling on this process (the
    step's micro-batches, a list), before any of them is trained on; return the list, changed
    (GRPO adds its advantages, online DPO orders each pair), or None to keep it. It also runs
    for every evaluation round (``--eval-data`` with an on-policy objective), on the eval
    prompts' rollouts, one micro-batch at a time, which are scored but not trained on:
    ``run.training`` is False then, and the model is in eval mode.

    ``model`` is the policy as the loss gets it (compute old log-probs with it under
    ``torch.no_grad()``); ``run.accelerator.gather`` collects a tensor from every process, for
    statistics over the whole round. A round may be trained on for several optimizer steps
    (``Sampling.reuse``).
    """


@hookspec(firstresult=True)
def align_loss_counts(objective, batch, examples, options, config):
    """The number of loss units of each term in ``batch``, before its forward: a dict
    ``term -> count`` (ints or tensors), the counts ``align_compute_loss`` will return for it.

    ``examples`` are the micro-batch's examples: records' groups (a pair of a preference batch
    is one), and for a rollout batch of an on-policy objective its *prompts* (each with
    ``num_generations`` completion rows in ``batch``). Not implemented: one term, ``loss``,
    counting the examples. The core totals each term over the step's micro-batches and all
    processes once, and scales each micro-batch's loss by those totals before its backward, so
    gradient accumulation and N processes equal one large batch with any engine that owns the
    backward.
    """


@hookspec(firstresult=True)
def align_compute_loss(objective, model, batch, options, reference, run, teacher):
    """Compute the loss of one micro-batch and return an ``align.LossOutput``.

    ``loss`` is the *sum* of the objective's loss units (tokens, sequences, pairs) and ``count``
    their number, or ``terms`` holds several such ``(sum, count)`` pairs; the core divides each
    by its total count over all micro-batches of the optimizer step and all processes
    (``align_loss_counts``), so gradient accumulation equals one large batch. ``reference`` gives
    reference log-probs when the objective declared ``needs_reference``, else it is None.
    ``teacher`` is the run's frozen teacher (an ``align.Teacher``: ``teacher.model``, in eval
    mode without gradients, on ``teacher.device``; ``teacher.hidden(batch)`` its hidden states
    at the batch's trained positions) when the objective declared ``needs_teacher``, else None.
    """


@hookspec
def align_metrics(objective, model, batch, output, options):
    """Contribute metrics for one micro-batch: a dict ``name -> (sum, count)``.

    The core reports ``Σ sum / Σ count`` over the micro-batches since the last log and all
    processes, so token means and uneven class counts are reduced correctly.
    """
