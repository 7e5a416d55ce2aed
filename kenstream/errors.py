"""Every error a user can cause, in one place.

Each class subclasses a built-in so callers can catch it generically, carries the
file, tensor and row it is about as attributes, and renders as one line that says
what went wrong and what to do next. The CLI prints ``error: <str(exc)>`` and exits
with ``exc.exit_code``; a traceback only with ``--debug``.
"""

from __future__ import annotations


class KenstreamError(Exception):
    """Base class: a failure kenstream understands and can explain in one line."""

    exit_code = 2
    hint = ""

    def __init__(self, message: str, *, file=None, tensor=None, row=None, hint=None):
        self.message = message
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.row = row
        if hint is not None:
            self.hint = hint
        super().__init__(self.__str__())

    def where(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if self.tensor is not None:
            parts.append(f"tensor {self.tensor!r}")
        if self.row is not None:
            parts.append(f"row {self.row}")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text

    def located(self, *, file=None, tensor=None):
        """Return this error with file / tensor filled in where still unknown."""
        if self.file is None and file is not None:
            self.file = str(file)
        if self.tensor is None and tensor is not None:
            self.tensor = tensor
        self.args = (self.__str__(),)
        return self

    def __reduce__(self):
        # Pickled whole, so that an error raised in a Ray worker reaches the driver as the
        # same class and the same one line: the default would call cls(str(self)) and
        # repeat the hint in args.
        return _restore, (type(self), dict(self.__dict__))


def _restore(cls, state: dict) -> KenstreamError:
    exc = cls.__new__(cls)
    exc.__dict__.update(state)
    exc.args = (exc.__str__(),)
    return exc


class SelectionError(KenstreamError, ValueError):
    """Bad selection input: k < 1, keep fraction out of range, unknown method or dtype."""


class NonFiniteError(SelectionError):
    """A NaN or Inf in a row that is to be selected."""

    hint = "the selection rules need finite values; check the checkpoint for overflow"
    in_base = False  # True when the value is the base's (the rules that compare with it)


class CheckpointError(KenstreamError, ValueError):
    """A checkpoint (base or fine-tune) cannot be read as what it claims to be."""


class CorruptFileError(CheckpointError):
    """A safetensors / .bin file whose bytes contradict its own header or index."""

    hint = "the file is damaged or truncated; download it again"


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint that is not weights-only."""

    hint = "only weights-only .bin files are loaded; convert it to safetensors"


class SourceNotFoundError(CheckpointError, FileNotFoundError):
    """Neither a local path nor a hub reference that the cache (or network) can supply."""


class MismatchError(KenstreamError, ValueError):
    """Base and fine-tune are not the same model."""

    hint = "pass the base model this checkpoint was fine-tuned from"


class DiffError(KenstreamError, ValueError):
    """A diff directory that is missing, unfinished, from a newer version, or tampered."""


class IdentityError(DiffError):
    """The base given to rebuild/verify is not the base the diff was made from."""

    hint = "pass the base used at compress time, or --force to go on with this one"


class VerifyError(DiffError):
    """Verification found a mismatch (exit code 1)."""

    exit_code = 1


class ExecutorError(KenstreamError, RuntimeError):
    """The executor cannot run the work: Ray missing or unreachable, or a worker that
    kept dying."""


class OutputError(KenstreamError, OSError):
    """The output path is unusable: inside an input, non-empty, or the disk is full."""

    @classmethod
    def from_os(cls, exc: OSError, doing: str, *, file) -> "OutputError":
        """One line for an OSError met while ``doing`` (e.g. "write") ``file``.

        A full disk, a quota or a file size limit (``ulimit -f``) is named as such and
        points at ``--resume``, since every finished shard survives; other errors keep
        the system's own words.
        """
        import errno

        full = {errno.ENOSPC: "no space left on the device",
                errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large (file size limit reached)"}
        if exc.errno in full:
            return cls(f"{doing} failed: {full[exc.errno]}", file=file,
                       hint="free space or raise the limit, then rerun with --resume")
        return cls(f"{doing} failed: {exc.strerror or exc}", file=file)
