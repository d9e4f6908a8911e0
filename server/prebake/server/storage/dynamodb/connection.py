"""The boto3 DynamoDB client of a registry: standard configuration sources, bounded waits.

Endpoint, region and credentials come only from boto3's standard sources
(`AWS_ENDPOINT_URL_DYNAMODB`, `AWS_REGION`, `AWS_PROFILE`, instance roles, ...).
Timeouts and retries are set so that a dead or unreachable endpoint fails within
seconds (as `Unavailable`), not after botocore's default minute-long waits, while a
throttled table still gets a few backed-off retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 20.0
# Attempts per call, the first included ("standard" mode: exponential backoff with
# jitter on throttling, 5xx and connection errors).
MAX_ATTEMPTS = 3


def client_config(max_pool_connections: int) -> Config:
    return Config(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        max_pool_connections=max_pool_connections,
    )


def new_client(max_pool_connections: int) -> DynamoDBClient:
    """A new client (thread-safe: one per `Storage`, shared by its threads)."""
    # A session of its own: boto3's default session is not safe to create from threads.
    return boto3.session.Session().client("dynamodb", config=client_config(max_pool_connections))
