"""Two copies of a job on one output: the second refuses to start (it would destroy the first's work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from workloads.jobs import hold_exclusive


def test_a_second_holder_of_an_output_is_refused(tmp_path: Path) -> None:
    assert hold_exclusive(tmp_path) is True
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from workloads.jobs import hold_exclusive; "
                            "sys.exit(0 if hold_exclusive(Path(sys.argv[1])) else 3)", str(tmp_path)],
                           check=False, timeout=60)
    assert other.returncode == 3


def test_the_lock_is_free_again_once_its_holder_is_gone(tmp_path: Path) -> None:
    holder = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from workloads.jobs import hold_exclusive; "
                             "sys.exit(0 if hold_exclusive(Path(sys.argv[1])) else 3)", str(tmp_path)],
                            check=False, timeout=60)
    assert holder.returncode == 0
    again = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from workloads.jobs import hold_exclusive; "
                            "sys.exit(0 if hold_exclusive(Path(sys.argv[1])) else 3)", str(tmp_path)],
                           check=False, timeout=60)
    assert again.returncode == 0
