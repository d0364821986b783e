"""The agent compiles BPF C as root: it refuses source that others could have changed."""
import os
import shutil

import pytest

from otel_ebpf.bpf import BpfError, check_source_safe, probes_dir


def test_shipped_probes_are_accepted():
    check_source_safe(os.path.join(probes_dir(), "postgres.c"))


@pytest.mark.parametrize("file_mode, dir_mode", [(0o666, 0o755), (0o644, 0o777), (0o620, 0o755)])
def test_writable_by_others_is_refused(tmp_path, file_mode, dir_mode):
    directory = tmp_path / "probes"
    directory.mkdir()
    c_file = directory / "postgres.c"
    shutil.copy(os.path.join(probes_dir(), "postgres.c"), c_file)
    os.chmod(c_file, file_mode)
    os.chmod(directory, dir_mode)
    with pytest.raises(BpfError, match="writable by group/others"):
        check_source_safe(str(c_file))
