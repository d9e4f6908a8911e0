"""Manifest path validation: nothing a manifest names may land outside the artifact root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prebake.core import manifest_paths as paths
from prebake.core.errors import InvalidArgument
from prebake.core.manifest_paths import UnsafePath

GOOD = [
    "config.json",
    "neff/model.neff",
    "a/b/c/d/e.bin",
    ".hidden",
    "..data",
    "a/..b/c",
    "tokenizer/vocab.json",
    "weights/model-00001-of-00002.safetensors",
    "größe/名前.txt",
    "name with spaces.txt",
    "x" * 255,
    "/".join(["d" * 200] * 5),  # 1004 bytes
]


@pytest.mark.parametrize("path", GOOD)
def test_good_paths_pass(path: str) -> None:
    paths.validate_manifest_paths([path])


def test_good_manifest_passes() -> None:
    paths.validate_manifest_paths(GOOD)
    paths.validate_manifest_paths(["a/b", "a/c", "ab", "a.b"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "empty"),
        ("/etc/passwd", "path '/etc/passwd' is absolute; manifest paths are relative to the artifact root"),
        ("/", "is absolute"),
        ("C:/Windows/win.ini", "is absolute"),
        ("c:evil", "is absolute"),
        ("../../etc/passwd", "path '../../etc/passwd' escapes the artifact root"),
        ("..", "escapes the artifact root"),
        ("a/../../b", "escapes the artifact root"),
        ("a/../b", "not normalised"),
        ("a//b", "not normalised"),
        ("./a", "not normalised"),
        ("a/./b", "not normalised"),
        (".", "not normalised"),
        ("a/", "not normalised"),
        ("a\\b", "backslash"),
        ("..\\..\\evil", "backslash"),
        ("a\x00b", r"'\x00'"),
        ("a\nb", r"'\n'"),
        ("a\x7fb", r"'\x7f'"),
        ("a\x85b", r"'\x85'"),
        ("a\ud800b", r"'\ud800'"),
        ("x" * 256, "component longer than 255 bytes"),
        ("é" * 128, "component longer than 255 bytes"),  # 128 characters, 256 bytes
        ("/".join(["d" * 200] * 6), "longer than 1024 bytes"),
    ],
)
def test_bad_paths(path: str, message: str) -> None:
    with pytest.raises(UnsafePath) as info:
        paths.validate_manifest_paths(["ok.txt", path])
    assert message in str(info.value)
    with pytest.raises(UnsafePath) as single:
        paths.check_path(path)
    assert str(single.value) == str(info.value)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ([], "an artifact needs at least one file"),
        (["a", "b", "a"], "path 'a' is listed twice"),
        (["a", "a/b"], "path 'a' is both a file and a directory (of 'a/b')"),
        (["a/b/c", "a/b"], "path 'a/b' is both a file and a directory (of 'a/b/c')"),
        (["x/y", "x/y/z/w"], "path 'x/y' is both a file and a directory"),
    ],
)
def test_bad_manifests(manifest: list[str], message: str) -> None:
    with pytest.raises(UnsafePath) as info:
        paths.validate_manifest_paths(manifest)
    assert message in str(info.value)


def test_too_many_files() -> None:
    manifest = [f"f{i}" for i in range(11)]
    paths.validate_manifest_paths(manifest[:10], max_files=10)
    with pytest.raises(UnsafePath, match="11 files; the limit is 10"):
        paths.validate_manifest_paths(manifest, max_files=10)


def test_a_single_string_is_not_a_manifest() -> None:
    with pytest.raises(TypeError):
        paths.validate_manifest_paths("abc")


def test_unsafe_path_is_invalid_argument() -> None:
    # The server lets it through as INVALID_ARGUMENT; no wrapper re-raises it.
    assert issubclass(UnsafePath, InvalidArgument)
    assert UnsafePath("x").code == "INVALID_ARGUMENT"
    assert not UnsafePath("x").retryable


@pytest.mark.parametrize("rel", ["a", "a/b/c.bin", ".hidden"])
def test_safe_join_stays_inside(tmp_path: Path, rel: str) -> None:
    joined = paths.safe_join(tmp_path, rel)
    assert joined == tmp_path / rel
    assert joined.resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../x", "", "a\\..\\..\\x", "a\x00"])
def test_safe_join_refuses(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UnsafePath):
        paths.safe_join(tmp_path, rel)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_safe_join_refuses_a_symlink_out_of_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "inner").mkdir()
    (root / "ok").symlink_to(root / "inner", target_is_directory=True)
    with pytest.raises(UnsafePath, match="symbolic link"):
        paths.safe_join(root, "link/file")
    assert paths.safe_join(root, "ok/file") == root / "ok" / "file"
