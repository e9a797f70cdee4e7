"""Resuming a run (`resume=true` or `resume=<last.pt>`): which checkpoint, which config, which run folder.

A resume continues the experiment a checkpoint holds: its saved config, where only `run_only` keys (batch,
workers, epochs ...) may change; its classes, which the dataset must still have; its run folder, the one holding
its last.pt (so a copied run continues in the copy). The trainer restores the states themselves (`Trainer._restore`).
"""

from __future__ import annotations

from pathlib import Path

from detector.config import TrainConfig, build_options, given_keys, run_only_keys
from detector.errors import DetectorError
from detector.runtime import checkpoint as ckpt_io

# Keys a resumed run may change (declared `run_only` beside their fields); any other difference is refused.
RESUME_SAFE_KEYS = run_only_keys(TrainConfig)


def find_resume_checkpoint(resume: bool | str, project: Path) -> Path:
    """`resume=true` -> the newest <project>/*/weights/last.pt; otherwise the given path. A newer run without a
    last.pt (killed in its first epoch) is an error naming it: resuming an older run instead would surprise."""
    if resume is True:
        candidates = sorted(project.glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise DetectorError(f"resume: nothing to resume: no */weights/last.pt under {project}")
        started = max(project.glob("*/args.yaml"), key=lambda p: p.stat().st_mtime, default=None)  # set up, then trained
        if started is not None and started.stat().st_mtime > candidates[-1].stat().st_mtime and not (started.parent / "weights" / "last.pt").exists():
            raise DetectorError(f"resume: the newest run {started.parent} has no weights/last.pt (stopped in its first epoch), so "
                                "nothing to resume: train it again, or pass resume=<run>/weights/last.pt to resume an older run")
        return candidates[-1]
    path = Path(resume)
    if not path.exists():
        raise DetectorError(f"resume: checkpoint '{path}' not found")
    return path


def load_resume(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """The config and checkpoint a `resume=` run continues: the saved config with the run-only keys given now (any
    other change refused, naming it), and the planned epoch count (refused when all are done)."""
    path = find_resume_checkpoint(cfg.resume, Path(cfg.project))
    ckpt = ckpt_io.load_checkpoint(path)
    if ckpt["optimizer"] is None:
        raise DetectorError(f"resume: {path} is an inference file without optimizer state (a finished run's best.pt "
                            "is one); resume from the run's weights/last.pt")
    saved = ckpt["train_config"]
    given = {k: getattr(cfg, k) for k in given_keys(cfg)}  # what the user set, defaults or not
    changed = [k for k, v in given.items() if k in saved and not _same(k, v, saved[k]) and k not in RESUME_SAFE_KEYS]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {given[k]!r}" for k in changed)
        raise DetectorError(f"resume: {path} was trained with a different config ({diffs}); start a new run instead")
    merged = dict(saved)
    merged.update({k: v for k, v in given.items() if k in RESUME_SAFE_KEYS})
    merged["resume"] = str(path)
    resumed = build_options(TrainConfig, merged, str(path))
    # the plan: epochs= given now, else the saved plan (a budget's refit; checkpoints before it kept it in the config)
    planned = resumed.epochs if "epochs" in given else ckpt["train_state"].get("epochs") or resumed.epochs
    ckpt["train_state"]["epochs"] = planned
    if ckpt["epoch"] + 1 >= planned:
        done = (f"stopped early (patience={resumed.patience}) after {planned} of {resumed.epochs} epochs"
                if ckpt["train_state"].get("stopped_early") else f"already finished all {planned} epochs")
        raise DetectorError(f"resume: {path} {done}; nothing to resume (pass epochs=N to train longer)")
    ckpt["train_state"]["stopped_early"] = False  # a longer plan given now continues it
    return resumed, ckpt


def _same(key: str, given: object, saved: object) -> bool:
    """A config value given now equals the saved one; the dataset path as the file it names (runs record it absolute)."""
    if key == "data" and isinstance(given, str) and isinstance(saved, str):
        return Path(given).absolute() == Path(saved).absolute()
    return given == saved


def resumed_run_dir(last: Path, recorded: str) -> Path:
    """Where a resumed run writes: the run folder holding `last` (`<run>/weights/last.pt`), so a copied or moved
    run continues in its copy; the recorded folder for a checkpoint kept elsewhere, while that folder exists."""
    own = last.resolve().parent
    if own.name == "weights" or not Path(recorded).exists():
        return own.parent
    return Path(recorded)


def check_resume_classes(ckpt: dict, category_ids: list[int], names: list[str], source: str, annotations: Path) -> None:
    """A resumed run must see the classes it was trained on; name what changed in the dataset since."""
    pairs = {"category_ids": (list(ckpt["category_ids"]), [int(c) for c in category_ids]), "names": (list(ckpt["names"]), list(names))}
    diffs = [f"nc: {len(ckpt['category_ids'])} -> {len(category_ids)}"] if len(ckpt["category_ids"]) != len(category_ids) else []
    for key, (saved, now) in pairs.items():
        if saved != now:
            i = next(i for i in range(max(len(saved), len(now))) if i >= min(len(saved), len(now)) or saved[i] != now[i])
            show = [repr(v[i]) if i < len(v) else "(none)" for v in (saved, now)]
            diffs.append(f"{key}[{i}]: {show[0]} -> {show[1]}")
    if diffs:
        raise DetectorError(f"resume: {source} was trained on other classes than {annotations} has now ({'; '.join(diffs)}); start a new run instead")
