"""Checkpoint storage: orbax checkpoints of any pytree, verified on restore.

A checkpoint at step s holds a payload (for a run: the train state — params, batch_stats,
opt_state incl. masks, step, rng) and a small JSON record (`meta`: the data position and
anything the loop adds). Restores always go against an abstract target carrying the current
shardings, so a run saved on one layout restores onto another. Storage only: what a payload
means is the state's and the pipeline's business (`jaxaccel.state`, `jaxaccel.loading`).
Owns `Checkpointer` (`save`, `restore_latest`), `tree_checksums` / `verify_checksums`,
`CorruptCheckpointError` and `CheckpointSaveError`.

Reliability (see RELIABILITY.md):
  * Orbax writes each step into a temporary directory and renames it into place, so a
    process killed mid-save leaves only a temporary directory, which is ignored and
    removed when the next run opens the checkpoints.
  * Orbax's compressed array files carry no checksum: a flipped byte restores silently
    wrong values. So every save records a checksum of each leaf (`tree_checksums`) in the
    JSON record, and every restore recomputes and compares them.
  * `restore_latest` walks back from the newest step past unreadable or failing
    checkpoints (one log line each), moves the bad ones to `checkpoints_corrupt/`, and
    refuses to start over silently if none is usable.
  * A failed save (disk full, read-only directory) raises `CheckpointSaveError`, one line
    naming the step; the previous checkpoint is left as it was.

Imports nothing of jaxaccel but `io`; never config, state, the loop or anything above.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxaccel import io
from jaxaccel.workdir import CHECKPOINTS_DIR

log = logging.getLogger("jaxaccel")

CHECKSUMS_KEY = "checksums"
RECORD_CRC_KEY = "record_crc32"
CORRUPT_DIR = "checkpoints_corrupt"
TMP_SUFFIX = ocp.utils.TMP_DIR_SUFFIX  # orbax writes into `<step><TMP_SUFFIX><n>`, then renames


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back, or whose arrays fail their checksums."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, read-only or missing directory, ...)."""


# ----------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------
# Each leaf's bits, read as 32-bit words w_i, give two sums mod 2**32 of w_i * k_i with odd
# position weights k_i. A change of any single word changes both sums (an odd weight is
# invertible mod 2**32), reordered words change them too, and integer sums do not depend on
# the reduction order, so the value is the same for every sharding and device count. Arrays
# this process can see whole are hashed in numpy (no compilation); arrays sharded over
# several processes are hashed by a jitted reduction where their shards live.
_M1, _C1 = np.uint32(0x9E3779B1), np.uint32(0x7F4A7C15)
_M2, _C2 = np.uint32(0x85EBCA77), np.uint32(0xC2B2AE3D)


def _words(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _hash_device(x: jax.Array) -> jax.Array:
    w = _words(x)
    i = jnp.arange(w.size, dtype=jnp.uint32)
    a = jnp.sum(w * ((i * _M1 + _C1) | 1), dtype=jnp.uint32)
    b = jnp.sum((w ^ (w >> 15)) * ((i * _M2 + _C2) | 1), dtype=jnp.uint32)
    return jnp.stack([a, b])


hash_leaves = jax.jit(lambda leaves: [_hash_device(x) for x in leaves])


def _hash_host(x: Any) -> np.ndarray:
    """The same two sums as `_hash_device`, computed in numpy."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.ascontiguousarray(np.asarray(x)).ravel()
    if x.dtype == np.bool_:
        w = x.astype(np.uint32)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(x.dtype.itemsize)
        if unsigned is None:
            raise ValueError(f"checksum: unsupported dtype {x.dtype}")
        w = x.view(unsigned).astype(np.uint32)
    i = np.arange(w.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        a = np.sum(w * ((i * _M1 + _C1) | np.uint32(1)), dtype=np.uint32)
        b = np.sum((w ^ (w >> np.uint32(15))) * ((i * _M2 + _C2) | np.uint32(1)),
                   dtype=np.uint32)
    return np.array([a, b], np.uint32)


def tree_checksums(tree: Any) -> dict[str, str]:
    """`{leaf path: 16 hex digits}` identifying every leaf's exact bits.

    Sharding-independent and computed on the devices holding each array; in a multi-process
    run every process must call it together (it is a collective for global arrays).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    sums: dict[int, np.ndarray] = {}
    groups: dict[frozenset, list[int]] = {}
    for i, (_, x) in enumerate(flat):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:  # every process holds all of it
                sums[i] = _hash_host(x.addressable_data(0))
            else:  # sharded over processes: reduce where the shards live
                groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
        else:
            sums[i] = _hash_host(x)
    for idx in groups.values():
        for i, out in zip(idx, hash_leaves([flat[i][1] for i in idx])):
            sums[i] = np.asarray(out.addressable_data(0))
    return {paths[i]: f"{int(sums[i][0]):08x}{int(sums[i][1]):08x}" for i in range(len(flat))}


def verify_checksums(tree: Any, expected: dict[str, str]) -> None:
    """Raise `CorruptCheckpointError` naming the first leaf whose bits differ from `expected`."""
    got = tree_checksums(tree)
    if set(got) != set(expected):
        missing = sorted(set(expected) ^ set(got))
        raise CorruptCheckpointError(f"checkpoint leaves differ from the recorded ones "
                                     f"(e.g. {missing[0]})")
    bad = [p for p in got if got[p] != expected[p]]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CorruptCheckpointError(f"checksum mismatch in {bad[0]}{more}")


# ----------------------------------------------------------------------------------------
# The checkpointer
# ----------------------------------------------------------------------------------------
def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " …"


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _describe(e: BaseException) -> str:
    """The operating-system cause of a failed write, short: 'No space left on device (…)'."""
    if isinstance(e, OSError) and e.errno:
        return f"{os.strerror(e.errno)} ({e.filename})" if e.filename else os.strerror(e.errno)
    code = _OS_ERROR_CODE.search(str(e))
    if code:  # tensorstore reports the errno inside its message
        return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)}): {_one_line(e, 160)}"
    return _one_line(e)


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs full tracebacks from its background save threads when a write fails; the
    failure reaches the user as one `CheckpointSaveError` line, so keep those logs one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" in (record.pathname or "") and record.levelno >= logging.ERROR:
            record.msg, record.args = " ".join(record.getMessage().split())[:300], ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


logging.getLogger("absl").addFilter(_OneLineOrbaxErrors())


class Checkpointer:
    """`workdir/checkpoints`: save every N steps and at the end, keep the last K."""

    def __init__(self, workdir: str, keep: int = 2, *, read_only: bool = False):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
        self._pending: int | None = None  # step of an asynchronous save not yet known good
        self._closed = False
        if not read_only:
            self._remove_unfinished()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, create=not read_only, read_only=read_only))
            if not read_only:  # fail now, not after hours of training
                self._probe_writable()
        except OSError as e:
            raise CheckpointSaveError(f"cannot write checkpoints in {self.directory}: "
                                      f"{_describe(e)}") from e

    def _remove_unfinished(self) -> None:
        """Delete temporary directories of saves that never finished (a killed process)."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if TMP_SUFFIX in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                log.info("removed %s: a checkpoint save that never finished", name)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start writing `state` (any pytree) and `meta` (JSON) as checkpoint `step`.

        The write finishes in the background; a failure of this or an earlier save raises
        `CheckpointSaveError` here or in `wait`/`close`.
        """
        record = io.to_jsonable({**meta, CHECKSUMS_KEY: tree_checksums(state)})  # strict JSON
        record[RECORD_CRC_KEY] = _record_crc(record)
        self._guard(self._probe_writable, step)
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)), force=True),
            step)
        self._pending = step

    def wait(self) -> None:
        self._guard(self.manager.wait_until_finished, self._pending)
        self._pending = None

    def close(self) -> None:
        """Finish pending saves (raising `CheckpointSaveError` if one failed) and close."""
        if self._closed:
            return
        self._closed = True
        try:
            self._guard(self.manager.wait_until_finished, self._pending)
        finally:
            self._pending = None
            self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Pending saves always finish; while another error propagates, a failed save is
        only logged so the first error stays the one reported."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointSaveError as e:
            log.warning("jaxaccel: warning: %s", e)

    def _probe_writable(self) -> None:
        """Fail fast on a directory we cannot write: orbax's background threads would
        otherwise wait minutes for a step directory that can never be created."""
        if "://" in self.directory:  # object stores: no directories to probe
            return
        probe = os.path.join(self.directory, f".write-probe-{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)

    def _guard(self, fn: Callable[[], Any], step: int | None) -> None:
        try:
            fn()
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, CheckpointSaveError):
                raise
            done = [s for s in self._finalized_steps() if step is None or s < step]
            kept = (f"the previous checkpoint (step {max(done)}) is intact" if done
                    else "no earlier checkpoint exists")
            what = f"step {step}" if step is not None else "a checkpoint"
            raise CheckpointSaveError(f"could not save {what} in {self.directory}: "
                                      f"{_describe(e)}; {kept}") from e

    def _finalized_steps(self) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        except OSError:
            return []

    # -- restoring ------------------------------------------------------------------------
    def read_meta(self, step: int) -> dict:
        """Only the JSON record of `step` (which stage wrote it, its step), no arrays."""
        return _strip(self._read_record(step))

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restore `step` into the structure/shardings of `target` and verify its checksums.

        Raises `CorruptCheckpointError` if it cannot be read or its bits are not the saved ones.
        """
        payload, record = self._restore_raw(step, target)
        self._verify(step, payload, record)
        return payload, _strip(record)

    def restore_latest(self, make_target: Callable[[dict], Any], *,
                       quarantine: bool = True) -> tuple[int, Any, dict] | None:
        """The newest usable checkpoint as `(step, payload, meta)`; None if there is none.

        `make_target(meta)` gives the abstract payload for a step's JSON record. A step that
        cannot be read or fails verification is reported in one log line and skipped; once
        an older step restores, the skipped ones are moved to `workdir/checkpoints_corrupt/`
        (with `quarantine`) so new saves can take their step numbers. If every checkpoint
        fails, nothing is moved and `CorruptCheckpointError` lists why: a run never starts
        over silently. In a multi-process run all processes agree on every outcome.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        failures: list[tuple[int, str]] = []
        for step in steps:
            record, err = _attempt(lambda: self._read_record(step))
            if _all_processes(err is None):
                target = make_target(_strip(record))
                (payload, record), err = _attempt(lambda: self._restore_raw(step, target))
                if _all_processes(err is None):
                    _, err = _attempt(lambda: self._verify(step, payload, record))
                    if err is None:  # checksums are global values: every process agrees
                        self._report(failures, step, quarantine)
                        return step, payload, _strip(record)
            failures.append((step, err or f"another process could not read checkpoint "
                                          f"step {step}"))
        raise CorruptCheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + "; ".join(reason for _, reason in failures)
            + " — fix or remove them, or start again with --overwrite")

    def _read_record(self, step: int) -> dict:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
            record = dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - any failure to read means unusable
            raise CorruptCheckpointError(f"cannot read the record of checkpoint step {step}: "
                                         f"{_one_line(e)}") from e
        return _checked(step, record)

    def _restore_raw(self, step: int, target: Any) -> tuple[Any, dict]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            payload, record = out["state"], dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
            raise CorruptCheckpointError(f"cannot restore checkpoint step {step}: "
                                         f"{_one_line(e)}") from e
        return payload, _checked(step, record)

    @staticmethod
    def _verify(step: int, payload: Any, record: dict) -> None:
        expected = record.get(CHECKSUMS_KEY)
        if expected is None:  # written before checksums existed: nothing to compare
            return
        try:
            verify_checksums(payload, expected)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"checkpoint step {step}: {e}") from None

    def _report(self, failures: list[tuple[int, str]], good: int, quarantine: bool) -> None:
        """One warning line per skipped step; with `quarantine`, move it out of orbax's way.

        Process 0 moves the directories to `workdir/checkpoints_corrupt/`; all processes wait
        for it and reload the step list.
        """
        if not failures:
            return
        dest_root = os.path.join(self.workdir, CORRUPT_DIR)
        for step, reason in failures:
            where = ""
            if quarantine and jax.process_index() == 0:
                os.makedirs(dest_root, exist_ok=True)
                dest, n = os.path.join(dest_root, str(step)), 1
                while os.path.exists(dest):
                    dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
                shutil.move(os.path.join(self.directory, str(step)), dest)
                where = f"; moved to {dest}"
            if jax.process_index() == 0:
                log.warning("jaxaccel: warning: %s%s; using step %d instead", reason, where,
                            good)
        if quarantine:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("jaxaccel_checkpoint_quarantine")
            self.manager.reload()


def _record_crc(record: dict) -> int:
    """crc32 of the JSON record (without its own crc): catches flipped bytes in it."""
    return zlib.crc32(json.dumps(record, sort_keys=True).encode())


def _checked(step: int, record: dict) -> dict:
    """The record without its crc, if the crc matches (records without one pass)."""
    crc = record.pop(RECORD_CRC_KEY, None)
    if crc is not None and crc != _record_crc(record):
        raise CorruptCheckpointError(f"checkpoint step {step}: its JSON record fails its "
                                     f"checksum")
    return record


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in (CHECKSUMS_KEY, RECORD_CRC_KEY)}


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """(fn(), None), or ((None, None), message) if it raised CorruptCheckpointError."""
    try:
        return fn(), None
    except CorruptCheckpointError as e:
        return (None, None), str(e)


def _all_processes(ok: bool) -> bool:
    """True only if `ok` holds on every process (all agree on which step to use)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return bool(np.all(flags))


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs (with shardings when given) describing `tree`."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
