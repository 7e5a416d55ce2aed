"""The diff format (``docs/format.md``) as code: names, typed records, layout, encodings.

- :mod:`.spec`: names and numbers of the format (file names, versions, entry names, rows);
- :mod:`.records`: the typed records of the index, the shard metadata and the plan file,
  each with one parser (``from_json``, where every check lives) and ``to_json``;
- :mod:`.layout`: what a shard holds for a record, and the bound on its header size;
- :mod:`.v1`: the format-1 encodings of a selected tensor (bitmask and indices).

Nothing here reads or writes files; :mod:`kenstream.io` does, and never imports the
encodings (they use the numba kernels).
"""
