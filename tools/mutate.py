"""A mutation check: seed one plausible bug at a time into a scratch copy of the repository and run the tests that
should catch it.

    python tools/mutate.py --list                  # the mutations, with the tests each one names
    python tools/mutate.py                         # all of them, one after another (42 took 8 minutes on two cores)
    python tools/mutate.py --only NAME [NAME ...]  # some of them
    python tools/mutate.py --check                 # every named test id collects (pytest --collect-only); no mutation

Each `Mutation` (listed in `tools/mutations.py`) is an exact source edit (`old` occurs once in `file`, `new`
replaces it) and the pytest node ids that must fail on it. The repository is copied once to a temporary directory
(the working tree as it is, uncommitted edits included); each mutation is applied there, its tests run with
`PYTHONPATH` pointing at the copy (so the editable install's `opd` is not the one imported), and the file is put
back. A mutation is *caught* when its tests fail (pytest exit status 1, or 2: an error while collecting), *not
caught* when they pass; a run past `--timeout` counts as caught and is reported as a timeout. The source tree itself
is never touched.

Why not mutmut: it generates operator-level mutants over whole modules and runs the suite against each. What we
want to keep is a short, reviewed list of bugs that matter here (a flag wired to the wrong divergence, a resume that
drops an RNG), each against the few tests that are meant to catch it, runnable in minutes on two cores.
`tests/test_mutate.py` keeps the list from rotting: every `old` string still occurs exactly once, the edit still
compiles, and every named test still exists.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python tools/mutate.py`: the repository root, for `tools.mutations`
    sys.path.insert(0, str(ROOT))
from tools.mutations import MUTATIONS, Mutation  # noqa: E402


def by_name(names: list[str] | None) -> list[Mutation]:
    """The mutations named (all of them for None), in list order; unknown names are an error."""
    if not names:
        return list(MUTATIONS)
    known = {m.name for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(unknown)}; `python tools/mutate.py --list` lists them")
    return [m for m in MUTATIONS if m.name in names]


def mutated_source(m: Mutation, root: Path = ROOT) -> tuple[str, str]:
    """(the file's text, the text with the mutation applied); ValueError unless `old` occurs exactly once."""
    path = (root / m.file).resolve()
    if not path.is_relative_to(root.resolve()):  # an absolute or ../ path would edit a file outside the copy
        raise ValueError(f"{m.name}: {m.file} is not a path inside the repository")
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"{m.name}: the old text occurs {count} times in {m.file} (expected once); update the mutation")
    return text, text.replace(m.old, m.new)


IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
                                 "runs", "build", "dist", ".studio", ".cache")


def scratch_copy(dest: Path) -> Path:
    """The working tree (uncommitted edits included, no .git, virtualenv or caches) copied to `dest/repo`."""
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORED, symlinks=True)
    return repo


def scratch_env(repo: Path) -> dict:
    """The environment the tests run in: the copy's `opd` first on the path, no bytecode written (a restored file
    must never meet a stale .pyc of its mutated version)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(repo: Path, env: dict) -> None:
    """Stop unless `import opd` in the copy imports the copy's package (and not the editable install's)."""
    found = subprocess.run([sys.executable, "-c", "import opd; print(opd.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"the scratch copy imports opd from {found}, not from {repo}; nothing would be tested")


def run_tests(repo: Path, env: dict, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """Run `tests` in `repo`, stopping at the first failure: (outcome, detail, seconds). Outcome is 'caught',
    'not caught', 'timeout' or 'error' (pytest could not run them: a test id that does not exist, ...)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, so a timeout ends its children too
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", f"still running after {timeout:.0f} s", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return "not caught", "every named test passed", seconds
    if proc.returncode in (1, 2):
        failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.MULTILINE)
        return "caught", failed[0] if failed else out.strip().splitlines()[-1], seconds
    tail = " | ".join(out.strip().splitlines()[-3:])
    return "error", f"pytest exit status {proc.returncode}: {tail}", seconds


def run(mutations: list[Mutation], timeout: float, keep: bool) -> dict[str, str]:
    """Apply each mutation to one scratch copy in turn, run its tests, restore the file; print and return outcomes."""
    tmp = Path(tempfile.mkdtemp(prefix="opd-mutate-"))
    results: dict[str, str] = {}
    try:
        repo = scratch_copy(tmp)
        env = scratch_env(repo)
        check_imports_from(repo, env)
        print(f"scratch copy: {repo}", flush=True)
        width = max(len(m.name) for m in mutations)
        for i, m in enumerate(mutations, 1):
            try:
                original, mutated = mutated_source(m, repo)
            except ValueError as e:
                results[m.name] = "stale"
                print(f"[{i:2}/{len(mutations)}] {m.name:<{width}}  stale: {e}", flush=True)
                continue
            path = (repo / m.file).resolve()  # inside the copy: mutated_source checked it
            path.write_text(mutated)
            try:
                outcome, detail, seconds = run_tests(repo, env, m.tests, timeout)
            finally:
                path.write_text(original)
            results[m.name] = outcome
            print(f"[{i:2}/{len(mutations)}] {m.name:<{width}}  {outcome:<10} {seconds:6.0f} s  {detail}", flush=True)
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    caught = sum(r in ("caught", "timeout") for r in results.values())
    print(f"\ncaught {caught} of {len(results)}")
    for outcome in ("not caught", "error", "stale"):
        names = [n for n, r in results.items() if r == outcome]
        if names:
            print(f"{outcome}: {', '.join(names)}")
    return results


def check_test_ids(mutations: list[Mutation]) -> int:
    """pytest --collect-only over every named test id of `mutations` (in the repository itself); its exit status."""
    ids = sorted({t for m in mutations for t in m.tests})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(line for line in lines if "not found" in line or "ERROR" in line) or lines[-1])
    print(f"{len(ids)} test ids: {'all collect' if proc.returncode == 0 else 'some do not collect'}")
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--check", action="store_true", help="check that every named test id collects, run nothing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)
    mutations = by_name(args.only)
    if args.list:
        for m in mutations:
            print(f"{m.name}  ({m.file})\n    {m.why}")
            for t in m.tests:
                print(f"    - {t}")
        return 0
    if args.check:
        return check_test_ids(mutations)
    results = run(mutations, args.timeout, args.keep)
    return 0 if all(r in ("caught", "timeout") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
