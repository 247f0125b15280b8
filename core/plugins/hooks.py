"""The selected objective's hooks, bound to the plugin that registered it."""

from __future__ import annotations

from typing import Any

from ..config import RunSpec
from ..data.batching import default_batch
from ..errors import PluginError
from .api import LossOutput
from .registry import PluginRegistry


class ObjectiveHooks:
    """Calls ``align_prepare_dataset``, ``align_build_batch`` and ``align_compute_loss`` on the
    registering plugin only, and ``align_metrics`` on every plugin."""

    def __init__(self, registry: PluginRegistry, spec: RunSpec, tokenizer: Any) -> None:
        self.registry, self.registered = registry, spec.objective
        self.objective, self.options, self.tokenizer = spec.objective.item, spec.options, tokenizer
        self.packed = self.objective.packable and spec.config.padding_free

    def _call(self, hook: str, **kwargs: Any) -> Any:
        return self.registry.call_objective_hook(
            hook, self.registered, objective=self.objective, options=self.options, **kwargs
        )

    def prepare_dataset(
        self, examples: list[dict[str, Any]], split: str, config: Any
    ) -> list[dict[str, Any]]:
        prepared = self._call(
            "align_prepare_dataset", examples=examples, split=split, config=config
        )
        return examples if prepared is None else prepared

    def build_batch(
        self, examples: list[dict[str, Any]], packed: bool | None = None
    ) -> dict[str, Any]:
        """The plugin's batch, else the core's: packed when the objective is ``packable`` and
        the run has ``padding_free`` on (``packed`` overrides that)."""
        batch = self._call("align_build_batch", examples=examples, tokenizer=self.tokenizer)
        if batch is None:
            packed = self.packed if packed is None else packed
            batch = default_batch(
                self.objective.data_format, examples, self.tokenizer.pad_token_id, packed
            )
        return batch

    def derive(self, values: dict[str, float]) -> dict[str, float]:
        """Reduced metric means plus the objective's derived metrics (differences of means)."""
        if self.objective.derived_metrics is None:
            return values
        return {**values, **self.objective.derived_metrics(values)}

    def compute(
        self, model: Any, batch: dict[str, Any], reference: Any, run: Any
    ) -> tuple[LossOutput, dict[str, tuple[Any, Any]]]:
        """The objective's loss, and the metrics every plugin contributes for this batch."""
        output = self._call(
            "align_compute_loss", model=model, batch=batch, reference=reference, run=run
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
