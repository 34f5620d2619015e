"""The TRAK baseline stage: checkpoints, traker features and scores, rankings.

For every target the rank stage ranked (the target ids in EXP/rankings of the rank
methods), TRAK (:mod:`attribution.baselines.trak`, MadryLab's ``traker``) scores every
training image from ``checkpoints`` full-data models, and the scores rank the training
images (method ``"trak"``; all classes by default, TRAK's native view).

The checkpoints are the support stage's full-data ensemble models: the [support]
recipe (model, epochs, batch size, lr) and torch seeds ``retrain.training_seed(seed,
i)`` for i = 0 .. checkpoints-1, trained with one torch thread as the support workers
do, so the weights are the same. They are trained in this process (an MLP takes well
under a second) and TRAK runs in this process too, on its GPU when it has one: the
stage is one featurize pass per checkpoint, nothing to spread over Ray workers at this
size; ``address`` is accepted for the pipeline's signature.

Outputs (all written atomically):
- ``EXP/trak/checkpoints/model-NNN.pt``: state dict, recipe fingerprint, torch seed;
  reused when the recipe and seed match.
- ``EXP/trak/features/``: traker's save directory (projected-gradient features per
  checkpoint), deleted and recreated by every computing run (traker 0.3.2 cannot be
  told to ignore a stale one).
- ``EXP/trak/scores/chunk-NNNNN.npz``: ``scores`` (n_train x chunk targets, float32),
  ``train_ids``, ``target_ids``; targets are scored ``target_chunk`` at a time, which
  bounds finalize_scores' memory to n_train x target_chunk floats.
- ``EXP/rankings/trak-classNNN.parquet``: one file per class of targets, schema
  :data:`attribution.ranking.RANKING_SCHEMA`, the settings in the Parquet metadata.

Resume: when every class file exists with the same settings the stage does nothing;
files with other settings are refused with the differing keys named (``force=True`` /
``attribution trak --force`` recomputes them).

Preset section ``[trak]``: see :class:`TrakSettings`.
"""

from __future__ import annotations

from attribution.presets import section_settings

from attribution.experiment import settings_differences
from attribution.ranking import ranked_targets

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from attribution import retrain
from attribution.baselines.trak import TrakScorer, cuda_projector_available, train_checkpoints
from attribution.experiment import Experiment, write_table_atomic
from attribution.ranking import _order, _table, ranking_file_name, sort_rankings
from cluster.support import SupportSettings, _data_arrays, recipe_fingerprint

METHOD = "trak"
SETTINGS_KEY = b"attribution.trak.settings"


@dataclass
class TrakSettings:
    """The [trak] section of a preset (every field has a default)."""

    checkpoints: int = 5               # full-data models featurized (TRAK's M; the paper: 100 on CIFAR-10)
    proj_dim: int = 256                # random projection of the per-example gradients (paper: 20480)
    same_class: bool = False           # False: rank every training image (native); True: only the target's class
    top_k: int | None = None           # rows per target; None: the rank stage's top_k
    lambda_reg: float = 0.0            # ridge term on X^T X (traker's lambda_reg)
    seed: int | None = None            # projector seed; None: the preset's seed
    batch_size: int = 256              # images per featurize / score call
    target_chunk: int = 1024           # targets per finalize_scores: memory n_train x target_chunk floats
    max_projector_mb: int = 1024       # CPU projection-matrix block (whole matrix when it fits)
    device: str = "auto"               # "auto": CUDA when available, else CPU

    @classmethod
    def from_preset(cls, preset: dict) -> "TrakSettings":
        from cluster.ranking import rank_settings

        settings = section_settings(cls, preset, "trak")
        if settings.top_k is None:
            settings.top_k = int(rank_settings(preset)["top_k"])
        for name, low in (("checkpoints", 1), ("proj_dim", 1), ("top_k", 1), ("batch_size", 1),
                          ("target_chunk", 1), ("max_projector_mb", 1)):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"trak.{name} must be an integer >= {low}, got {value!r}")
        if isinstance(settings.lambda_reg, bool) or not isinstance(settings.lambda_reg, (int, float)) \
                or settings.lambda_reg < 0:
            raise ValueError(f"trak.lambda_reg must be a number >= 0, got {settings.lambda_reg!r}")
        if not isinstance(settings.same_class, bool):
            raise ValueError(f"trak.same_class must be true or false, got {settings.same_class!r}")
        if settings.device != "auto" and not str(settings.device).startswith(("cpu", "cuda")):
            raise ValueError(f"trak.device must be \"auto\", \"cpu\" or \"cuda[:i]\", got {settings.device!r}")
        settings.lambda_reg = float(settings.lambda_reg)
        return settings

    def scorer(self, save_dir: Path, progress: bool = True) -> TrakScorer:
        return TrakScorer(save_dir, proj_dim=self.proj_dim, lambda_reg=self.lambda_reg, batch_size=self.batch_size,
                          device=self.device, seed=self.seed, max_projector_mb=self.max_projector_mb,
                          progress=progress)


# ----------------------------------------------------------------------------- helpers


def trak_folder(exp: Experiment) -> Path:
    return exp.root / "trak"






def _stored_settings(path: Path) -> dict | None:
    raw = (pq.read_schema(path).metadata or {}).get(SETTINGS_KEY)
    return json.loads(raw) if raw else None


def _sha(values) -> str:
    return hashlib.sha256(np.asarray(values, np.int64).tobytes()).hexdigest()[:16]


def _save_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def rank_by_scores(scores: np.ndarray, train_ids: np.ndarray, train_labels: np.ndarray, target_ids: np.ndarray,
                   target_labels: np.ndarray, top_k: int, same_class: bool) -> pa.Table:
    """Rankings (RANKING_SCHEMA, method "trak") from a (n_train, n_targets) score matrix.

    Sorted by (score desc, train id asc) like every ranking; ``same_class`` keeps only
    the training images of the target's class.
    """
    rows_ids, rows_scores = [], []
    for j in range(len(target_ids)):
        keep = np.flatnonzero(train_labels == target_labels[j]) if same_class else np.arange(len(train_ids))
        order = _order(train_ids[keep], scores[keep, j].astype(np.float64), int(top_k))
        rows_ids.append(train_ids[keep][order])
        rows_scores.append(scores[keep, j][order])
    return _table(target_ids, METHOD, rows_ids, rows_scores)


# ----------------------------------------------------------------------------- the stage


def estimate_trak(exp: Experiment, train: dict, targets: dict, settings: TrakSettings, support: SupportSettings,
                  data_key: dict, force: bool = False, progress: bool = True) -> dict:
    """Everything after loading: checkpoints, TRAK scores, ranking files. Returns a summary.

    train : images (N,H,W,C uint8), labels, ids, mean, std, num_classes
    targets : images, labels, ids of the targets (ascending ids)
    """
    start = time.perf_counter()
    s = settings
    config = support.train_config()
    recipe = recipe_fingerprint(config, data_key, support.seed, len(train["ids"]))
    device = s.scorer(trak_folder(exp) / "features")._device()
    projector = "CudaProjector" if device.startswith("cuda") and cuda_projector_available() else "BasicProjector"
    common = {"checkpoints": s.checkpoints, "proj_dim": s.proj_dim, "same_class": s.same_class, "top_k": s.top_k,
              "lambda_reg": s.lambda_reg, "seed": s.seed, "max_projector_mb": s.max_projector_mb,
              "projector": projector, "recipe": recipe}
    target_ids = np.asarray(targets["ids"], np.int64)
    target_labels = np.asarray(targets["labels"], np.int64)
    classes = [int(c) for c in np.unique(target_labels)]
    wanted = {c: {**common, "targets_sha256": _sha(target_ids[target_labels == c])} for c in classes}

    # 1) what exists: matching files are kept, others refused unless forced
    exp.rankings.mkdir(parents=True, exist_ok=True)
    todo, reused = [], []
    for c in classes:
        path = exp.rankings / ranking_file_name(METHOD, c)
        if path.exists():
            stored = _stored_settings(path) or {}
            if stored == wanted[c]:
                reused.append(path.name)
                continue
            if not force:
                raise ValueError(f"{path} was computed with other settings or targets ({settings_differences(stored, wanted[c])}); "
                                 "use a new --exp, delete the trak-*.parquet files, or rerun with force "
                                 "('attribution trak --force')")
        todo.append(c)
    stale = [p for p in exp.rankings.glob(f"{METHOD}-class*.parquet")
             if int(p.stem.rsplit("class", 1)[1]) not in classes]
    if stale and not force:
        raise ValueError(f"{[p.name for p in stale]} rank classes no target of the rank stage has now (the rank "
                         "stage's targets changed); rerun with force ('attribution trak --force') or a new --exp")
    for path in stale:
        path.unlink()
    if not todo:
        summary = {"targets": len(target_ids), "computed_files": 0, "reused_files": len(reused),
                   "projector": projector, "proj_dim": s.proj_dim, "checkpoints": s.checkpoints}
        exp.record_stage(METHOD, reused=True, computed_files=[], reused_files=sorted(reused),
                         last_run_seconds=round(time.perf_counter() - start, 1))
        return summary

    # 2) checkpoints: the support stage's full-data ensemble models
    folder = trak_folder(exp)
    train_start = time.perf_counter()
    trainer = retrain.Retrainer(config, train["images"], train["labels"], train["ids"], train["mean"], train["std"],
                                train["num_classes"])
    states, trained = train_checkpoints(trainer, folder / "checkpoints", s.checkpoints, support.seed, recipe,
                                        threads=1, progress=progress)
    train_seconds = time.perf_counter() - train_start

    # 3) TRAK features (fresh traker save dir) and scores, target_chunk targets at a time
    image_shape = tuple(np.asarray(train["images"]).shape[1:])
    model_fn = lambda: retrain.build_model(config.model, int(train["num_classes"]), image_shape)  # noqa: E731
    scorer = s.scorer(folder / "features", progress=progress)
    scorer.fit(model_fn, states, trainer.x if trainer.x is not None else
               retrain.to_tensor(train["images"], train["mean"], train["std"]), train["labels"])
    scores_dir = folder / "scores"
    shutil.rmtree(scores_dir, ignore_errors=True)  # only this stage's chunk files live here
    train_ids = np.asarray(train["ids"], np.int64)
    train_labels = np.asarray(train["labels"], np.int64)
    todo_mask = np.isin(target_labels, todo)
    chunk_targets = np.flatnonzero(todo_mask)
    tables = {c: [] for c in todo}
    score_seconds = 0.0
    for chunk, begin in enumerate(tqdm(range(0, len(chunk_targets), s.target_chunk), desc="trak score chunks",
                                       unit="chunk", disable=not progress, file=sys.stderr, dynamic_ncols=True)):
        rows = chunk_targets[begin:begin + s.target_chunk]
        x = retrain.to_tensor(np.asarray(targets["images"])[rows], train["mean"], train["std"])
        result = scorer.score(x, target_labels[rows])
        score_seconds += result.seconds
        _save_npz_atomic(scores_dir / f"chunk-{chunk:05d}.npz", scores=result.scores, train_ids=train_ids,
                         target_ids=target_ids[rows])
        table = rank_by_scores(result.scores, train_ids, train_labels, target_ids[rows], target_labels[rows],
                               s.top_k, s.same_class)
        for c in np.unique(target_labels[rows]):
            ids_c = pa.array(target_ids[rows][target_labels[rows] == c], pa.int64())
            tables[int(c)].append(table.filter(pc.is_in(table.column("target_id"), value_set=ids_c)))
    computed = []
    for c in todo:
        merged = sort_rankings(pa.concat_tables(tables[c]))
        merged = merged.replace_schema_metadata({SETTINGS_KEY: json.dumps(wanted[c], sort_keys=True).encode()})
        path = exp.rankings / ranking_file_name(METHOD, c)
        write_table_atomic(merged, path)
        computed.append(path.name)
    seconds = round(time.perf_counter() - start, 1)
    summary = {"targets": len(target_ids), "computed_files": len(computed), "reused_files": len(reused),
               "projector": scorer.projector_, "proj_dim": s.proj_dim, "checkpoints": s.checkpoints,
               "trained_checkpoints": trained, "seconds": seconds}
    exp.record_stage(METHOD, settings=asdict(s), recipe=recipe, projector=scorer.projector_, device=scorer.device_,
                     proj_dim=s.proj_dim, checkpoints=s.checkpoints, trained_checkpoints=trained,
                     n_train=len(train_ids), n_targets=len(target_ids), top_k=s.top_k, same_class=s.same_class,
                     seconds=seconds, train_seconds=round(train_seconds, 1),
                     featurize_seconds=round(scorer.featurize_seconds_, 1), score_seconds=round(score_seconds, 1),
                     reused=False, computed_files=sorted(computed), reused_files=sorted(reused),
                     outputs=["trak/checkpoints/", "trak/features/", "trak/scores/", "rankings/trak-*.parquet"])
    return summary


def run_trak_stage(exp: Experiment, preset: dict, address: str | None = None, force: bool = False,
                   progress: bool = True) -> dict:
    """The pipeline's trak stage: reads preset['data'], ['support'] (the recipe), ['rank'] and ['trak']."""
    from attribution.data import load_dataset

    exp = exp if isinstance(exp, Experiment) else Experiment(exp)
    settings = TrakSettings.from_preset(preset)
    support = SupportSettings.from_preset(preset)
    target_ids = ranked_targets(exp, "trak")
    data = preset.get("data") or {}
    name, root = data.get("dataset", "fashion-mnist"), data.get("root") or None
    per_class = data.get("train_per_class") or None
    data_seed = int(data.get("seed", preset.get("seed", 0)))
    train_set = load_dataset(name, "train", root, n_per_class=per_class, seed=data_seed)
    if not train_set.in_memory:
        raise ValueError(f"the trak stage holds the training set in memory; {name} is read from files "
                         "(too large): not supported yet")
    test_set = load_dataset(name, "test", root)
    try:
        positions = test_set.positions_of(target_ids)
    except KeyError as error:
        raise ValueError(f"{error.args[0]}: the targets in {exp.rankings} are not test images of {name}; "
                         "rerun the rank stage or fix [data]") from error
    targets = {"images": test_set.images(positions), "labels": np.asarray(test_set.labels[positions], np.int64),
               "ids": target_ids}
    data_key = {"dataset": name, "root": root, "train_per_class": per_class, "seed": data_seed}
    return estimate_trak(exp, _data_arrays(train_set), targets, settings, support, data_key, force=force,
                         progress=progress)
