"""Undo what lisa_dist.versions remembers per process, so each test sees a fresh one. Reads its
private sets (`_warned`: libraries already warned about; `_probed`: probes that passed)."""
from lisa_dist import versions


def forget_version_checks() -> None:
    """Forget which warnings were given and which probes passed (a new process starts this way)."""
    versions._warned.clear()
    versions._probed.clear()
