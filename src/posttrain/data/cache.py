"""A tokenization cache: a second run on the same data does not read and tokenize it again.

An entry is keyed by the SHA-256 of

* the data file's *content* (every shard's bytes, for a directory), not its name or date,
* the tokenizer (its serialized vocabulary/merges/normalizer, chat template and special
  tokens), and
* the settings that change the result (record format, field mapping, max_length, the
  over-long policy, loss_on; for preference data the data kind and seed) and this module's
  version,

so a changed file, tokenizer or setting misses and is tokenized again. An entry is a directory
``<cache_dir>/<key>/`` holding ``examples.safetensors`` (flat int32 ``input_ids`` / ``labels``,
int64 ``offsets``, uint8 ``truncated``: no pickle), ``report.json`` (the encode report) and
``key.json`` (what the key was made of, for people); units of several sequences (preference
pairs, KTO examples with their KL partner, ranked K-sets) add int64 ``counts`` (sequences per
unit) and ``meta.json`` (each unit's margin / label / rewards). Entries are written to a temporary
directory and renamed into place, so a crash never leaves half an entry; an unreadable entry is
reported, deleted and rebuilt. An SFT file's first pass is streamed into its entry
(:class:`EntryWriter`), and entries are read lazily (:class:`CachedExamples`).

The cache directory is ``data.cache_dir``, else ``$POSTTRAIN_CACHE/tokenized``, else
``~/.cache/posttrain/tokenized``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from collections.abc import Sequence
from pathlib import Path

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("POSTTRAIN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "posttrain") / "tokenized"


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (names and bytes, in name order)."""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str | None:
    """SHA-256 of what makes a tokenizer encode as it does; None when it cannot be serialized
    (a slow tokenizer: such runs are not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())},
        "added": sorted((t.content, i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({**parts, "version": CACHE_VERSION}, sort_keys=True, default=str)
                          .encode()).hexdigest()[:40]


def cache_location(spec: str, data, tokenizer, settings: dict) -> tuple[Path | None, dict]:
    """``(cache directory, key parts)`` for a data file ``spec`` read with ``data``'s cache
    settings (``data.cache``, ``data.cache_dir``) and ``tokenizer``; ``(None, {})`` when it is not
    cached (cache off, built-in data, not a file, a tokenizer that cannot be fingerprinted)."""
    path = Path(spec).expanduser()
    if not data.cache or not spec.strip() or spec.startswith("builtin:") or not path.exists():
        return None, {}
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None, {}
    directory = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    return directory, {"data": content_digest(path), "tokenizer": fingerprint, "fields": data.fields, **settings}


def save_entry(directory: Path, examples, report, parts: dict, *, counts: list[int] | None = None,
               meta: list | None = None) -> None:
    """Write an entry atomically (a temporary directory renamed into place). ``report`` is an
    encode report (dataclass) or any JSON value; units of several examples (preference pairs,
    K-sets) are stored as their examples in order with ``counts`` (examples per unit) and
    ``meta`` (one JSON value per unit)."""
    import itertools

    import numpy as np
    import torch
    from safetensors.torch import save_file

    tmp = _temp_dir(directory)
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total = int(offsets[-1])
    # streamed into int32 arrays: no intermediate list of every token
    flat_ids = np.fromiter(itertools.chain.from_iterable(e.input_ids for e in examples), dtype=np.int32, count=total)
    flat_labels = np.fromiter(itertools.chain.from_iterable(e.labels for e in examples), dtype=np.int32, count=total)
    tensors = {"input_ids": torch.from_numpy(flat_ids), "labels": torch.from_numpy(flat_labels), "offsets": offsets,
               "truncated": torch.tensor([bool(e.truncated) for e in examples], dtype=torch.uint8)}
    if counts is not None:
        tensors["counts"] = torch.tensor(counts, dtype=torch.int64)
        (tmp / "meta.json").write_text(json.dumps(meta if meta is not None else [None] * len(counts)),
                                       encoding="utf-8")
    save_file(tensors, str(tmp / "examples.safetensors"))
    _write_meta(tmp, report, parts)
    _publish(tmp, directory)


def _temp_dir(directory: Path) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, directory: Path) -> None:
    if directory.exists():   # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, directory)


class EntryWriter:
    """Builds an SFT entry example by example, on disk: token ids and labels are appended to
    two int32 files in the entry's temporary directory as they come, and :meth:`finish` writes
    ``examples.safetensors`` from them (the format's header, then the bytes copied in blocks),
    so a first pass over a file larger than memory holds only a few MiB of tokens plus 9 bytes
    per example (offset and truncation flag). The entry appears, complete, only when
    :meth:`finish` renames it into place; :meth:`abort` (or an exception) leaves nothing."""

    FLUSH = 1 << 20   # tokens buffered per file before a write

    def __init__(self, directory: Path):
        from array import array

        self.directory = directory
        self.tmp = _temp_dir(directory)
        self._files = [open(self.tmp / "ids.bin", "wb"), open(self.tmp / "labels.bin", "wb")]
        self._bufs = [array("i"), array("i")]
        self.offsets = array("q", [0])
        self.truncated = array("B")

    def add(self, example) -> None:
        self._bufs[0].extend(example.input_ids)
        self._bufs[1].extend(example.labels)
        self.offsets.append(self.offsets[-1] + len(example.input_ids))
        self.truncated.append(bool(example.truncated))
        if len(self._bufs[0]) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        from array import array

        for i, (fh, buf) in enumerate(zip(self._files, self._bufs)):
            fh.write(_little_endian(buf))
            self._bufs[i] = array("i")

    def finish(self, report, parts: dict) -> None:
        self._flush()
        for fh in self._files:
            fh.close()
        total, n = self.offsets[-1], len(self.truncated)
        tensors = [("input_ids", "I32", [total], self.tmp / "ids.bin"), ("labels", "I32", [total], self.tmp / "labels.bin"),
                   ("offsets", "I64", [n + 1], _little_endian(self.offsets)),
                   ("truncated", "U8", [n], self.truncated.tobytes())]
        header, start = {}, 0
        for name, dtype, shape, data in tensors:
            size = data.stat().st_size if isinstance(data, Path) else len(data)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
            start += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.tmp / "examples.safetensors", "wb") as out:
            out.write(len(head).to_bytes(8, "little"))
            out.write(head)
            for _, _, _, data in tensors:
                if isinstance(data, Path):
                    with open(data, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 22)
                    data.unlink()
                else:
                    out.write(data)
        _write_meta(self.tmp, report, parts)
        _publish(self.tmp, self.directory)

    def abort(self) -> None:
        for fh in self._files:
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _little_endian(buf) -> bytes:
    import sys

    if sys.byteorder != "little":
        buf = type(buf)(buf.typecode, buf)
        buf.byteswap()
    return buf.tobytes()


def _write_meta(tmp: Path, report, parts: dict) -> None:
    (tmp / "report.json").write_text(json.dumps(asdict(report) if is_dataclass(report) else report),
                                     encoding="utf-8")
    (tmp / "key.json").write_text(json.dumps(parts, indent=1, sort_keys=True, default=str), encoding="utf-8")


class CachedExamples(Sequence):
    """The examples of a cache entry, built one at a time from its flat token arrays when indexed
    (a slice gives a list). A cached dataset then costs its int32 arrays, not a Python list per
    example: the whole dataset is never held as Python objects."""

    def __init__(self, ids, labels, offsets: list[int], truncated: list[int]):
        self.ids, self.labels, self.offsets, self.truncated = ids, labels, offsets, truncated

    def __len__(self) -> int:
        return len(self.truncated)

    def __getitem__(self, i):
        from .tokenize import EncodedExample

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self.offsets[i], self.offsets[i + 1]
        return EncodedExample(input_ids=self.ids[a:b].tolist(), labels=self.labels[a:b].tolist(),
                              truncated=bool(self.truncated[i]))


def read_entry(directory: Path) -> dict:
    """``{"examples", "report" (JSON), "counts", "meta"}`` of an entry (counts / meta None for
    one-example units); raises ValueError/OSError when it is unreadable."""
    from safetensors.torch import load_file

    t = load_file(str(directory / "examples.safetensors"))
    report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    offsets, trunc = t["offsets"].tolist(), t["truncated"].tolist()
    ids, labels = t["input_ids"], t["labels"]
    if len(offsets) != len(trunc) + 1 or offsets[-1] != ids.numel() or ids.numel() != labels.numel():
        raise ValueError("the entry's arrays do not fit together")
    counts = meta = None
    if "counts" in t:
        counts = t["counts"].tolist()
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        if sum(counts) != len(trunc) or not isinstance(meta, list) or len(meta) != len(counts):
            raise ValueError("the entry's units do not fit its examples")
    # built example by example when used (SFT: lazily; units: now, they are held anyway)
    examples = CachedExamples(ids, labels, offsets, trunc)
    if counts is not None:
        examples = examples[:]
    return {"examples": examples, "report": report, "counts": counts, "meta": meta}


def load_entry(directory: Path):
    """``(examples, report)`` of an SFT entry; raises ValueError/OSError when it is unreadable."""
    from .tokenize import EncodeReport

    entry = read_entry(directory)
    report = EncodeReport(**entry["report"])
    if report.kept != len(entry["examples"]):
        raise ValueError(f"the entry holds {len(entry['examples'])} examples but its report says {report.kept}")
    return entry["examples"], report


def cached(directory: Path | None, parts: dict, build, *, log, save=None, load=None, stream=None):
    """``build()`` through the cache entry of ``parts`` (no cache when ``directory`` is None).
    By default ``build() -> (examples, report)`` (SFT); ``save(built, entry_dir)`` /
    ``load(entry_dir) -> built`` store other results. ``stream(entry_dir)``, when given, writes
    the entry itself without holding the data (then it is loaded; if the entry cannot be written,
    ``build()`` runs in memory instead). Returns ``(*built, hit)``."""
    save = save or (lambda built, d: save_entry(d, built[0], built[1], parts))
    load = load or load_entry
    if directory is None:
        return (*build(), False)
    entry = directory / cache_key(parts)
    if entry.is_dir():
        try:
            return (*load(entry), True)
        except Exception as e:   # corrupt or from an incompatible version: rebuild
            log(f"note: the tokenization cache entry {entry} is unreadable ({type(e).__name__}: {e}); "
                "deleting and tokenizing again")
            shutil.rmtree(entry, ignore_errors=True)
    if stream is not None:
        try:
            stream(entry)
            return (*load(entry), False)
        except OSError as e:
            log(f"note: could not write the tokenization cache entry {entry} ({e}); tokenizing in memory instead")
    built = build()
    try:
        save(built, entry)
    except OSError as e:
        log(f"note: could not write the tokenization cache entry {entry} ({e}); continuing without it")
    return (*built, False)


__all__ = ["CACHE_VERSION", "CachedExamples", "EntryWriter", "cache_key", "cache_location", "cached", "content_digest", "default_cache_dir", "load_entry", "read_entry",
           "save_entry", "tokenizer_fingerprint"]
