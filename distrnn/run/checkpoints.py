"""A run's save path: held by one run at a time, its checkpoints found from
what is on disk, and nothing in it lost to a crash, a full disk or a mistake.

    with SavePathLock(save_path):               # a second run stops here, in one line
        checkpoints = Checkpoints(parts, save_path, optional=("loss_scale",))
        resumed = checkpoints.open_run(resume, config, shape_keys)
        ...
        checkpoints.save(step)                   # SaveFailed, partial files removed, on a full disk

Only the chief process calls these (see distrnn.run.start.run).
"""
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from distrnn.errors import SaveFailed, UsageError
from distrnn.run import faults
from distrnn.run.files import LOCK, replacing, write_json, write_text

STATE_FILE = "checkpoint"  # tf.train.CheckpointManager's name for it
_CHECKPOINT_FILE = re.compile(r"ckpt-(\d+)(?:\.index|\.data-\d+-of-\d+|_temp.*)$")


class SavePathLock:
    """An exclusive lock on SAVE_PATH/.lock (flock(2)), held until release() or the process's end.

    The kernel drops the lock when its process dies, by kill -9 too, so no stale lock outlives a run
    and no lock file needs cleaning up (the file stays; only its lock matters). The file names the
    holder, for the line a second run stops with. On NFS, Linux maps flock onto the server's byte-range
    locks, so two nodes of a cluster exclude each other as two processes of one machine do."""

    NAME = LOCK

    def __init__(self, save_path: str):
        self.path = os.path.join(save_path, self.NAME)
        self.created = not os.path.lexists(save_path)  # by this run: removed again if it stays empty
        try:
            os.makedirs(save_path, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot write to --save_path {save_path} ({e.strerror}); pass a directory you can "
                             "write to") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder()
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise UsageError(f"--save_path {save_path} is in use by another run ({holder}); wait for it to "
                                 "end, or choose another --save_path") from None
            raise UsageError(f"cannot lock --save_path {save_path} ({e.strerror}): its file system has no file "
                             "locks; choose a --save_path on a local or NFS disk") from None
        holder = (f"process {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  + " ".join([os.path.basename(sys.executable)] + sys.argv))
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, holder.encode("utf-8", "replace")[:4000] + b"\n")
        except OSError:
            pass  # the lock is what counts; a full disk only costs the holder's name

    def _holder(self) -> str:
        try:
            with open(self.path, "rb") as f:
                text = f.read(4000).decode("utf-8", "replace").strip().splitlines()
        except OSError:
            text = []
        return text[0] if text else "a process that has not yet written its name"

    def release(self) -> None:
        """Drops the lock; a save path this run created and wrote nothing else to (it stopped at bad
        input) is removed, so a failed start leaves nothing behind."""
        if self.fd is None:
            return
        save_path = os.path.dirname(self.path)
        try:
            if self.created and os.listdir(save_path) == [self.NAME]:
                os.remove(self.path)
                os.rmdir(save_path)
        except OSError:
            pass  # another run's files appeared meanwhile: leave them
        os.close(self.fd)  # closing the only descriptor drops the lock
        self.fd = None

    def __enter__(self) -> "SavePathLock":
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def checkpoint_files(directory: str) -> Dict[int, List[str]]:
    """The names in `directory` that belong to each checkpoint number (ckpt-N.index, its data
    shards, a ckpt-N_temp left by a save that did not finish)."""
    found: Dict[int, List[str]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    except OSError as e:
        raise UsageError(f"cannot read {directory} ({e.strerror}); make it readable") from None
    for name in names:
        m = _CHECKPOINT_FILE.match(name)
        if m:
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def incomplete_reason(names: List[str]) -> Optional[str]:
    """Why the files of one checkpoint number are not a whole checkpoint, or None. A ckpt-N_temp beside
    a whole ckpt-N (a save killed after its files were in place) does not make it partial."""
    whole = [n for n in names if "_temp" not in n]
    shards = {(int(m.group(1)), int(m.group(2))) for m in (re.search(r"\.data-(\d+)-of-(\d+)$", n) for n in whole)
              if m}
    totals = {total for _, total in shards}
    if any(n.endswith(".index") for n in whole) and len(totals) == 1 and len(shards) == totals.pop():
        return None
    if len(whole) < len(names):
        return "a save that did not finish"
    return "no .index file" if not any(n.endswith(".index") for n in whole) else "data files missing"


def unreadable(prefix: str) -> Optional[str]:
    """Why the checkpoint at `prefix` cannot be read whole (every value read, each checked against its
    checksum), or None."""
    import tensorflow as tf
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        return None
    except (tf.errors.OpError, IndexError, OSError, ValueError) as e:
        return failure_reason(e)


def failure_reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else 'unreadable'}"


class Unfit(UsageError):
    """A checkpoint read whole whose values do not fit the model it is restored into."""


def restore_newest(directory: str, restore, unfit_hint: str, numbers=None) -> Tuple[int, List[str]]:
    """The one way distrnn reads a checkpoint (a resumed run, its best epoch's, the model-use commands):
    `restore(prefix)` of the newest whole checkpoint in `directory` (or of those of `numbers`) that
    reads, past partial and corrupt ones (truncated, a failed checksum); returns (its number, a note
    naming what was skipped, or none). UsageError (exit 2) naming each file and why where none reads;
    Unfit where one reads but does not fit (an older one of the same run would not fit either), saying
    `unfit_hint`. TensorFlow's warnings about a half-restored object are held back: the line says it."""
    import tensorflow as tf
    files = checkpoint_files(directory)
    failures: Dict[int, str] = {}
    for number in sorted(files if numbers is None else [n for n in numbers if n in files], reverse=True):
        prefix = os.path.join(directory, f"ckpt-{number}")
        why = incomplete_reason(files[number])
        if why is None:
            try:
                restore(prefix)
                notes = [f"skipped {describe(failures)}: read the next older one, ckpt-{number}"] if failures else []
                return number, notes
            except (ValueError, AssertionError, tf.errors.OpError, IndexError, OSError) as e:
                tf.get_logger().setLevel("ERROR")  # the half-restored object warns when it is collected
                # A damaged file can fail as a misfit does: it is read whole before the model is blamed.
                why = unreadable(prefix)
                if why is None and isinstance(e, (ValueError, AssertionError, tf.errors.InvalidArgumentError)):
                    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    raise Unfit(f"checkpoint {prefix} does not fit this model ({first}); {unfit_hint}") from None
                why = why or failure_reason(e)
        failures[number] = why
    if not failures:
        raise UsageError(f"no checkpoint in {directory}")
    raise UsageError(f"no checkpoint in {directory} reads whole: {describe(failures)}; every file was left as it "
                     "was")


class Checkpoints:
    """tf.train.CheckpointManager with the rules that keep saved work safe.

    What exists is read from the files on disk, not only from the state file: ckpt-N files with a state
    file that is missing, unreadable or names a checkpoint that is not there are a run that exists. A
    fresh run refuses such a save path (pass --resume to continue it); --resume restores the newest
    checkpoint that restores, trying older ones past a corrupt one, and rewrites the state file from
    what is on disk; a restore whose shapes do not fit the model is refused, every file left as it was.
    Rotation deletes only checkpoints the state file lists (the run's own), never a file it does not
    know. A save that fails (a full disk) removes its partial files and keeps every earlier checkpoint.
    The best epoch's checkpoint lives apart, in SAVE_PATH/best (one kept, replaced by a better one), out of
    the rotation's reach.
    """

    def __init__(self, parts: Dict[str, object], save_path: str, max_to_keep: int = 3, optional: Sequence[str] = ()):
        """parts: what a checkpoint holds, by name (a tf.train.Checkpoint's children); optional: the names of
        parts added after runs were saved without them: restored where a checkpoint has them, else left at
        their initial values, so that those runs still resume."""
        import tensorflow as tf
        self.directory = os.path.join(save_path, "checkpoints")
        self.best_directory = os.path.join(save_path, "best")
        self.parts, self.optional = dict(parts), tuple(optional)
        self.checkpoint = tf.train.Checkpoint(**self.parts)
        self.max_to_keep = max_to_keep
        self.manager = self.best_manager = None
        self.notes: List[str] = []  # what restore_or_start found wrong and did about it, for the log

    @property
    def latest(self) -> Optional[str]:
        return self.manager.latest_checkpoint if self.manager else None

    def _state(self) -> Tuple[bool, Optional[str], Optional[str]]:
        """(whether the state file exists, the checkpoint it names as latest, what is wrong with it)."""
        import tensorflow as tf
        path = os.path.join(self.directory, STATE_FILE)
        if not os.path.lexists(path):
            return False, None, None
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")  # TensorFlow warns twice for a state file it cannot parse
        try:
            state = tf.train.get_checkpoint_state(self.directory)
        except (ValueError, UnicodeDecodeError, tf.errors.OpError):
            state = None
        finally:
            logger.setLevel(level)
        if state is None:
            return True, None, f"its state file {path} is unreadable"
        return True, os.path.basename(state.model_checkpoint_path), None

    def open_run(self, resume: bool, saved_config: Dict, keys, absent: Optional[Dict] = None) -> bool:
        """Restores the run in the save path (or refuses it: restore_or_start, the saved config.json's
        `keys` compared with `saved_config`'s, `absent` giving the value of a key an older config.json
        lacks) and writes config.json where it changes; returns whether a checkpoint was restored."""
        save_path = os.path.dirname(self.directory)
        resumed = self.restore_or_start(resume, lambda: config_mismatch(save_path, saved_config, keys, absent))
        # Rewritten only where it would change: a resumed run on a full disk still starts.
        if not (resumed and read_config(save_path) == json.loads(json.dumps(saved_config))):
            write_json(os.path.join(save_path, "config.json"), saved_config)
        return resumed

    def restore_or_start(self, resume: bool, describe_mismatch=None) -> bool:
        """Restores the newest checkpoint that restores when resuming; returns whether one was."""
        files = checkpoint_files(self.directory)
        has_state, named, state_problem = self._state()
        if not files and not has_state:
            best = sorted(checkpoint_files(self.best_directory))
            if best and not resume:  # a run whose last checkpoints were deleted: its best is still work
                raise UsageError(f"--save_path holds a best checkpoint ({self.best_directory}: ckpt-{best[-1]}) "
                                 "from an earlier run; choose another --save_path for a new run (or move it away)")
            self._open_manager()
            return False
        if not has_state:
            state_problem = f"its state file {os.path.join(self.directory, STATE_FILE)} is missing"
        numbers = sorted(files, reverse=True)
        listing = ", ".join(f"ckpt-{n}" for n in numbers) or "no checkpoint files"
        if not resume:
            why = f"; {state_problem}" if state_problem else ""
            raise UsageError(f"--save_path already holds checkpoints ({self.directory}: {listing}{why}); pass "
                             "--resume to continue that run, or choose another --save_path for a new run")
        if describe_mismatch is not None:
            problem = describe_mismatch()
            if problem:
                raise UsageError(f"the checkpoints in {self.directory} are from another config ({problem}); "
                                 "resume with that config or choose another --save_path")
        if named and not any(named == f"ckpt-{n}" for n in numbers):
            state_problem = f"its state file names {named}, which is not there"
        try:
            number, notes = restore_newest(self.directory, self._read, "resume with the config that wrote it or "
                                           "choose another --save_path")
        except Unfit:
            raise
        except UsageError as e:
            raise UsageError(f"{e}" + (f"; {state_problem}" if state_problem else "") + ": restore a backup into "
                             "it, or start a new run with another --save_path") from None
        self.notes += notes
        return self._restored(number, named, state_problem, bool(notes))

    def _restored(self, number: int, named: Optional[str], state_problem: Optional[str], skipped: bool) -> bool:
        """After ckpt-`number` restored: rewrites the state file where it was wrong (naming the restored
        checkpoint alone: the manager's rotation then deletes none of the files it found on disk, only the
        ones this run saves), and opens the manager on it."""
        if state_problem or skipped or named != f"ckpt-{number}":
            text = f'model_checkpoint_path: "ckpt-{number}"\nall_model_checkpoint_paths: "ckpt-{number}"\n'
            write_text(os.path.join(self.directory, STATE_FILE), text)
            self.notes.append(f"{state_problem or f'its state file named {named}'}: rewrote it from the files on "
                              f"disk (latest ckpt-{number}; the older ones are kept, never rotated away)")
        self._open_manager()
        return True

    def _open_manager(self) -> None:
        import tensorflow as tf
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=self.max_to_keep)
        self._open_best_manager()

    def _open_best_manager(self) -> None:
        import tensorflow as tf
        self.best_manager = tf.train.CheckpointManager(self.checkpoint, self.best_directory, max_to_keep=1)

    def save(self, step: int) -> str:
        """Saves ckpt-`step`. A save that fails (a full disk, a read-only file system) or is interrupted (a
        second signal) removes the files it had begun; a failure raises SaveFailed. Every earlier checkpoint
        and the state file stay as they were."""
        return self._save(self.manager, self.directory, step)

    def save_best(self, step: int) -> str:
        """Saves ckpt-`step` as the best (the one before it removed once this one is written), as `save`."""
        return self._save(self.best_manager, self.best_directory, step)

    # --- the best epoch's checkpoint: always the one the run's history names ---------------------------
    def settle_best(self, want: Optional[int], known: Sequence[int]) -> Optional[int]:
        """Makes best/ hold ckpt-`want` (the step of the best epoch in the restored history; None before
        any), whatever failed or was killed between an epoch's checkpoint and its best save: kept where it
        is there and reads whole, else copied from checkpoints/ where that step still is. Where it cannot
        be had, best/ keeps the newest whole checkpoint of a step in `known` (the history's epoch ends)
        and says so. Partial files and checkpoints of other steps (a history rolled back past them) are
        removed. Returns the step best/ holds (None: nothing); the notes go to the log."""
        files = checkpoint_files(self.best_directory)
        whole = [n for n in sorted(files, reverse=True) if incomplete_reason(files[n]) is None]
        held = None
        if want is not None and want in whole and unreadable(self._best_prefix(want)) is None:
            held = want
        elif want is not None and self._copy_into_best(want):
            held = want
            self.notes.append(f"best/ did not hold the best epoch's checkpoint (step {want}; it held "
                              f"{', '.join(f'ckpt-{n}' for n in whole) or 'none'}): copied it from checkpoints/")
        else:
            held = next((n for n in whole if n in known and unreadable(self._best_prefix(n)) is None), None)
            if want is not None:
                self.notes.append(f"the best epoch's weights (step {want}) are in neither best/ nor checkpoints/; "
                                  f"best/ keeps {f'ckpt-{held}' if held is not None else 'nothing'}, and the run's "
                                  "best figures describe that")
        self._keep_only_best(held, files)
        return held

    def _best_prefix(self, step: int) -> str:
        return os.path.join(self.best_directory, f"ckpt-{step}")

    def _copy_into_best(self, step: int) -> bool:
        """checkpoints/ckpt-`step`, where it is whole and reads, copied into best/ (data first, the index
        last: a copy cut short is a partial checkpoint, removed next time); whether it was."""
        names = checkpoint_files(self.directory).get(step, [])
        if incomplete_reason(names) is not None or unreadable(os.path.join(self.directory, f"ckpt-{step}")):
            return False
        os.makedirs(self.best_directory, exist_ok=True)
        for name in sorted((n for n in names if "_temp" not in n), key=lambda n: n.endswith(".index")):
            source = os.path.join(self.directory, name)
            try:
                with replacing(os.path.join(self.best_directory, name)) as tmp:
                    shutil.copyfile(source, tmp)
            except SaveFailed:
                raise SaveFailed(f"could not copy {source} into {self.best_directory} (the best epoch's checkpoint): "
                                 "free space there, then continue with --resume") from None
        return True

    def _keep_only_best(self, held: Optional[int], files: Dict[int, List[str]]) -> None:
        """best/ left holding ckpt-`held` alone, its state file naming it, and the manager opened on that."""
        for number, names in files.items():
            if number != held:
                for name in names:
                    path = os.path.join(self.best_directory, name)
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        state = os.path.join(self.best_directory, STATE_FILE)
        if held is None:
            if os.path.lexists(state):
                os.remove(state)
        else:
            write_text(state, f'model_checkpoint_path: "ckpt-{held}"\nall_model_checkpoint_paths: "ckpt-{held}"\n')
        self._open_best_manager()

    def restore_best(self, step: int) -> str:
        """Restores best/ckpt-`step` (what settle_best left) into the run's objects, copied again from
        checkpoints/ where best/'s was damaged since; returns its path."""
        try:
            restore_newest(self.best_directory, self._read, "", numbers=[step])
        except Unfit:
            raise
        except UsageError as e:
            if not self._copy_into_best(step):
                raise UsageError(f"{e}, and checkpoints/ no longer holds that step: move {self.best_directory} away "
                                 "and continue with --resume to finish without the best epoch's figures") from None
            self.notes.append(f"best/ckpt-{step} could not be read ({e}): copied it again from checkpoints/")
            restore_newest(self.best_directory, self._read, "", numbers=[step])
        return self._best_prefix(step)

    def _read(self, prefix: str) -> None:
        """Restores `prefix` into the parts it must hold, and the optional ones it has."""
        import tensorflow as tf
        held = {name.split("/")[0] for name, _ in tf.train.list_variables(prefix)}
        missing = [name for name in self.optional if name not in held]
        root = self.checkpoint if not missing else tf.train.Checkpoint(
            **{name: part for name, part in self.parts.items() if name not in missing})
        root.restore(prefix).assert_existing_objects_matched()

    def _save(self, manager, directory: str, step: int) -> str:
        import tensorflow as tf
        before = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        faults.point("best" if directory == self.best_directory else "checkpoint")
        try:
            return manager.save(checkpoint_number=step)
        except BaseException as e:
            for name in set(os.listdir(directory)) - before if os.path.isdir(directory) else ():
                path = os.path.join(directory, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            if not isinstance(e, (tf.errors.OpError, OSError)):
                raise
            reason = getattr(e, "strerror", None) or op_error_reason(e)
            latest = self.latest or "none yet"
            raise SaveFailed(f"could not save checkpoint ckpt-{step} in {directory} ({reason}); its partial "
                             f"files were removed and the earlier checkpoints are intact (latest: {latest}): free "
                             "space there, then continue with --resume") from None


def op_error_reason(error) -> str:
    """What a TensorFlow error says, without the op's name: its last clause ("No space left on device")."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", lines[0] if lines else type(error).__name__)
    return re.sub(r"\s*\[Op:\w+\]$", "", text).rsplit("; ", 1)[-1][:160]


def describe(failures: Dict[int, str]) -> str:
    return "; ".join(f"ckpt-{n} ({why})" for n, why in failures.items())


def read_config(save_path: str) -> Optional[Dict]:
    """The saved run's config.json, None if there is none; one line for a file that cannot be read."""
    path = os.path.join(save_path, "config.json")
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); make it readable, or delete it to resume "
                         "without comparing configs (the checkpoint's shapes are still checked)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not JSON ({e}); restore it, or delete it to resume without comparing "
                         "configs (the checkpoint's shapes are still checked)") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path} holds a {type(saved).__name__}, not a JSON object; restore it, or delete it")
    return saved


def config_mismatch(save_path: str, current: Dict, keys, absent: Optional[Dict] = None) -> Optional[str]:
    """Names the `keys` (fields that fix variable shapes or the meaning of a saved position) whose
    value in the saved run's config.json differs from `current`, if any; a key the saved file lacks
    has its value in `absent` (a field added since), or is not compared."""
    saved = read_config(save_path)
    saved = dict(absent or {}, **saved) if saved is not None else {}

    def shown(value, other):  # quoted where the types differ: "16" there is not 16 here
        return repr(value) if type(value) is not type(other) else str(value)

    diffs = [f"{k}={shown(saved[k], current[k])} there, {shown(current[k], saved[k])} here"
             for k in keys if k in saved and saved[k] != current[k]]
    if "global_batch_size" in keys and saved.get("global_batch_size", current["global_batch_size"]) \
            != current["global_batch_size"]:  # the one a user changes by starting on another number of ranks
        diffs.append(f"keep it on any number of ranks with --global_batch_size {saved['global_batch_size']}")
    return "; ".join(diffs) or None
