"""Compress: prune a fine-tune against its base into a sharded sparse diff, streaming.

The engine's entry point for compress (with `stream`, its per-shard loop): it opens both
checkpoints, aligns and plans, prepares the output (or resumes it), writes each planned
shard, then the config files, the card and, last, the index.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__, kernels
from ..errors import CheckpointError, DiffError, OutputError, SelectionError
from ..format import spec, v2
from ..format.fields import is_int
from ..format.index import Coding, DiffIndex, Identity, Selection, ShardInfo, Totals
from ..format.plans import CompressPlan
from ..format.records import parse_shard_metadata
from ..io.checkpoint import Checkpoint
from ..io.diff_reader import DiffReader
from ..io.extras import copy_files, copy_stale
from ..io.fingerprint import sha256_file, sized_sha256
from ..io.jsonfile import read_plan, write_json_atomic, write_text_atomic
from ..io.outputs import SEARCH_NAME, claim_output
from ..io.safetensors_file import SafetensorsFile
from ..progress import bar, say
from ..settings import DEFAULT_TIES, DIFF_SHARD_SIZE, Settings, parse_size
from ..text import counted, printable
from . import budget as budget_pass
from .align import align, tie_heads
from .cards import FINETUNED_CARD, card_license, diff_card
from .executor import CompressJob, Source, check_executor, executor_ready, run_shards
from .plan import make_items, plan_shards

_REDO = "delete it and rerun with --resume"


def read_shard_records(path: Path, expected) -> dict:
    """Records stored in a finished shard's metadata (used by --resume).

    A shard holding other tensors than ``expected`` (the planned names), or entries its
    records do not account for, is refused: it is not this run's.
    """
    try:
        with SafetensorsFile(path) as sf:
            meta = sf.metadata
            owners = {spec.entry_owner(e) for e in sf.names()}
    except CheckpointError as exc:  # this run's own output: not a download to fetch again
        raise DiffError(exc.message, file=path, hint=_REDO) from None
    try:
        records = parse_shard_metadata(meta)
    except DiffError as exc:
        raise DiffError(exc.message, file=path, tensor=exc.tensor, hint=_REDO) from None
    if set(records) != set(expected):
        raise DiffError("shard does not hold the tensors the plan puts in it", file=path,
                        hint=_REDO)
    if not owners <= set(expected):
        raise DiffError("shard holds entries of tensors the plan does not put in it",
                        file=path, hint=_REDO)
    return records


def _resumed_plan(plan: CompressPlan, partial: Path) -> CompressPlan:
    """The interrupted run's plan, after checking that this run would make the same one.

    The identities and command line are taken from the interrupted run, so that the
    finished diff is byte-identical to an uninterrupted one however the paths are spelled.
    With full hashes recorded (``--strict-resume``), every input file must still have them.
    """
    try:
        previous = CompressPlan.from_json(read_plan(partial))
    except DiffError as exc:
        raise OutputError(f"--resume: {exc.message}", file=partial,
                          hint="delete the output directory and start again") from None
    _check_same(previous, plan, partial, "the interrupted run's",
                "repeat the original command with --resume")
    for side in ("base", "finetuned"):
        for name, digest in sorted((plan.strict or {}).get(side, {}).items()):
            if previous.strict.get(side, {}).get(name) != digest:
                raise OutputError(f"--resume --strict-resume: {side} file {name} changed since "
                                  "the interrupted run (sha256)", file=partial,
                                  hint="restore that file, or start again without --resume")
    return CompressPlan(plan.settings, plan.shard_size, previous.base, previous.finetuned,
                        plan.shards, previous.command, plan.format_version, plan.strict,
                        plan.coding, plan.budget)


_CHECKS = (("settings", "selection settings"), ("shard_size", "--shard-size values"),
           ("format_version", "format versions"), ("coding", "--level or frame sizes"),
           ("base", "base files"), ("finetuned", "fine-tune files"), ("shards", "shard plans"),
           ("strict", "--strict-resume settings"), ("budget", "budget cuts"))


def _check_same(previous: CompressPlan, plan: CompressPlan, path: Path, theirs: str,
                hint: str, keys=None) -> None:
    """Refuse (OutputError naming the first setting that differs) unless ``plan`` would
    make what ``previous`` made or was making."""
    for key, what in _CHECKS:
        if keys is not None and key not in keys:
            continue
        was, now = getattr(previous, key), getattr(plan, key)
        if key in ("base", "finetuned"):  # the same files, however the path is spelled
            was, now = was.get("files"), now.get("files")
        if key == "strict":  # recorded or not; the hashes themselves are compared apart
            was, now = was is not None, now is not None
        if was == now:
            continue
        if key in ("settings", "coding") and isinstance(was, dict) and isinstance(now, dict):
            name = next(n for n in sorted(set(was) | set(now)) if was.get(n) != now.get(n))
            kind = "selection" if key == "settings" else "coding"
            raise OutputError(f"--resume: {kind} setting {name} is {now.get(name)!r} here "
                              f"but {was.get(name)!r} in {theirs}", file=path, hint=hint)
        if key in ("shard_size", "format_version"):
            raise OutputError(f"--resume: {key.replace('_', ' ')} is {now!r} here but "
                              f"{was!r} in {theirs}", file=path, hint=hint)
        raise OutputError(f"--resume: the {what} differ from {theirs}", file=path, hint=hint)


def _check_finished(plan: CompressPlan, index_path: Path) -> dict:
    """The index of a finished diff that ``--resume`` met, after checking that this run
    asked for what it holds (a resume with other settings must not report success) and
    that its shards are all there. The index is read and checked once, by the reader."""
    hint = "to replace it, run the command with --overwrite instead of --resume"
    try:
        with DiffReader(index_path.parent) as d:
            index = d.index
            finished = CompressPlan(
                index.selection.to_json(), index.shard_size, index.base.to_json(),
                None if index.finetuned is None else index.finetuned.to_json(), {},
                index.command, index.format_version, None,
                None if index.coding is None else index.coding.to_json())
            keys = {"settings", "shard_size", "format_version", "coding", "base"}
            if finished.finetuned is not None:
                keys.add("finetuned")
            _check_same(finished, plan, index_path, "the finished diff",
                        hint + ", or choose another -o", keys)
            d.check_files()  # a finished diff that lost a shard is not done
    except DiffError as exc:
        raise OutputError(f"--resume: {exc.message}", file=exc.file or index_path,
                          hint=hint) from None
    return index.to_json()


def _full_hashes(ckpt) -> dict:
    """sha256 of every weight file of ``ckpt`` (``--strict-resume``): reads every byte."""
    return {p.relative_to(ckpt.root).as_posix(): sha256_file(p) for p in ckpt.files}


def compress(base, finetuned, out, *, k=None, keep=None, ties=DEFAULT_TIES, method="ken",
             include=None, exclude=None, seed=0, threads=None, shard_size=DIFF_SHARD_SIZE,
             level=None, format_version=spec.FORMAT_VERSION,
             frame_elems=spec.DEFAULT_FRAME_ELEMS, block_elems=spec.DEFAULT_BLOCK_ELEMS,
             resume=False, strict_resume=False, overwrite=False, quiet=False, command=None,
             header_limit=None, executor="local", ray_address=None, budget="row",
             first_pass=None, search=None) -> dict:
    """Prune ``finetuned`` against ``base`` and write the diff directory ``out``.

    Returns the index (also written as ``out/kenstream-diff.json``) as JSON. ``keep=1``
    (or ``k`` at least every row's length) stores the whole fine-tune, losslessly.
    ``threads`` threads select and code (the caller's numba thread count is restored
    after); ``level`` is the zstd level of format 2 (default `spec.DEFAULT_LEVEL`;
    refused for format 1, which does not code), whose frames hold about
    ``frame_elems`` values; tensors stream in row blocks of about ``block_elems`` values.
    Peak memory is a few row blocks. ``strict_resume`` records the inputs' full sha256 in
    the plan file, so that ``resume`` refuses inputs changed anywhere (one extra read of
    every input file). No shard's header may exceed ``header_limit`` bytes (default: the
    reader's limit, ``MAX_HEADER_BYTES``). ``executor="ray"`` writes the shards as Ray
    tasks (on the cluster at ``ray_address``, or the running or a new local one) into the
    same bytes; see :mod:`.executor`. ``budget`` ``tensor`` or ``global`` shares the keep
    across rows (:mod:`.budget`: one more read of the selected tensors first);
    ``first_pass``, a dict, keeps that read's result for another call with the same
    inputs and rule (``--size`` runs compress several times); ``search``, a ``--size``
    search's record, is written into the output once it is claimed (a run without one that
    starts the output afresh deletes a stale record).
    """
    check_executor(executor)
    settings = Settings(method=method, k=k, keep=keep, ties=ties, include=include,
                        exclude=exclude, seed=seed, budget=budget)
    limit = parse_size(shard_size)
    version, coding = _coding(format_version, level, frame_elems)
    if settings.budget != "row" and version < 2:
        raise SelectionError(f"--budget {settings.budget} needs format 2: format 1 keeps at "
                             "least one value a row", hint="drop --format-version 1")
    out = Path(out)
    with kernels.threads(threads), Checkpoint.open(str(base)) as b, \
            Checkpoint.open(str(finetuned)) as f:
        # Planned before the output is touched, so unrelated models leave nothing behind and
        # the plan file follows the directory's creation at once.
        alignment = align(f.names(), b.names())
        if version >= 2:
            tie_heads(alignment, b.names())
        items = make_items(f, b, alignment, settings, version=version,
                           frame_elems=frame_elems)
        shards = plan_shards(out, items, limit, settings.ties, header_limit, version)
        codes = _coded_dtypes(items, version, executor)
        cuts = _cuts(f, b, items, settings, block_elems, first_pass, quiet, codes)
        extras = f.extra_files()
        strict = None
        if strict_resume:
            say("--strict-resume: hashing every input file", quiet)
            strict = {"base": _full_hashes(b), "finetuned": _full_hashes(f)}
        plan = CompressPlan(settings.to_json(), limit, b.identity(), f.identity(),
                            {n: [i.name for i in g] for n, g in shards},
                            list(command) if command is not None else None, version,
                            strict, None if coding is None else coding.to_json(), cuts)
        rename = {"README.md": FINETUNED_CARD}  # the diff's own README.md is its card
        files = [*shards.names, spec.INDEX_NAME, spec.PARTIAL_NAME, "README.md",
                 *(rename.get(n, n) for n in extras)]
        with executor_ready(executor, ray_address=ray_address, quiet=quiet,
                            threads=kernels.get_threads(), groups=len(shards.names)), \
                claim_output(out, inputs=[b, f], resume=resume, overwrite=overwrite,
                             plan=spec.PARTIAL_NAME, index=spec.INDEX_NAME,
                             files=files, run="compress") as claim:
            if claim.state == "complete":
                index = _check_finished(plan, out / spec.INDEX_NAME)
                # Its shards are whole; the companions rebuild copies out of it (config,
                # tokenizer) may have been lost or edited since, and are copied again.
                lost = copy_stale(f.root, extras, out, rename)
                done = (f"; copied again from the fine-tune: {', '.join(lost)}" if lost
                        else "; nothing to resume")
                say(f"{printable(out)} is already a complete diff{done}",
                    quiet or search is not None)
                return index
            if search is not None:
                write_json_atomic(out / SEARCH_NAME, search)
            elif claim.state == "fresh":
                (out / SEARCH_NAME).unlink(missing_ok=True)
            partial = out / spec.PARTIAL_NAME
            if claim.state == "resume":
                plan = _resumed_plan(plan, partial)
                claim.record(files)
            else:
                write_json_atomic(partial, plan.to_json())
            # The fine-tune's config, tokenizer and card, and the diff's own card, first: a
            # file that cannot be read stops the run before the hours of shards, not after.
            copy_files(f.root, extras, out, rename)
            card = _read_card(f.root, extras)
            write_text_atomic(out / "README.md", diff_card(plan.base, plan.command,
                                                           card_license(card), card is not None))
            # A --size search reports its plan once, and labels each pass's bar.
            say(_plan_report(alignment, items), quiet or bool(search and search["passes"]))
            label = "compress" if search is None else f"--size pass {len(search['passes']) + 1}"
            job = CompressJob(shards, Source.of(f), Source.of(b), settings, version,
                              block_elems, None if coding is None else coding.level,
                              frame_elems, kernels.get_threads(), cuts)
            if executor == "local":  # Ray's workers compile on their own nodes
                _compile_first(settings, codes, quiet)
            with bar(sum(i.params for i in items), label, quiet) as progress:
                records, table = run_shards(job, list(shards), progress,
                                            executor=executor, handles=(f, b),
                                            resume=claim.state == "resume",
                                            ray_address=ray_address, quiet=quiet)
            carried = [rename.get(n, n) for n in extras]
            index = build_index(plan, alignment, items, records, table,
                                {n: ShardInfo(*sized_sha256(out / n)) for n in carried}
                                if version >= 2 else None)
            shards.write_index(spec.INDEX_NAME, index.to_json())
            partial.unlink(missing_ok=True)
    return index.to_json()


_WARMED = set()
"""(rule, budget, dtypes) this process has compiled the kernels for."""


def _coded_dtypes(items, version: int, executor: str) -> list:
    """The dtypes whose selected values this process codes: none in format 1, nor in a Ray
    driver (its workers code)."""
    if version < 2 or executor != "local":
        return []
    return sorted({i.dtype for i in items if i.action == "select"})


def _compile_first(settings, codes, quiet: bool) -> None:
    """On a machine whose numba cache lacks the kernels, say so and compile them before
    the first progress bar starts (the selection kernel of the rule and budget, and the
    value coder for each dtype in ``codes``): else the bar sits at 0 for half a minute and
    then promises hundreds of hours."""
    method, budget = settings.method, settings.budget
    key = (method, budget, tuple(codes))
    if quiet or key in _WARMED or \
            (kernels.compiled(method, budget) and (not codes or v2.coder_compiled())):
        return
    _WARMED.add(key)  # a budget's scores pass warms up before its bar, compress finds it done
    slow = method == "ken" and budget == "row"
    say(f"compiling kenstream's kernels for this machine (the first run only: about "
        f"{'30-45' if slow else '10-15'} s on 2 cores; numba caches them)")
    kernels.warm_up(method, budget)
    for code in codes:
        v2.warm_up(code)


def _cuts(f, b, items, settings, block_elems, first_pass, quiet, codes) -> dict | None:
    """A tensor or global budget's cuts (None for the row budget), after its first pass
    over the selected tensors (or the one ``first_pass`` holds for this rule). The pass
    runs here, whatever the executor: it compiles its kernel first, and the coder of each
    of ``codes`` (`_coded_dtypes`) for the compress after it."""
    if settings.budget == "row":
        return None
    key = (settings.method, settings.seed, settings.include, settings.exclude)
    if first_pass is not None and first_pass.get("key") == key:
        stats = first_pass["stats"]
    else:
        selected = sum(i.params for i in items if i.action == "select")
        _compile_first(settings, codes, quiet)  # the bar below is the first
        with bar(selected, f"budget {settings.budget}: scores", quiet) as progress:
            stats = budget_pass.gather(f, b, items, settings, progress, block_elems)
        if first_pass is not None:
            first_pass.update(key=key, stats=stats)
    return budget_pass.allocate(stats, items, settings)


def _read_card(root, extras) -> str | None:
    """The text of the fine-tune's README.md among its companion files, if it has one."""
    if "README.md" not in extras:
        return None
    return (Path(root) / "README.md").read_text(encoding="utf-8", errors="replace")


def _coding(version, level, frame_elems):
    """(format version, its Coding or None), checked."""
    if version not in spec.READ_VERSIONS:
        raise SelectionError(f"format version {version!r} is not one this kenstream writes "
                             f"({', '.join(map(str, spec.READ_VERSIONS))})")
    if version == 1:
        if level is not None:  # it would be ignored: format 1 stores raw bits
            raise SelectionError("--level sets format 2's zstd coding; format 1 stores raw "
                                 "bits", hint="drop --level, or --format-version 1")
        return 1, None
    if level is None:
        level = spec.DEFAULT_LEVEL
    if not (is_int(level) and spec.MIN_WRITE_LEVEL <= level <= spec.MAX_WRITE_LEVEL):
        raise SelectionError(f"--level must be a zstd level from {spec.MIN_WRITE_LEVEL} to "
                             f"{spec.MAX_WRITE_LEVEL}, got {level!r}",
                             hint=f"higher is smaller and slower; the default is "
                                  f"{spec.DEFAULT_LEVEL}")
    try:
        return 2, Coding.from_json({"level": level, "frame_elems": frame_elems})
    except DiffError as exc:
        raise SelectionError(exc.message) from None


def _plan_report(alignment, items) -> str:
    """One status line: how names were paired and what happens to special tensors."""
    prefix = alignment.finetuned_prefix or alignment.base_prefix
    parts = [f"aligned {counted(len(alignment.pairs), 'tensor')} ({alignment.exact} by exact name"
             + (f", prefix {printable(prefix)!r}" if prefix else "") + ")",
             f"{len(alignment.new)} new", f"{len(alignment.dropped)} only in the base"]
    for head, embedding in alignment.tied.items():
        parts.append(f"{printable(head)} untied from the base's {printable(embedding)}")
    resized = [i for i in items if i.base_rows is not None]
    if resized:
        parts.append(f"{len(resized)} resized (rows beyond the base's stored whole)")
    quantized = sum(1 for i in items if i.reason == "quantized")
    if quantized:
        parts.append(f"{quantized} tensors of quantized units kept whole")
    return "; ".join(parts)


def build_index(plan: CompressPlan, alignment, items, records, table, files=None) -> DiffIndex:
    """The index of a finished diff: every shard's size and hash (``table``, shard name ->
    ShardInfo, from the tasks that wrote them), every record, totals, and (format 2) the
    companion files it carries (``files``, name -> ShardInfo)."""
    version = plan.format_version
    tensors = {i.name: records[i.name] for i in items}
    selected = [r for r in tensors.values() if r.selected]
    totals = Totals(params=sum(i.params for i in items),
                    selected=sum(r.params for r in selected),
                    kept=sum(r.kept for r in selected),
                    reset=sum(r.params - r.kept for r in selected),
                    finetuned_bytes=sum(r.params * r.itemsize for r in tensors.values()),
                    diff_bytes=sum(s.size for s in table.values()),
                    positions_bytes=sum(r.positions_bytes or 0 for r in tensors.values()),
                    values_bytes=sum(r.values_bytes or 0 for r in tensors.values()),
                    version=version)
    return DiffIndex(version, __version__, plan.command,
                     Selection.from_json(plan.settings), plan.shard_size,
                     Identity.from_json(plan.base, "base"),
                     Identity.from_json(plan.finetuned, "finetuned"), alignment.summary(),
                     table, tensors, totals,
                     None if plan.coding is None else Coding.from_json(plan.coding), files)
