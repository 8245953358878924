"""Fetch scaling: the fetch step for a new commit on a warm mirror, 10 commits against 5,000.

Baseline: a repository of 10 commits. Candidate: one of 5,000 commits whose history also holds
large files (added, then deleted). Both mirrors are warm (fetched once before timing); each
sample pushes one new commit to the source and times `resolve_commit` (what the
fetch_repo_commit task runs: fetch, resolve, changed files, ancestry).
Target: large / small <= 1.5.

    .venv/bin/python benchmarks/fetch_scaling.py [--repeats 9] [--commits 5000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from _common import bench_dir, median, print_header, spread


def build_repo(path: Path, commits: int, large_files: int) -> Path:
    """A repository of `commits` commits (made with git fast-import), with large files in history."""
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "--quiet", "--initial-branch=main"], cwd=path, check=True)
    lines: list[bytes] = []
    stamp = 1_700_000_000
    for number in range(1, commits + 1):
        message = f"commit {number}".encode()
        lines.append(b"commit refs/heads/main")
        lines.append(f"committer Bench <bench@example.com> {stamp + number} +0000".encode())
        lines.append(b"data %d" % len(message))
        lines.append(message)
        content = f"random_seed: {number}\nmodel: gpt2\n".encode()
        lines.append(b"M 100644 inline textgen.yaml")
        lines.append(b"data %d" % len(content))
        lines.append(content)
        note = f"note {number}\n".encode() * 20
        lines.append(f"M 100644 inline notes/{number % 200}.txt".encode())
        lines.append(b"data %d" % len(note))
        lines.append(note)
        if large_files and number % max(1, commits // large_files) == 0:
            blob = os.urandom(16 * 1024 * 1024)  # 16 MiB, incompressible
            lines.append(b"M 100644 inline data/large.bin")
            lines.append(b"data %d" % len(blob))
            lines.append(blob)
        if large_files and number % max(1, commits // large_files) == 1 and number > 1:
            lines.append(b"D data/large.bin")
        lines.append(b"")
    subprocess.run(
        ["git", "fast-import", "--quiet"], cwd=path, input=b"\n".join(lines) + b"\n", check=True
    )
    subprocess.run(["git", "checkout", "--quiet", "main"], cwd=path, check=True)
    subprocess.run(["git", "config", "user.email", "bench@example.com"], cwd=path, check=True)
    subprocess.run(["git", "config", "user.name", "Bench"], cwd=path, check=True)
    return path


def new_commit(path: Path, number: int) -> None:
    (path / "textgen.yaml").write_text(f"random_seed: {number}\nmodel: gpt2\n")
    subprocess.run(["git", "commit", "--quiet", "-am", f"bench {number}"], cwd=path, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--commits", type=int, default=5000)
    args = parser.parse_args()
    print_header("fetch scaling: new commit on a warm mirror, large history / small history")

    root = bench_dir() / "fetch"
    shutil.rmtree(root, ignore_errors=True)  # fresh repositories and mirrors every time
    os.environ["TEXTGEN_REPO_CACHE"] = str(root / "mirrors")
    from tasks.repo import RepoLocation, resolve_commit

    small = build_repo(root / "small", 10, 0)
    large = build_repo(root / f"large-{args.commits}", args.commits, 4)
    sizes, commits = {}, {}
    for name, path in (("small", small), ("large", large)):
        out = subprocess.run(
            ["git", "count-objects", "-vH"], cwd=path, capture_output=True, text=True, check=True
        ).stdout
        sizes[name] = dict(line.split(": ") for line in out.splitlines())
        commits[name] = subprocess.run(
            ["git", "rev-list", "--count", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        resolve_commit(RepoLocation.parse(str(path)), "main", None)  # warm the mirror
    times: dict[str, list[float]] = {"small": [], "large": []}
    counter = int(time.time())
    for index in range(args.repeats):
        for name, path in (("small", small), ("large", large))[:: 1 if index % 2 == 0 else -1]:
            counter += 1
            new_commit(path, counter)
            started = time.perf_counter()
            commit = resolve_commit(RepoLocation.parse(str(path)), "main", None)
            times[name].append(time.perf_counter() - started)
            assert commit.changed_paths == ("textgen.yaml",)
    for name in ("small", "large"):
        pack = sizes[name].get("size-pack", "?")
        print(f"  {name:5} ({commits[name]} commits, objects {pack} packed): {spread(times[name])}")
    print(
        f"  ratio large / small: {median(times['large']) / median(times['small']):.3f} (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
