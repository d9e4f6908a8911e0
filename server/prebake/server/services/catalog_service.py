"""`prebake.v1.Catalog`: the JumpStart model table and the instance catalog."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from prebake.core import names
from prebake.core.errors import InvalidArgument
from prebake.server.presets import Preset, Presets
from prebake.server.state import ServerState
from prebake.server.status import unary
from prebake.server.storage.evaluation_store import EvaluationQuery
from prebake.v1 import catalog_pb2, catalog_pb2_grpc, evaluations_pb2, key_pb2

if TYPE_CHECKING:
    from prebake.server.services.registry_service import RegistryService

OBJECTIVES = {
    "latency": evaluations_pb2.OBJECTIVE_LATENCY,
    "throughput": evaluations_pb2.OBJECTIVE_THROUGHPUT,
    "cost": evaluations_pb2.OBJECTIVE_COST,
}
MAX_MODEL_FILTER = 256

MAX_FAMILY = 64
Ctx = grpc.aio.ServicerContext[Any, Any]


def support(value: bool | None) -> catalog_pb2.Support.ValueType:
    if value is None:
        return catalog_pb2.SUPPORT_UNKNOWN
    return catalog_pb2.SUPPORT_YES if value else catalog_pb2.SUPPORT_NO


class CatalogService(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, state: ServerState, registry: RegistryService | None = None) -> None:
        """`registry` resolves presets' keys as its lookups do (the toolchain above all); the
        app passes its own. Presets are loaded (and validated) against the state's catalogs."""
        from prebake.server.services.registry_service import RegistryService

        self.s = state
        self.registry = registry or RegistryService(state)
        self.presets = Presets.load_default(state.catalog, state.models)

    @unary
    async def ListModels(
        self, request: catalog_pb2.ListModelsRequest, context: Ctx
    ) -> catalog_pb2.ListModelsResponse:
        if len(request.family) > MAX_FAMILY:
            raise InvalidArgument(f"family filter is {len(request.family)} characters; at most {MAX_FAMILY}")
        family = request.family.lower()
        return catalog_pb2.ListModelsResponse(
            models=[
                catalog_pb2.ModelInfo(
                    family=m.family,
                    jumpstart_model_id=m.jumpstart_model_id,
                    hf_model_id=m.hf_model_id,
                    aliases=m.aliases,
                    quantization=support(m.supports_quantization),
                    speculative_decoding=support(m.supports_speculative_decoding),
                    sagemaker_draft_model=support(m.sagemaker_draft_model),
                )
                for m in self.s.models
                if (not family or m.family.lower() == family)
                and (not request.quantization_only or m.supports_quantization)
            ]
        )

    @unary
    async def ListInstanceTypes(
        self, request: catalog_pb2.ListInstanceTypesRequest, context: Ctx
    ) -> catalog_pb2.ListInstanceTypesResponse:
        return catalog_pb2.ListInstanceTypesResponse(
            instance_types=[
                catalog_pb2.InstanceTypeInfo(
                    name=i.name,
                    accelerator=i.accelerator,
                    accelerator_count=i.accelerator_count,
                    total_cores=i.total_cores,
                    core_generation=i.core_generation,
                    compile_target=i.compile_target,
                    accelerator_memory_gib=i.accelerator_memory_gib,
                    vcpus=i.vcpus,
                    host_memory_gib=i.host_memory_gib,
                )
                for i in self.s.catalog
            ]
        )

    async def _preset(self, preset: Preset) -> catalog_pb2.Preset:
        """The preset with its key as this server resolves it, its artifact and newest evaluation."""
        k = preset.key
        key = key_pb2.ArtifactKey(
            kind=names.kind_to_proto(k.kind),
            model=k.model,
            instance_type=k.instance_type,
            sequence_length=k.sequence_length,
            batch_size=k.batch_size,
            tensor_parallel_degree=k.tensor_parallel_degree,
            precision=k.precision,
        )
        known = await self.registry.known_key(key)
        sent = catalog_pb2.Preset(
            name=preset.name,
            objective=OBJECTIVES[preset.objective.value],
            description=preset.description,
            key=key,
            resolved=known.resolved,
        )
        artifact = await self.registry.exact_artifact(known.key, k.model)
        if artifact is not None:
            sent.artifact_id = artifact.artifact_id
            page = await self.s.storage.evaluations.list_page(EvaluationQuery(artifact.artifact_id), "", 1)
            if page.items:
                from prebake.server import evaluation_messages

                sent.evaluation.CopyFrom(evaluation_messages.evaluation(page.items[0]))
        return sent

    @unary
    async def ListPresets(
        self, request: catalog_pb2.ListPresetsRequest, context: Ctx
    ) -> catalog_pb2.ListPresetsResponse:
        if len(request.model) > MAX_MODEL_FILTER:
            raise InvalidArgument(
                f"model filter is {len(request.model)} characters; at most {MAX_MODEL_FILTER}"
            )
        chosen = list(self.presets)
        if request.model:
            chosen = self.presets.of_model(self.registry.recommendations.model_name(request.model))
        return catalog_pb2.ListPresetsResponse(presets=[await self._preset(p) for p in chosen])

    @unary
    async def GetPreset(self, request: catalog_pb2.GetPresetRequest, context: Ctx) -> catalog_pb2.Preset:
        return await self._preset(self.presets.get(request.name))
