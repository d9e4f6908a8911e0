"""The deploy host: no link planted where a fetch or the host cache works is followed,
written through or deleted; names with invisible characters are refused by publish (the
server) and by fetch (the client), which place nothing. Real server on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prebake.client import Client, errors
from prebake.client.fetch import TEMP_PREFIX, temp_dir_prefix, temp_dirs_for
from prebake.client.hostcache import HostCache
from prebake.core.manifest_paths import UnsafePath, check_path
from prebake.v1 import registry_pb2
from tests.conftest import LLAMA3_8B_INF2, make_artifact_dir, tree

# Every kind of invisible character a file name could hide behind.
INVISIBLE = {
    "right-to-left override": "\u202e",
    "left-to-right isolate": "\u2066",
    "right-to-left mark": "\u200f",
    "zero-width space": "\u200b",
    "zero-width joiner": "\u200d",
    "byte order mark": "\ufeff",
    "line separator": "\u2028",
    "paragraph separator": "\u2029",
    "escape": "\x1b",
    "C1 CSI": "\x9b",
    "delete": "\x7f",
}


def victim(root: Path) -> dict[str, bytes]:
    """A directory of someone else's files, with names a manifest also uses."""
    root.mkdir(parents=True)
    files = {"model.neff": b"precious", "keep.txt": b"not in any manifest", "sub/weights.bin": b"mine"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def published(client: Client, tmp_path: Path) -> registry_pb2.Artifact:
    src = make_artifact_dir(tmp_path / "src", {"model.neff": 300_000, "sub/weights.bin": 70_000}, seed=3)
    return client.get_artifact(client.publish(src, LLAMA3_8B_INF2).artifact.artifact_id)


def test_links_planted_at_the_temporary_directory_are_never_followed(client: Client, tmp_path: Path) -> None:
    artifact = published(client, tmp_path)
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    dest = deploy / "model"
    elsewhere = tmp_path / "elsewhere"
    before = victim(elsewhere)
    prefix = temp_dir_prefix(dest, artifact.artifact_id)
    # The old predictable name, names with the current prefix, a world-writable directory
    # with the prefix (anyone could have filled it), all planted before the fetch.
    (deploy / f"{TEMP_PREFIX}model-{artifact.artifact_id[:16]}").symlink_to(elsewhere)
    (deploy / f"{prefix}aaaaaaaa").symlink_to(elsewhere)
    (deploy / f"{prefix}00000000").symlink_to(elsewhere / "model.neff")
    shared = deploy / f"{prefix}0shared0"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "sub").symlink_to(elsewhere / "sub")
    if os.geteuid() == 0:  # root can plant a directory of another user's
        other = deploy / f"{prefix}0other00"
        other.mkdir(mode=0o700)
        os.chown(other, 12345, 12345)
    assert temp_dirs_for(dest, artifact.artifact_id) == [], "none of them may be resumed"

    result = client.fetch(artifact, dest)

    assert result.bytes_downloaded == result.total_bytes
    assert tree(dest) == tree(tmp_path / "src")
    assert {p: (elsewhere / p).read_bytes() for p in before} == before, "nothing outside dest changed"
    assert sorted(p.name for p in elsewhere.rglob("*")) == ["keep.txt", "model.neff", "sub", "weights.bin"]
    assert (shared / "sub").is_symlink() and not any(p.name == "model.neff" for p in shared.rglob("*"))
    assert stat_mode(dest) == 0o777 & ~current_umask(), "placed with the usual directory mode"


def test_an_interrupted_fetch_resumes_only_in_its_own_directory(client: Client, tmp_path: Path) -> None:
    artifact = published(client, tmp_path)
    dest = tmp_path / "model"
    # An earlier attempt's directory: made by this user, 0o700, holding a partial file.
    from prebake.client.fetch import new_temp_dir

    earlier = new_temp_dir(dest, artifact.artifact_id)
    src_neff = (tmp_path / "src" / "model.neff").read_bytes()
    (earlier / "model.neff").write_bytes(src_neff[:100_000])
    assert temp_dirs_for(dest, artifact.artifact_id) == [earlier]
    result = client.fetch(artifact, dest)
    assert result.bytes_resumed == 100_000
    assert tree(dest) == tree(tmp_path / "src")
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*")), "no temporary directory left"


def test_the_host_cache_never_writes_through_a_planted_link(client: Client, tmp_path: Path) -> None:
    artifact = published(client, tmp_path)
    neff = next(f for f in artifact.files if f.path == "model.neff")
    cache = HostCache(tmp_path / "cache")
    (cache.root / "tmp").mkdir(parents=True)
    target = tmp_path / "etc-file"
    target.write_bytes(b"do not touch")
    name = f"{neff.digest.hash}-{neff.digest.size_bytes}"
    (cache.root / "tmp" / f"{name}.partial").symlink_to(target)
    (cache.root / "tmp" / f"{name}.lock").symlink_to(tmp_path / "created-through-a-link")

    put = cache.put_from_server(client, neff.digest)

    assert put.bytes_downloaded == neff.digest.size_bytes
    assert cache.path_for(neff.digest) is not None
    assert target.read_bytes() == b"do not touch" and oct(stat_mode(target)) != oct(0o444)
    assert not (tmp_path / "created-through-a-link").exists()


def test_the_host_cache_refuses_a_linked_tmp_directory(client: Client, tmp_path: Path) -> None:
    artifact = published(client, tmp_path)
    cache = HostCache(tmp_path / "cache")
    cache.root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (cache.root / "tmp").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="symbolic link"):
        cache.put_from_server(client, artifact.files[0].digest)
    assert not list((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize("what", sorted(INVISIBLE))
def test_the_shared_path_check_refuses_invisible_characters(what: str) -> None:
    name = f"model{INVISIBLE[what]}.neff"
    with pytest.raises(UnsafePath, match="not allowed") as info:
        check_path(f"dir/{name}")
    assert INVISIBLE[what] not in str(info.value), "the message shows the character escaped"


def test_publish_refuses_a_name_with_a_bidirectional_override(client: Client, tmp_path: Path) -> None:
    artifact = published(client, tmp_path)  # its blobs are on the server
    files = [registry_pb2.ArtifactFile(path=f.path, digest=f.digest) for f in artifact.files]
    files[0].path = "innocent\u202ehs.so"  # shows as "innocentos.sh"
    key = LLAMA3_8B_INF2.to_proto()
    key.batch_size = 4
    with pytest.raises(errors.InvalidArgument, match="not allowed"):
        client.publish_artifact(key, files)
    assert [a.artifact_id for a in client.list_artifacts().artifacts] == [artifact.artifact_id]


@pytest.mark.parametrize("what", ["right-to-left override", "zero-width space", "escape", "line separator"])
def test_fetch_refuses_a_manifest_with_invisible_names_and_places_nothing(
    client: Client, tmp_path: Path, what: str
) -> None:
    artifact = published(client, tmp_path)
    hostile = registry_pb2.Artifact()
    hostile.CopyFrom(artifact)
    hostile.files[0].path = f"model{INVISIBLE[what]}.neff"
    dest = tmp_path / "deploy" / "model"
    with pytest.raises(errors.UnsafeManifest, match="not allowed"):
        client.fetch(hostile, dest)
    assert not dest.exists() and not list((tmp_path / "deploy").glob("*"))


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
