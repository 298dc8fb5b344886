"""The launcher's variables in the environment, read without torch (the tools check them before
torch is imported)."""
from __future__ import annotations

import os
from typing import Optional

# what torchrun sets for each process, beside WORLD_SIZE
PROCESS_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_problem() -> Optional[str]:
    """Why the environment does not describe a process group although WORLD_SIZE says several
    processes (variables a job script exported, or a launcher's left in a shell), else None:
    torch's own error was a traceback ("environment variable RANK expected, but not set"), and a
    one-process tool said "torchrun started 2" when no torchrun ran."""
    world = os.environ.get("WORLD_SIZE", "")
    if not world.strip().isdigit() or (int(world) <= 1 and not os.environ.get("MASTER_ADDR")):
        return None  # one process, and nothing names a group to join
    missing = [name for name in PROCESS_VARIABLES if not os.environ.get(name)]
    if not missing:
        return None
    return (f"the environment sets WORLD_SIZE={world} but not {', '.join(missing)}: torchrun sets them all for each "
            f"of its processes, so these look left over (a job script's export, another launcher's shell): start "
            f"with torchrun, or unset WORLD_SIZE to run in one process")
