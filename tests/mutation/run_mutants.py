"""Run the planted bugs of tests/mutation/mutants.py one at a time and print which are caught.

    python tests/mutation/run_mutants.py               # every mutant
    python tests/mutation/run_mutants.py tf jax        # those whose name contains one of the words

Each mutant patches a fresh temporary copy of the tree (tracked and untracked, non-ignored files),
runs its test selection there with the interpreter running this script, and counts failed tests.
Exit status 0 when every mutant selected is caught (at least its ``min_failures`` tests fail).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mutants import MUTANTS, Mutant  # noqa: E402


def copy_tree(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def run(m: Mutant) -> tuple:
    """``(failed, passed, seconds, pytest's last line)`` of the mutant's tests on a patched copy."""
    tmp = tempfile.mkdtemp(prefix="blip-mutant-")
    try:
        copy_tree(tmp)
        target = os.path.join(tmp, m.path)
        text = open(target).read()
        if text.count(m.old) != 1:
            raise ValueError(f"{m.name}: the snippet occurs {text.count(m.old)} times in {m.path}")
        open(target, "w").write(text.replace(m.old, m.new))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *m.tests]
        if m.select:
            cmd += ["-k", m.select]
        env = dict(os.environ, PYTHONPATH=tmp)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        count = {k: int(n) for n, k in re.findall(r"(\d+) (failed|passed|error)", last)}
        return count.get("failed", 0) + count.get("error", 0), count.get("passed", 0), time.time() - t0, last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(words) -> int:
    chosen = [m for m in MUTANTS if not words or any(w in m.name for w in words)]
    missed = []
    for m in chosen:
        failed, passed, seconds, last = run(m)
        caught = failed >= m.min_failures
        print(f"{'CAUGHT' if caught else 'MISSED'}  {m.name}: {failed} failed, {passed} passed "
              f"(needs {m.min_failures}; {seconds:.0f} s) | {last}", flush=True)
        if not caught:
            missed.append(m.name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutants caught" + (": missed " + "; ".join(missed) if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
