"""Seeded mutation fuzzing: corrupt checkpoint headers, shard indexes and diff indexes, and
check that only kenstream's own errors come out, and that nothing wrong comes out silently.

* safetensors files: the 8-byte length field and the JSON header are mutated (bytes flipped,
  inserted, deleted, values swapped for hostile ones, the file cut short). ``Checkpoint.open``
  plus reading every array must either raise a ``KenstreamError`` or hand out exactly the
  bytes an independent parse of the same file locates.
* sharded checkpoints: the ``weight_map`` index is mutated the same way.
* diffs: ``kenstream-diff.json`` is mutated; also shard headers, with the index's size and
  sha256 fixed up to match (a forger's edit). ``info``, ``verify`` and ``rebuild`` must raise
  a ``KenstreamError`` or, for a mutation that leaves the shards and records alone, rebuild
  exactly the reference model.

Each loop is bounded by a case count and stays in the tens of seconds at most.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import struct
import traceback
from pathlib import Path

import zipfile

import matplotlib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

matplotlib.use("Agg")

import kenstream
import kenstream.viz
from kenstream.errors import KenstreamError
from kenstream.io.checkpoint import Checkpoint
from tests.ckpt import save_dir, toy_pair

HOSTILE = [None, True, False, 0, -1, 1, 7, 2**31, 2**63, 2**64 + 3, -2**63, 1e308, -0.5, 3.5,
           float("inf"), float("nan"), "", "F32", "BF16", "U8", "I64", "F8_E4M3", "F17", "x" * 300,
           "../../etc/passwd", "a::values", [], [0], [1, 2], [-1, 4], [0, 2**62], [[1]], ["1"],
           [2**40, 2**40], {}, {"dtype": "F32"}, {"__import__": "os"}]


def hostile(rng: random.Random):
    return copy.deepcopy(rng.choice(HOSTILE))


def paths(node, prefix=()):
    """Every (path, value) in a JSON tree, parents before children."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def mutate_tree(tree, rng: random.Random):
    """A copy of ``tree`` with one node replaced, deleted, duplicated under a new key, or
    given an unknown sibling key."""
    tree = copy.deepcopy(tree)
    spots = [p for p, _ in paths(tree) if p]
    path = rng.choice(spots)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = rng.random()
    if action < 0.6:
        parent[last] = hostile(rng)
    elif action < 0.75 and isinstance(parent, dict):
        del parent[last]
    elif action < 0.85 and isinstance(parent, dict):
        parent[f"{last}_unknown"] = hostile(rng)
    elif isinstance(parent, list):
        parent.append(hostile(rng))
    else:
        parent[last] = copy.deepcopy(rng.choice([v for _, v in paths(tree)]))
    return tree


def mutate_value(value, rng: random.Random):
    """``value`` (any JSON) mutated by :func:`mutate_tree`, itself included as a target."""
    wrapped = mutate_tree({"v": value}, rng)
    return wrapped["v"] if "v" in wrapped else hostile(rng)


def mutate_text(raw: bytes, rng: random.Random) -> bytes:
    """``raw`` with a few bytes replaced, inserted or deleted, or cut short."""
    raw = bytearray(raw)
    action = rng.random()
    if action < 0.15 and raw:
        return bytes(raw[:rng.randrange(len(raw))])
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(raw) + 1)
        byte = rng.choice(b'{}[]",:0123456789-+eE.tfn \\\x00\xff') if rng.random() < 0.7 \
            else rng.randrange(256)
        kind = rng.random()
        if kind < 0.5 and pos < len(raw):
            raw[pos] = byte
        elif kind < 0.75:
            raw.insert(pos, byte)
        elif pos < len(raw):
            del raw[pos]
    return bytes(raw)


def unexpected(case: str, exc: BaseException) -> str:
    return f"{case}: {type(exc).__name__}: {exc}\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:])


# -- safetensors headers ----------------------------------------------------------------------

def _source_file(path: Path) -> bytes:
    g = torch.Generator().manual_seed(3)
    save_file({
        "w.f32": torch.randn(5, 7, generator=g),
        "w.bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(6, generator=g).to(torch.float16),
        "ids": torch.arange(9, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def mutate_safetensors(raw: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    head, data = raw[8:8 + n], raw[8 + n:]
    action = rng.random()
    if action < 0.15:  # the length field: a flipped byte, a near miss, or anything
        field = bytearray(raw[:8])
        choice = rng.random()
        if choice < 0.4:
            field[rng.randrange(8)] = rng.randrange(256)
        elif choice < 0.8:
            field = bytearray(struct.pack("<Q", max(0, n + rng.randint(-16, 16))))
        else:
            field = bytearray(struct.pack("<Q", rng.randrange(2**64)))
        return bytes(field) + raw[8:]
    if action < 0.45:  # the JSON text, length field kept in step
        head = mutate_text(head, rng)
        return struct.pack("<Q", len(head)) + head + data
    if action < 0.55:  # the JSON text, length field left stale
        return raw[:8] + mutate_text(head, rng) + data
    if action < 0.65:  # the file cut short
        return raw[:rng.randrange(len(raw))]
    tree = mutate_tree(json.loads(head), rng)  # well-formed JSON that lies
    head = json.dumps(tree).encode()
    if rng.random() < 0.2:  # and a repeated tensor name
        first = next((k for k in tree if k != "__metadata__"), "x")
        head = head[:-1] + b', ' + json.dumps(first).encode() + b': {}}'
    return struct.pack("<Q", len(head)) + head + data


def independent_bytes(raw: bytes, name: str) -> bytes:
    """The bytes of tensor ``name`` located by a plain struct + json parse of the layout."""
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return raw[8 + n + begin:8 + n + end]


def read_everything(ref) -> dict:
    """name -> bytes of every tensor of checkpoint ``ref``, reading each one whole."""
    out = {}
    with Checkpoint.open(ref) as ckpt:
        for name in ckpt.names():
            arr = ckpt.array(name)
            info = ckpt.info(name)
            assert arr.nbytes == info.nbytes and list(arr.shape) == list(info.shape)
            out[name] = np.ascontiguousarray(arr).tobytes()
    return out


def fuzz_reading(path: Path, cases: int, write, check) -> tuple:
    """For each case, ``write(case)`` puts a mutated file at ``path``; reading it whole must
    raise a KenstreamError or give what ``check(case, got)`` accepts (it returns a list of
    failures). Returns (failures, refused, opened)."""
    failures, refused, opened = [], 0, 0
    for case in range(cases):
        write(case)
        try:
            got = read_everything(path)
        except KenstreamError:
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the property under test
            failures.append(unexpected(f"case {case}", exc))
            continue
        opened += 1
        failures.extend(check(case, got))
    return failures, refused, opened


def test_fuzz_safetensors_headers(tmp_path):
    rng = random.Random(20240611)
    raw = _source_file(tmp_path / "source.safetensors")
    path = tmp_path / "model.safetensors"
    written = {}

    def write(case):
        written["bytes"] = mutate_safetensors(raw, rng)
        path.write_bytes(written["bytes"])

    def check(case, got):  # accepted: then it must be what the file says
        return [f"case {case}: tensor {name!r} read from the wrong bytes"
                for name, data in got.items() if data != independent_bytes(written["bytes"], name)]

    failures, refused, opened = fuzz_reading(path, 2500, write, check)
    assert not failures, "\n".join(failures[:5])
    assert refused > 1500 and opened > 20  # the loop exercised both outcomes


def test_fuzz_shard_index(tmp_path):
    rng = random.Random(7)
    base, _ = toy_pair(torch.float32)
    folder = save_dir(tmp_path / "ckpt", base, shards=3)
    index_path = folder / "model.safetensors.index.json"
    good = index_path.read_bytes()
    expected = read_everything(folder)
    failures, refused = [], 0
    for case in range(600):
        if rng.random() < 0.5:
            mutated = mutate_text(good, rng)
        else:
            mutated = json.dumps(mutate_tree(json.loads(good), rng)).encode()
        index_path.write_bytes(mutated)
        try:
            got = read_everything(folder)
        except KenstreamError:
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001
            failures.append(unexpected(f"case {case}", exc))
            continue
        if got != expected:  # an index that is accepted cannot change what is read
            failures.append(f"case {case}: accepted index changed the tensors read")
    assert not failures, "\n".join(failures[:5])
    assert refused > 200


# -- .bin containers ---------------------------------------------------------------------------

_METHODS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]


def _bin_state(rng: random.Random) -> dict:
    """A state dict whose tensors take the forms torch.save can hold: contiguous, views of
    all kinds (transposed, sliced, expanded, strided), meta, empty, of several dtypes."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    base = torch.randn(6, 8, generator=g)
    forms = {
        "plain": lambda: base.clone(),
        "transposed": lambda: base.t(),
        "sliced": lambda: base[1:4, 2:7],
        "strided": lambda: base[::2, ::3],
        "expanded": lambda: torch.zeros(1).expand(rng.choice([3, 4000, 200000]),
                                                  rng.choice([5, 200000])),
        "as_strided": lambda: torch.as_strided(base.reshape(-1), (5, 5), (1, 1)),
        "meta": lambda: torch.empty(3, 4, device="meta"),
        "empty": lambda: torch.zeros(0, 3),
        "bf16": lambda: base.to(torch.bfloat16),
        "ints": lambda: torch.arange(7, dtype=torch.int64),
        "scalar": lambda: torch.tensor(1.5, dtype=torch.float16),
    }
    names = rng.sample(sorted(forms), rng.randint(1, 4))
    return {name: forms[name]() for name in names}


def _repack(raw: bytes, rng: random.Random) -> bytes:
    """The zip ``raw`` with its members re-compressed, edited, cut or dropped."""
    import io

    with zipfile.ZipFile(io.BytesIO(raw)) as src:
        members = [(i.filename, src.read(i)) for i in src.infolist()]
    action = rng.random()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for k, (name, data) in enumerate(members):
            method = rng.choice(_METHODS) if action < 0.5 else zipfile.ZIP_STORED
            if "/data/" in name and 0.5 <= action < 0.7 and rng.random() < 0.5:
                data = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 \
                    else data + bytes(rng.randrange(1, 64))
            if name.endswith("data.pkl") and 0.7 <= action < 0.9:
                data = mutate_text(data, rng)
            if action >= 0.9 and rng.random() < 0.2:
                continue
            dst.writestr(name, data, compress_type=method)
    return out.getvalue()


def torch_reference(path: Path) -> dict | None:
    """name -> bytes of every tensor, as torch itself reads the file (no memory map, which
    checks each storage against its member); None if torch refuses it or it holds a tensor
    kenstream must not read (no data, or fewer bytes than elements)."""
    try:
        state = torch.load(path, weights_only=True, mmap=False, map_location="cpu")
    except Exception:  # noqa: BLE001
        return None
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or \
                t.numel() * t.element_size() > t.untyped_storage().nbytes():
            return None
        out[name] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return out


def test_fuzz_bin_containers(tmp_path):
    rng = random.Random(15)
    path = tmp_path / "pytorch_model.bin"
    wanted = {}

    def write(case):
        torch.save(_bin_state(rng), path)
        if rng.random() < 0.8:
            path.write_bytes(_repack(path.read_bytes(), rng))
        if rng.random() < 0.1:
            raw = path.read_bytes()
            path.write_bytes(raw[:rng.randrange(len(raw))])
        wanted["tensors"] = torch_reference(path)

    def check(case, got):
        if wanted["tensors"] is None:
            return [f"case {case}: read a file torch itself refuses, or a view without its bytes"]
        return [] if got == wanted["tensors"] else [
            f"case {case}: tensors differ from torch's own reading"]

    failures, refused, opened = fuzz_reading(path, 300, write, check)
    assert not failures, "\n".join(failures[:5])
    assert refused > 100 and opened > 30  # the loop exercised both outcomes


# -- diff indexes and shards ------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real diff of a bf16 pair (prefix, new head, ints, 3-D) with several shards, and the
    hashes of its rebuilt model."""
    root = tmp_path_factory.mktemp("fuzzdiff")
    base, ft = toy_pair(torch.bfloat16, prefix="model.")
    b = save_dir(root / "base", base)
    f = save_dir(root / "ft", ft)
    d = root / "diff"
    kenstream.compress(b, f, d, keep=0.3, shard_size="600B", quiet=True)
    assert len(list(d.glob("*.kdiff"))) >= 3
    kenstream.rebuild(b, d, root / "rebuilt", quiet=True)
    return b, f, d, (rebuilt_state(root / "rebuilt"), loaded_state(b, d))


def rebuilt_state(directory: Path) -> dict:
    """The rebuilt model: every tensor's bits, and every file but the card and the shards'
    provenance (which name the diff's index, and so change with any edit of it)."""
    from safetensors.torch import load_file

    state = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")
             and p.name != "README.md" and not p.name.endswith(".safetensors")}
    for p in sorted(directory.glob("*.safetensors")):
        for name, t in load_file(str(p)).items():
            state[f"{p.name}:{name}"] = (str(t.dtype), tuple(t.shape),
                                         hashlib.sha256(t.contiguous().view(-1).view(
                                             torch.uint8).numpy().tobytes()).hexdigest())
    return state


def loaded_state(b, d) -> dict:
    """name -> (dtype, shape, sha256 of the bytes) of every tensor ``kenstream.load`` yields."""
    return {name: (str(t.dtype), tuple(t.shape), hashlib.sha256(
                t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
            for name, t in kenstream.load(b, d)}


def _viz(d, out: Path, rng: random.Random) -> None:
    """One picture of diff ``d``: a raw matrix or neighbours view of a tensor the index
    names (or any name), or now and then the summary figure."""
    try:
        names = list(json.loads((d / "kenstream-diff.json").read_text())["tensors"])
    except Exception:  # noqa: BLE001 - the index is the thing being broken
        names = []
    name = rng.choice(names) if names and rng.random() < 0.9 else "model.emb.weight"
    if rng.random() < 0.05:
        kenstream.viz.render(d, None, "summary", out / "summary.png")
    else:
        view = rng.choice(["matrix", "neighbors"])
        kenstream.viz.render(d, name, view, out / "view.png", raw=True, max_pixels=16)


def exercise(b, f, d, out, case, failures, reference=None, rng=None) -> int:
    """Run info, verify, rebuild, load and viz on diff ``d``; count refusals, record
    anything else. ``reference`` (rebuilt files, loaded tensors) is what a diff with its
    records and shards intact must give."""
    refusals = 0
    rng = rng or random.Random(case)
    for op in ("info", "verify", "rebuild", "load", "viz"):
        try:
            if op == "info":
                kenstream.info(d)
            elif op == "verify":
                kenstream.verify(d, b, f, quiet=True)
            elif op == "rebuild":
                kenstream.rebuild(b, d, out, overwrite=True, quiet=True)
                if reference is not None and rebuilt_state(out) != reference[0]:
                    failures.append(f"{case}: rebuild succeeded with a different model")
            elif op == "load":
                got = loaded_state(b, d)
                if reference is not None and got != reference[1]:
                    failures.append(f"{case}: load succeeded with a different model")
            else:
                pictures = out.parent / "pictures"
                pictures.mkdir(exist_ok=True)
                _viz(d, pictures, rng)
        except KenstreamError:
            refusals += 1
        except Exception as exc:  # noqa: BLE001
            failures.append(unexpected(f"{case} ({op})", exc))
    return refusals


def test_fuzz_diff_index(made, tmp_path):
    b, f, good_dir, reference = made
    rng = random.Random(99)
    d = tmp_path / "diff"
    d.mkdir()
    for p in good_dir.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    index_path = d / "kenstream-diff.json"
    good = index_path.read_bytes()
    tree = json.loads(good)
    records = [("tensors", n) for n in tree["tensors"]]
    failures, refusals, unchanged_models = [], 0, 0
    for case in range(1000):
        choice = rng.random()
        if choice < 0.25:
            mutated = mutate_text(good, rng)
        elif choice < 0.6:  # aim at the records, where the arithmetic is
            t = copy.deepcopy(tree)
            key = rng.choice(records)
            t["tensors"][key[1]] = mutate_value(t["tensors"][key[1]], rng)
            mutated = json.dumps(t).encode()
        else:
            mutated = json.dumps(mutate_tree(tree, rng)).encode()
        index_path.write_bytes(mutated)
        # Records and shard names decide the model; any other edit must not change it.
        try:
            new = json.loads(mutated)
            same_model = isinstance(new, dict) and new.get("tensors") == tree["tensors"] \
                and new.get("shards") == tree["shards"]
        except ValueError:
            same_model = False
        refusals += exercise(b, f, d, tmp_path / "out", f"case {case}", failures,
                             reference if same_model else None, rng)
        unchanged_models += same_model
    assert not failures, "\n".join(failures[:5])
    assert refusals > 2500 and unchanged_models > 50


def _forge_shard(shard: Path, rng: random.Random) -> None:
    """Rewrite ``shard`` with a mutated header (entries or metadata records) or data byte."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])
    choice = rng.random()
    if choice < 0.3 and data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice < 0.65:
        meta = header["__metadata__"]
        records = json.loads(meta["records"])
        records = mutate_value(records, rng)
        meta["records"] = json.dumps(records)
    else:
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        if entries:
            header.update(mutate_tree(entries, rng))
    head = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(head)) + head + bytes(data))


def test_fuzz_forged_shards(made, tmp_path):
    """Shards edited and the index's size and sha256 updated to match: hashes pass, so the
    readers' own checks of records and entries must stop anything inconsistent."""
    b, f, good_dir, _ = made
    rng = random.Random(5)
    d = tmp_path / "diff"
    d.mkdir()
    failures, refusals = [], 0
    for case in range(500):
        for p in good_dir.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        index = json.loads((d / "kenstream-diff.json").read_text())
        shard = d / rng.choice(sorted(index["shards"]))
        _forge_shard(shard, rng)
        raw = shard.read_bytes()
        index["shards"][shard.name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        if rng.random() < 0.3:  # forge the index record too, so both copies agree
            try:
                meta = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]
                index["tensors"].update(json.loads(meta["records"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
        (d / "kenstream-diff.json").write_text(json.dumps(index))
        refusals += exercise(b, f, d, tmp_path / "out", f"forged case {case}", failures,
                             rng=rng)
    assert not failures, "\n".join(failures[:5])
    assert refusals > 500
