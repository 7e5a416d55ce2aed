"""Turn ``org/name[@revision]`` into a local snapshot folder of the Hugging Face cache.

The cache is asked first, with no network: if it already holds a snapshot whose weights
are complete, that folder is returned. Only then, and only when offline mode is off, is
the Hub asked for the repository's file list, and just the weights kenstream will read
(chosen by the same rule as a local folder, :func:`checkpoint.pick_weight_file`:
safetensors first, ``.bin`` only when the repo has no safetensors; for an index, exactly
the shards it names) plus config and tokenizer files, and the module folders of a
sentence-transformers model, are downloaded.

Environment: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` and the cache location
variables (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``)
are read at call time with huggingface_hub's precedence. huggingface_hub itself reads
them once at import, so without this a variable set later (a test, a notebook cell)
would be ignored.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import huggingface_hub as hfh
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from kenstream.errors import CheckpointError, SourceNotFoundError
from kenstream.io.checkpoint import pick_weight_file, read_weight_map
from kenstream.io.extras import EXTRA_PATTERNS, MODULES_NAME, module_paths, read_modules

_NAME = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?"
_REF = re.compile(rf"(?P<repo>(?:{_NAME}/)?{_NAME})(?:@(?P<rev>[^\s@]+))?")
_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pth")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HINT = "download it first (e.g. `hf download REPO`) or check the name and revision"


def _hint(repo_id: str, revision: str | None) -> str:
    return _HINT.replace("REPO", repo_id + (f" --revision {revision}" if revision else ""))


def looks_like_ref(ref: str) -> bool:
    """Whether ``ref`` has the form ``name``, ``org/name`` or either with ``@revision``."""
    match = _REF.fullmatch(ref)
    return bool(match) and "--" not in match["repo"] and ".." not in match["repo"] \
        and not match["repo"].endswith(_FILE_SUFFIXES)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``(repo_id, revision or None)`` of a hub reference; malformed -> SourceNotFoundError."""
    if not looks_like_ref(ref):
        raise SourceNotFoundError(f"{ref!r} is not a hub reference of the form org/name[@revision]")
    match = _REF.fullmatch(ref)
    return match["repo"], match["rev"]


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now or was at import."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "")
    return env.upper() in _TRUE or constants.is_offline_mode()


def cache_dir_from_env() -> Path:
    """The hub cache folder the environment names now, with huggingface_hub's precedence."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not env:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface")
        env = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(env)))


def is_cache_folder(folder: Path) -> bool:
    """Whether ``folder`` is a model's folder in a hub cache, ``models--org--name`` (which
    holds ``snapshots/``, ``refs/``, ``blobs/``), not one of its snapshots."""
    return folder.name.startswith("models--") and (folder / "snapshots").is_dir()


def cache_folder_hint(folder: Path) -> str:
    """What to pass instead of the cache folder ``folder`` of ``models--org--name``: the
    reference ``org/name`` (with ``HF_HUB_CACHE`` where ``folder`` is not in the cache the
    environment names), or its snapshot folder (``refs/main``'s, or the only one)."""
    repo_id = folder.name[len("models--"):].replace("--", "/")
    try:
        main = (folder / "refs" / "main").read_text(errors="replace").strip()
    except OSError:
        main = None
    snapshots = sorted(p.name for p in (folder / "snapshots").iterdir() if p.is_dir())
    chosen = main if main in snapshots else snapshots[0] if len(snapshots) == 1 else "<hash>"
    ref = repo_id
    if folder.parent.resolve() != cache_dir_from_env().resolve():
        ref += f" with HF_HUB_CACHE={folder.parent}"
    return f"pass {ref}, or its snapshot folder {folder / 'snapshots' / chosen}"


def weights_complete(folder: Path) -> bool:
    """Whether ``folder`` holds the weight file it would be opened from, and every shard.

    A folder whose index is unreadable or ambiguous counts as complete: downloading
    again would fetch the same files, and opening it reports the precise problem.
    """
    listing = [p.name for p in folder.iterdir() if p.is_file()]
    try:
        chosen = pick_weight_file(listing)
    except CheckpointError:
        return True
    if chosen is None:
        return False
    if not chosen.endswith(".index.json"):
        return True
    try:
        shards = set(read_weight_map(folder / chosen).values())
    except CheckpointError:
        return True
    return all((folder / shard).is_file() for shard in shards)


def download_plan(filenames, fetch) -> list[str] | None:
    """``allow_patterns`` that fetch only what kenstream reads, or None if no weights.

    ``filenames``: every file path in the repo; ``fetch(name) -> Path`` downloads one
    small file: an index, so the shards it names can be listed exactly (a repo may also
    hold e.g. a ``consolidated.safetensors`` copy that must not be fetched), and a
    sentence-transformers ``modules.json``, whose module folders are fetched whole.
    """
    chosen = pick_weight_file([f for f in filenames if "/" not in f])
    if chosen is None:
        return None
    wanted = [chosen]
    if chosen.endswith(".index.json"):
        wanted += sorted(set(read_weight_map(fetch(chosen)).values()))
    # Exact names become fnmatch patterns; escaping keeps a "[" in a name literal.
    plan = [glob.escape(name) for name in wanted] + list(EXTRA_PATTERNS)
    if MODULES_NAME in filenames:
        raw = read_modules(fetch(MODULES_NAME))
        plan += [glob.escape(folder) + "/*" for folder in module_paths(raw, MODULES_NAME)]
    return plan


def _cached(repo_id, revision, cache) -> Path | None:
    try:
        # allow_patterns=None: any file a filtered download left out makes the library
        # call the snapshot incomplete; weights_complete() judges what matters here.
        return Path(hfh.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                          local_files_only=True))
    except IncompleteSnapshotError as exc:
        return Path(exc.snapshot_path)
    except LocalEntryNotFoundError:
        return None


def _download(repo_id, revision, cache) -> Path:
    info = hfh.HfApi().model_info(repo_id, revision=revision)
    names = [s.rfilename for s in (info.siblings or [])]

    def fetch(name):
        return Path(hfh.hf_hub_download(repo_id, name, revision=revision, cache_dir=cache))

    try:
        plan = download_plan(names, fetch)
    except CheckpointError as exc:
        raise exc.located(file=f"hub repo {repo_id}") from None
    if plan is None:
        raise SourceNotFoundError(
            f"hub repo {repo_id!r} has no .safetensors or pytorch_model.bin weights")
    return Path(hfh.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      allow_patterns=plan))


def resolve(ref: str, cache_dir=None) -> Path:
    """Local snapshot folder for ``org/name[@revision]``, downloading only if needed.

    ``cache_dir`` overrides the environment's cache. No network call is made when the
    cache holds complete weights, nor ever in offline mode. Every failure (unknown repo
    or revision, offline and not cached, network down) raises ``SourceNotFoundError``.
    """
    repo_id, revision = parse_ref(ref)
    cache = str(Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_from_env())
    where = repo_id + (f"@{revision}" if revision else "")
    try:
        snapshot = _cached(repo_id, revision, cache)
    except ValueError as exc:  # huggingface_hub rejects a malformed id or revision
        raise SourceNotFoundError(f"hub reference {where!r} is invalid ({exc})") from None
    if snapshot is not None and snapshot.is_dir() and weights_complete(snapshot):
        return snapshot
    if offline():
        raise SourceNotFoundError(
            f"hub model {where!r} is not in the cache {cache} and HF_HUB_OFFLINE is set",
            hint=_hint(repo_id, revision))
    try:
        return _download(repo_id, revision, cache)
    except CheckpointError:
        raise
    except Exception as exc:  # HTTP, connection and validation errors all mean "not found"
        raise SourceNotFoundError(
            f"hub model {where!r} could not be fetched ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'})",
            hint=_hint(repo_id, revision)) from exc
