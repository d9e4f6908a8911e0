"""The one s3:// URL parser every flag, TOML setting and model source goes through."""

from __future__ import annotations

import pytest

from prebake.core.errors import InvalidArgument
from prebake.core.s3_urls import S3Location, is_s3_url, parse_s3_url


@pytest.mark.parametrize(
    ("text", "bucket", "prefix"),
    [
        ("s3://my-bucket", "my-bucket", ""),
        ("s3://my-bucket/", "my-bucket", ""),
        ("s3://my.bucket/a/b", "my.bucket", "a/b/"),
        (" s3://b12/models/llama/ ", "b12", "models/llama/"),
    ],
)
def test_parses_bucket_and_prefix(text: str, bucket: str, prefix: str) -> None:
    location = parse_s3_url(text)
    assert location == S3Location(bucket, prefix)
    assert location.key("x.json") == prefix + "x.json"
    assert parse_s3_url(str(location)) == location
    assert is_s3_url(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("/data/models", "not an s3:// URL"),
        ("gs://bucket/x", "not an s3:// URL"),
        ("s3://", "not a valid bucket name"),
        ("s3://UPPER/x", "not a valid bucket name"),
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://a..b/x", "not a valid bucket name"),
        ("s3://bucket//x", "empty"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/" + "p" * 600, "longer than 512"),
    ],
)
def test_refuses_what_is_not_a_location(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match="model source") as caught:
        parse_s3_url(text, what="model source")
    assert says in str(caught.value)
