"""``shardlib check RUN_DIR``: what a run directory holds and what a start would resume, without training.

    shardlib check runs/tiny            # every step's files and metadata, the config record
    shardlib check runs/tiny --deep     # and every array, read back against its checksum

For each complete checkpoint step it runs the checks a start runs before restoring
(``Checkpointer.read_meta``: the step's files against their digests, the metadata against what
its version records; ``shardlib.training.checkpoint_integrity`` says what each covers). Data
files over ``HASHED_UP_TO`` are listed by size only, and only their arrays' checksums verify their
bytes: ``--deep`` restores every step's arrays on one CPU device, in their stored dtypes, onto
targets read from Orbax's own metadata of the step (no model is built and nothing of it is
compiled; the checksum is one small jitted reduction), and compares them with the checksums saved.

It also names the saves that never completed and the steps a fallback set aside, and the run's
config record (``shardlib.training.run_guard``): the fingerprint of the last start and whether
``config.json`` agrees with it. It writes nothing. Exit status 0 when the newest step restores,
1 when the newest step is damaged or no step restores, none saved yet included (``EXIT_DAMAGED``),
2 for a directory that is not a run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

from shardlib.training.checkpoint_integrity import Damaged, read_file_digests

EXIT_DAMAGED = 1
YES, NO, UNREAD = "yes", "no", "if its arrays are intact"  # the "restores" column


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """One checkpoint step: what its files, metadata and (``deep``) arrays showed."""

    step: int
    data_position: int | None  # batches consumed when it was saved; None when its metadata is unusable
    files: str  # "ok (N)", "not listed" (a version before file digests) or "damaged"
    arrays: str  # "not read" (without deep), "ok (N)", "differ" or "unreadable"
    restores: str  # YES, NO or UNREAD (files intact as far as listed; data files listed by size only)
    problem: str = ""  # what is damaged, as a start would say it
    warning: str = ""  # what an older checkpoint leaves unverified


@dataclasses.dataclass(frozen=True)
class ConfigRecord:
    """The run directory's record of its config (``config-history.jsonl``, ``config.json``)."""

    digest: str | None  # of the last start's fingerprint; None: nothing recorded
    starts: int  # starts recorded in the history
    last_start: str  # "at <time> from step <n>", or ""
    summary: str  # the model and data the fingerprint holds, in a few words
    disagreements: tuple[str, ...]  # keys where config.json differs from the last start's fingerprint


@dataclasses.dataclass(frozen=True)
class RunCheck:
    """Everything ``check_run`` found in one run directory."""

    run_dir: pathlib.Path
    steps: tuple[StepCheck, ...]  # oldest first
    incomplete: tuple[str, ...]  # temporary directories of saves that never completed
    set_aside: tuple[str, ...]  # steps a fallback moved to checkpoints-unusable/
    config: ConfigRecord
    deep: bool

    @property
    def resumes_from(self) -> int | None:
        """The step a start with ``checkpoint.fallback=true`` resumes from (the newest that restores)."""
        return next((s.step for s in reversed(self.steps) if s.restores != NO), None)

    @property
    def healthy(self) -> bool:
        """The newest step restores (so a start resumes it without falling back)."""
        return bool(self.steps) and self.steps[-1].restores != NO


def _damage_text(err: Exception) -> str:
    """The damage alone (``Damaged``), without the step and path a CheckpointError adds."""
    cause = err.__cause__
    return str(cause) if isinstance(cause, Damaged) else str(err)


def _check_step(checkpointer, step: int, deep: bool) -> StepCheck:
    from shardlib.training.checkpoint import CheckpointError

    step_dir = checkpointer.step_path(step)
    warnings: list[str] = []
    try:
        meta = checkpointer.read_meta(step, log=warnings.append)
        listed = read_file_digests(step_dir)  # read_meta has checked it
    except CheckpointError as err:
        return StepCheck(step, None, "damaged", "not read", NO, problem=_damage_text(err))
    files = f"ok ({len(listed)})" if listed is not None else "not listed"
    warning = _step_text(checkpointer, step, warnings[0].removeprefix("warning: ")) if warnings else ""
    position = meta.get("data_position")
    if not deep:
        by_size = [name for name, record in (listed or {}).items() if "sha256" not in record]
        restores = YES if listed is not None and not by_size else UNREAD
        return StepCheck(step, position, files, "not read", restores, warning=warning)
    try:
        count = _restore_arrays(checkpointer, step)
    except CheckpointError as err:
        text = _step_text(checkpointer, step, str(err))
        arrays = "differ" if text.startswith("fails its checksum") else "unreadable"
        return StepCheck(step, position, files, arrays, NO, problem=text, warning=warning)
    return StepCheck(step, position, files, f"ok ({count})", YES, warning=warning)


def _step_text(checkpointer, step: int, message: str) -> str:
    """A CheckpointError's or warning's message about ``step`` without the step, its path and the older steps."""
    where = f"checkpoint step {step} at {checkpointer.step_path(step)} "
    return message.removeprefix(where).removesuffix(f"; {checkpointer.older_steps_text(step)}")


def _restore_arrays(checkpointer, step: int) -> int:
    """Restores ``step``'s arrays onto one CPU device (verified by ``Checkpointer.restore``); how many.

    The targets' shapes and dtypes are those Orbax recorded for the step (its public metadata).
    """
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding

    device = SingleDeviceSharding(jax.devices("cpu")[0])
    saved = ocp.PyTreeCheckpointHandler().metadata(checkpointer.step_path(step) / "state").tree
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype, sharding=device), saved)
    params, opt_state, _ = checkpointer.restore(step, target["params"], target["opt_state"])
    count = len(jax.tree.leaves(params)) + len(jax.tree.leaves(opt_state))
    del params, opt_state
    return count


def _config_record(run_dir: pathlib.Path) -> ConfigRecord:
    from shardlib.training.run_guard import CONFIG_FILE, HISTORY_FILE, differences, digest, fingerprint

    starts = []
    history = run_dir / HISTORY_FILE
    if history.is_file():
        for line in history.read_text().splitlines():
            try:
                starts.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: run_guard skips it too
                continue
    last = next((s for s in reversed(starts) if isinstance(s, dict) and "fingerprint" in s), None)
    config_file = run_dir / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): a start would refuse this run directory") from err
    recorded = last["fingerprint"] if last else (fingerprint(config) if config else None)
    if recorded is None:
        return ConfigRecord(None, 0, "", "", ())
    changed = differences(recorded, fingerprint(config)) if config and last else []
    when = f"at {last.get('started_at', '?')} from step {last.get('start_step', '?')}" if last else ""
    return ConfigRecord(
        digest(recorded), len(starts), when, _summary(recorded), tuple(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
    )


def _summary(fp: dict) -> str:
    model = ", ".join(f"{k.split('.')[-1]} {fp[k]}" for k in ("model.n_layers", "model.d_model") if k in fp)
    data = fp.get("data.source", "?") + (f" tokenized by {fp['data.tokenizer']}" if fp.get("data.tokenizer") else "")
    return f"model {model}; data {data}; seed {fp.get('seed')}; batch {fp.get('batch_size')} x {fp.get('seq_len')}"


def check_run(run_dir: str | pathlib.Path, *, deep: bool = False) -> RunCheck:
    """Checks every complete checkpoint step of ``run_dir`` and reads its config record; writes nothing.

    Raises ValueError when ``run_dir`` is not a run directory (neither ``checkpoints/`` nor a config
    record), or its ``config.json`` is not JSON.
    """
    from shardlib.training.checkpoint import UNUSABLE_DIR, Checkpointer

    run_dir = pathlib.Path(run_dir)
    directory = run_dir / "checkpoints"
    config = _config_record(run_dir) if run_dir.is_dir() else None
    if not directory.is_dir() and (config is None or config.digest is None):
        raise ValueError(f"{run_dir} is not a run directory: it holds neither checkpoints/ nor config.json")
    steps, incomplete = [], []
    if directory.is_dir():  # Checkpointer would create it
        with Checkpointer(directory, every=0, keep=1, async_save=False) as checkpointer:
            steps = [_check_step(checkpointer, step, deep) for step in checkpointer.complete_steps()]
            incomplete = [p.name for p in checkpointer.incomplete_saves()]
    aside = sorted(p.name for p in (run_dir / UNUSABLE_DIR).iterdir()) if (run_dir / UNUSABLE_DIR).is_dir() else []
    return RunCheck(run_dir, tuple(steps), tuple(incomplete), tuple(aside), config, deep)


def format_check(check: RunCheck) -> str:
    """The check as text: a verdict line, the steps' table, the config record."""
    lines = [_verdict(check), ""]
    if check.steps:
        rows = [
            [s.step, "-" if s.data_position is None else s.data_position, s.files, s.arrays, s.restores]
            for s in check.steps
        ]
        lines += _columns(["step", "data position", "files", "arrays", "restores"], rows)
        lines += [f"  step {s.step}: {s.problem}" for s in check.steps if s.problem]
        lines += [f"  step {s.step}: {s.warning}" for s in check.steps if s.warning]
        lines.append(
            "  files: checked against the step's digests (sizes, and sha256 up to 1 MiB); arrays: "
            + ("restored on one CPU device against their checksums" if check.deep else "read by --deep only")
        )
    else:
        lines.append("  no complete checkpoint")
    lines += [f"  incomplete save (never restored from): {name}" for name in check.incomplete]
    lines += [f"  set aside by a fallback (checkpoints-unusable/): {name}" for name in check.set_aside]
    c = check.config
    lines.append("")
    if c.digest is None:
        lines.append("config record: none (no config-history.jsonl or config.json)")
    else:
        started = f", last {c.last_start}" if c.last_start else ""
        lines.append(f"config fingerprint {c.digest} ({c.starts} start(s) recorded{started}): {c.summary}")
        lines += [f"  config.json differs from the last start's record: {d}" for d in c.disagreements]
    return "\n".join(lines)


def _columns(header: list[str], rows: list[list[object]]) -> list[str]:
    """The steps' table: the two number columns right-aligned, the rest left (training imports no analysis
    module, whose report tables look the same)."""
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row, numbers=True):
        return (
            "  "
            + "  ".join(
                c.rjust(w) if numbers and i < 2 else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )

    return [line(header, numbers=False), "  " + "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])]


def _verdict(check: RunCheck) -> str:
    where = f"{check.run_dir}:"
    if not check.steps:
        return f"{where} no checkpoint to resume from: a start trains from step 0"
    newest, resumes = check.steps[-1], check.resumes_from
    if check.healthy:
        sure = "" if newest.restores == YES else f" ({UNREAD}: --deep reads them)"
        return f"{where} a start resumes from step {newest.step}{sure}"
    if resumes is None:
        return f"{where} DAMAGED: no step restores ({len(check.steps)} checked); a start fails, with fallback too"
    return (
        f"{where} DAMAGED: the newest step {newest.step} does not restore; a start fails unless "
        f"checkpoint.fallback=true, which resumes from step {resumes}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``shardlib check RUN_DIR [--deep]`` (``python -m shardlib.training.run_check``)."""
    parser = argparse.ArgumentParser(
        prog="shardlib check",
        description="Check a run directory offline: every checkpoint step's integrity, which steps would "
        "restore, and the config fingerprint. Writes nothing and starts no training.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (the config's run_dir)")
    parser.add_argument(
        "--deep",
        action="store_true",
        help="also restore every step's arrays on one CPU device and compare them with their checksums",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    args = parser.parse_args(argv)
    from shardlib.training.cli import run_guarded

    def run(args: argparse.Namespace) -> int:
        check = check_run(args.run_dir, deep=args.deep)
        print(format_check(check))
        return 0 if check.healthy else EXIT_DAMAGED

    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
