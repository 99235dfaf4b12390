"""The run cache: finished training runs as JSON files, reused when the same run is asked for again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import git_sha, relative_path
from benchmarks.finetune.model import LORA_ALPHA, LORA_R, LORA_TARGETS


class RunBudgetExhausted(SystemExit):
    """``--max-new-runs`` new runs were done and cached; rerun the same command to continue."""


class MixedCommitsError(SystemExit):
    """The cache would mix runs of different commits (or of an uncommitted tree) into one result."""


@dataclasses.dataclass
class _Ledger:
    """What the caches of one invocation share: the new-run budget, the counts, the commits seen."""

    max_new: int | None
    allow_mixed: bool
    sha: str
    new: int = 0
    hits: int = 0
    commits: dict[str, int] = dataclasses.field(default_factory=dict)
    memo: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def count(self, sha: str) -> None:
        self.commits[sha] = self.commits.get(sha, 0) + 1


class RunCache:
    """Finished training runs as JSON files, so a comparison that takes longer than one sitting
    (``--full`` is hours on a 2-core CPU) is resumed by rerunning the same command.

    A run is keyed by everything that determines it: the protocol (dataset, steps, batch, max_len,
    evaluation, head lr, model, LoRA settings, initial adapter) and the optimizer, lr, seed and
    gauge. The file also records the git commit and date that produced it. A published result must
    be reproducible by one command at one commit, so unless ``allow_mixed`` the cache refuses a run
    cached at another commit than ``sha`` (this checkout's, by default) and refuses to cache runs
    of an uncommitted tree; with ``allow_mixed`` it goes on and :attr:`single_clean_commit` flags
    the result. ``directory=None``: nothing is written. Either way a run asked for twice in one
    invocation (the gauge sweep's ``s = 1`` runs are the table's) is computed once.
    """

    PROTOCOL_KEYS = ("dataset", "steps", "batch", "max_len", "eval_every", "eval_cap", "head_lr", "model")

    def __init__(
        self,
        directory: str | Path | None,
        cfg: dict[str, Any],
        max_new: int | None = None,
        allow_mixed: bool = False,
        sha: str | None = None,
    ) -> None:
        self.dir = Path(directory) if directory else None
        self.protocol = {k: cfg[k] for k in self.PROTOCOL_KEYS}
        self.protocol.update(lora_r=LORA_R, lora_alpha=LORA_ALPHA, targets=list(LORA_TARGETS))
        # the runs cached before --init existed all started from "random": their keys stay valid
        if cfg.get("init", "random") != "random":
            self.protocol["init"] = cfg["init"]
        self.ledger = _Ledger(max_new, allow_mixed, sha if sha is not None else git_sha())
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def with_protocol(self, cfg: dict[str, Any]) -> RunCache:
        """A cache of runs of another protocol in the same directory, sharing budget, counts and commit policy."""
        other = RunCache(self.dir, cfg)
        other.ledger = self.ledger
        return other

    hits = property(lambda self: self.ledger.hits)
    new = property(lambda self: self.ledger.new)
    commits = property(lambda self: self.ledger.commits)

    @property
    def single_clean_commit(self) -> bool:
        """Whether every run came from one commit without uncommitted changes."""
        shas = set(self.ledger.commits) or {self.ledger.sha}
        return len(shas) == 1 and not next(iter(shas)).endswith("+dirty")

    def _key(self, name: str, lr: float, seed: int, gauge_s: float) -> str:
        return json.dumps(dict(self.protocol, name=name, lr=lr, seed=seed, gauge_s=gauge_s), sort_keys=True)

    def _path(self, name: str, lr: float, seed: int, gauge_s: float) -> Path:
        digest = hashlib.sha1(self._key(name, lr, seed, gauge_s).encode()).hexdigest()[:12]
        return self.dir / f"{name}-lr{lr:g}-seed{seed}-gauge{gauge_s:g}-{digest}.json"

    def run(self, name: str, lr: float, seed: int, gauge_s: float, compute: Callable[[], dict]) -> dict[str, Any]:
        """The run from this invocation or the cache, or ``compute()`` (then cached)."""
        led, key = self.ledger, self._key(name, lr, seed, gauge_s)
        if key in led.memo:
            return led.memo[key]
        if self.dir is not None and self._path(name, lr, seed, gauge_s).exists():
            led.memo[key] = self._load(self._path(name, lr, seed, gauge_s))
            return led.memo[key]
        if self.dir is not None:
            self._check_new_run()
        led.memo[key] = res = compute()
        led.new += 1
        led.count(led.sha)
        if self.dir is not None:
            self._store(self._path(name, lr, seed, gauge_s), dict(name=name, lr=lr, seed=seed, gauge_s=gauge_s), res)
        return res

    def _load(self, path: Path) -> dict[str, Any]:
        entry = json.loads(path.read_text())
        sha = entry["git_sha"]
        if sha != self.ledger.sha and not self.ledger.allow_mixed:
            raise MixedCommitsError(
                f"finetune: {relative_path(path)} was made at commit {sha}, this checkout is {self.ledger.sha}: "
                "a published result must come from one commit. Use a fresh --cache directory (or delete the "
                "runs of other commits), or pass --allow-mixed-commits to assemble anyway (the result is flagged)."
            )
        self.ledger.hits += 1
        self.ledger.count(sha)
        return entry["run"]

    def _check_new_run(self) -> None:
        led = self.ledger
        if led.sha.endswith("+dirty") and not led.allow_mixed:
            raise MixedCommitsError(
                "finetune: this checkout has uncommitted changes, and a cached run of it could not be reproduced: "
                "commit first, or pass --allow-mixed-commits (the result is flagged)."
            )
        if led.max_new is not None and led.new >= led.max_new:
            print(
                f"finetune: {led.new} new run(s) cached in {relative_path(self.dir)} (--max-new-runs); rerun the "
                "same command to continue",
                file=sys.stderr,
            )
            raise RunBudgetExhausted(3)

    def _store(self, path: Path, what: dict[str, Any], res: dict[str, Any]) -> None:
        entry = {
            "protocol": self.protocol,
            **what,
            "git_sha": self.ledger.sha,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": res,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, allow_nan=True))
        tmp.replace(path)  # a run is cached whole or not at all

    def summary(self) -> dict[str, Any] | None:
        """What the result records about its runs (None without a cache directory)."""
        if self.dir is None:
            return None
        led = self.ledger
        return {
            "directory": relative_path(self.dir),
            "reused_runs": led.hits,
            "new_runs": led.new,
            "runs_by_commit": led.commits,
            "single_clean_commit": self.single_clean_commit,
        }
