"""A checkpoint's identity as caches see it: sha256 over every weight byte (kept in a sidecar beside the
checkpoint), the config and tokenizer files, the compute dtype and the cache layout. Used for the prefix cache's
root key; `write_atomic` is the crash-safe file write the sidecar and the cache's spill files share."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

TMP_PREFIX = ".v4ray-tmp-"  # atomic writes: temp files in the target's directory
# Files besides the weights that decide what a token id means or how the model computes.
IDENTITY_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
IDENTITY_SIDECAR = ".v4ray-identity.json"
_HASH_CHUNK_BYTES = 16 << 20


def model_identity(ckpt_dir: str | Path, dtype: object = None, layout: str | None = None) -> str:
    """Identity of a checkpoint as the prefix cache sees it: sha256 over the content hash of every weight file,
    the bytes of the config, index and tokenizer files (`IDENTITY_FILES`, those present), the compute `dtype`
    (a torch dtype or its name) and the cache `layout` string. Any changed byte changes the identity.

    Why a content hash, and not size + mtime_ns + safetensors headers (+ an operator-set revision): the cache
    is shared across the cluster, so replicas on different nodes, each with its own copy of the checkpoint,
    must agree on the identity. Copies made by a download or `cp` carry new mtimes and would never share an
    entry under an mtime identity, while a fine-tune that keeps shapes (same headers, same sizes) and an
    operator who forgets to bump a revision would share entries they must not. Hashing every byte costs one
    read of the checkpoint, once: each weight file's sha256 is kept beside it in `IDENTITY_SIDECAR`, keyed by
    the file's size and mtime_ns, so later starts only stat the files and a rewritten file is hashed again.
    Files are hashed in parallel (sha256 releases the GIL; ~1-2 GB/s per core). A file's sha256 is also its
    Hugging Face hub LFS object id, so it can be checked against the hub. The sidecar is trusted as far as its
    key: an edit that restores both size and mtime_ns keeps the old digest (delete the sidecar to rehash). A
    read-only checkpoint gets no sidecar (a warning) and is hashed at every start.
    """
    d = Path(ckpt_dir)
    files = {}
    for name in IDENTITY_FILES:
        if name == "config.json" or (d / name).is_file():  # config.json is required: a missing one raises
            files[name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    files.update(_weight_digests(d, _weight_files(d)))
    dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
    record = {"version": 2, "files": files, "dtype": dtype_name, "layout": layout}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _weight_files(d: Path) -> list[str]:
    """The safetensors files the loader reads: those the index names, else every one in the directory."""
    try:
        names = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sorted(p.name for p in d.glob("*.safetensors"))
    # Entries outside the directory are refused by the loader; they are not read here either.
    return sorted(n for n in names if isinstance(n, str) and not Path(n).is_absolute() and ".." not in Path(n).parts)


def _weight_digests(d: Path, names: list[str]) -> dict[str, str]:
    sidecar = d / IDENTITY_SIDECAR
    try:
        known = json.loads(sidecar.read_text())["files"]
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    entries, todo = {}, []
    for name in names:
        st = (d / name).stat()  # before hashing: a file changed meanwhile is hashed again next time
        k = known.get(name)
        if (isinstance(k, dict) and k.get("size") == st.st_size and k.get("mtime_ns") == st.st_mtime_ns
                and isinstance(k.get("sha256"), str)):
            entries[name] = k
        else:
            todo.append((name, st))
    if todo:
        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
            digests = list(pool.map(lambda t: _file_sha256(d / t[0]), todo))
        for (name, st), digest in zip(todo, digests):
            entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        try:
            write_atomic(sidecar, json.dumps({"version": 1, "files": entries}, sort_keys=True).encode(), 0o644)
        except OSError as e:
            log.warning("cannot write %s (%s): the checkpoint will be hashed again at the next start",
                        sidecar, repr(e))
    return {name: entries[name]["sha256"] for name in names}


def _file_sha256(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `path` so that it holds either its old content or all of `data`, even across a crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
