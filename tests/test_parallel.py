"""tests/parallel.py (`make test`: the suite as two pytest processes at once) and the --shard
option it gives each (tests/conftest.py, tests/helpers.shard_files)."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FILE_SECONDS, shard_files

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_goes_to_exactly_one_part_and_the_parts_are_balanced():
    files = sorted(f"tests/{name}" for name in FILE_SECONDS) + ["tests/test_new.py"]
    counts = {f: 10 for f in files}  # test_new.py, not measured: 0.3 s a test
    parts = shard_files(files, counts, 2)
    assert sorted(parts[0] + parts[1]) == sorted(files) and not set(parts[0]) & set(parts[1])
    loads = [sum(FILE_SECONDS.get(Path(f).name, 3.0) for f in part) for part in parts]
    assert abs(loads[0] - loads[1]) <= max(FILE_SECONDS.values())  # within the largest file
    assert shard_files(files, counts, 2) == parts  # the same split in every process
    assert shard_files(files[:1], counts, 3) == [files[:1], [], []]


@pytest.mark.slow  # starts pytest processes
def test_the_parts_run_apart_and_their_exit_status_is_the_suites():
    def parallel(*pytest_args):
        return subprocess.run([sys.executable, str(ROOT / "tests" / "parallel.py"), "--processes", "2", "--",
                               *pytest_args], cwd=ROOT, capture_output=True, text=True, timeout=300)

    both = parallel("tests/test_environment.py", "tests/test_box_coder.py", "-q")
    assert both.returncode == 0, both.stdout[-2000:]
    first, second = both.stdout.split("======== part 2 of 2")
    assert "part 1 of 2: exit status 0" in first and "(exit status 0)" in second
    assert " passed" in first and " passed" in second  # each part ran one of the files
    assert both.stdout.strip().splitlines()[-1].startswith("2 parts in ") and "all passed" in both.stdout
    one_file = parallel("tests/test_environment.py", "-q")  # a part left without tests is no failure
    assert one_file.returncode == 0 and "(exit status 5)" in one_file.stdout, one_file.stdout[-2000:]
    bad = parallel("tests/test_environment.py", "--no-such-option")
    assert bad.returncode == 4 and "part 1 exit status 4" in bad.stdout.splitlines()[-1], bad.stdout[-2000:]
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(ROOT / "tests" / "parallel.py"), "--processes", "0"], check=True,
                       capture_output=True)
