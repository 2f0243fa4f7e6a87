"""The data version a dispatched training step reads: DVC's md5 of `data/shards`, pushed and pulled by hash.

A step dispatched to a worker on another machine must train on exactly the shards the DVC stage
that dispatched it sees. The stage sends DVC's md5 of the directory (the value `dvc.lock` records,
e.g. "ab12...dir") as a flow parameter and pushes that version's objects to the project's default
DVC remote; the worker hashes its own copy and, when it differs, pulls that md5's objects from the
remote and checks them out, or fails naming both versions. It never trains on other data.

These go through DVC's data-cloud API (`Repo.cloud.push/pull`), not `dvc push`/`dvc pull`: a
stage runs while `dvc repro` holds the repository lock, which the CLI commands would wait on.
"""

from __future__ import annotations

from pathlib import Path

STATUS_PREFIX = "[data]"


class DataVersionError(RuntimeError):
    """The worker cannot get the requested version of the training data."""


def _repo(project_dir: Path):
    from dvc.repo import Repo

    try:
        return Repo(str(project_dir))
    except Exception as exc:  # NotDvcRepoError and friends
        raise DataVersionError(f"{project_dir}: not a DVC project ({exc})") from exc


def dvc_root_of(path: Path) -> Path:
    """The DVC project that holds `path` (the nearest parent with a .dvc directory)."""
    from dvc.repo import Repo

    start = Path(path).resolve()
    while not start.is_dir():  # a worker may not have the directory (or its parent) yet
        start = start.parent
    try:
        return Path(Repo.find_root(str(start)))
    except Exception as exc:
        raise DataVersionError(f"{path}: not inside a DVC project ({exc})") from exc


def _abs(path: Path) -> str:
    return str(Path(path).resolve())  # DVC's local fs resolves relative paths against the cwd, not the repo


def local_md5(path: Path, project_dir: Path) -> str | None:
    """DVC's md5 of directory `path` as it is on disk now (the value dvc.lock would record), or None if absent.

    Uses DVC's hashing and its state cache, so a directory hashed before costs a stat per file.
    """
    from dvc_data.hashfile.build import build

    if not Path(path).is_dir():
        return None
    repo = _repo(project_dir)  # hashing needs no repository lock, so this works inside `dvc repro`
    _, _, obj = build(repo.cache.local, _abs(path), repo.fs, "md5", dry_run=True, ignore=repo.dvcignore)
    return obj.hash_info.value


def _objects(repo, md5: str) -> list:
    """The .dir object of `md5` and every file object it lists (all must be in the local cache)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree.load(repo.cache.local, HashInfo("md5", md5))
    return [HashInfo("md5", md5)] + [oid for _, _, oid in tree]


def default_remote(project_dir: Path) -> str | None:
    """Name of the project's default DVC remote, or None when none is configured."""
    return _remote_of(_repo(project_dir))


def _remote_of(repo) -> str | None:
    return repo.config.get("core", {}).get("remote")


def push_version(path: Path, md5: str, project_dir: Path) -> int:
    """Upload version `md5` of `path` (from the local DVC cache) to the default remote; returns objects sent.

    Raises DataVersionError when no remote is configured or the version is not in the cache.
    """
    repo = _repo(project_dir)
    if not _remote_of(repo):
        raise DataVersionError(f"{project_dir}: no default DVC remote (dvc remote add -d NAME URL) to push {path} to")
    try:
        objs = _objects(repo, md5)
    except Exception as exc:
        raise DataVersionError(f"{path}: version {md5} is not in the DVC cache of {project_dir} ({exc})") from exc
    result = repo.cloud.push(objs)
    if result.failed:
        raise DataVersionError(f"{path}: pushing {md5} failed for {len(result.failed)} objects")
    return len(result.transferred)


def pull_version(path: Path, md5: str, project_dir: Path) -> None:
    """Fetch version `md5` from the default remote into the DVC cache and check it out at `path`."""
    from dvc_data.hashfile.checkout import checkout
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    repo = _repo(project_dir)
    remote = _remote_of(repo)
    if not remote:
        raise DataVersionError(f"{project_dir}: no default DVC remote to pull {path} version {md5} from")
    try:
        repo.cloud.pull([HashInfo("md5", md5)])
        tree = Tree.load(repo.cache.local, HashInfo("md5", md5))
        result = repo.cloud.pull([oid for _, _, oid in tree])
    except Exception as exc:
        raise DataVersionError(f"{path}: version {md5} is not on DVC remote {remote!r} ({exc}); "
                               "run the data stages and push them (dvc push) from the project that has it") from exc
    if result.failed:
        raise DataVersionError(f"{path}: {len(result.failed)} objects of {md5} missing on DVC remote {remote!r}")
    checkout(_abs(path), repo.fs, tree, repo.cache.local, relink=True, force=True)


def ensure_version(path: Path, md5: str, project_dir: Path, log=print) -> str:
    """Make `path` hold DVC version `md5`: as it is, or pulled from the default remote. Returns how.

    Raises DataVersionError (naming both versions) when it cannot; training never starts on other data.
    """
    have = local_md5(path, project_dir)
    if have == md5:
        log(f"{STATUS_PREFIX} {path}: version {md5} present")
        return "present"
    log(f"{STATUS_PREFIX} {path}: have {have or 'nothing'}, need {md5}: pulling from the DVC remote")
    try:
        pull_version(path, md5, project_dir)
    except DataVersionError as exc:
        raise DataVersionError(f"{path} on this worker is version {have or '(missing)'}, the step needs {md5}: {exc}") from exc
    have = local_md5(path, project_dir)
    if have != md5:
        raise DataVersionError(f"{path}: after pulling, version {have} is not the requested {md5}")
    log(f"{STATUS_PREFIX} {path}: version {md5} pulled")
    return "pulled"
