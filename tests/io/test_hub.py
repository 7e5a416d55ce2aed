"""Hub references resolved against a hand-built Hugging Face cache, with no network.

The cache layout built here is the one huggingface_hub documents for its cache:
``models--{org}--{name}/blobs/<hash>``, ``refs/<branch>`` holding a commit hash, and
``snapshots/<commit>/<file>`` symlinks into ``blobs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from safetensors.torch import save_file as torch_save_file

from kenstream.errors import SourceNotFoundError
from kenstream.io import Checkpoint, fingerprint, hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit=COMMIT, branch="main"):
    """Lay ``files`` out as a cached snapshot of ``repo_id`` at ``commit``; returns it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", blob), snapshot / name)
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot


def _safetensors_bytes(tmp_path, state) -> bytes:
    path = tmp_path / "tmp.safetensors"
    torch_save_file(state, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture
def no_network(monkeypatch):
    """Record, and refuse, every attempt to open a connection or resolve a host."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, no_network, io_helpers):
    """An offline environment whose HF_HUB_CACHE holds ``org/tiny`` at COMMIT."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no stray local folder named org/tiny
    state = io_helpers.tiny_state()
    add_to_cache(cache, "org/tiny", {"model.safetensors": _safetensors_bytes(tmp_path, state),
                                     "config.json": b'{"model_type": "tiny"}'})
    return SimpleNamespace(cache=cache, state=state, attempts=no_network)


@pytest.mark.parametrize("ref", ["org/tiny", f"org/tiny@{COMMIT}", "org/tiny@main"])
def test_cached_ref_opens_offline(offline_cache, io_helpers, ref):
    with Checkpoint.open(ref) as ckpt:
        assert sorted(ckpt.names()) == sorted(offline_cache.state)
        for name, tensor in offline_cache.state.items():
            assert io_helpers.same_bits(ckpt.array(name), tensor)
        assert ckpt.extra_files() == ["config.json"]
        ident = ckpt.identity()
        snapshot = offline_cache.cache / "models--org--tiny" / "snapshots" / COMMIT
        assert ckpt.root == snapshot
    assert ident == {"source": ref, "kind": "hub", "repo_id": "org/tiny", "revision": COMMIT,
                     "files": {"model.safetensors": fingerprint(snapshot / "model.safetensors")}}
    assert offline_cache.attempts == []


def test_hf_home_and_explicit_cache_dir(tmp_path, monkeypatch, no_network, io_helpers):
    home = tmp_path / "home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    data = _safetensors_bytes(tmp_path, io_helpers.tiny_state(2))
    add_to_cache(home / "hub", "org/a", {"model.safetensors": data})
    assert hub.resolve("org/a") == home / "hub" / "models--org--a" / "snapshots" / COMMIT
    other = tmp_path / "elsewhere"
    add_to_cache(other, "org/b", {"model.safetensors": data})
    with Checkpoint.open("org/b", cache_dir=other) as ckpt:
        assert ckpt.root.parent.parent.parent == other
    assert no_network == []


@pytest.mark.parametrize("ref", ["org/absent", "org/tiny@v9", "org/tiny@" + "f" * 40, "solo"])
def test_missing_repo_or_revision_fails_fast_offline(offline_cache, ref):
    with pytest.raises(SourceNotFoundError) as caught:
        Checkpoint.open(ref)
    message = str(caught.value)
    assert ref.split("@")[0] in message and "HF_HUB_OFFLINE" in message
    assert "download" in message
    if "@" in ref:  # the command the hint suggests fetches that revision
        assert f"--revision {ref.split('@')[1]}" in message
    assert offline_cache.attempts == []


def test_a_mistyped_local_path_is_not_taken_for_a_hub_model(tmp_path, monkeypatch, no_network):
    """``p1/bse`` next to a folder ``p1`` is a local path with a typo: refused as one, with
    no network call, though online a reference of that form would be downloaded."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p1" / "base").mkdir(parents=True)
    with pytest.raises(SourceNotFoundError, match="'p1' is a folder here") as caught:
        Checkpoint.open("p1/bse", cache_dir=tmp_path / "cache")
    assert caught.value.file == "p1/bse" and no_network == []


def test_a_cache_folder_given_as_a_model_names_what_to_pass(offline_cache, tmp_path,
                                                            monkeypatch):
    """``models--org--name`` given as a model said only 'found no model.safetensors ...':
    it is named as a hub cache's folder, with the reference and the snapshot to pass (and
    HF_HUB_CACHE where the folder is in another cache); the reference then opens it."""
    folder = offline_cache.cache / "models--org--tiny"
    snapshot = folder / "snapshots" / COMMIT
    (folder / "snapshots" / ("f" * 40)).mkdir()  # another revision: refs/main chooses
    with pytest.raises(SourceNotFoundError) as caught:
        Checkpoint.open(folder)
    assert str(caught.value) == (f"{folder}: is a hub cache's folder of a model, not a model "
                                 f"folder (pass org/tiny, or its snapshot folder {snapshot})")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(SourceNotFoundError,
                       match=f"pass org/tiny with HF_HUB_CACHE={offline_cache.cache}, or"):
        Checkpoint.open(folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_cache.cache))
    with Checkpoint.open("org/tiny") as ckpt:
        assert ckpt.root == snapshot
    assert offline_cache.attempts == []


def test_incomplete_cached_shards_are_not_used_offline(offline_cache, tmp_path):
    shard = _safetensors_bytes(tmp_path, {"w": __import__("torch").ones(2)})
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors",
                            "v": "model-00002-of-00002.safetensors"}}
    add_to_cache(offline_cache.cache, "org/sharded",
                 {"model.safetensors.index.json": json.dumps(index).encode(),
                  "model-00001-of-00002.safetensors": shard})
    with pytest.raises(SourceNotFoundError, match="org/sharded"):
        Checkpoint.open("org/sharded")


def test_local_path_wins_over_hub_id(offline_cache, tmp_path, write_model, io_helpers):
    local_state = io_helpers.tiny_state(9)
    write_model(tmp_path / "org" / "tiny", local_state)
    with Checkpoint.open("org/tiny") as ckpt:
        assert ckpt.kind == "local" and ckpt.identity()["repo_id"] is None
        assert all(io_helpers.same_bits(ckpt.array(n), t) for n, t in local_state.items())


def test_ref_parsing():
    assert hub.parse_ref("org/name") == ("org/name", None)
    assert hub.parse_ref("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert hub.parse_ref("gpt2@main") == ("gpt2", "main")
    for bad in ("./local/dir", "/abs/path", "a/b/c", "org/model.safetensors", "org--x/y",
                "org/name@", "-org/name", "org/na me"):
        assert not hub.looks_like_ref(bad), bad
    with pytest.raises(SourceNotFoundError):
        hub.parse_ref("a/b/c")


def test_download_plan_fetches_only_what_is_read(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-1-of-2.safetensors",
                                                "b": "model-2-of-2.safetensors",
                                                "c": "model-2-of-2.safetensors"}}))
    fetched = []

    def fetch(name):
        fetched.append(name)
        return index

    listing = ["model.safetensors.index.json", "model-1-of-2.safetensors", "model-2-of-2.safetensors",
               "consolidated.safetensors", "pytorch_model.bin", "README.md", "config.json"]
    plan = hub.download_plan(listing, fetch)
    assert fetched == ["model.safetensors.index.json"]
    weights = [p for p in plan if p not in hub.EXTRA_PATTERNS]
    assert weights == ["model.safetensors.index.json", "model-1-of-2.safetensors", "model-2-of-2.safetensors"]
    import fnmatch

    for companion in ("config.json", "tokenizer.json", "README.md", "LICENSE",
                      "modeling_toy.py"):
        assert any(fnmatch.fnmatchcase(companion, p) for p in plan), companion
    assert hub.download_plan(["pytorch_model.bin", "config.json"], fetch)[0] == "pytorch_model.bin"
    assert hub.download_plan(["model.safetensors", "pytorch_model.bin"], fetch)[0] == "model.safetensors"
    assert hub.download_plan(["weird[1].safetensors"], fetch)[0] == "weird[[]1].safetensors"
    assert hub.download_plan(["README.md", "sub/model.safetensors"], fetch) is None


def test_download_plan_fetches_the_module_folders_modules_json_names(tmp_path):
    """A sentence-transformers repo: its module folders come whole (the Dense head's
    weights too); an ONNX export does not."""
    import fnmatch

    listing = tmp_path / "modules.json"
    listing.write_text(json.dumps([{"path": ""}, {"path": "1_Pooling"}, {"path": "2_Dense[x]"},
                                   {"path": "../up"}]))
    fetched = []

    def fetch(name):
        fetched.append(name)
        return listing

    names = ["model.safetensors", "modules.json", "1_Pooling/config.json",
             "2_Dense[x]/model.safetensors", "2_Dense[x]/config.json", "onnx/model.onnx",
             "onnx_data/weights.bin"]
    with pytest.warns(UserWarning, match="'../up'"):
        plan = hub.download_plan(names, fetch)
    assert fetched == ["modules.json"]
    picked = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in plan)]
    assert picked == ["model.safetensors", "modules.json", "1_Pooling/config.json",
                      "2_Dense[x]/model.safetensors", "2_Dense[x]/config.json"]


def test_online_download_asks_for_the_planned_files(tmp_path, monkeypatch, io_helpers, no_network):
    """With offline mode off and an empty cache, the hub is listed and the plan fetched."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    state = io_helpers.tiny_state(4)
    data = _safetensors_bytes(tmp_path, state)
    calls = []

    class FakeApi:
        def model_info(self, repo_id, revision=None):
            calls.append(("model_info", repo_id, revision))
            names = ["model.safetensors", "pytorch_model.bin", "config.json", "README.md"]
            return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=n) for n in names])

    def fake_snapshot_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False,
                               allow_patterns=None):
        calls.append(("snapshot", local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(add_to_cache(Path(cache_dir), repo_id, {"model.safetensors": data}))

    real_snapshot_download = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with Checkpoint.open("org/online@main", cache_dir=cache) as ckpt:
        assert all(io_helpers.same_bits(ckpt.array(n), t) for n, t in state.items())
        assert ckpt.revision == COMMIT
    assert calls[0] == ("snapshot", True, None)
    assert calls[1] == ("model_info", "org/online", "main")
    assert calls[2][:2] == ("snapshot", False)
    assert "model.safetensors" in calls[2][2] and "pytorch_model.bin" not in calls[2][2]
    # Second open, with the real snapshot_download: the cache now holds the weights, so
    # the listing (FakeApi) is never asked and nothing is downloaded.
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real_snapshot_download)
    calls.clear()
    with Checkpoint.open("org/online@main", cache_dir=cache) as ckpt:
        assert ckpt.revision == COMMIT
    assert calls == [] and no_network == []


def test_online_failure_becomes_source_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)

    class DownApi:
        def model_info(self, repo_id, revision=None):
            raise ConnectionError("name resolution failed")

    monkeypatch.setattr(huggingface_hub, "HfApi", DownApi)
    with pytest.raises(SourceNotFoundError, match="org/x.*ConnectionError"):
        Checkpoint.open("org/x", cache_dir=tmp_path / "cache")
