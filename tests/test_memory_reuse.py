"""``blip_apps.memory.keep_freed_memory``: a block freed by one call is reused by the next without new
page faults (glibc), measured in fresh processes so the settings of one do not reach another."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from blip_apps.memory import keep_freed_memory
on = keep_freed_memory() if sys.argv[2] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(3):          # one "call": a 64 MB intermediate written, then freed
    before = faults()
    a = np.empty(64 << 20, np.uint8); a.fill(1); del a
    counts.append(faults() - before)
print(json.dumps({"on": on, "faults": counts}))
"""


def _run(mode, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD, ROOT, mode], capture_output=True, text=True, env=e,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_freed_blocks_are_reused_without_new_faults():
    plain = _run("plain")
    kept = _run("keep")
    assert kept["on"] is True
    # Without the settings every call takes its 64 MB as new pages (4 KB or, numpy asking for them,
    # transparent huge pages: hundreds to thousands of faults); with them only the first call does.
    first = plain["faults"][0]
    assert first > 100 and all(n > first // 2 for n in plain["faults"]), plain
    assert kept["faults"][0] > 100 and all(n < kept["faults"][0] // 20 for n in kept["faults"][1:]), kept


def test_switch_and_environment_are_respected():
    assert _run("keep", BLIP_KEEP_FREED_MEMORY="0")["on"] is False
    assert _run("keep", MALLOC_TRIM_THRESHOLD_="1000000")["on"] is True   # the user's own settings, left alone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
@pytest.mark.parametrize("threshold", [1 << 20, 32 << 20])
def test_a_users_mmap_threshold_alone_is_left_alone(threshold):
    """``MALLOC_MMAP_THRESHOLD_`` alone in the environment, below the 64 MB block: the user's setting stands
    (keep_freed_memory reports it in effect and does not replace it), so glibc maps each block afresh and
    every call takes its pages anew, as without any settings."""
    kept = _run("keep", MALLOC_MMAP_THRESHOLD_=str(threshold))
    assert kept["on"] is True
    first = kept["faults"][0]
    assert first > 100 and all(n > first // 2 for n in kept["faults"]), kept
