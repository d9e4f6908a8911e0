"""`prebake.v1.Catalog`: the JumpStart model table and the instance catalog."""

from __future__ import annotations

from typing import Any

import grpc

from prebake.core.errors import InvalidArgument
from prebake.server.state import ServerState
from prebake.server.status import unary
from prebake.v1 import catalog_pb2, catalog_pb2_grpc

MAX_FAMILY = 64
Ctx = grpc.aio.ServicerContext[Any, Any]


def support(value: bool | None) -> catalog_pb2.Support.ValueType:
    if value is None:
        return catalog_pb2.SUPPORT_UNKNOWN
    return catalog_pb2.SUPPORT_YES if value else catalog_pb2.SUPPORT_NO


class CatalogService(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, state: ServerState) -> None:
        self.s = state

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
