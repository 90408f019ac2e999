"""`idjax run CONFIG.yaml`: the whole pipeline from one YAML file, every stage cached on disk.

Why: a selection experiment is a chain of slow steps (tokenize, warm up, embed, select, fine-tune,
evaluate) that researchers re-run many times while changing one knob. Each stage here writes its
result under out/<stage>/ together with a done-marker (done.json) holding the fingerprint of its
inputs: the config keys it reads, the content of the data files and model, and the fingerprints of
the stages it depends on. A re-run skips every stage whose fingerprint matches ("stage X: cached"),
recomputes a stage whose inputs changed, and then everything downstream of it. Within the select
stage the pool's embeddings and landmark gradients live in out/store/, the resumable chunked store
of `idjax select`, so a run killed in the middle resumes at the first missing chunk and a change of
k or of the target set recomputes no embedding.

    out/data/     pool.npz, targets.npz, eval.npz (tokenized), summary.json
    out/warmup/   the warmed-up model and its optimizer state (absent recipe: the GD update model)
    out/store/    chunked embeddings / gradients / curvature (never wiped: fingerprinted by name)
    out/select/   selection.jsonl + selection.meta.json
    out/train/    model/: the model fine-tuned on the selection (HF safetensors + optimizer state)
    out/eval/     eval.json: target loss before and after fine-tuning
    out/run.json  the configuration and summary of the last run

Relative input paths in a config file are relative to the file (a config travels with its data);
`out` is relative to the working directory. Every file is written to a temporary name and
renamed; a stage's done-marker is written last, so an interrupted stage is never taken as done.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

from idjax.example_file import load_examples, save_examples
from idjax.io import atomic_write
from idjax.configs import EmbedConfig, SelectConfig
from idjax.run_config import ConfigError, RunConfig, check_inputs

log = logging.getLogger(__name__)

STAGES = ("data", "warmup", "select", "train", "eval")
MARKER = "done.json"      # a finished stage: {"fingerprint", "inputs", "result", ...}
STARTED = "started.json"  # a stage directory this command owns (written before any work)
_HASH_WHOLE = 256 << 20   # files up to this size are hashed whole; larger ones by size, mtime, head and tail


# ----------------------------------------------------------------------------- files and fingerprints


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode() + b"\n"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _file_digest(path: Path) -> str:
    """sha256 of the content; for huge files (model shards) size, mtime and 1 MiB at each end."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _HASH_WHOLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def path_fingerprint(path) -> str | None:
    """A fingerprint of a file's or a directory's content (not of its name or location)."""
    from idjax.io import fingerprint

    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return _file_digest(p)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
        return fingerprint([[str(q.relative_to(p)), _file_digest(q)] for q in files])
    raise ConfigError(f"no such file or directory: {p}")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    """What `run` did: per-stage status ("computed", "cached", "skipped"), timings and the summary."""

    out: Path
    status: dict[str, str]
    seconds: dict[str, float]
    summary: dict
    results: dict[str, dict | None]        # each stage's result (its done.json "result")
    fingerprints: dict[str, str | None]    # each stage's input fingerprint (None: skipped)


class _Runner:
    def __init__(self, config: RunConfig, force: Iterable[str], source=None):
        force = set(force)
        unknown = force - set(STAGES) - {"all"}
        if unknown:
            raise ConfigError(f"--force: unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(STAGES)}, all")
        self.config = config
        self.where = f"{source}: " if source is not None else ""  # config errors found late name the file
        self.out = Path(config.out)
        first = min([STAGES.index(s) for s in force if s in STAGES] + ([0] if "all" in force else [len(STAGES)]))
        self.force = set(STAGES[first:])  # forcing a stage forces everything downstream
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.fps: dict[str, str | None] = {}
        self.dirty = False  # a stage was computed: everything after it is recomputed
        self._tok = None
        self._model_key, self._model = None, None

    # -- stage bookkeeping

    def stage(self, name: str, inputs: dict, compute: Callable[[Path], dict], *, resumable: bool = False) -> dict:
        """Run `compute(stage_dir)` unless the done-marker holds the fingerprint of `inputs`."""
        from idjax.io import fingerprint

        d = self.out / name
        fp = fingerprint(inputs)
        self.fps[name] = fp
        marker = _read_json(d / MARKER)
        if name not in self.force and not self.dirty and marker and marker.get("fingerprint") == fp:
            log.info("stage %s: cached (%s)", name, d)
            self.status[name], self.seconds[name] = "cached", 0.0
            return marker["result"]
        if name in self.force:
            why = "forced"
        elif not marker:
            why = "no finished result"
        elif self.dirty:
            why = "an upstream stage was recomputed"
        else:
            old = marker.get("inputs") or {}
            changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
            why = f"inputs changed: {', '.join(changed) or 'fingerprint'}"
        log.info("stage %s: computing (%s)", name, why)
        # Resume only the same work cut short: not when forced, nor after an upstream recompute.
        resume = self._claim(d, fp, resumable and name not in self.force and not self.dirty)
        t0 = time.perf_counter()
        result = compute(d, resume) if resumable else compute(d)
        seconds = round(time.perf_counter() - t0, 2)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_json(d / MARKER, {"stage": name, "fingerprint": fp, "inputs": inputs, "result": result,
                                 "seconds": seconds, "finished": now})
        log.info("stage %s: done in %.1f s", name, seconds)
        self.status[name], self.seconds[name] = "computed", seconds
        self.dirty = True
        from idjax import host_memory

        host_memory.release()  # compiled programs and freed heap of this stage
        return result

    def _claim(self, d: Path, fp: str, resumable: bool) -> bool:
        """Make `d` ours and empty (or keep it to resume the same interrupted work); True if resuming."""
        if d.exists() and not d.is_dir():
            raise ConfigError(f"{d} exists and is not a directory; choose another out directory")
        if d.is_dir() and any(d.iterdir()) and not ((d / MARKER).exists() or (d / STARTED).exists()):
            raise ConfigError(f"{d} exists and was not written by `idjax run`; choose another out directory")
        (d / MARKER).unlink(missing_ok=True)  # from here on the old result is no longer "done"
        started = _read_json(d / STARTED)
        if resumable and started and started.get("fingerprint") == fp:
            return True
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        _write_json(d / STARTED, {"fingerprint": fp})
        return False

    # -- lazily loaded things (a fully cached run loads no model)

    def tokenizer(self):
        from idjax import models

        if self._tok is None:
            self._tok = models.load_tokenizer(models.resolve(self.config.model))
        return self._tok

    def model(self, path):
        """One model at a time, so a run never holds the base, warmed-up and trained models at once."""
        from idjax import models

        key = str(path)
        if self._model_key != key:
            self._model, self._model_key = None, None
            self._model, _ = models.load(path, dtype=self.config.dtype, tokenizer=False)
            self._model.remat = self.config.remat
            self._model_key = key
        return self._model

    def take_model(self, path):
        """The model at `path` for a trainer to own (donate_model): no copy is kept here."""
        model = self.model(path)
        self._model, self._model_key = None, None
        return model

    def before_path(self):
        """The model selection scores and fine-tuning starts from: the warmed-up one, else the base."""
        return self.out / "warmup" if self.config.warmup is not None else self.config.model

    # -- the stages

    def run(self) -> RunResult:
        c = self.config
        t_start = time.perf_counter()
        check_inputs(c)
        self.out.mkdir(parents=True, exist_ok=True)
        from idjax import host_memory

        host_memory.trim_after_compiles()
        model_fp = path_fingerprint(self._resolved_model())

        # 1. data
        data_inputs = {"pool": path_fingerprint(c.pool), "pool_limit": c.pool_limit,
                       "target": path_fingerprint(c.target), "target_task": c.target_task,
                       "target_limit": c.target_limit,
                       "eval": path_fingerprint(c.eval), "eval_limit": c.eval_limit,
                       "max_length": c.max_length, "tokenizer": model_fp}
        data_info = self.stage("data", data_inputs, self._data)
        d = self.out / "data"
        pool, targets, evals = (load_examples(d / f"{n}.npz") for n in ("pool", "targets", "eval"))
        pad = int(data_info["pad_id"])
        k = self.k(len(pool))

        # 2. warm-up
        if c.warmup is None:
            log.info("stage warmup: skipped (no warm-up recipe: selection uses the plain GD update model, "
                     "eta = gd_lr = %g)", c.gd_lr)
            self.status["warmup"], self.seconds["warmup"], self.fps["warmup"] = "skipped", 0.0, None
            warm_info = None
        else:
            w = c.warmup
            inputs = {"data": self.fps["data"], "model": model_fp, "dtype": c.dtype, "remat": c.remat,
                      "recipe": dataclasses.asdict(w), "batch_size": w.batch_size or c.batch_size, "seed": c.seed}
            # resumable: the same warm-up cut short continues from its checkpoints (stages.warm_up)
            warm_info = self.stage("warmup", inputs, lambda sd, resume: self._warmup(sd, pool, data_info),
                                   resumable=True)

        # 3. selection: every selection key but chunk_rows (stores of each chunk size live apart)
        sel_keys = [f.name for f in dataclasses.fields(c) if f.metadata.get("same_as", (None,))[0] in
                    (SelectConfig, EmbedConfig) and f.name not in ("gd_lr", "chunk_rows")]
        inputs = {"data": self.fps["data"], "warmup": self.fps["warmup"], "model": model_fp, "dtype": c.dtype,
                  "k": k, "gd_lr": c.gd_lr if c.warmup is None else None, "remat": c.remat,
                  **{key: getattr(c, key) for key in sel_keys}}
        sel_info = self.stage("select", inputs, lambda sd: self._select(sd, pool, targets, k))

        # 4. fine-tuning on the selection
        t = c.train
        inputs = {"select": self.fps["select"], "recipe": dataclasses.asdict(t), "remat": c.remat,
                  "batch_size": t.batch_size or c.batch_size, "seed": c.seed}
        train_info = self.stage("train", inputs, lambda sd, resume: self._train(sd, resume, pool, pad),
                                resumable=True)

        # 5. evaluation before / after
        from idjax.io import fingerprint

        before_fp = fingerprint({"data": self.fps["data"], "warmup": self.fps["warmup"], "model": model_fp,
                                 "dtype": c.dtype, "batch_size": c.batch_size})
        previous = _read_json(self.out / "eval" / "eval.json")
        inputs = {"train": self.fps["train"], "before": before_fp}
        eval_info = self.stage("eval", inputs, lambda sd: self._eval(sd, evals, pad, before_fp, previous))

        summary = {
            "out": str(self.out), "stages": dict(self.status),
            "pool": len(pool), "targets": len(targets), "k": k, "selected": sel_info["selected"],
            "warmup_steps": None if warm_info is None else warm_info["steps"],
            "train_steps": train_info["steps"],
            "eval": {"samples": eval_info["after"]["samples"], "source": data_info["eval"]["source"],
                     "before": eval_info["before"]["loss"], "after": eval_info["after"]["loss"],
                     "delta": eval_info["delta"]},
            "files": {"selection": str(self.out / "select" / "selection.jsonl"),
                      "meta": str(self.out / "select" / "selection.meta.json"),
                      "model": str(self.out / "train" / "model"), "eval": str(self.out / "eval" / "eval.json")},
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        _write_json(self.out / "run.json", {"config": c.to_dict(), "summary": summary, "stage_seconds": self.seconds})
        results = {"data": data_info, "warmup": warm_info, "select": sel_info, "train": train_info, "eval": eval_info}
        return RunResult(self.out, dict(self.status), dict(self.seconds), summary, results, dict(self.fps))

    def _resolved_model(self) -> Path:
        from idjax.models import resolve

        return resolve(self.config.model)

    def k(self, n: int) -> int:
        c = self.config
        k = c.k if isinstance(c.k, int) else max(1, round(c.k * n))
        if k > n:
            raise ConfigError(f"{self.where}key 'k': {k} is larger than the pool ({n} samples with a response token in "
                              f"{c.pool})")
        return k

    def _data(self, d: Path) -> dict:
        from idjax import stages

        c = self.config
        tok = self.tokenizer()
        sets = stages.load_sets(tok, pool=c.pool, target=c.target, target_task=c.target_task, eval=c.eval,
                                with_eval=True, max_length=c.max_length, pool_limit=c.pool_limit,
                                target_limit=c.target_limit, eval_limit=c.eval_limit)
        for name, examples in (("pool", sets.pool), ("targets", sets.targets), ("eval", sets.evals)):
            save_examples(d / f"{name}.npz", examples)
        result = {**sets.summary(), "pad_id": int(tok.pad_token_id or 0)}
        _write_json(d / "summary.json", result)
        return result

    def _warmup(self, d: Path, pool, data_info) -> dict:
        from idjax import stages, train

        c, w = self.config, self.config.warmup
        n_records = int(data_info["pool"]["records"])
        chosen = set(train.warmup_subset(n_records, w.fraction, c.seed).tolist())
        examples = [e for e in pool if e.index in chosen]  # what train.warmup_examples would tokenize
        # The trainer owns the base model (no float32 copy beside it).
        result = stages.warm_up(self.take_model(c.model), examples, self.tokenizer(), w, d, pool_size=n_records,
                                seed=c.seed, batch_size=c.batch_size, donate_model=True)
        return {"samples": len(examples), "steps": int(result.state.step),
                "losses": [round(h["loss"], 4) for h in result.history]}

    def _select(self, d: Path, pool, targets, k: int) -> dict:
        from idjax import stages

        c = self.config
        # Stores of another chunk size cannot be reopened (a chunk is the unit of resumption): one
        # directory per chunk size keeps a change of chunk_rows from failing the run.
        selection = stages.select(self.model(self.before_path()), pool, targets, c.select_config(k),
                                  store_dir=self.out / "store" / f"chunk-rows-{c.chunk_rows}",
                                  optimizer_state=self.out / "warmup" if c.warmup is not None else None,
                                  out=d / "selection.jsonl", meta={"command": "idjax run", "run": c.to_dict()})
        info = selection.info
        return {"selected": int(len(selection.rows)), "landmarks": int(info["landmarks"]),
                "update_model": info["update_model"], "timings_s": info["timings_s"], "stores": info["stores"],
                "solver": info["solver"]}

    def _train(self, d: Path, resume: bool, pool, pad: int) -> dict:
        from idjax import stages, train
        from idjax.checkpoint import resumable
        from idjax.selection_file import read_selection

        c, t = self.config, self.config.train
        rows, weights = read_selection(self.out / "select" / "selection.jsonl", [{"id": e.id} for e in pool],
                                       t.weighted)
        by_id = {e.id: e for e in pool}
        examples = [dataclasses.replace(by_id[r["id"]], index=j) for j, r in enumerate(rows)]
        config = stages.finetune_config(examples, t, seed=c.seed, batch_size=c.batch_size)
        out = d / "model"
        resume_from = resumable(out) if resume else None
        if resume_from is not None:
            log.info("stage train: resuming the interrupted fine-tuning from %s", out / "checkpoints")
        elif out.exists():
            shutil.rmtree(out)
        result = train.train(self.take_model(self.before_path()), examples, config, weights=weights, out_dir=out,
                             resume=resume_from, tokenizer=self.tokenizer(), pad_id=pad, final_checkpoint=False,
                             donate_model=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the exported model is the result
        hist = result.history
        return {"samples": len(examples), "steps": int(result.state.step), "weighted": t.weighted,
                "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
                "losses": [round(h["loss"], 4) for h in hist]}

    def _eval(self, d: Path, evals, pad: int, before_fp: str, previous) -> dict:
        from idjax import evaluate

        c = self.config
        if previous and previous.get("before_fingerprint") == before_fp and "before" in previous:
            log.info("stage eval: the model before fine-tuning is unchanged; its loss is reused")
            before = previous["before"]
        else:
            before = evaluate.target_loss(self.model(self.before_path()), evals, batch_size=c.batch_size, pad_id=pad)
        after = evaluate.target_loss(self.model(self.out / "train" / "model"), evals, batch_size=c.batch_size,
                                     pad_id=pad)
        result = {"before": before, "after": after, "delta": after["loss"] - before["loss"],
                  "before_fingerprint": before_fp}
        _write_json(d / "eval.json", result)
        return result


def run(config: RunConfig, *, force: Iterable[str] = (), source=None) -> RunResult:
    """Run (or resume, or reuse) every stage of `config`; see the module docstring.

    force: stage names (or "all") to recompute even when cached; everything downstream follows.
    source: the config file, named in errors about its keys that show only once data is read (k).
    """
    return _Runner(config, force, source).run()
