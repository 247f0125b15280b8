"""The selected objective's hooks, bound to the plugin that registered it."""

from __future__ import annotations

from typing import Any

from ..data.fields import collate, column_names, merged_fields
from ..data.formats import default_batch
from ..data.store import Examples, ListExamples
from ..errors import PluginError
from .api import DataFormat, LossOutput
from .registry import PluginRegistry


class ObjectiveHooks:
    """Calls ``align_prepare_dataset``, ``align_build_batch``, ``align_loss_counts`` and
    ``align_compute_loss`` on the registering plugin only, and ``align_metrics`` on every
    plugin."""

    def __init__(self, registry: PluginRegistry, spec: Any, tokenizer: Any) -> None:
        self.registry, self.registered = registry, spec.objective
        self.objective, self.options, self.tokenizer = spec.objective.item, spec.options, tokenizer
        self.config = spec.config
        # The batch is the shape's: any format of the objective's shapes gives the same one.
        self.data_format = registry.data_format(self.objective)
        self.format_name = spec.config.format
        self.format_given = spec.named("format")  # --format, or format (run.yaml)
        rewards = getattr(spec, "rewards", [])
        self.fields = merged_fields([self.objective.fields, *(c.reward.fields for c in rewards)])
        fields = self.fields
        self.field_names = column_names(fields) if fields is not None else []
        self.packed = self.objective.packable and spec.config.padding_free
        self.teacher: Any = None  # the run's teacher (``--teacher``), handed to the loss

    def format_for(self, source: Any, streaming: bool = False) -> tuple[DataFormat, str, str]:
        """The data format that reads ``source`` (an ``align.data.sources.DataSource``): the
        source's own ``format`` (a mixture's YAML), ``--format``, or detected from its first
        record's columns. Returns the format, its origin (plugin and version, part of the data
        cache's key) and how it was chosen, for the report."""
        from ..data.fields import reserved_problem

        name = source.format or self.format_name
        given = f"data source {source.label}: format" if source.format else self.format_given
        columns = None if name else source.column_names(streaming)
        registered, also = self.registry.choose_format(
            self.objective, name, columns, source.label, given
        )
        fmt, origin = registered.item, registered.plugin
        for field in self.field_names:
            problem = reserved_problem(field, fmt.columns, fmt.name)
            if problem:
                raise PluginError(f"objective {self.objective.name!r}: {problem}")
        if name:
            chosen = f"{fmt.name} ({'the source' if source.format else self.format_given})"
        else:
            chosen = f"{fmt.name} (detected from its columns)"
            if also:
                chosen = (
                    f"{fmt.name} (detected from its columns; they also fit "
                    f"{', '.join(also)}: pick one with --format)"
                )
        return fmt, f"{origin.label} {origin.version}", chosen

    def _call(self, hook: str, **kwargs: Any) -> Any:
        return self.registry.call_objective_hook(
            hook, self.registered, objective=self.objective, options=self.options, **kwargs
        )

    def prepare_dataset(self, examples: Any, split: str, config: Any) -> Examples:
        """The split's examples as the objective's ``align_prepare_dataset`` leaves them: an
        ``align.Examples`` (a list the hook gets or returns is wrapped in one)."""
        if isinstance(examples, list):
            examples = ListExamples(examples)
        prepared = self._call(
            "align_prepare_dataset", examples=examples, split=split, config=config
        )
        if prepared is None:
            return examples
        if isinstance(prepared, list):
            return ListExamples(prepared)
        if not isinstance(prepared, Examples):
            raise PluginError(
                f"objective {self.objective.name!r}: align_prepare_dataset returned "
                f"{type(prepared).__name__}; expected align.Examples, a list of examples or None"
            )
        return prepared

    def build_batch(
        self, examples: list[dict[str, Any]], packed: bool | None = None
    ) -> dict[str, Any]:
        """The plugin's batch, else the data format's: packed when the objective is
        ``packable`` and the run has ``padding_free`` on (``packed`` overrides that). The
        objective's extra fields are added, one value per example, unless the plugin's batch
        already holds them."""
        packed = self.packed if packed is None else packed
        batch = self._call(
            "align_build_batch",
            examples=examples,
            tokenizer=self.tokenizer,
            config=self.config,
            packed=packed,
        )
        if batch is None:
            batch = default_batch(self.data_format, examples, self.tokenizer.pad_token_id, packed)
            taken = [name for name in self.field_names if name in batch]
            if taken:
                raise PluginError(
                    f"objective {self.objective.name!r}: field {taken[0]!r} is a key of the "
                    f"{self.data_format.shape!r} shape's batches; rename the field"
                )
        missing = [name for name in self.field_names if name not in batch]
        batch.update(collate(examples, missing))
        return batch

    def prepare_rollouts(
        self, model: Any, batches: list[dict[str, Any]], reference: Any, run: Any
    ) -> list[dict[str, Any]]:
        """A round's rollout batches, as the objective's ``align_prepare_rollouts`` leaves them."""
        prepared = self._call(
            "align_prepare_rollouts", model=model, batches=batches, reference=reference, run=run
        )
        if prepared is None:
            return batches
        if not isinstance(prepared, list) or len(prepared) != len(batches):
            raise PluginError(
                f"{self.registered.plugin.label}: align_prepare_rollouts returned "
                f"{type(prepared).__name__}, expected a list of {len(batches)} batches"
            )
        return prepared

    def counts(self, batch: dict[str, Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Each loss term's units in ``batch``, before its forward (``align_loss_counts``);
        by default one term, ``loss``, counting the examples."""
        counts = self._call("align_loss_counts", batch=batch, examples=examples, config=self.config)
        if counts is None:
            return {"loss": len(examples)}
        if not isinstance(counts, dict) or not counts:
            raise PluginError(
                f"{self.registered.plugin.label}: align_loss_counts returned {counts!r}, "
                "expected a dict term -> count"
            )
        return counts

    def derive(self, values: dict[str, float]) -> dict[str, float]:
        """Reduced metric means, a multi-term loss's total, and the objective's derived metrics
        (differences of means)."""
        from ..loop.metrics import with_total_loss

        values = with_total_loss(values)
        if self.objective.derived_metrics is None:
            return values
        return {**values, **self.objective.derived_metrics(values)}

    def compute(
        self, model: Any, batch: dict[str, Any], reference: Any, run: Any
    ) -> tuple[LossOutput, dict[str, tuple[Any, Any]]]:
        """The objective's loss, and the metrics every plugin contributes for this batch."""
        output = self._call(
            "align_compute_loss",
            model=model,
            batch=batch,
            reference=reference,
            run=run,
            teacher=self.teacher,
        )
        if not isinstance(output, LossOutput):
            raise PluginError(
                f"{self.registered.plugin.label}: align_compute_loss returned "
                f"{type(output).__name__}, expected align.LossOutput"
            )
        extra: dict[str, tuple[Any, Any]] = {}
        for contribution in self.registry.pm.hook.align_metrics(
            objective=self.objective, model=model, batch=batch, output=output, options=self.options
        ):
            extra.update(contribution or {})
        return output, extra
