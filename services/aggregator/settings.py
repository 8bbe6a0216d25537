"""Settings of the aggregator service: the shared groups plus its own."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator
from typing_extensions import Self

from services.common.schema import SchemaSettings, check_federation
from services.common.settings import (
    DefenceSettings,
    OptionalStr,
    ServiceConfig,
    ServiceSettings,
    Settings,
    Shape3,
    TrainingSettings,
)
from services.core.catalog import DATASET_SHAPES, Shape, is_reference
from services.core.errors import ConfigError


class ModelStoreSettings(Settings):
    """The model's shape when the dataset has no built-in one, and how many versions stay."""

    input_shape: Shape3 = Field(
        (), description="C,H,W of the input when the dataset's shape is not built in (folder)"
    )
    num_classes: Annotated[int, Field(ge=2)] | None = Field(
        None, description="classes of the model when the dataset's are not built in"
    )
    initial_model: OptionalStr = Field(
        None,
        description="start from these weights (safetensors, as flclustering init-model or "
        "export write them; a user's model, or pretrained weights) instead of building w0; "
        "every upload is checked against its tensors",
    )
    keep_versions: int = Field(3, ge=2, description="global model versions kept for downloads")
    memory_budget_mb: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="memory (MiB) for the current and next model, a round's deltas and the "
        "working blocks; deltas beyond it are kept in files and read back in blocks, older "
        "versions too (default: no limit, all in memory)",
    )
    spill_dir: str = Field(
        "",
        description="directory for the files of deltas and versions beyond the budget "
        "(default: STATE_DIR/spill, else a temporary directory); emptied at start",
    )


class ComputeSettings(Settings):
    """Where a round's defence and merge run."""

    device: str = Field(
        "cpu",
        description="device for the defence and merge (Gram products, robust rules): cpu, "
        "cuda[:n], or auto (CUDA when present); updates are received and kept on the CPU",
    )


class AggregatorConfig(ServiceConfig):
    """Everything the aggregator runs on; one frozen value built at start-up."""

    # 136 upload streams at once (policy keeps 24 threads free): more than the 128 the
    # clusterer relays at once, so a round selecting a hundred is never refused here.
    service: ServiceSettings = ServiceSettings(port=50052, metrics_port=9102, max_workers=160)
    # The defence policy is the aggregator's own, fixed at start (callers cannot change it);
    # the training rate is q-FFL's step size.
    defence: DefenceSettings = DefenceSettings()
    training: TrainingSettings = TrainingSettings()
    store: ModelStoreSettings = ModelStoreSettings()
    compute: ComputeSettings = ComputeSettings()
    sample: SchemaSettings = SchemaSettings()

    @model_validator(mode="after")
    def _own_model_from_file(self) -> Self:
        check_federation(self.federation.dataset, self.sample)
        if is_reference(self.federation.model) and not self.store.initial_model:
            raise ValueError(
                f"--model {self.federation.model} is a user's model, which the aggregator "
                "never imports: give --initial-model FILE (flclustering init-model writes it)"
            )
        return self

    def shape(self) -> tuple[Shape, int]:
        """Input shape and class count of the model."""
        given = self.store.input_shape  # validated: empty or C,H,W
        shape = (given[0], given[1], given[2]) if given else None
        if shape is not None and self.store.num_classes is not None:
            return shape, self.store.num_classes
        if self.sample.declared:  # own data: what the federation declared a sample is
            return self.sample.input_shape, self.sample.outputs
        known = DATASET_SHAPES.get(self.federation.dataset)
        if known is None:
            raise ConfigError(
                f"dataset {self.federation.dataset!r} has no known shape: "
                "give --input-shape and --num-classes"
            )
        return shape or known[0], self.store.num_classes or known[1]
