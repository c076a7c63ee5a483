"""The policy store: versioned Hugging Face checkpoints with sha256 manifests (DESIGN.md).

Writers stage a version in `tmp/`, hash every file into `manifest.json`, rename the
directory into `versions/` and then replace `LATEST` with os.replace, so a reader sees
either the old state or the new one, never half a version. Readers verify hashes before
loading; a version that does not verify is refused.

A version is either full weights or a LoRA adapter over a full version (its base). An
adapter's manifest names the base version and the sha256 of the base's own manifest, so
verifying the adapter verifies the exact base it was trained on too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from rlhf_loop.core.contracts import Manifest, version_dirname

MANIFEST = "manifest.json"
ROLLBACKS = "ROLLBACKS.json"


class VerificationError(RuntimeError):
    """A version's files do not match its manifest (or it has none)."""


class LineageMismatch(RuntimeError):
    """The store was made from another base model than the one configured (check_source)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PolicyStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.tmp_dir = self.root / "tmp"

    def path(self, version: int) -> Path:
        return self.versions_dir / version_dirname(version)

    def versions(self) -> list[int]:
        if not self.versions_dir.exists():
            return []
        return sorted(int(p.name[1:]) for p in self.versions_dir.iterdir() if p.name.startswith("v") and p.name[1:].isdigit())

    def latest(self) -> int | None:
        try:
            return int((self.root / "LATEST").read_text().strip())
        except FileNotFoundError:
            return None

    def manifest_sha256(self, version: int) -> str:
        """The sha256 of a version's manifest.json: what an adapter's manifest names its base by."""
        return sha256_file(self.path(version) / MANIFEST)

    def manifest(self, version: int) -> Manifest:
        return Manifest.model_validate_json((self.path(version) / MANIFEST).read_text())

    def write(
        self,
        version: int,
        save: Callable[[Path], None],
        *,
        parent_version: int | None,
        metrics: dict[str, float] | None = None,
        set_latest: bool = True,
        base_version: int | None = None,
        source: str | None = None,
    ) -> Manifest:
        """Stage with `save(dir)`, hash, rename into place, then (optionally) move LATEST.

        `base_version`: the version is an adapter over that full version (which must exist).
        `source`: (version 0) the model it was copied from, which `check_source` holds later starts to.
        """
        final = self.path(version)
        if final.exists():
            raise FileExistsError(f"policy version {version} already exists at {final}")
        base_sha256 = None
        if base_version is not None:
            if self.manifest(base_version).base_version is not None:
                raise ValueError(f"version {base_version} is an adapter itself; an adapter's base must be full weights")
            base_sha256 = self.manifest_sha256(base_version)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        stage = self.tmp_dir / f"{version_dirname(version)}.{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            save(stage)
            pickles = [p.name for p in stage.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
            if pickles:
                raise ValueError(f"refusing to store pickled files {pickles}; save safetensors only")
            files = {p.name: sha256_file(p) for p in sorted(stage.iterdir()) if p.is_file()}
            manifest = Manifest(
                version=version, parent_version=parent_version, files=files,
                metrics=metrics or {}, created=int(time.time()), base_version=base_version, base_sha256=base_sha256,
                source=source,
            )
            (stage / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            _fsync_dir_files(stage)
            try:
                os.rename(stage, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(f"policy version {version} was written concurrently") from e
                raise
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if set_latest:
            self.set_latest(version)
        return manifest

    def source(self) -> str | None:
        """The model version 0 was made from (None: an empty store, or one older than the record)."""
        return self.manifest(0).source if (self.path(0) / MANIFEST).is_file() else None

    def check_source(self, source: str, *, new_lineage: bool) -> None:
        """Refuse to serve or train `source` from a store made from another model: its versions are that
        model's (a service would serve them under the new name, a trainer would train on the wrong base).
        With `new_lineage`, the store's versions move aside to lineages/<n>/ and the store starts empty."""
        recorded = self.source()
        if recorded is None or recorded == source:
            return
        if not new_lineage:
            raise LineageMismatch(
                f"the policy store {self.root} holds versions of {recorded}, not of {source} (RLHF_MODEL): "
                f"use another state dir (RLHF_STATE_DIR) or store (RLHF_POLICY_STORE), or set RLHF_NEW_LINEAGE=true "
                f"to move its versions aside and start {source}'s here")
        lineages = self.root / "lineages"
        lineages.mkdir(exist_ok=True)
        aside = lineages / str(len(list(lineages.iterdir())))
        aside.mkdir()
        for name in ("versions", "LATEST", ROLLBACKS):
            if (self.root / name).exists():
                os.rename(self.root / name, aside / name)

    def set_latest(self, version: int) -> None:
        if not self.path(version).is_dir():
            raise FileNotFoundError(f"no policy version {version}")
        tmp = self.root / f".LATEST.{uuid.uuid4().hex[:8]}"
        tmp.write_text(f"{version}\n")
        os.replace(tmp, self.root / "LATEST")

    def verify(self, version: int) -> Manifest:
        """Check every file against the manifest (and an adapter's base, the same way, and that it is
        the very base the adapter names); raise VerificationError on any mismatch."""
        manifest = self._verify_files(version)
        if manifest.base_version is not None:
            try:
                self._verify_files(manifest.base_version)
            except VerificationError as e:
                raise VerificationError(f"version {version}: its base {e}") from e
            if self.manifest_sha256(manifest.base_version) != manifest.base_sha256:
                raise VerificationError(f"version {version}: base version {manifest.base_version} is not the one "
                                        "it was trained on (manifest sha256 differs)")
        return manifest

    def verify_files(self, version: int) -> Manifest:
        """This version's own files against its manifest (not an adapter's base: see verify)."""
        return self._verify_files(version)

    def _verify_files(self, version: int) -> Manifest:
        vdir = self.path(version)
        if not vdir.is_dir():
            raise VerificationError(f"version {version}: not in {self.versions_dir}")
        try:
            manifest = self.manifest(version)
        except (FileNotFoundError, ValueError) as e:
            raise VerificationError(f"version {version}: unreadable manifest ({e})") from e
        present = {p.name for p in vdir.iterdir() if p.is_file() and p.name != MANIFEST}
        if present != set(manifest.files):
            raise VerificationError(f"version {version}: files {sorted(present ^ set(manifest.files))} not as in manifest")
        for name, digest in manifest.files.items():
            if sha256_file(vdir / name) != digest:
                raise VerificationError(f"version {version}: sha256 mismatch for {name}")
        return manifest

    def clean_tmp(self, older_than_s: float) -> None:
        """Remove staging leftovers of writers that died mid-write (older than `older_than_s`,
        so a writer still staging its version is left alone)."""
        if self.tmp_dir.exists():
            for p in self.tmp_dir.iterdir():
                if time.time() - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p)

    def roll_back(self, version: int, to: int, reason: str) -> None:
        """Move LATEST from `version` back to `to` and record why (ROLLBACKS.json, replaced atomically).
        Versions are immutable, so the record lives beside them, not in them."""
        record = self.rollbacks()
        record[version] = {"to": to, "reason": reason, "ts": time.time()}
        tmp = self.root / f".ROLLBACKS.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps({str(k): v for k, v in record.items()}, indent=2))
        os.replace(tmp, self.root / ROLLBACKS)
        self.set_latest(to)

    def rollbacks(self) -> dict[int, dict]:
        """version -> {"to", "reason", "ts"} for every version rolled back."""
        try:
            return {int(k): v for k, v in json.loads((self.root / ROLLBACKS).read_text()).items()}
        except FileNotFoundError:
            return {}

    def info(self) -> list[dict]:
        out = []
        rolled = self.rollbacks()
        for v in self.versions():
            try:
                m = self.manifest(v)
                out.append({"version": v, "parent_version": m.parent_version, "base_version": m.base_version,
                            "created": m.created, "metrics": m.metrics, "rolled_back": rolled.get(v)})
            except (FileNotFoundError, ValueError) as e:
                out.append({"version": v, "error": str(e)})
        return out


def _fsync_dir_files(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
